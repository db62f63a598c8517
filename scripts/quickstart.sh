#!/usr/bin/env bash
# The README's first command. On a fresh Debian 12 host (as root): installs what is missing,
# builds smolvm, gets the image release (downloads the pinned one; if it cannot be reached,
# builds it here and says so), creates a sandbox and runs a command in it.
#   bash scripts/quickstart.sh [NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-quickstart}
say() { printf '\n==> %s\n' "$*" >&2; }

say "host dependencies (QEMU, e2fsprogs, OpenSSH client, image build tools)"
bash scripts/install-host-deps.sh

say "building smolvm"
cargo build --release --locked -p smolvm-cli
smolvm=$PWD/target/release/smolvm

say "getting the image release pinned in this binary"
if ! "$smolvm" image pull; then
  say "the release could not be downloaded: building it locally instead (kernel and base only: about 10 minutes the first time; cached afterwards)"
  # Preset layers are left out here (`smolvm image build all --out dist` builds them too).
  dir=$("$smolvm" image build all --no-presets --out dist --force --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["dir"])')
  # Import checks its SHA256SUMS and makes it this home's release: later creates use it.
  "$smolvm" image import "$dir"
fi

say "creating sandbox $name"
"$smolvm" delete --force "$name" >/dev/null 2>&1 || true
"$smolvm" create --name "$name"

say "running a command in it: uname -a"
"$smolvm" exec "$name" -- uname -a

cat >&2 <<TXT

Done. The sandbox is still running:
  $smolvm exec $name -- python3 -c 'print(1+1)'
  $smolvm ssh $name
  $smolvm delete $name
TXT
