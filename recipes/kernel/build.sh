#!/usr/bin/env bash
# Builds the smolvm guest kernel from Debian's linux-source package.
# Called by `smolvm image build kernel`, which owns caching and hashing; runnable by hand too:
#   recipes/kernel/build.sh SOURCE_DEB CONFIG FRAGMENT OUTDIR
# Outputs OUTDIR/vmlinux-x86_64.elf (PVH-bootable ELF) and OUTDIR/vmlinux-x86_64.image (bzImage).
set -euo pipefail
deb=$1 config=$2 fragment=$3 out=$4
jobs=${SMOLVM_BUILD_JOBS:-$(nproc)}
work=$(mktemp -d "${out%/}.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "kernel: unpacking $(basename "$deb")" >&2
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work" --wildcards './usr/src/linux-source-*.tar.xz'
tar -C "$work" -xf "$work"/usr/src/linux-source-*.tar.xz
rm -rf "$work/usr"
src=$(echo "$work"/linux-source-*)

# Reproducible build metadata: no host name, user or wall-clock time leaks into the image.
export KBUILD_BUILD_TIMESTAMP="@${SOURCE_DATE_EPOCH:-0}" KBUILD_BUILD_USER=smolvm KBUILD_BUILD_HOST=smolvm
cp "$config" "$src/.config"
make -C "$src" -s ARCH=x86_64 olddefconfig

# The full config was resolved against a source version; a newer source may silently drop an
# option whose dependencies changed. Refuse to build a kernel that lost one of ours.
lost=0
while IFS= read -r line; do
  key=${line%%=*} val=${line#*=}
  if [ "$val" = n ]; then
    if grep -q "^$key=" "$src/.config"; then echo "kernel: $key should be off" >&2; lost=1; fi
  elif ! grep -qxF "$line" "$src/.config"; then
    echo "kernel: option lost after olddefconfig: $line (now: $(grep -E "^# $key is not set|^$key=" "$src/.config" || echo absent))" >&2
    lost=1
  fi
done < <(grep -E '^CONFIG_[A-Z0-9_]+=' "$fragment")
[ "$lost" = 0 ] || { echo "kernel: regenerate recipes/kernel/x86_64.config (recipes/kernel/regen-config.sh)" >&2; exit 1; }

echo "kernel: make -j$jobs vmlinux bzImage" >&2
make -C "$src" -s ARCH=x86_64 -j"$jobs" vmlinux bzImage
mkdir -p "$out"
# Symbols are not needed to boot (kallsyms lives in the image); the PVH ELF note is kept.
objcopy --strip-all "$src/vmlinux" "$out/vmlinux-x86_64.elf.tmp"
readelf -n "$out/vmlinux-x86_64.elf.tmp" | grep -q 'Xen' || { echo "kernel: vmlinux has no PVH (Xen ELF) note" >&2; exit 1; }
mv "$out/vmlinux-x86_64.elf.tmp" "$out/vmlinux-x86_64.elf"
cp "$src/arch/x86/boot/bzImage" "$out/vmlinux-x86_64.image"
cp "$src/.config" "$out/config"
echo "kernel: done" >&2
