#!/usr/bin/env bash
# The project's test command (see README.md). On a fresh Debian 12 machine it installs what is
# missing, builds the image release (cached outside the checkout by recipe hash, so a second
# run skips the kernel and rootfs builds), then runs the lints and every test, including the
# ones that boot the release under QEMU. Needs root (apt, mmdebstrap).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "host dependencies"
bash scripts/install-host-deps.sh

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "smolvm binary"
cargo build --release --locked -p smolvm-cli

step "image release (cache: ${SMOLVM_BUILD_CACHE:-/var/cache/smolvm/build})"
release_json=$(./target/release/smolvm image build all --out dist --force --json)
release_dir=$(printf '%s' "$release_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["dir"])')
printf '%s' "$release_json" | python3 -c '
import json, sys
r = json.load(sys.stdin)
for s in r["steps"]:
    print("  %-28s %8.1f s  %s" % (s["name"], s["seconds"], "(cached)" if s["cached"] else ""))
for a in r["manifest"]["assets"]:
    print("  %-32s %11d bytes" % (a["name"], a["size"]))
' >&2

step "tests (unit, and integration against $release_dir)"
export SMOLVM_TEST_RELEASE="$PWD/$release_dir"
case "$release_dir" in /*) export SMOLVM_TEST_RELEASE="$release_dir" ;; esac
cargo test --workspace --locked -- --include-ignored
