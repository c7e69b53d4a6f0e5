#!/usr/bin/env bash
# The benchmarks: builds the release binaries and runs merkle-bench (bench/src/main.rs).
#   scripts/bench.sh [--runs 5 --million]   merklectl hash and TreeBuilder beside sha256sum,
#                                           git and openssl on T1, T2 and the Rust sysroot
#   scripts/bench.sh cache                  the Cache service beside redis-benchmark and a
#                                           bare tonic echo server
#   scripts/bench.sh db-sync                DbSync beside pgbench -S and a two-hop echo
#   scripts/bench.sh scheduler [--million]  the Scheduler with 1,000 sources, its memory on a
#                                           100,000- (or 1,000,000-) file tree
#   scripts/bench.sh discovery [--nodes 10000] [--backend kubernetes]
#                                           Discovery on 1,000 (or 10,000) Nomad nodes (a stand-in,
#                                           2 ms per answer): HOT list, incremental refresh vs full
#                                           fetch, pages and details read, peak RSS
#   scripts/bench.sh fleet [--nodes 10000]   a fleet source built on 10,000 Nomad nodes (a
#                                           stand-in) over 4 real TreeBuilders: time, Scheduler
#                                           RSS, storage per identical node, ListBuilds paging
#   scripts/bench.sh log                    the transparency log: append rate, checkpoint lag,
#                                           proofs at 1,000,000 leaves
#   scripts/bench.sh bundle                 proof bundles: size and verify time for a file of
#                                           a 1,000,000-file tree in a 1,000,000-leaf log
#   scripts/bench.sh history                signing and chaining on a changed SyncTree (signed
#                                           beside unsigned), verify-history of 100,000 records
#   scripts/bench.sh load [--callers 200 --seconds 60]
#                                           the whole stack under concurrent callers of a mix of
#                                           real calls while builds run, beside one caller;
#                                           each service's peak RSS
#   scripts/bench.sh console [--sources 10000]
#                                           the web console's pages at 10,000 sources beside
#                                           the gRPC calls each page makes
#   scripts/bench.sh faults                 the fault campaign's long variants (five sources,
#                                           DbSync frozen 30 s): the integration suite
#                                           tests/faults.rs with FAULTS_LONG=1
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = faults ]; then
  scripts/install-deps.sh
  export GRPCURL="$PWD/.tools/bin/grpcurl"
  cargo build --workspace --bins --locked
  FAULTS_LONG=1 exec cargo test --locked -p integration-tests --test faults
fi
cargo build --release --locked -p merklectl -p merkle-tree-builder -p merkle-cache -p merkle-db-sync -p merkle-scheduler -p merkle-discovery -p merkle-bench
exec "${CARGO_TARGET_DIR:-target}/release/merkle-bench" "$@"
