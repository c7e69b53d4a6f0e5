#!/usr/bin/env bash
# Installs what the tests and the local stack need on a fresh Debian machine with Rust:
# the PostgreSQL server binaries, redis-server, openssl (the TLS tests make their certificates
# with it), Go with golang.org/x/mod (the transparency-log interop test checks our checkpoints
# and proofs with Go's sumdb/note and sumdb/tlog), chromium and chromium-driver (the console's browser tests)
# (Debian packages, when root) and the tools in .tools/bin (grpcurl, buf; see
# install-tools.sh). Idempotent: what is there is kept.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

have_postgres() {
  local dir
  dir=$(pg_config --bindir 2>/dev/null || true)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ] && return 0
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
have_redis() { command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; }

missing=()
have_postgres || missing+=(postgresql)
have_redis || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
[ -d /usr/share/gocode/src/golang.org/x/mod/sumdb/tlog ] || missing+=(golang-golang-x-mod-dev)
# The web console's tests drive a real browser over WebDriver.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

"$root/scripts/install-tools.sh" >/dev/null
