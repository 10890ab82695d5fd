"""``net.mptcp.*`` sysctls of the daemon's network namespace."""

from __future__ import annotations

import os

MPTCP_SYSCTL_DIR = "/proc/sys/net/mptcp"


def sysctl_path(name: str) -> str:
    return os.path.join(MPTCP_SYSCTL_DIR, name)


def read_mptcp_sysctl(name: str) -> str | None:
    """The value of ``net.mptcp.NAME``, or None when this kernel lacks it."""
    try:
        with open(sysctl_path(name)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def write_mptcp_sysctl(name: str, value: str) -> None:
    """Write ``net.mptcp.NAME``; raises OSError (EACCES/EROFS under systemd hardening)."""
    with open(sysctl_path(name), "w") as f:
        f.write(value)


def active_path_manager() -> str:
    """"kernel" or "userspace": ``path_manager`` (6.15+) or the older ``pm_type``
    (5.19+); a kernel with neither has the in-kernel path manager alone."""
    value = read_mptcp_sysctl("path_manager")
    if value:
        return value
    return "userspace" if read_mptcp_sysctl("pm_type") == "1" else "kernel"


def set_path_manager(name: str) -> None:
    if read_mptcp_sysctl("path_manager") is not None:
        write_mptcp_sysctl("path_manager", name)
    else:
        write_mptcp_sysctl("pm_type", "1" if name == "userspace" else "0")
