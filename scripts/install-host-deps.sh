#!/usr/bin/env bash
# Installs what building the images and running sandboxes needs on a Debian 12 host.
#
# Why this is a script and not a README paragraph: CI and every new machine start from a fresh
# image, so the project must install its own tools. It is idempotent and quick when all is there.
#
# Repositories: we add the `bookworm-backports` and `trixie` suites using the *same URIs* as the
# host's existing Debian entry (no host name is written here). `trixie` is pinned low so that it
# only supplies what we ask for by name (the 6.12 kernel source).
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "install-host-deps: run as root (apt-get is needed)" >&2; exit 1; }; }

PKGS_BASE=(mmdebstrap e2fsprogs zstd xz-utils bc flex bison libelf-dev libssl-dev make gcc
           cpio lz4 openssh-client python3 python3-venv iproute2 util-linux ca-certificates curl dwarves)
PKG_QEMU=qemu-system-x86

# The sandboxes' users. When smolvm runs as root, each sandbox's QEMU, network process and
# agent proxy run as a uid of their own from a range reserved here for the system user
# `smolvm` (in /etc/subuid and /etc/subgid, where tools that hand out uid ranges look before
# they choose one). One uid per sandbox: a QEMU taken over by its guest cannot reach another
# sandbox's processes or files.
VM_USER=smolvm
VM_RANGE_COUNT=65536
VM_RANGE_START=1900000000   # far above users and systemd's ranges for containers
vm_users() {
  if ! getent passwd "$VM_USER" >/dev/null; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
      --comment "smolvm sandboxes" "$VM_USER"
  fi
  touch /etc/subuid /etc/subgid
  for f in /etc/subuid /etc/subgid; do
    if ! grep -q "^$VM_USER:" "$f"; then
      # After every range already there, if one reaches past our default start.
      start=$(awk -F: -v s="$VM_RANGE_START" '$2+$3 > s { s = $2+$3 } END { print s }' "$f")
      echo "$VM_USER:$start:$VM_RANGE_COUNT" >>"$f"
      echo "install-host-deps: sandboxes run as uids $start-$((start + VM_RANGE_COUNT - 1)) ($f)" >&2
    fi
  done
}

missing=()
for p in "${PKGS_BASE[@]}" "$PKG_QEMU"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
done
# Node and npm run the E2B JS SDK in the serve tests. A host that has a node already keeps it
# (its own packages may conflict with Debian's npm); Debian 12's is Node 18, and the test says
# so if the SDK needs newer.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  PKGS_BASE+=(nodejs npm)
  missing+=(nodejs npm)
fi
if [ ${#missing[@]} -eq 0 ]; then
  if [ "$(id -u)" = 0 ]; then vm_users; fi
  exit 0
fi
need_root
echo "install-host-deps: installing ${missing[*]}" >&2

src=/etc/apt/sources.list.d/debian.sources
uri=""
if [ -r "$src" ]; then
  uri=$(awk '/^URIs:/ {print $2; exit}' "$src")
fi
if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
  uri=$(awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list)
fi
if [ -z "$uri" ]; then
  echo "install-host-deps: cannot find the host's Debian mirror in $src or /etc/apt/sources.list" >&2
  exit 1
fi

extra=/etc/apt/sources.list.d/smolvm-extra.sources
if [ ! -e "$extra" ]; then
  cat >"$extra" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat >/etc/apt/preferences.d/smolvm-trixie <<'PIN'
# smolvm: take packages from trixie only when asked for by name or with -t trixie.
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
fi

export DEBIAN_FRONTEND=noninteractive
# Third-party sources on the host may be unreachable; Debian's own must work.
apt-get update -o APT::Update::Error-Mode=any >/dev/null 2>&1 || apt-get update >/dev/null || true
apt-get install -y --no-install-recommends "${PKGS_BASE[@]}"
# Debian 12's QEMU 7.2 conflicts with the backported qemu-utils 10 that such hosts carry.
apt-get install -y --no-install-recommends -t bookworm-backports "$PKG_QEMU"
vm_users
