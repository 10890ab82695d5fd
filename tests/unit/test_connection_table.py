"""The connection table built from events holds what sock_diag shows: the
initial subflow is one of the connection's subflows while it is alive."""

from __future__ import annotations

import ipaddress

from mptcpd_py.connections import ConnectionTable
from mptcpd_py.netlink.diag import DiagSubflow
from mptcpd_py.netlink.types import ConnectionEvent, MptcpEventType, SubflowEvent

A = ipaddress.ip_address
T = MptcpEventType
TOKEN = 0x1234


def created(kind: MptcpEventType = T.CREATED) -> ConnectionEvent:
    return ConnectionEvent(kind, TOKEN, A("192.0.2.1"), A("192.0.2.2"), 40000, 443)


def subflow_event(kind: MptcpEventType, local: str, sport: int, local_id: int
                  ) -> SubflowEvent:
    return SubflowEvent(kind, TOKEN, local_id, 0, A(local), A("192.0.2.2"), sport, 443)


def four_tuples(table: ConnectionTable) -> set[tuple[str, int, str, int]]:
    rec = table.get(TOKEN)
    assert rec is not None
    return {(str(s.local), s.local_port, str(s.remote), s.remote_port)
            for s in rec.snapshot().subflows}


INITIAL = ("192.0.2.1", 40000, "192.0.2.2", 443)
JOINED = ("198.51.100.1", 50000, "192.0.2.2", 443)


def test_the_initial_subflow_is_a_subflow_from_the_first_event_on() -> None:
    table = ConnectionTable()
    table.apply(created())
    assert four_tuples(table) == {INITIAL}
    table.apply(created(T.ESTABLISHED))
    assert four_tuples(table) == {INITIAL}
    (initial,) = table.get(TOKEN).snapshot().subflows  # type: ignore[union-attr]
    assert (initial.local_id, initial.remote_id, initial.backup) == (0, 0, False)


def test_a_connection_first_seen_established_has_its_initial_subflow_too() -> None:
    table = ConnectionTable()
    table.apply(created(T.ESTABLISHED))
    assert four_tuples(table) == {INITIAL}


def test_the_initial_subflow_leaves_the_table_when_it_closes_and_comes_back_when_reopened(
        ) -> None:
    table = ConnectionTable()
    table.apply(created())
    table.apply(created(T.ESTABLISHED))
    table.apply(subflow_event(T.SUB_ESTABLISHED, "198.51.100.1", 50000, 1))
    assert four_tuples(table) == {INITIAL, JOINED}
    table.apply(subflow_event(T.SUB_CLOSED, "192.0.2.1", 40000, 0))
    assert four_tuples(table) == {JOINED}
    # The kernel takes a new subflow from the initial address (id 0) again.
    table.apply(subflow_event(T.SUB_ESTABLISHED, "192.0.2.1", 41000, 0))
    assert four_tuples(table) == {JOINED, ("192.0.2.1", 41000, "192.0.2.2", 443)}


def test_events_and_a_sock_diag_rebuild_agree_on_the_subflows() -> None:
    from_events = ConnectionTable()
    for event in (created(), created(T.ESTABLISHED),
                  subflow_event(T.SUB_ESTABLISHED, "198.51.100.1", 50000, 1)):
        from_events.apply(event)
    rebuilt = ConnectionTable()
    rebuilt.rebuild([
        DiagSubflow(TOKEN, A("192.0.2.1"), 40000, A("192.0.2.2"), 443, 0, 0, False, 0),
        DiagSubflow(TOKEN, A("198.51.100.1"), 50000, A("192.0.2.2"), 443, 1, 0, False, 0),
    ], set())
    assert four_tuples(from_events) == four_tuples(rebuilt) == {INITIAL, JOINED}


def test_a_rebuild_without_the_initial_subflow_keeps_the_kernels_ids() -> None:
    """A connection first seen in a sock_diag rebuild after its initial
    subflow died: its addresses keep the ids the kernel reports (giving one
    of them id 0 would make later ANNOUNCEs and SUBFLOW_CREATEs use 0)."""
    table = ConnectionTable()
    table.rebuild([
        DiagSubflow(TOKEN, A("198.51.100.1"), 50000, A("192.0.2.2"), 443, 5, 0, False, 3),
        DiagSubflow(TOKEN, A("203.0.113.1"), 50001, A("198.51.100.2"), 443, 6, 2, True, 4),
    ], listener_ports=set())
    rec = table.get(TOKEN)
    assert rec is not None
    assert rec.local_ids == {A("198.51.100.1"): 5, A("203.0.113.1"): 6}
    assert rec.local_id(A("192.0.2.9")) not in (0, 5, 6)
    assert {r.id: (str(r.address), r.port) for r in rec.remotes.values()} == {
        0: ("192.0.2.2", 443), 2: ("198.51.100.2", 443)}


def test_connections_lacking_a_subflow_from_an_address_are_counted() -> None:
    table = ConnectionTable()
    table.apply(created())
    assert table.lacking_subflow_from(A("198.51.100.1")) == 0  # not established yet
    table.apply(created(T.ESTABLISHED))
    assert table.lacking_subflow_from(A("198.51.100.1")) == 1
    assert table.lacking_subflow_from(A("192.0.2.1")) == 0  # the initial subflow's
    assert table.lacking_subflow_from(A("2001:db8::1")) == 0  # another family
    table.apply(subflow_event(T.SUB_ESTABLISHED, "198.51.100.1", 50000, 1))
    assert table.lacking_subflow_from(A("198.51.100.1")) == 0
