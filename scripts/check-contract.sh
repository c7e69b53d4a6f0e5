#!/usr/bin/env bash
# Checks the protobuf contract with the real Buf CLI: `buf lint` (STANDARD and COMMENTS rules)
# and `buf breaking` against the contract of main's previous commit, so no change can break
# existing clients unnoticed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=$(scripts/install-tools.sh | tail -n1)

"$bin/buf" lint proto
echo "buf lint: ok"

if git rev-parse --verify --quiet HEAD~1 >/dev/null \
   && git cat-file -e HEAD~1:proto/buf.yaml 2>/dev/null; then
  "$bin/buf" breaking proto --against ".git#ref=HEAD~1,subdir=proto"
  echo "buf breaking against $(git rev-parse --short HEAD~1): ok"
else
  echo "buf breaking: the previous commit has no contract to compare with; nothing to check"
fi
