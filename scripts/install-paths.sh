# Where scripts/install.sh puts mptcpd-py and scripts/uninstall.sh removes it
# from (sourced by both; systemd/mptcpd-py.service's ExecStart follows PREFIX).
PREFIX=/opt/mptcpd-py
UNIT_DIR=/usr/local/lib/systemd/system
CONF_DIR=/etc/mptcpd-py
BIN_LINK=/usr/local/bin/mptcpd-py
# The unit's RuntimeDirectory (state file, control socket), kept until reboot.
RUN_DIR=/run/mptcpd-py

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$1: run as root" >&2
        exit 64
    fi
}
