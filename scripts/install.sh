#!/bin/sh
# Install mptcpd-py as a system service (Debian 12, as root). Idempotent:
# run it again to upgrade (a running service is restarted, unless the new
# version rejects your mptcpd.toml: then it is left running and this exits 1).
#
#   /opt/mptcpd-py/                      a dedicated venv: mptcpd-py and its pinned
#                                        dependencies (requirements.lock), the
#                                        mptcpize shim lib/mptcpd-py/libmptcpize.so, docs
#   /usr/local/bin/mptcpd-py             -> /opt/mptcpd-py/bin/mptcpd-py
#   /usr/local/lib/systemd/system/mptcpd-py.service
#   /etc/mptcpd-py/mptcpd.toml           the shipped defaults, only when there is none:
#                                        a file you have is never overwritten
#   /etc/mptcpd-py/plugins.d/            your policies
#
# Then: systemctl enable --now mptcpd-py. Undo with scripts/uninstall.sh.
# pip options come from the environment as usual (PIP_INDEX_URL, or
# PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR for an offline install from wheels).
set -eu
cd "$(dirname "$0")/.."
src=$(pwd)

. ./scripts/install-paths.sh
say() { echo "install: $*"; }
require_root install

# Build tools: the venv, the shim (gcc), systemd-python (python3-dev,
# pkg-config, libsystemd-dev) when pip has to build it from source.
./scripts/apt-install.sh python3 python3-venv python3-dev gcc libc6-dev pkg-config \
    libsystemd-dev

if [ -e "$PREFIX" ] && [ ! -f "$PREFIX/pyvenv.cfg" ]; then
    echo "install: $PREFIX exists and is not a Python venv; move it away first" >&2
    exit 1
fi
if [ -x "$PREFIX/bin/python" ] && ! "$PREFIX/bin/python" -c "" 2>/dev/null; then
    say "$PREFIX's Python no longer runs (system Python upgraded?): recreating it"
    rm -rf "$PREFIX"
fi
if [ ! -x "$PREFIX/bin/python" ]; then
    say "creating the venv $PREFIX"
    python3 -m venv "$PREFIX"
fi
say "installing mptcpd-py and its dependencies (pinned by requirements.lock)"
"$PREFIX/bin/python" -m pip install -q --disable-pip-version-check \
    --constraint requirements.lock "$src"

say "building the mptcpize shim"
./scripts/build-shim.sh "$PREFIX/lib/mptcpd-py/libmptcpize.so"

doc="$PREFIX/share/doc/mptcpd-py"
install -d -m 0755 "$doc"
install -m 0644 README.md docs/plugins.md docs/operations.md docs/service.md "$doc/"
install -m 0644 conf/mptcpd.toml "$doc/mptcpd.toml.example"

if [ -L "$BIN_LINK" ] || [ ! -e "$BIN_LINK" ]; then
    ln -sfn "$PREFIX/bin/mptcpd-py" "$BIN_LINK"
else
    say "warning: $BIN_LINK exists and is not a link: left alone (use $PREFIX/bin/mptcpd-py)"
fi

install -d -m 0755 "$UNIT_DIR"
install -m 0644 systemd/mptcpd-py.service "$UNIT_DIR/mptcpd-py.service"

install -d -m 0755 "$CONF_DIR" "$CONF_DIR/plugins.d"
config_rejected=0
if [ -e "$CONF_DIR/mptcpd.toml" ]; then
    say "kept your $CONF_DIR/mptcpd.toml (the shipped defaults are in $doc/mptcpd.toml.example)"
    if ! "$PREFIX/bin/mptcpd-py" check-config "$CONF_DIR/mptcpd.toml" >/dev/null 2>&1; then
        config_rejected=1
        say "warning: this version rejects $CONF_DIR/mptcpd.toml:"
        "$PREFIX/bin/mptcpd-py" check-config "$CONF_DIR/mptcpd.toml" 2>&1 | sed 's/^/    /' || true
    fi
else
    install -m 0644 conf/mptcpd.toml "$CONF_DIR/mptcpd.toml"
    say "wrote $CONF_DIR/mptcpd.toml (the documented defaults)"
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if systemctl -q is-active mptcpd-py; then
        if [ "$config_rejected" = 1 ]; then
            # A restart would stop the old daemon (taking its endpoints
            # away) and the new one would refuse the file (exit 78, not
            # restarted): nothing would manage the paths. The old one keeps
            # running on the code it loaded at start.
            say "NOT restarting mptcpd-py: the new version would refuse $CONF_DIR/mptcpd.toml" >&2
            say "the running daemon is still the old version, and keeps running" >&2
            say "fix the file (mptcpd-py check-config), then: systemctl restart mptcpd-py (not reload)" >&2
            exit 1
        fi
        say "restarting the running mptcpd-py"
        systemctl restart mptcpd-py
    fi
fi
if [ "$config_rejected" = 1 ]; then
    say "done: $("$PREFIX/bin/mptcpd-py" --version); fix $CONF_DIR/mptcpd.toml before starting it (it would exit 78)"
else
    say "done: $("$PREFIX/bin/mptcpd-py" --version); start it with: systemctl enable --now mptcpd-py"
fi
