#!/usr/bin/env bash
# The Dockerfile's install steps without a container engine: a clean venv gets the CPU lock with
# --require-hashes --no-deps, then the package with --no-deps, `pip check` and `influence --help`,
# as the image build does. Minutes and ~1 GB of downloads (torch): for CI's image job or a nightly
# run, not the test suite (tests/deploy/test_images.py checks the lock against pyproject.toml offline).
# Usage: scripts/check-image-lock.sh [LOCK] (default deploy/docker/requirements-cpu-amd64.lock);
#   TORCH_INDEX (default the cpu index; "" where torch's wheel is in pip's find-links), PYTHON (default python3.11).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="${1:-$root/deploy/docker/requirements-cpu-amd64.lock}"
index="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
"${PYTHON:-python3.11}" -m venv "$venv"
extra=()
[ -n "$index" ] && extra=(--extra-index-url "$index")
"$venv/bin/pip" install --quiet --no-cache-dir --require-hashes --no-deps --only-binary :all: "${extra[@]}" -r "$lock"
"$venv/bin/pip" install --quiet --no-cache-dir --no-deps --no-build-isolation "$root"
"$venv/bin/pip" check
"$venv/bin/influence" --help >/dev/null
echo "the lock installs and satisfies the package: $lock"
