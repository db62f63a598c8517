# claude-code: Anthropic's Claude Code from npm, on Debian's Node.js.
apt-get update -q
apt-get install -y -q --no-install-recommends nodejs npm
npm install -g --no-fund --no-audit @anthropic-ai/claude-code
# npm installs both x86_64 builds (glibc and musl); the base is glibc, so the musl one
# (~390 MB) is never run.
rm -rf /usr/local/lib/node_modules/@anthropic-ai/claude-code/node_modules/@anthropic-ai/claude-code-linux-x64-musl
# npm is needed to install, not to run: Debian's npm brings hundreds of node-* packages.
apt-get purge -y -q npm
apt-get autoremove -y -q --purge
claude --version
