#!/usr/bin/env bash
# buf for the API checks (tests/services/rpc/test_protos.py: `buf lint`, `buf breaking` against the released
# protos), into tools/bin/buf (gitignored): the static binary the npm package @bufbuild/buf ships
# for this platform. Quiet; instant when present.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
target="$root/tools/bin/buf"
[ -x "$target" ] && exit 0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm install --silent --no-audit --no-fund --prefix "$work" @bufbuild/buf@1 >/dev/null 2>&1)
binary="$(find "$work/node_modules/@bufbuild" -path '*/bin/buf' -type f | grep -v '/buf/bin/' | head -n 1)"
[ -n "$binary" ] || { echo "buf.sh: no platform binary in @bufbuild/buf" >&2; exit 1; }
mkdir -p "$(dirname "$target")"
install -m 0755 "$binary" "$target"
"$target" --version >/dev/null
