//! The `merkle-scheduler` binary: wiring only (see `lib.rs`).

fn main() -> std::process::ExitCode {
    merkle_shared::service::main(merkle_scheduler::SERVICE_NAME, merkle_scheduler::run)
}
