#!/usr/bin/env bash
# Writes a preset's lock files: the exact version of its tool and of everything it depends on,
# each with its digest, so that a layer build installs those bytes or fails.
#   recipes/presets/lock.sh codex        @openai/codex@0.171.0
#   recipes/presets/lock.sh claude-code  @anthropic-ai/claude-code@2.1.332
#   recipes/presets/lock.sh pi           @mariozechner/pi-coding-agent@0.73.1
#   recipes/presets/lock.sh hermes       hermes-agent==0.19.0
# npm packages: recipes/presets/NAME/package.json and package-lock.json (npm's integrity
# hashes, checked by `npm ci`). PyPI packages: recipes/presets/NAME/requirements.txt with one
# `--hash=sha256:` per file (checked by `pip install --require-hashes`), wheels only, for the
# base's Python (Debian trixie: CPython 3.13 on glibc). Run by hand when a version is bumped;
# the lock files are part of the layer's cache key, so a new lock is a new layer.
set -euo pipefail
name=$1 spec=$2
dir="$(cd "$(dirname "$0")" && pwd)/$name"
mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
case "$spec" in
  *==*)
    python3 -m pip download --disable-pip-version-check -q "$spec" --dest "$work" --only-binary=:all: \
      --python-version 3.13 --implementation cp --abi cp313 --abi abi3 --abi none \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_34_x86_64 --platform any
    python3 - "$work" "$spec" >"$dir/requirements.txt" <<'PY'
import hashlib, os, sys
work, spec = sys.argv[1], sys.argv[2]
print(f"# {spec} and its dependencies, exactly: written by recipes/presets/lock.sh")
for f in sorted(os.listdir(work)):
    name, version = f.split("-")[:2]
    digest = hashlib.sha256(open(os.path.join(work, f), "rb").read()).hexdigest()
    print(f"{name.lower().replace('_', '-')}=={version} --hash=sha256:{digest}")
PY
    ;;
  *@*)
    pkg=${spec%@*} version=${spec##*@}
    printf '{\n  "name": "smolvm-preset-%s",\n  "private": true,\n  "dependencies": { "%s": "%s" }\n}\n' \
      "$name" "$pkg" "$version" >"$dir/package.json"
    (cd "$dir" && npm install --package-lock-only --omit-lockfile-registry-resolved --no-fund --no-audit --ignore-scripts >/dev/null)
    ;;
  *) echo "lock.sh: say NAME==VERSION (PyPI) or NAME@VERSION (npm)" >&2; exit 2 ;;
esac
echo "lock.sh: wrote $(ls "$dir" | tr '\n' ' ')in $dir" >&2
