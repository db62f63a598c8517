#!/usr/bin/env bash
# Installs the real client packages the `smolvm serve` tests drive: the E2B Python SDK and the
# MCP Python SDK in a venv, the E2B JS SDK with npm, at the versions pinned in
# crates/smolvm-cli/tests/clients/. Cached outside the checkout by the hash of those pins, so
# a second run is instant. Prints the directory (venv/ and node_modules/ inside).
#
#   scripts/test-clients.sh          install (or reuse) and print the directory
#   scripts/test-clients.sh --lock   resolve requirements.in anew into requirements.txt
#
# Registries are the tools' defaults (pip's and npm's own configuration): no host is named here.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=crates/smolvm-cli/tests/clients
cache=${SMOLVM_CLIENTS_CACHE:-/var/cache/smolvm/clients}
python=${SMOLVM_TEST_PYTHON:-/usr/bin/python3}

if [ "${1:-}" = --lock ]; then
  tmp=$(mktemp -d)
  "$python" -m venv "$tmp/venv" >&2
  "$tmp/venv/bin/pip" install --quiet -r "$pins/requirements.in" >&2
  { echo "# Resolved from requirements.in by scripts/test-clients.sh --lock; do not edit."; "$tmp/venv/bin/pip" freeze; } >"$pins/requirements.txt"
  (cd "$tmp" && cp "$OLDPWD/$pins/package.json" . && npm install --silent --no-audit --no-fund --omit-lockfile-registry-resolved >&2 && cp package-lock.json "$OLDPWD/$pins/")
  rm -rf "$tmp"
  echo "$pins/requirements.txt and package-lock.json written" >&2
  exit 0
fi

hash=$(cat "$pins/requirements.txt" "$pins/package.json" "$pins/package-lock.json" "$python" 2>/dev/null | sha256sum | cut -c1-16)
dir="$cache/$hash"
if [ -f "$dir/.complete" ]; then
  echo "$dir"
  exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.tmp-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "test-clients: installing the pinned E2B and MCP clients into $dir" >&2
"$python" -m venv "$tmp/venv" >&2
"$tmp/venv/bin/pip" install --quiet --disable-pip-version-check -r "$pins/requirements.txt" >&2
cp "$pins/package.json" "$pins/package-lock.json" "$tmp/"
(cd "$tmp" && npm ci --silent --no-audit --no-fund >&2)
touch "$tmp/.complete"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
echo "$dir"
