#!/usr/bin/env bash
# The test command: every unit test and every integration test (real PostgreSQL, Redis and
# service binaries, started by the harness on free ports in temporary folders).
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh -p integration-tests`.
# Ends with one line "tests: N passed, M failed" summing every test binary.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/install-deps.sh
export GRPCURL="$root/.tools/bin/grpcurl"
# The integration tests run the service binaries; build them first, in the same profile.
cargo build --workspace --bins --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# The spec's depth limit holds in release builds too (frames and inlining differ).
if [ $# -eq 0 ]; then
  cargo test --release --locked -p merkle-core --test depth 2>&1 | tee -a "$log" || status=$?
fi
count() { grep '^test result:' "$log" | grep -Eo "[0-9]+ $1" | awk '{s+=$1} END {print s+0}'; }
passed=$(count passed)
failed=$(count failed)
echo "tests: $passed passed, $failed failed"
exit "$status"
