#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) with everything the package,
# its tests and its demo need. Idempotent: a second run with nothing changed takes ~1 s.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${INFLUENCE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

# pip's stderr (build backends' deprecation banners, warnings about absent local index
# directories) is shown only when an install fails, without those warnings.
pip_install() {
  local log
  log="$(mktemp)"
  if ! "$venv/bin/python" -m pip install -q "$@" 2>"$log"; then
    grep -v "is ignored" "$log" >&2 || true
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up $venv (the first time: about 1.7 GB and 3 minutes; later runs: about a second)" >&2
  pip_install --upgrade pip
  # torch first and exactly pinned, so nothing later resolves a CUDA build.
  pip_install "torch==2.13.0"
  pip_install -e "$root[system,test]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
