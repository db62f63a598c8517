#!/usr/bin/env bash
# Builds the smolvm base rootfs: Debian minbase + packages, stripped, with smolvm-init at /init.
# Called by `smolvm image build base`, which owns caching and hashing; runnable by hand too:
#   SOURCE_DATE_EPOCH=... recipes/base/build.sh OUT.ext4 INIT_BINARY PACKAGES OVERLAY_DIR
# Needs root (mmdebstrap --mode=root, files owned by root in the image).
set -euo pipefail
out=$1 init=$2 packages=$3 overlay=$4
suite=${SMOLVM_BASE_SUITE:-trixie}
: "${SOURCE_DATE_EPOCH:?set SOURCE_DATE_EPOCH for a reproducible image}"
export SOURCE_DATE_EPOCH

work=$(mktemp -d "${out%/*}/.base-work.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"   # apt inside mmdebstrap downloads as the unprivileged _apt user
root=$work/root

include=$(sed -e 's/#.*//' "$packages" | xargs | tr ' ' ',')
echo "base: mmdebstrap $suite minbase + $include" >&2
# Documentation, manuals and translations are never unpacked, now or by later apt installs in
# the guest (the dpkg filter stays in the image); each package's copyright file is kept, since
# we redistribute the binaries. The mirror is mmdebstrap's default (the host's apt sources for
# a matching suite, else Debian's canonical mirror): no host name is written here.
mmdebstrap --mode=root --variant=minbase --format=directory --include="$include" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --aptopt='Acquire::Languages "none"' \
  "$suite" "$root" >&2

if chroot "$root" dpkg-query -W cloud-init >/dev/null 2>&1; then
  echo "base: cloud-init must not be in the base" >&2; exit 1
fi
chroot "$root" dpkg-query -W -f='${Package}\t${Version}\n' > "$out.packages"

echo "base: stripping" >&2
# dpkg's path filters skip files, not the directories that held them.
find "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/locale \
  -mindepth 1 -depth -type d -empty -delete 2>/dev/null || true
# Headers are removed once, not filtered for good: a user who installs a compiler in the
# guest gets working headers back from the packages.
rm -rf "$root"/usr/include/*
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
       "$root"/var/lib/dpkg/*-old "$root"/var/cache/ldconfig/aux-cache
find "$root"/var/log -type f -delete
# SSH host keys made by openssh-server's postinst would be shared by every sandbox: the init
# makes a fresh one per boot instead.
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root"/etc/machine-id
rm -f "$root"/var/lib/dbus/machine-id
# Python's byte-code caches are kept: start-up under an emulated CPU is much faster with them.

echo "base: installing smolvm-init and configuration" >&2
install -m 0755 "$init" "$root/init"
ln -sfn /init "$root/usr/sbin/init"
cp -a "$overlay"/. "$root"/
echo smolvm > "$root/etc/hostname"
mkdir -p "$root/root/.ssh" && chmod 0700 "$root/root/.ssh"

# Reproducibility, part 1: no modification time later than SOURCE_DATE_EPOCH. Files unpacked
# from packages keep their packaged times; Python sources are left alone whatever their time,
# because their byte-code caches record it and would go stale.
find "$root" -newermt "@$SOURCE_DATE_EPOCH" ! -name '*.py' -print0 | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"

# Size: used space plus 10% and 64 MiB of headroom (each sandbox grows its own copy).
used_kib=$(du -sk --apparent-size "$root" | cut -f1)
files=$(find "$root" | wc -l)
size_mib=$(( (used_kib * 11 / 10) / 1024 + 64 ))
echo "base: mkfs.ext4 ${size_mib} MiB for ${used_kib} KiB in $files files" >&2
rm -f "$out"
# Fixed UUID and directory-hash seed, fake time: the same tree gives the same bytes.
uuid=5b6f1c2e-7a3d-4e9b-9c1f-736d6f6c766d
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -t ext4 -d "$root" -L smolvm-root \
  -U "$uuid" -E "hash_seed=$uuid,lazy_itable_init=0,nodiscard" -m 0 -i 8192 -J size=16 \
  "$out" "${size_mib}M"
# Reproducibility, part 2: `mkfs.ext4 -d` copies each file's ctime and atime, which record
# when this build ran. Set both to SOURCE_DATE_EPOCH in the image itself.
if (cd "$root" && find . -mindepth 1 -name '*"*' -print -quit) | grep -q .; then
  echo "base: a path contains a double quote; debugfs cannot address it" >&2; exit 1
fi
{
  echo "sif / ctime @$SOURCE_DATE_EPOCH"
  echo "sif / atime @$SOURCE_DATE_EPOCH"
  (cd "$root" && find . -mindepth 1 -printf '%P\n') |
    awk -v t="@$SOURCE_DATE_EPOCH" '{ printf "sif \"/%s\" ctime %s\nsif \"/%s\" atime %s\n", $0, t, $0, t }'
} > "$work/times.debugfs"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$work/times.debugfs" "$out" >/dev/null 2>"$work/debugfs.log" || {
  cat "$work/debugfs.log" >&2; exit 1; }
if grep -v '^debugfs ' "$work/debugfs.log" | grep -q .; then cat "$work/debugfs.log" >&2; exit 1; fi
e2fsck -fn "$out" >/dev/null
echo "base: done" >&2
