#!/bin/sh
# The main job: installs what it needs (as root, on Debian 12), then runs
# `mptcpd-py demo`: mptcpd-py in a client network namespace, one MPTCP
# upload over tbf-shaped paths, a failover and a cellular-backup round.
# Extra arguments go to the demo (e.g. --rate 20 --seconds 3).
set -eu
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/mptcpd-py demo "$@"
