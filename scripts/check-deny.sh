#!/usr/bin/env bash
# The supply-chain checks (deny.toml): licences, banned and duplicate crates, sources; then
# security advisories when the RustSec database can be fetched (this machine may not reach
# GitHub: then that check is skipped, saying so).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=$(scripts/install-tools.sh | tail -n1)
"$bin/cargo-deny" --log-level error check licenses bans sources
echo "cargo deny: licences, bans and sources ok"
if timeout 60 "$bin/cargo-deny" --log-level error fetch db >/dev/null 2>&1; then
  "$bin/cargo-deny" --log-level error check advisories
  echo "cargo deny: advisories ok"
else
  echo "cargo deny: the RustSec advisory database is not reachable from here; advisories not checked"
fi
