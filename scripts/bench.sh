#!/bin/sh
# The side-by-side benchmark: mptcpd-py and the C mptcpd in network
# namespaces (about 3 minutes). Installs what it needs first (as root, on
# Debian 12): everything scripts/bootstrap.sh installs, the Debian packages
# mptcpd and mptcpd-plugins (the C daemon, /usr/libexec/mptcpd; never
# started outside the benchmark's namespaces) and the profilers of
# bench/requirements.txt into .venv/.
# Prints the table and writes bench/RESULTS.md. Extra arguments go to
# `python -m bench` (e.g. --sections endpoints,startup, --quick, --no-mptcpd).
set -eu
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
missing=""
for pkg in mptcpd mptcpd-plugins; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "bench: apt-get install$missing"
    # The package enables and starts mptcp.service, which would run mptcpd in
    # the host namespace and change its endpoints: a policy-rc.d that says
    # "no" (unless one exists) keeps it from starting.
    policy=/usr/sbin/policy-rc.d
    made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
        made_policy=1
        trap 'rm -f "$policy"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    if [ -n "$made_policy" ]; then rm -f "$policy"; trap - EXIT; fi
fi
# ... nor start at the next boot.
if [ -e /etc/systemd/system/multi-user.target.wants/mptcp.service ]; then
    echo "bench: disabling mptcp.service (mptcpd runs only inside the benchmark's namespaces)"
    deb-systemd-helper disable mptcp.service >/dev/null 2>&1 ||
        systemctl disable mptcp.service >/dev/null 2>&1 || true
fi
stamp=.venv/.bench-requirements
want=$(sha256sum bench/requirements.txt | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bench: installing bench/requirements.txt into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check -r bench/requirements.txt
    echo "$want" > "$stamp"
fi
exec .venv/bin/python -m bench "$@"
