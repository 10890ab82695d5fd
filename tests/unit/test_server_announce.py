"""server_announce with a fixed ``addresses`` list on a host that lacks one
of them: the others are announced, and nothing it asks for is an action the
core rejects (which would fail the hook and, repeated, disable the plugin).
A listed address that is on the host but not eligible (link without
carrier, tentative, excluded) is not announced either: the core withdraws
such an address, so announcing it made it flap on every pass."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator

import pytest
import structlog
from recording_log import RecordingLog
from userspace_core import userspace_core

from mptcpd_py.config import NetworkConfig
from mptcpd_py.model import NetworkModel
from mptcpd_py.netlink.types import (
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    AddressFlags,
    ConnectionEvent,
    IfAddress,
    Link,
    MptcpEventType,
)
from mptcpd_py.plugin import Connection, ConnectionContext
from plugins.server_announce import ServerAnnounce

A = ipaddress.ip_address
UP = IFF_UP | IFF_RUNNING | IFF_LOWER_UP
LISTED = ["198.51.100.1", "203.0.113.1"]


def model(*addresses: str, eth1_flags: int = UP, address_flags: int = AddressFlags.PERMANENT,
          cfg: NetworkConfig | None = None) -> NetworkModel:
    m = NetworkModel(cfg or NetworkConfig(), devtype_reader=lambda name: "")
    m.load([Link(index=2, name="eth0", flags=UP), Link(index=3, name="eth1", flags=eth1_flags)],
           [IfAddress(index=2, address=A("192.0.2.1"), prefixlen=24,
                      flags=AddressFlags.PERMANENT)]
           + [IfAddress(index=3, address=A(a), prefixlen=24, flags=address_flags)
              for a in addresses], [])
    return m


def established(token: int) -> Connection:
    return Connection(token=token, local=A("192.0.2.1"), local_port=443,
                      remote=A("192.0.2.2"), remote_port=40000 + token, server_side=True,
                      established=True)


def announced(plugin: ServerAnnounce, m: NetworkModel, token: int) -> list[str]:
    ctx = ConnectionContext(established(token), m.snapshot(), plugin.name)
    plugin.connection_established(ctx)
    local = ctx.net.local_addresses
    assert all(a.local in local for a in ctx.actions)  # what UserspacePM._invalid checks
    return [str(a.local) for a in ctx.actions]


def test_a_listed_address_absent_from_the_host_is_skipped_and_logged_once() -> None:
    log = RecordingLog()
    plugin = ServerAnnounce({"addresses": LISTED, "port": 0}, log)
    without = model("198.51.100.1")
    assert announced(plugin, without, 1) == ["198.51.100.1"]
    assert announced(plugin, without, 2) == ["198.51.100.1"]
    assert log.lines == [("info", "listed address not eligible; not announced until it is",
                          {"addr": "203.0.113.1", "reason": "not on this host"})]


def test_a_listed_address_is_announced_once_it_is_back_and_logged_again_if_it_goes() -> None:
    log = RecordingLog()
    plugin = ServerAnnounce({"addresses": LISTED, "port": 0}, log)
    announced(plugin, model("198.51.100.1"), 1)
    assert announced(plugin, model("198.51.100.1", "203.0.113.1"), 2) == [
        "198.51.100.1", "203.0.113.1"]
    announced(plugin, model("198.51.100.1"), 3)
    assert [fields["addr"] for _level, _event, fields in log.lines] == [
        "203.0.113.1", "203.0.113.1"]


@pytest.mark.parametrize(("what", "net", "reason"), [
    ("link up without carrier", model("198.51.100.1", eth1_flags=IFF_UP), "link down"),
    ("tentative", model("198.51.100.1",
                        address_flags=AddressFlags.PERMANENT | AddressFlags.TENTATIVE),
     "tentative (duplicate address detection not finished)"),
    ("excluded", model("198.51.100.1", cfg=NetworkConfig(exclude=("eth1",))),
     "interface in [network] exclude"),
])
def test_a_listed_address_on_the_host_but_not_eligible_is_skipped_and_logged_once(
        what: str, net: NetworkModel, reason: str) -> None:
    log = RecordingLog()
    plugin = ServerAnnounce({"addresses": ["198.51.100.1"], "port": 0}, log)
    assert announced(plugin, net, 1) == []
    assert announced(plugin, net, 2) == []
    assert log.lines == [("info", "listed address not eligible; not announced until it is",
                          {"addr": "198.51.100.1", "reason": reason})]
    assert announced(plugin, model("198.51.100.1"), 3) == ["198.51.100.1"]


@pytest.fixture
def _daemon_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("_daemon_logging")
def test_a_listed_address_whose_link_has_no_carrier_is_not_announced_then_withdrawn_in_a_loop(
        ) -> None:
    core, pm = userspace_core(
        'plugins = ["server_announce"]\n[plugins.server_announce]\naddresses = ["198.51.100.1"]',
        [Link(index=2, name="eth0", flags=UP), Link(index=3, name="eth1", flags=IFF_UP)],
        [IfAddress(index=2, address=A("192.0.2.1"), prefixlen=24, flags=AddressFlags.PERMANENT),
         IfAddress(index=3, address=A("198.51.100.1"), prefixlen=24,
                   flags=AddressFlags.PERMANENT)])
    userspace = core.userspace

    async def scenario() -> None:
        for kind in (MptcpEventType.CREATED, MptcpEventType.ESTABLISHED):
            await userspace.handle(ConnectionEvent(kind, 7, A("192.0.2.1"), A("192.0.2.2"),
                                                   443, 40000, server_side=True))
        for _pass in range(3):  # periodic or route passes: nothing eligible changed
            await userspace.network_changed(core.model.snapshot())
    asyncio.run(scenario())
    assert pm.calls == []
