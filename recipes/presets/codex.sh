# codex: OpenAI's Codex CLI from npm, on Debian's Node.js, at exactly the versions of
# recipes/presets/codex/package-lock.json: `npm ci` checks every package against its integrity
# hash and refuses a lock that does not match package.json (recipes/presets/lock.sh writes both).
apt-get update -q
apt-get install -y -q --no-install-recommends nodejs npm
install -d /opt/codex
cp /run/recipe/package.json /run/recipe/package-lock.json /opt/codex/
(cd /opt/codex && npm ci --no-fund --no-audit --omit=dev)
ln -sf /opt/codex/node_modules/.bin/codex /usr/local/bin/codex
# npm is needed to install, not to run: Debian's npm brings hundreds of node-* packages.
apt-get purge -y -q npm
apt-get autoremove -y -q --purge
codex --version
