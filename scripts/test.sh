#!/usr/bin/env bash
# The test suite on a fresh machine: set up the venv and every server the tests need, lint, test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
for installer in "$root"/scripts/install/*.sh; do
  [ -e "$installer" ] && bash "$installer" "$root/.venv" >/dev/null
done
cd "$root"
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/python -m pytest -q --durations=25 "$@"
