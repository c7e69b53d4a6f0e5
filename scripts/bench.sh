#!/usr/bin/env bash
# The benchmarks: builds the release binaries and runs merkle-bench (bench/src/main.rs).
#   scripts/bench.sh [--runs 5 --million]   merklectl hash and TreeBuilder beside sha256sum,
#                                           git and openssl on T1, T2 and the Rust sysroot
#   scripts/bench.sh cache                  the Cache service beside redis-benchmark and a
#                                           bare tonic echo server
#   scripts/bench.sh db-sync                DbSync beside pgbench -S and a two-hop echo
#   scripts/bench.sh scheduler [--million]  the Scheduler with 1,000 sources, its memory on a
#                                           100,000- (or 1,000,000-) file tree
#   scripts/bench.sh discovery              Discovery on 1,000 Nomad nodes (a stand-in, 2 ms per
#                                           answer): HOT list, incremental refresh vs full fetch
#   scripts/bench.sh history                signing and chaining on a changed SyncTree (signed
#                                           beside unsigned), verify-history of 100,000 records
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p merklectl -p merkle-tree-builder -p merkle-cache -p merkle-db-sync -p merkle-scheduler -p merkle-discovery -p merkle-bench
exec target/release/merkle-bench "$@"
