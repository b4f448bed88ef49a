#!/usr/bin/env bash
# Headless Chromium for the report's browser tests: Debian's chromium (Playwright's own browser
# download is not reachable here) driven by the playwright Python package installed into the
# venv given as $1, which launches it with executable_path=/usr/bin/chromium.
# Idempotent: instant when both are present.
set -euo pipefail
venv="${1:?usage: chromium.sh VENV}"
if ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
if ! "$venv/bin/python" -c "import playwright" >/dev/null 2>&1; then
  "$venv/bin/python" -m pip install -q "playwright>=1.40" 2> >(grep -v "is ignored" >&2)
fi
