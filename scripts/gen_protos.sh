#!/usr/bin/env bash
# Regenerate services/gen/ from protos/ (run after editing a .proto; tests/services/rpc/test_protos.py checks
# the committed code is current). protoc writes absolute `from influence.v1 import ...`
# imports; they are rewritten to the package path `services.gen.influence.v1` (and .internal.v1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/services/gen}"
python="${PYTHON:-$root/.venv/bin/python}"
common_protos="$("$python" -c 'import google.longrunning, os; print(os.path.dirname(os.path.dirname(google.longrunning.__path__[0])))')"
# googleapis-common-protos ships google/longrunning/operations.proto as operations_proto.proto,
# while its Python module registers the original name: stage it under that name for protoc.
includes="$(mktemp -d)"
trap 'rm -rf "$includes"' EXIT
mkdir -p "$includes/google/longrunning"
cp "$common_protos/google/longrunning/operations_proto.proto" "$includes/google/longrunning/operations.proto"
rm -rf "$out/influence"
mkdir -p "$out"
cd "$root/protos"
"$python" -m grpc_tools.protoc -I . -I "$includes" -I "$common_protos" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" influence/v1/*.proto influence/internal/v1/*.proto
find "$out/influence" -name '*.py*' -exec sed -i -E 's/^from influence\.(v1|internal\.v1) import/from services.gen.influence.\1 import/' {} +
touch "$out/__init__.py" "$out/influence/__init__.py" "$out/influence/v1/__init__.py" \
  "$out/influence/internal/__init__.py" "$out/influence/internal/v1/__init__.py"
