"""server_announce with a fixed ``addresses`` list on a host that lacks one
of them: the others are announced, and nothing it asks for is an action the
core rejects (which would fail the hook and, repeated, disable the plugin)."""

from __future__ import annotations

import ipaddress

from recording_log import RecordingLog

from mptcpd_py.config import NetworkConfig
from mptcpd_py.model import NetworkModel
from mptcpd_py.netlink.types import (
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    AddressFlags,
    IfAddress,
    Link,
)
from mptcpd_py.plugin import Connection, ConnectionContext
from plugins.server_announce import ServerAnnounce

A = ipaddress.ip_address
UP = IFF_UP | IFF_RUNNING | IFF_LOWER_UP
LISTED = ["198.51.100.1", "203.0.113.1"]


def model(*addresses: str) -> NetworkModel:
    m = NetworkModel(NetworkConfig(), devtype_reader=lambda name: "")
    m.load([Link(index=2, name="eth0", flags=UP), Link(index=3, name="eth1", flags=UP)],
           [IfAddress(index=2, address=A("192.0.2.1"), prefixlen=24,
                      flags=AddressFlags.PERMANENT)]
           + [IfAddress(index=3, address=A(a), prefixlen=24, flags=AddressFlags.PERMANENT)
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
    assert log.lines == [("info", "listed address not on this host; not announced until it is",
                          {"addr": "203.0.113.1"})]


def test_a_listed_address_is_announced_once_it_is_back_and_logged_again_if_it_goes() -> None:
    log = RecordingLog()
    plugin = ServerAnnounce({"addresses": LISTED, "port": 0}, log)
    announced(plugin, model("198.51.100.1"), 1)
    assert announced(plugin, model("198.51.100.1", "203.0.113.1"), 2) == [
        "198.51.100.1", "203.0.113.1"]
    announced(plugin, model("198.51.100.1"), 3)
    assert [fields["addr"] for _level, _event, fields in log.lines] == [
        "203.0.113.1", "203.0.113.1"]
