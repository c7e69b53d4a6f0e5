#!/usr/bin/env bash
# The test command: every unit test and every integration test (real PostgreSQL, Redis and
# service binaries, started by the harness on free ports in temporary folders).
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh -p integration-tests`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/install-deps.sh
export GRPCURL="$root/.tools/bin/grpcurl"
# The integration tests run the service binaries; build them first, in the same profile.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
