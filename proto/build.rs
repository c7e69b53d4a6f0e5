//! Compiles the contract with protox (pure Rust, no system `protoc`) and generates the tonic
//! clients and servers. The encoded descriptor set, comments included, is kept for server
//! reflection so that `grpcurl describe` shows the contract's documentation.

use std::{env, fs, path::PathBuf};

const FILES: &[&str] = &[
    "merkle/common/v1/common.proto",
    "merkle/treebuilder/v1/treebuilder.proto",
    "merkle/dbsync/v1/dbsync.proto",
    "merkle/cache/v1/cache.proto",
    "merkle/scheduler/v1/scheduler.proto",
    "merkle/discovery/v1/discovery.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=merkle");
    let fds = protox::compile(FILES, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("merkle_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
