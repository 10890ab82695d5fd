"""What the running kernel offers: probed once at start, logged, and used
to mask flags the kernel would silently drop (so the reconciler does not
fight it forever)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import platform
import threading

from mptcpd_py.errors import FamilyMissing, MptcpdError
from mptcpd_py.netlink.mptcp import MptcpPM
from mptcpd_py.netlink.types import Capabilities, EndpointFlags
from mptcpd_py.netns import CLONE_NEWNET, _libc
from mptcpd_py.sysctl import active_path_manager, read_mptcp_sysctl

CAP_NET_ADMIN = 12
_PROBE_FLAGS = (
    EndpointFlags.SUBFLOW | EndpointFlags.BACKUP | EndpointFlags.FULLMESH | EndpointFlags.LAMINAR
)
_ALWAYS_KEPT = (
    EndpointFlags.SIGNAL | EndpointFlags.SUBFLOW | EndpointFlags.BACKUP | EndpointFlags.FULLMESH
)


def has_net_admin() -> bool:
    """CAP_NET_ADMIN in the effective set (what every write needs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << CAP_NET_ADMIN))
    except OSError:
        pass
    return os.geteuid() == 0


def _kernel_version() -> tuple[int, int]:
    parts = platform.release().split(".")
    try:
        return (int(parts[0]), int(parts[1].split("-")[0]))
    except (IndexError, ValueError):
        return (0, 0)


def _kept_flags_in_private_netns() -> EndpointFlags | None:
    """Add an endpoint with every flag in a throw-away namespace and read
    back which flags stuck. None when a namespace cannot be made (no
    CAP_SYS_ADMIN, e.g. under the hardened unit)."""
    result: list[EndpointFlags | None] = [None]

    def worker() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            return

        async def probe() -> EndpointFlags:
            pm = await MptcpPM.open()
            try:
                await pm.add_endpoint(ipaddress.ip_address("192.0.2.1"), _PROBE_FLAGS, id=1)
                (endpoint,) = await pm.endpoints()
                return endpoint.flags | EndpointFlags.SIGNAL
            finally:
                pm.close()

        try:
            result[0] = asyncio.run(probe())
        except (OSError, MptcpdError, ValueError):
            result[0] = None

    thread = threading.Thread(target=worker, name="mptcp-flag-probe", daemon=True)
    thread.start()
    thread.join(timeout=5)
    return result[0]


def kept_flags() -> EndpointFlags:
    flags = _kept_flags_in_private_netns()
    if flags is not None:
        return flags & ~EndpointFlags.IMPLICIT
    # Fallback by version: LAMINAR arrived in the 6.18 cycle.
    if _kernel_version() >= (6, 18):
        return _ALWAYS_KEPT | EndpointFlags.LAMINAR
    return _ALWAYS_KEPT


def available_path_managers() -> tuple[str, ...]:
    """``net.mptcp.available_path_managers`` (6.15+); before it, a kernel
    with ``pm_type`` (5.19-6.14) has both, and an older one only "kernel"."""
    listed = read_mptcp_sysctl("available_path_managers")
    if listed:
        return tuple(listed.split())
    if read_mptcp_sysctl("pm_type") is not None:
        return ("kernel", "userspace")
    return ("kernel",)


async def probe_capabilities(pm: MptcpPM | None = None) -> Capabilities:
    enabled = read_mptcp_sysctl("enabled")
    notes: list[str] = []
    family_present = pm is not None
    if pm is None:
        try:
            pm = await MptcpPM.open()
            family_present = True
            pm.close()
        except FamilyMissing as exc:
            notes.append(str(exc))
    return Capabilities(
        mptcp_enabled=enabled == "1",
        family_present=family_present,
        path_manager=active_path_manager(),
        available_path_managers=available_path_managers(),
        kept_flags=await asyncio.to_thread(kept_flags),
        can_write=has_net_admin(),
        notes=tuple(notes),
    )


