"""What the core accepts from a plugin's ``endpoints`` hook (pure logic: the
network is a loaded model, the plugin a class made here)."""

from __future__ import annotations

import io
import ipaddress
from typing import Any

import pytest

from mptcpd_py.config import default_text, parse_config
from mptcpd_py.core import Core
from mptcpd_py.endpoints import ALL_KEPT
from mptcpd_py.loader import discover, schemas
from mptcpd_py.logging import configure
from mptcpd_py.netlink.types import (
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    AddressFlags,
    Capabilities,
    EndpointFlags,
    IfAddress,
    Link,
)
from mptcpd_py.plugin import EndpointIntent, Plugin, PluginState

ETH0 = 2
LOCAL = "192.0.2.1"


def core_proposing(*intents: EndpointIntent) -> tuple[Core, PluginState]:
    """A core on a host with eth0 = 192.0.2.1/24, whose one plugin proposes ``intents``."""
    available, _ = discover([])
    config = parse_config(default_text(), "<test>", schemas(available))  # nothing is written
    configure("info", "json", io.StringIO())
    core = Core(config, {})
    core.model.devtype_reader = lambda name: ""
    core.model.load([Link(index=ETH0, name="eth0", flags=IFF_UP | IFF_RUNNING | IFF_LOWER_UP)],
                    [IfAddress(index=ETH0, address=ipaddress.ip_address(LOCAL), prefixlen=24,
                               flags=AddressFlags.PERMANENT)], [])
    core.caps = Capabilities(mptcp_enabled=True, family_present=True, path_manager="kernel",
                             kept_flags=ALL_KEPT)

    def endpoints(self: Any, net: Any, proposed: Any) -> list[EndpointIntent]:
        return list(intents)

    cls = type("Proposer", (Plugin,), {"name": "proposer", "endpoints": endpoints})
    state = PluginState(cls({}, None), "test", hooks=("endpoints",))
    core.host.states.append(state)
    return core, state


async def desired(*intents: EndpointIntent) -> tuple[list[EndpointIntent], PluginState]:
    core, state = core_proposing(*intents)
    return await core.compute_desired(core.model.snapshot()), state


async def test_an_address_given_as_text_is_parsed() -> None:
    as_text: Any = LOCAL
    wanted, state = await desired(EndpointIntent(as_text, ETH0, EndpointFlags.SUBFLOW))
    assert state.last_error == ""
    assert [(i.address, i.ifindex, i.plugin) for i in wanted] == [
        (ipaddress.ip_address(LOCAL), ETH0, "proposer")]


@pytest.mark.parametrize(("address", "problem"), [
    ("192.0.2.99", "endpoint 192.0.2.99: not an address of this host"),
    ("eth0", "endpoint 'eth0': not an IP address"),
    (3221225985, "endpoint 3221225985: the address must be an ipaddress address or a string, "
                 "not int"),
    # Unhashable: a set lookup would raise in the core's pass, not in the plugin.
    (["192.0.2.1"], "endpoint ['192.0.2.1']: the address must be an ipaddress address or a "
                    "string, not list"),
])
async def test_an_address_that_is_not_local_or_not_an_address_is_named(
        address: Any, problem: str) -> None:
    wanted, state = await desired(EndpointIntent(address, 0, EndpointFlags.SUBFLOW))
    assert wanted == []
    assert state.last_error == f"invalid result: {problem}"


@pytest.mark.parametrize("flags", [EndpointFlags.NONE, EndpointFlags.SUBFLOW,
                                   EndpointFlags.SIGNAL | EndpointFlags.SUBFLOW,
                                   EndpointFlags.BACKUP])
async def test_a_port_without_signal_or_with_subflow_is_refused_as_the_kernel_would(
        flags: EndpointFlags) -> None:
    wanted, state = await desired(EndpointIntent(ipaddress.ip_address(LOCAL), ETH0, flags,
                                                 port=10000))
    assert wanted == []
    assert state.last_error == ("invalid result: endpoint 192.0.2.1: a port needs the signal "
                                "flag and not subflow (the kernel refuses it otherwise)")


@pytest.mark.parametrize("flags", [EndpointFlags.SIGNAL,
                                   EndpointFlags.SIGNAL | EndpointFlags.BACKUP, 1])
async def test_a_port_with_signal_alone_is_accepted(flags: EndpointFlags) -> None:
    wanted, state = await desired(EndpointIntent(ipaddress.ip_address(LOCAL), ETH0, flags,
                                                 port=10000))
    assert state.last_error == ""
    assert [(i.port, i.flags) for i in wanted] == [(10000, EndpointFlags(flags))]


@pytest.mark.parametrize("ifindex", [[ETH0], -1, "eth0"])
async def test_an_interface_index_that_is_not_one_is_named(ifindex: Any) -> None:
    wanted, state = await desired(EndpointIntent(ipaddress.ip_address(LOCAL), ifindex,
                                                 EndpointFlags.SUBFLOW))
    assert wanted == []
    assert state.last_error == (f"invalid result: endpoint 192.0.2.1: invalid interface index "
                                f"{ifindex!r}")
