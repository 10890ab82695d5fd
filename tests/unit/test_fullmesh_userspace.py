"""fullmesh (userspace PM) keeps to ``max_subflows`` when the peer announces
an address while the subflows asked for on establishment are still being
opened: those count, as the connection snapshot shows them pending."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator

import pytest
import structlog
from userspace_core import userspace_core

from mptcpd_py import connections
from mptcpd_py.netlink.types import (
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    AddressAnnounced,
    AddressFlags,
    ConnectionEvent,
    IfAddress,
    Link,
    MptcpEventType,
    SubflowEvent,
)
from mptcpd_py.userspace import PENDING_TIMEOUT

A = ipaddress.ip_address
UP = IFF_UP | IFF_RUNNING | IFF_LOWER_UP
LOCALS = ("192.0.2.1", "198.51.100.1", "203.0.113.1")
PEER, PEER_ANNOUNCED = A("192.0.2.2"), A("198.51.100.2")


@pytest.fixture(autouse=True)
def _daemon_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def three_address_client(max_subflows: int):  # type: ignore[no-untyped-def]
    return userspace_core(
        f'plugins = ["fullmesh"]\n[plugins.fullmesh]\nmax_subflows = {max_subflows}',
        [Link(index=i, name=f"eth{i}", flags=UP) for i in (2, 3, 4)],
        [IfAddress(index=i, address=A(a), prefixlen=24, flags=AddressFlags.PERMANENT)
         for i, a in zip((2, 3, 4), LOCALS, strict=True)])


async def establish(core) -> None:  # type: ignore[no-untyped-def]
    for kind in (MptcpEventType.CREATED, MptcpEventType.ESTABLISHED):
        await core.userspace.handle(ConnectionEvent(kind, 7, A(LOCALS[0]), PEER, 40000, 443))


def test_a_peer_announcement_before_the_first_join_is_up_stays_within_max_subflows() -> None:
    core, pm = three_address_client(max_subflows=2)

    async def scenario() -> None:
        await establish(core)
        assert [c for c in pm.calls] == [("subflow_create", LOCALS[1], str(PEER))]
        await core.userspace.handle(AddressAnnounced(7, 1, PEER_ANNOUNCED, 0))
    asyncio.run(scenario())
    assert len(pm.calls) == 1  # initial + one being opened = 2: nothing more


def test_a_join_being_opened_holds_its_place_until_it_is_up_or_has_failed() -> None:
    core, pm = three_address_client(max_subflows=3)

    def creates() -> list[tuple[str, str, str]]:
        return [c for c in pm.calls if c[0] == "subflow_create"]

    async def scenario() -> None:
        await establish(core)
        assert creates() == [("subflow_create", LOCALS[1], str(PEER)),
                             ("subflow_create", LOCALS[2], str(PEER))]
        await core.userspace.handle(AddressAnnounced(7, 1, PEER_ANNOUNCED, 0))
        assert len(creates()) == 2  # with the initial one, 3: full
        await core.userspace.handle(SubflowEvent(
            MptcpEventType.SUB_ESTABLISHED, 7, 1, 0, A(LOCALS[1]), PEER, 40001, 443))
        assert core.connections.get(7).snapshot().pending == ((A(LOCALS[2]), PEER, 443),)
        await core.userspace.handle(AddressAnnounced(7, 2, A("203.0.113.2"), 0))
        assert len(creates()) == 2  # two up, one being opened
        await core.userspace.handle(SubflowEvent(
            MptcpEventType.SUB_CLOSED, 7, 2, 0, A(LOCALS[2]), PEER, 40002, 443, error=111))
        # Its place is free: the next pair (that one backs off) gets it.
        assert creates()[2:] == [("subflow_create", LOCALS[0], str(PEER_ANNOUNCED))]
    asyncio.run(scenario())


def test_a_join_past_its_pending_timeout_is_no_longer_shown_pending(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The core may ask for it again then, so a budget must not count it."""
    core, _pm = three_address_client(max_subflows=2)
    asyncio.run(establish(core))
    rec = core.connections.get(7)
    assert len(rec.snapshot().pending) == 1
    later = time.monotonic() + PENDING_TIMEOUT + 1
    monkeypatch.setattr(connections.time, "monotonic", lambda: later)
    assert rec.snapshot().pending == ()
