"""The mptcp_pm commands against the real kernel, in a namespace."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from mptcpd_py.errors import (
    AddressNotAvailable,
    EndpointExists,
    EndpointIdBusy,
    EndpointTableFull,
    FamilyMissing,
    InvalidArgument,
    NoSuchEndpoint,
    PermissionDenied,
)
from mptcpd_py.lab import Lab
from mptcpd_py.netlink.mptcp import MptcpPM, resolve_family
from mptcpd_py.netlink.probe import probe_capabilities
from mptcpd_py.netlink.types import Endpoint, EndpointFlags, Limits
from mptcpd_py.netns import in_netns

F = EndpointFlags
A = ipaddress.ip_address


@pytest.fixture
async def pm(ns: str):
    pm = await MptcpPM.open(netns=ns)
    yield pm
    pm.close()


async def test_limits_roundtrip_and_kernel_maximum(pm: MptcpPM) -> None:
    await pm.set_limits(subflows=5, add_addr_accepted=3)
    assert await pm.get_limits() == Limits(subflows=5, add_addr_accepted=3)
    await pm.set_limits(subflows=1)
    assert await pm.get_limits() == Limits(subflows=1, add_addr_accepted=3)
    with pytest.raises(InvalidArgument, match="limit greater than maximum"):
        await pm.set_limits(subflows=9)
    assert await pm.get_limits() == Limits(subflows=1, add_addr_accepted=3)


@pytest.mark.parametrize("address", ["192.0.2.10", "2001:db8::10"])
async def test_endpoint_add_get_dump_delete(pm: MptcpPM, ns: str, address: str) -> None:
    addr = A(address)
    added = await pm.add_endpoint(addr, F.SUBFLOW | F.BACKUP, id=7, ifindex=1)
    assert added == Endpoint(7, addr, F.SUBFLOW | F.BACKUP, 1, 0)
    assert await pm.get_endpoint(7) == added
    assert await pm.endpoints() == [added]
    shown = subprocess.run(["ip", "-n", ns, "mptcp", "endpoint", "show"],
                           capture_output=True, text=True, check=True).stdout
    assert f"{address} id 7 subflow backup dev lo" in shown
    await pm.delete_endpoint(7)
    assert await pm.endpoints() == []


async def test_endpoint_with_port_and_kernel_assigned_id(pm: MptcpPM, ns: str) -> None:
    with pytest.raises(AddressNotAvailable):  # a port needs a listener on a local address
        await pm.add_endpoint(A("192.0.2.20"), F.SIGNAL, port=10100)
    subprocess.run(["ip", "-n", ns, "addr", "add", "192.0.2.20/32", "dev", "lo"], check=True)
    first = await pm.add_endpoint(A("192.0.2.20"), F.SIGNAL, port=10100)
    second = await pm.add_endpoint(A("2001:db8::20"), F.SIGNAL)
    assert first.port == 10100 and first.id > 0
    assert second.id > first.id
    assert {e.address for e in await pm.endpoints()} == {A("192.0.2.20"), A("2001:db8::20")}


async def test_endpoint_refusals_are_typed_with_kernel_text(pm: MptcpPM) -> None:
    await pm.add_endpoint(A("192.0.2.1"), F.SUBFLOW, id=1)
    with pytest.raises(EndpointExists):
        await pm.add_endpoint(A("192.0.2.1"), F.SUBFLOW, id=2)
    with pytest.raises(EndpointIdBusy):
        await pm.add_endpoint(A("192.0.2.2"), F.SUBFLOW, id=1)
    with pytest.raises(NoSuchEndpoint):
        await pm.delete_endpoint(99)
    with pytest.raises(InvalidArgument, match="signal and fullmesh"):
        await pm.add_endpoint(A("192.0.2.3"), F.SIGNAL | F.FULLMESH, id=3)
    for i in range(2, 9):
        await pm.add_endpoint(A(f"192.0.2.{i + 10}"), F.SUBFLOW, id=i)
    with pytest.raises(EndpointTableFull):
        await pm.add_endpoint(A("192.0.2.99"), F.SUBFLOW, id=99)
    assert len(await pm.endpoints()) == 8


@pytest.mark.parametrize("prefix", ["198.51.100.", "2001:db8:5::"])
async def test_flush_removes_every_endpoint(pm: MptcpPM, prefix: str) -> None:
    for i in range(1, 4):
        await pm.add_endpoint(A(f"{prefix}{i}"), F.SIGNAL, id=i)
    await pm.flush_endpoints()
    assert await pm.endpoints() == []


@pytest.mark.parametrize("address", ["203.0.113.1", "2001:db8:6::1"])
async def test_set_flags_changes_backup_and_fullmesh(pm: MptcpPM, address: str) -> None:
    await pm.add_endpoint(A(address), F.SUBFLOW, id=4)
    await pm.set_endpoint_flags(F.BACKUP | F.FULLMESH, id=4)
    assert (await pm.get_endpoint(4)).flags == F.SUBFLOW | F.BACKUP | F.FULLMESH
    await pm.set_endpoint_flags(F.NONE, address=A(address))
    assert (await pm.get_endpoint(4)).flags == F.SUBFLOW


async def test_missing_family_is_reported_clearly(pm: MptcpPM) -> None:
    with pytest.raises(FamilyMissing, match="not found"):
        await resolve_family(pm.sock, "nosuchfam")


async def test_probe_sees_path_manager_flags_and_disabled_mptcp(lab: Lab) -> None:
    ns = lab.netns("probe")
    with in_netns(ns.name):
        caps = await probe_capabilities()
    assert caps.mptcp_enabled and caps.family_present
    assert caps.path_manager == "kernel"
    assert F.SIGNAL | F.SUBFLOW | F.BACKUP | F.FULLMESH in caps.kept_flags
    ns.sysctl("net.mptcp.path_manager", "userspace")
    ns.sysctl("net.mptcp.enabled", 0)
    with in_netns(ns.name):
        caps = await probe_capabilities()
    assert caps.path_manager == "userspace"
    assert not caps.mptcp_enabled


def test_writes_without_cap_net_admin_are_permission_denied(ns: str) -> None:
    code = (
        "import asyncio, ipaddress\n"
        "from mptcpd_py.netlink.mptcp import MptcpPM\n"
        "from mptcpd_py.errors import PermissionDenied\n"
        "async def main():\n"
        "    pm = await MptcpPM.open()\n"
        "    print(await pm.get_limits())\n"
        "    try:\n"
        "        await pm.set_limits(subflows=3)\n"
        "    except PermissionDenied as e:\n"
        "        print('DENIED', e)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "setpriv", "--bounding-set", "-net_admin",
         "--inh-caps", "-net_admin", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert "Limits(" in out.stdout, out.stderr
    assert "DENIED set limits: permission denied" in out.stdout, out.stdout + out.stderr


def test_permission_denied_message_names_the_capability() -> None:
    assert "CAP_NET_ADMIN" in str(PermissionDenied(1, "", "set limits"))
