#!/usr/bin/env bash
# A real redis-server for the integration tests (Debian's package). Quiet; instant when present.
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq redis-server >/dev/null
fi
