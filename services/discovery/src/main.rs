//! The `merkle-discovery` binary: wiring only (see `lib.rs`).

fn main() -> std::process::ExitCode {
    merkle_shared::service::main(merkle_discovery::SERVICE_NAME, merkle_discovery::run)
}
