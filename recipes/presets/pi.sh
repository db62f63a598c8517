# pi: the pi coding agent from npm, on Debian's Node.js.
apt-get update -q
apt-get install -y -q --no-install-recommends nodejs npm
npm install -g --no-fund --no-audit @mariozechner/pi-coding-agent
# npm is needed to install, not to run: Debian's npm brings hundreds of node-* packages.
apt-get purge -y -q npm
apt-get autoremove -y -q --purge
pi --version
