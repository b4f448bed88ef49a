#!/usr/bin/env bash
# The public API's checks: `buf lint` over protos/ and `buf breaking` against the released API
# (protos/released/influence-v1.binpb). With --release, write that image from the current protos
# instead (do this when tagging an API release; the previous image is then the baseline).
# The googleapis protos our files import are staged from the installed googleapis-common-protos
# package into a scratch copy of the tree (they are not vendored).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
buf="${BUF:-$root/tools/bin/buf}"
released="$root/protos/released/influence-v1.binpb"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

packages="$("$python" -c 'import google.api.field_behavior_pb2 as m, os; print(os.path.dirname(os.path.dirname(os.path.dirname(m.__file__))))')"
cp "$root/buf.yaml" "$work/"
mkdir -p "$work/protos/google/longrunning"
cp -r "$root/protos/influence" "$work/protos/"
cp -r "$packages/google/api" "$packages/google/rpc" "$work/protos/google/"
cp "$packages/google/longrunning/operations_proto.proto" "$work/protos/google/longrunning/operations.proto"
find "$work/protos/google" -type f ! -name '*.proto' -delete

cd "$work"
if [ "${1:-}" = "--release" ]; then
  mkdir -p "$(dirname "$released")"
  "$buf" build --exclude-source-info -o "$released"
  echo "wrote $released"
  exit 0
fi
"$buf" lint
"$buf" breaking --against "$released"
