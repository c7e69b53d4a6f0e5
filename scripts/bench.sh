#!/usr/bin/env bash
# The TreeBuilder benchmark: builds the release binaries and prints merklectl hash and the
# TreeBuilder service beside sha256sum, git and openssl on T1, T2 and the Rust sysroot, and
# their rebuilds after 1% of T1 changed (see bench/src/main.rs).
# Arguments go to merkle-bench, e.g. `scripts/bench.sh --runs 5 --million`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p merklectl -p merkle-tree-builder -p merkle-bench
exec target/release/merkle-bench "$@"
