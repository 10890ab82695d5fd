"""backup_cellular's endpoints hook: an endpoint on a cellular interface gets
the backup flag, also when the plugin that proposed it gave no interface
(ifindex 0, which the core accepts)."""

from __future__ import annotations

import ipaddress

import pytest
from recording_log import RecordingLog

from mptcpd_py.config import NetworkConfig
from mptcpd_py.model import NetworkModel, NetworkSnapshot
from mptcpd_py.netlink.types import (
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    AddressFlags,
    EndpointFlags,
    IfAddress,
    Link,
)
from mptcpd_py.plugin import EndpointIntent
from plugins.backup_cellular import BackupCellular

A = ipaddress.ip_address
UP = IFF_UP | IFF_RUNNING | IFF_LOWER_UP
ETH0, WWAN0 = 2, 3
WIRED, CELLULAR, SHARED = A("192.0.2.1"), A("198.51.100.7"), A("203.0.113.9")


def network() -> NetworkSnapshot:
    """eth0 and wwan0, each with its own address, and one address on both."""
    def on(index: int, address: ipaddress.IPv4Address) -> IfAddress:
        return IfAddress(index=index, address=address, prefixlen=24,
                         flags=AddressFlags.PERMANENT)

    model = NetworkModel(NetworkConfig(), devtype_reader=lambda name: "")
    model.load([Link(index=ETH0, name="eth0", flags=UP), Link(index=WWAN0, name="wwan0", flags=UP)],
               [on(ETH0, WIRED), on(WWAN0, CELLULAR), on(ETH0, SHARED), on(WWAN0, SHARED)], [])
    return model.snapshot()


def backup_after_the_plugin(*intents: EndpointIntent) -> list[bool]:
    plugin = BackupCellular({"match": ["wwan*"], "detect_devtype": True,
                             "detect_link_type": True}, RecordingLog())
    return [EndpointFlags.BACKUP in intent.flags
            for intent in plugin.endpoints(network(), intents)]


@pytest.mark.parametrize("ifindex", [WWAN0, 0])
def test_an_endpoint_on_the_cellular_interface_is_backup_with_or_without_its_index(
        ifindex: int) -> None:
    assert backup_after_the_plugin(EndpointIntent(CELLULAR, ifindex, EndpointFlags.SUBFLOW),
                                   EndpointIntent(WIRED, 0, EndpointFlags.SUBFLOW)) == [True, False]


def test_an_address_on_two_interfaces_without_an_index_is_left_alone() -> None:
    """Which interface the kernel would use is not known: no guess."""
    assert backup_after_the_plugin(EndpointIntent(SHARED, 0, EndpointFlags.SUBFLOW)) == [False]
    assert backup_after_the_plugin(EndpointIntent(SHARED, WWAN0, EndpointFlags.SUBFLOW)) == [True]
