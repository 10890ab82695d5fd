#!/bin/sh
# Install the Debian packages named as arguments that are not installed yet
# (idempotent: nothing to do costs a dpkg-query per package).
# libsystemd-dev must match libsystemd0 exactly (systemd-python builds
# against it); when the mirror no longer has the installed version, both
# move to the current one.
set -eu
missing=""
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
[ -n "$missing" ] || exit 0
echo "apt-get install$missing"
export DEBIAN_FRONTEND=noninteractive
# Other runs on the machine may hold the dpkg lock for a while: wait for it.
apt="apt-get -o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends"
apt-get -o DPkg::Lock::Timeout=600 update -qq
plain=$(echo "$missing" | sed 's/ libsystemd-dev\b//')
if [ -n "$plain" ]; then
    # shellcheck disable=SC2086
    $apt install $plain >/dev/null
fi
case "$missing" in *" libsystemd-dev"*)
    v=$(dpkg-query -W -f='${Version}' libsystemd0)
    $apt install "libsystemd-dev=$v" >/dev/null 2>&1 ||
        $apt install libsystemd-dev libsystemd0 >/dev/null
esac
