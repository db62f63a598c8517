# hermes: Nous Research's Hermes agent from PyPI, in a virtual environment on Debian's Python,
# at exactly the versions of recipes/presets/hermes/requirements.txt: every file is checked
# against its SHA-256 (--require-hashes), nothing unlisted is pulled in (--no-deps), and only
# wheels are taken (no build step runs code we did not pin).
python3 -m venv /opt/hermes
/opt/hermes/bin/pip install --no-cache-dir --disable-pip-version-check \
  --require-hashes --no-deps --only-binary=:all: -r /run/recipe/requirements.txt
ln -sf /opt/hermes/bin/hermes /usr/local/bin/hermes
hermes --version
