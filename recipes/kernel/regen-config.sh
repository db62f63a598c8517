#!/usr/bin/env bash
# Regenerates recipes/kernel/x86_64.config from x86_64.fragment against a kernel source package:
#   recipes/kernel/regen-config.sh /var/cache/smolvm/build/src/linux-source-6.12_*.deb
# Run it after editing the fragment or when a new source version drops an option (the build
# says so), then review the diff of x86_64.config like code.
set -euo pipefail
deb=$1
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work" --wildcards './usr/src/linux-source-*.tar.xz'
tar -C "$work" -xf "$work"/usr/src/linux-source-*.tar.xz
src=$(echo "$work"/linux-source-*)
make -C "$src" -s ARCH=x86_64 KCONFIG_ALLCONFIG="$here/x86_64.fragment" allnoconfig
cp "$src/.config" "$here/x86_64.config"
echo "wrote $here/x86_64.config" >&2
