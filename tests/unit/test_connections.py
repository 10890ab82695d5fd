"""The connection table after lost events: rebuilt from sock_diag; of the
events queued before the dump, those adding state are superseded by it (no
closed connection comes back), those taking state away and the peer's
announcements (which no dump shows) are applied after it."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from mptcpd_py import connections
from mptcpd_py.connections import ConnectionTable
from mptcpd_py.netlink.diag import DiagSubflow
from mptcpd_py.netlink.types import (
    AddressAnnounced,
    ConnectionClosed,
    ConnectionEvent,
    MptcpEventType,
)

A = ipaddress.ip_address


class FakeDiag:
    """sock_diag showing token 1 (live) and token 3 (closed, its subflow
    still established): a kernel dump cannot be made to race on demand."""

    def __init__(self, netns: Any = None) -> None:
        pass

    async def subflows(self) -> list[DiagSubflow]:
        return [DiagSubflow(1, A("192.0.2.1"), 40000, A("192.0.2.2"), 80, 0, 0, False, 2),
                DiagSubflow(3, A("192.0.2.1"), 40003, A("192.0.2.2"), 80, 0, 0, False, 2)]

    async def mptcp_listeners(self) -> list[tuple[Any, int]]:
        return []

    def close(self) -> None:
        pass


async def test_resync_supersedes_events_adding_state_and_applies_those_removing_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "SockDiag", FakeDiag)
    table = ConnectionTable()
    superseded = [
        ConnectionEvent(MptcpEventType.CREATED, 2, A("192.0.2.1"), A("192.0.2.2"), 40001, 80),
        AddressAnnounced(1, 5, A("198.51.100.2"), 80),
        AddressAnnounced(2, 6, A("198.51.100.2"), 80),
        ConnectionClosed(3),
    ]
    await table.resync(None, superseded)
    # token 2 closed before the dump; token 3 reported CLOSED, the dump lags
    assert set(table.connections) == {1}
    remotes = table.connections[1].remotes
    assert remotes[5].address == A("198.51.100.2")
