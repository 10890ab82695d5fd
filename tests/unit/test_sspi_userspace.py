"""sspi (userspace PM): an interface with a subflow being opened has its
subflow, even when the interface's first address changes before the join
is up (a second address that sorts first)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator

import pytest
import structlog
from userspace_core import userspace_core

from mptcpd_py.netlink.types import (
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    AddressFlags,
    ConnectionEvent,
    IfAddress,
    Link,
    MptcpEventType,
    SubflowEvent,
)

A = ipaddress.ip_address
UP = IFF_UP | IFF_RUNNING | IFF_LOWER_UP
LINKS = [Link(index=2, name="eth0", flags=UP), Link(index=3, name="eth1", flags=UP)]
PEER = A("192.0.2.2")


@pytest.fixture(autouse=True)
def _daemon_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def addresses(*on_eth1: str) -> list[IfAddress]:
    return [IfAddress(index=2, address=A("192.0.2.1"), prefixlen=24,
                      flags=AddressFlags.PERMANENT)] + [
        IfAddress(index=3, address=A(a), prefixlen=24, flags=AddressFlags.PERMANENT)
        for a in on_eth1]


def test_no_second_join_on_an_interface_whose_first_address_changed_while_one_is_pending(
        ) -> None:
    core, pm = userspace_core('plugins = ["sspi"]', LINKS, addresses("198.51.100.20"))

    async def scenario() -> None:
        for kind in (MptcpEventType.CREATED, MptcpEventType.ESTABLISHED):
            await core.userspace.handle(ConnectionEvent(kind, 7, A("192.0.2.1"), PEER,
                                                        40000, 443))
        assert pm.calls == [("subflow_create", "198.51.100.20", str(PEER))]
        core.model.load(LINKS, addresses("198.51.100.20", "198.51.100.10"), [])
        await core.userspace.network_changed(core.model.snapshot())
        assert len(pm.calls) == 1  # eth1's join is on its way
        await core.userspace.handle(SubflowEvent(
            MptcpEventType.SUB_CLOSED, 7, 1, 0, A("198.51.100.20"), PEER, 40001, 443,
            error=110))
        await core.userspace.network_changed(core.model.snapshot())
    asyncio.run(scenario())
    # Once it failed, eth1 gets a subflow again, from its first address now.
    assert pm.calls[1:] == [("subflow_create", "198.51.100.10", str(PEER))]
