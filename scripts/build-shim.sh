#!/bin/sh
# Build libmptcpize.so (the LD_PRELOAD shim of `mptcpd-py mptcpize`) from
# shim/mptcpize.c into OUTPUT, when it is missing or older than the source.
# Used by bootstrap.sh (.venv/lib/mptcpd-py/) and install.sh (/opt/mptcpd-py/lib/mptcpd-py/).
set -eu
if [ "$#" -ne 1 ]; then
    echo "usage: $0 OUTPUT" >&2
    exit 64
fi
out=$1
src="$(cd "$(dirname "$0")/.." && pwd)/shim/mptcpize.c"
if [ -f "$out" ] && [ ! "$src" -nt "$out" ]; then
    exit 0
fi
mkdir -p "$(dirname "$out")"
# Build next to the target and rename: a running program never sees half a file.
${CC:-cc} -O2 -fPIC -shared -Wall -Wextra -Werror -o "$out.tmp" "$src" -ldl
chmod 0755 "$out.tmp"
mv -f "$out.tmp" "$out"
