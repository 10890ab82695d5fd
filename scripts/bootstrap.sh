#!/bin/sh
# Install everything mptcpd-py's demo and tests need on Debian 12, as root.
# Idempotent: a second run installs nothing and takes about a second.
#   apt: iproute2, python3-venv/-dev, gcc, pkg-config, libsystemd-dev (same
#        version as libsystemd0: systemd-python builds against it), ...
#   .venv/: the pinned Python packages of requirements.lock + this project.
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: run as root (network namespaces and MPTCP endpoints need it)" >&2
    exit 64
fi

APT_PACKAGES="iproute2 procps kmod python3 python3-venv python3-dev gcc pkg-config iputils-ping"
missing=""
for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if ! dpkg-query -W -f='${Status}' libsystemd-dev 2>/dev/null | grep -q "ok installed"; then
    missing="$missing libsystemd-dev"
fi
if [ -n "$missing" ]; then
    echo "bootstrap: apt-get install$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $(echo "$missing" | sed 's/libsystemd-dev//') >/dev/null
    case "$missing" in *libsystemd-dev*)
        # libsystemd-dev must match libsystemd0 exactly; when the mirror no
        # longer has the installed version, move both to the current one.
        v=$(dpkg-query -W -f='${Version}' libsystemd0)
        apt-get install -y -qq --no-install-recommends "libsystemd-dev=$v" >/dev/null 2>&1 ||
            apt-get install -y -qq --no-install-recommends libsystemd-dev libsystemd0 >/dev/null
    esac
fi

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
