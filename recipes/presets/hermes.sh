# hermes: Nous Research's Hermes agent from PyPI, in a virtual environment on Debian's Python.
python3 -m venv /opt/hermes
/opt/hermes/bin/pip install --no-cache-dir --disable-pip-version-check hermes-agent
ln -sf /opt/hermes/bin/hermes /usr/local/bin/hermes
hermes --version
