#!/bin/sh
# The whole test suite, as CI runs it: installs what it needs (as root, on
# Debian 12), then ruff, mypy --strict and pytest (unit + integration tests
# in network namespaces against the running kernel).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m long` or `-k reconcile`.
set -eu
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy --strict mptcpd_py"
.venv/bin/mypy
echo "== pytest"
status=0
.venv/bin/python -m pytest -p no:cacheprovider "$@" || status=$?
# pytest's 5 means "no tests collected": with a filter that is not a failure.
if [ "$status" -eq 5 ] && [ "$#" -gt 0 ]; then status=0; fi
exit "$status"
