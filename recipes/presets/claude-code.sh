# claude-code: Anthropic's Claude Code from npm, on Debian's Node.js, at exactly the versions of
# recipes/presets/claude-code/package-lock.json: `npm ci` checks every package against its integrity
# hash and refuses a lock that does not match package.json (recipes/presets/lock.sh writes both).
apt-get update -q
apt-get install -y -q --no-install-recommends nodejs npm
install -d /opt/claude-code
cp /run/recipe/package.json /run/recipe/package-lock.json /opt/claude-code/
(cd /opt/claude-code && npm ci --no-fund --no-audit --omit=dev)
ln -sf /opt/claude-code/node_modules/.bin/claude /usr/local/bin/claude
# npm installs both x86_64 builds (glibc and musl; Debian's npm does not read the packages'
# "libc" field); the base is glibc, so the musl one (~390 MB) is never run.
rm -rf /opt/claude-code/node_modules/@anthropic-ai/claude-code-linux-x64-musl
# npm is needed to install, not to run: Debian's npm brings hundreds of node-* packages.
apt-get purge -y -q npm
apt-get autoremove -y -q --purge
claude --version
