#!/bin/sh
# Remove what scripts/install.sh installed: the service (stopped and
# disabled first), the venv /opt/mptcpd-py, the unit, /usr/local/bin/mptcpd-py,
# the mptcpize drop-ins of other services and the service's /run/mptcpd-py.
# /etc/mptcpd-py (your configuration and plugins) stays.
set -eu
. "$(dirname "$0")/install-paths.sh"
UNIT="$UNIT_DIR/mptcpd-py.service"
say() { echo "uninstall: $*"; }
require_root uninstall

systemd=""
[ -d /run/systemd/system ] && systemd=yes

if [ -n "$systemd" ] && [ -e "$UNIT" ]; then
    say "stopping and disabling mptcpd-py"
    systemctl disable --now -q mptcpd-py || true
fi

# Services made to use MPTCP with `mptcpd-py mptcpize enable` would preload a
# shim that is about to disappear: drop their drop-ins (only ours: the command
# refuses files it did not write), without restarting them.
for dropin in /etc/systemd/system/*.service.d/mptcpize.conf; do
    [ -e "$dropin" ] || continue
    unit=$(basename "$(dirname "$dropin")" .d)
    if [ -n "$systemd" ] && [ -x "$PREFIX/bin/mptcpd-py" ]; then
        "$PREFIX/bin/mptcpd-py" mptcpize disable --no-restart "$unit" | sed 's/^/uninstall: /' || true
    else
        say "left $dropin (remove it if \`mptcpd-py mptcpize enable\` wrote it)"
    fi
done

rm -f "$UNIT"
# The unit keeps its state directory past a stop (RuntimeDirectoryPreserve=yes):
# with the service gone, nothing reads it again. (Without systemd, a daemon
# started by hand may be using it: left alone.)
if [ -n "$systemd" ] && [ -d "$RUN_DIR" ]; then
    rm -rf "$RUN_DIR"
    say "removed $RUN_DIR"
fi
if [ -L "$BIN_LINK" ] && [ "$(readlink "$BIN_LINK")" = "$PREFIX/bin/mptcpd-py" ]; then
    rm -f "$BIN_LINK"
fi
if [ -f "$PREFIX/pyvenv.cfg" ]; then
    rm -rf "$PREFIX"
    say "removed $PREFIX"
fi
if [ -n "$systemd" ]; then
    systemctl daemon-reload
    systemctl reset-failed mptcpd-py 2>/dev/null || true
fi
if [ -d "$CONF_DIR" ]; then
    say "kept $CONF_DIR (your configuration and plugins); remove it with: rm -r $CONF_DIR"
fi
say "done"
