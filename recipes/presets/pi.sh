# pi: the pi coding agent from npm, on Debian's Node.js, at exactly the versions of
# recipes/presets/pi/package-lock.json: `npm ci` checks every package against its integrity
# hash and refuses a lock that does not match package.json (recipes/presets/lock.sh writes both).
apt-get update -q
apt-get install -y -q --no-install-recommends nodejs npm
install -d /opt/pi
cp /run/recipe/package.json /run/recipe/package-lock.json /opt/pi/
(cd /opt/pi && npm ci --no-fund --no-audit --omit=dev)
ln -sf /opt/pi/node_modules/.bin/pi /usr/local/bin/pi
# npm is needed to install, not to run: Debian's npm brings hundreds of node-* packages.
apt-get purge -y -q npm
apt-get autoremove -y -q --purge
pi --version
