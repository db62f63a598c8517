#!/usr/bin/env bash
# Builds one preset layer: the files a preset adds to the base rootfs, as an ext4 image that
# the guest stacks over the base with overlayfs (deletions are overlayfs whiteouts).
# Called by `smolvm image build preset NAME`, which owns caching and hashing; by hand:
#   SOURCE_DATE_EPOCH=... recipes/presets/build-layer.sh BASE.ext4 RECIPE.sh OUT.ext4 [LOCKS]
# LOCKS: the preset's lock files (recipes/presets/NAME/), which the recipe finds in
# /run/recipe (a tmpfs: not kept in the layer).
# Needs root (loop and overlay mounts, chroot) and the package registries (apt, npm, PyPI).
set -euo pipefail
base=$1 recipe=$2 out=$3 locks=${4:-}
: "${SOURCE_DATE_EPOCH:?set SOURCE_DATE_EPOCH for a reproducible image}"

work=$(mktemp -d "${out%/*}/.layer-work.XXXXXX")
mounts=()
cleanup() {
  for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work"/{lower,upper,ovl,root}
mount -o loop,ro "$base" "$work/lower"; mounts+=("$work/lower")
mount -t overlay overlay -o "lowerdir=$work/lower,upperdir=$work/upper,workdir=$work/ovl" "$work/root"
mounts+=("$work/root")
mount -t proc proc "$work/root/proc"; mounts+=("$work/root/proc")
mount -t sysfs sys "$work/root/sys"; mounts+=("$work/root/sys")
mount --rbind /dev "$work/root/dev"; mounts+=("$work/root/dev")
mount -t tmpfs tmpfs "$work/root/tmp"; mounts+=("$work/root/tmp")
mount -t tmpfs tmpfs "$work/root/run"; mounts+=("$work/root/run")
# Name resolution for the package clients, from the host; not kept in the layer.
cp /etc/resolv.conf "$work/root/run/resolv.conf"
mount --bind "$work/root/run/resolv.conf" "$work/root/etc/resolv.conf" 2>/dev/null || {
  rm -f "$work/root/etc/resolv.conf"; cp /etc/resolv.conf "$work/root/etc/resolv.conf"; }
mounts+=("$work/root/etc/resolv.conf")

# The host's CA bundle, for the package clients' TLS during the build only (/run is a tmpfs
# here): where the host reaches the registries through a TLS-inspecting proxy, its CA is in
# there. The layer keeps Debian's own bundle.
cp /etc/ssl/certs/ca-certificates.crt "$work/root/run/host-ca.crt"
mkdir -p "$work/root/run/recipe"
if [ -n "$locks" ]; then cp -r "$locks"/. "$work/root/run/recipe/"; fi

echo "layer: running $(basename "$recipe")" >&2
chroot "$work/root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
  NODE_EXTRA_CA_CERTS=/run/host-ca.crt PIP_CERT=/run/host-ca.crt SSL_CERT_FILE=/run/host-ca.crt \
  /bin/sh -eu < "$recipe" >&2

# Clean what package managers leave behind: caches, lists, logs.
chroot "$work/root" /bin/sh -c 'apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/* /root/.npm /root/.cache \
  /tmp/* /var/log/* /var/cache/debconf/*-old /var/lib/dpkg/*-old' >&2
for ((i=${#mounts[@]}-1; i>=1; i--)); do umount -l "${mounts[$i]}"; done
mounts=("$work/lower")
# The bind-mounted resolv.conf left no trace; a copied one is removed again.
[ -e "$work/lower/etc/resolv.conf" ] || rm -f "$work/upper/etc/resolv.conf"
rm -rf "$work/upper/run" "$work/upper/tmp" "$work/upper/var/log" 2>/dev/null || true

find "$work/upper" -newermt "@$SOURCE_DATE_EPOCH" ! -name '*.py' -print0 | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"
used_kib=$(du -sk --apparent-size "$work/upper" | cut -f1)
size_mib=$(( (used_kib * 12 / 10) / 1024 + 32 ))
echo "layer: mkfs.ext4 ${size_mib} MiB for ${used_kib} KiB" >&2
rm -f "$out"
uuid=6c617965-7220-4e9b-9c1f-736d6f6c766d
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -t ext4 -d "$work/upper" -L smolvm-layer \
  -U "$uuid" -E "hash_seed=$uuid,nodiscard" -m 0 -i 8192 -O ^has_journal "$out" "${size_mib}M"
e2fsck -fn "$out" >/dev/null
echo "layer: done" >&2
