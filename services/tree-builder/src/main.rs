//! The `merkle-tree-builder` binary: wiring only (see `lib.rs`).

fn main() -> std::process::ExitCode {
    merkle_shared::service::main(merkle_tree_builder::SERVICE_NAME, merkle_tree_builder::run)
}
