#!/bin/sh
# Install everything mptcpd-py's demo and tests need on Debian 12, as root.
# Idempotent: a second run installs nothing and takes about a second.
#   apt: iproute2, python3-venv/-dev, gcc, pkg-config, libsystemd-dev (same
#        version as libsystemd0: systemd-python builds against it), ...
#   .venv/: the pinned Python packages of requirements.lock + this project,
#           and .venv/lib/mptcpd-py/libmptcpize.so (the mptcpize shim).
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: run as root (network namespaces and MPTCP endpoints need it)" >&2
    exit 64
fi

# systemd-container + debootstrap: the e2e test boots Debian 12 under a real
# systemd (tests/e2e); curl: the mptcpize tests drive it as an unmodified program.
./scripts/apt-install.sh iproute2 procps kmod python3 python3-venv python3-dev gcc libc6-dev \
    pkg-config iputils-ping libsystemd-dev systemd-container debootstrap curl

PY=/usr/bin/python3
stamp=.venv/.mptcpd-py-lock
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: creating .venv with pinned packages"
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>/dev/null ||
        .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
    echo "$want" > "$stamp"
fi
# The LD_PRELOAD shim of `mptcpd-py mptcpize`, where the .venv's mptcpd-py looks for it.
./scripts/build-shim.sh .venv/lib/mptcpd-py/libmptcpize.so
