//! The `merkle-cache` binary: wiring only (see `lib.rs`).

fn main() -> std::process::ExitCode {
    merkle_shared::service::main(merkle_cache::SERVICE_NAME, merkle_cache::run)
}
