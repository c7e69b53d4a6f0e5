//! The `merkle-db-sync` binary: wiring only (see `lib.rs`).

fn main() -> std::process::ExitCode {
    merkle_shared::service::main(merkle_db_sync::SERVICE_NAME, merkle_db_sync::run)
}
