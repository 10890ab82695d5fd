"""Other path managers in the same network namespace.

Two daemons editing the same endpoints fight; the C mptcpd (or a second
mptcpd-py) in this namespace is a reason not to start. NetworkManager,
which manages endpoints only for its own devices when its
``connection.mptcp-flags`` say so, gets a warning: mptcpd-py never touches
endpoints it did not create and stops restoring one that keeps being
deleted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    pid: int
    name: str


def _netns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _cmdline(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def is_mptcpd_py(argv: list[str]) -> bool:
    """``mptcpd-py run`` (the console script, or ``python -m mptcpd_py run``)."""
    if "run" not in argv:
        return False
    head = argv[: argv.index("run")]
    return any(os.path.basename(a) == "mptcpd-py" or a == "mptcpd_py" for a in head)


def peers_in_namespace() -> tuple[list[Peer], list[Peer]]:
    """(conflicting path managers, NetworkManager) sharing our namespace."""
    mine = _netns_inode("self")
    conflicts: list[Peer] = []
    network_manager: list[Peer] = []
    me = os.getpid()
    ancestors = {me, os.getppid()}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return conflicts, network_manager
    for pid in pids:
        if int(pid) in ancestors:
            continue
        comm = _comm(pid)
        if comm not in ("mptcpd", "NetworkManager") and not comm.startswith(("mptcpd-py",
                                                                               "python")):
            continue
        if _netns_inode(pid) != mine:
            continue
        if comm == "mptcpd":
            conflicts.append(Peer(int(pid), "mptcpd"))
        elif comm == "NetworkManager":
            network_manager.append(Peer(int(pid), "NetworkManager"))
        elif is_mptcpd_py(_cmdline(pid)):
            conflicts.append(Peer(int(pid), "mptcpd-py"))
    return conflicts, network_manager
