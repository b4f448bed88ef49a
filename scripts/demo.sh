#!/usr/bin/env bash
# The main job on embedded defaults: set up the venv, then train (or reuse) the demo model,
# fit EK-FAC factors, score the demo queries and print their most influential training sequences.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export HF_HUB_OFFLINE=1
exec "$root/.venv/bin/influence" demo "$@"
