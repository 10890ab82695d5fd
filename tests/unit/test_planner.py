"""The endpoint planner (pure) and the reconciler against a fake kernel
that injects the refusals a real one gives only by accident."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from recording_log import RecordingLog as Log

from mptcpd_py.endpoints import ADD, DELETE, SET_FLAGS, EndpointReconciler, PassResult, plan
from mptcpd_py.errors import (
    EndpointExists,
    EndpointIdBusy,
    EndpointTableFull,
    InvalidArgument,
    KernelError,
    NoSuchEndpoint,
)
from mptcpd_py.netlink.types import Endpoint, EndpointFlags, Limits
from mptcpd_py.plugin import EndpointIntent
from mptcpd_py.state import OwnedEndpoint, StateStore

F = EndpointFlags
A = ipaddress.ip_address


def want(addr: str, flags: EndpointFlags = F.SUBFLOW, ifindex: int = 2, prio: int = 0
         ) -> EndpointIntent:
    return EndpointIntent(A(addr), ifindex, flags, priority=(prio, int(A(addr))), plugin="t")


def owned(id: int, addr: str, flags: EndpointFlags = F.SUBFLOW, ifindex: int = 2
          ) -> OwnedEndpoint:
    return OwnedEndpoint(id, A(addr), 0, flags, ifindex, "t")


def ep(id: int, addr: str, flags: EndpointFlags = F.SUBFLOW, ifindex: int = 2) -> Endpoint:
    return Endpoint(id, A(addr), flags, ifindex)


def kinds(p: Any) -> list[tuple[str, str, int]]:
    return [(op.kind, str(op.endpoint.address), op.endpoint.id) for op in p.operations]


def test_new_address_is_added_with_a_fresh_id_past_the_cursor() -> None:
    p = plan([want("192.0.2.1")], [ep(1, "203.0.113.9", F.SIGNAL)], {}, next_id=1)
    assert kinds(p) == [(ADD, "192.0.2.1", 2)]
    assert p.next_id == 3


def test_foreign_endpoints_are_never_touched_even_for_a_wanted_address() -> None:
    foreign = ep(5, "192.0.2.1", F.SIGNAL)
    p = plan([want("192.0.2.1")], [foreign, ep(6, "198.51.100.1")], {})
    assert p.operations == ()
    assert [i.address for i in p.foreign] == [A("192.0.2.1")]


def test_implicit_kernel_endpoint_is_replaced_by_an_add_that_keeps_its_id() -> None:
    p = plan([want("192.0.2.1")], [ep(3, "192.0.2.1", F.IMPLICIT)], {})
    assert kinds(p) == [(ADD, "192.0.2.1", 3)]
    assert p.operations[0].replaces_implicit


def test_owned_endpoint_no_longer_wanted_is_deleted_and_kept_ones_stay() -> None:
    mine = {o.key: o for o in (owned(1, "192.0.2.1"), owned(2, "192.0.2.2"))}
    p = plan([want("192.0.2.1")], [ep(1, "192.0.2.1"), ep(2, "192.0.2.2")], mine)
    assert kinds(p) == [(DELETE, "192.0.2.2", 2)]
    assert [k.id for k in p.kept] == [1]


def test_backup_change_is_set_flags_but_signal_change_is_delete_then_add() -> None:
    mine = {o.key: o for o in (owned(1, "192.0.2.1"), owned(2, "192.0.2.2"))}
    observed = [ep(1, "192.0.2.1"), ep(2, "192.0.2.2")]
    p = plan([want("192.0.2.1", F.SUBFLOW | F.BACKUP), want("192.0.2.2", F.SIGNAL)],
             observed, mine, next_id=3)
    assert kinds(p) == [(DELETE, "192.0.2.2", 2), (SET_FLAGS, "192.0.2.1", 1),
                        (ADD, "192.0.2.2", 3)]
    assert p.operations[1].old_flags == F.SUBFLOW


def test_device_change_is_delete_then_add() -> None:
    mine = {owned(1, "192.0.2.1", ifindex=2).key: owned(1, "192.0.2.1", ifindex=2)}
    p = plan([want("192.0.2.1", ifindex=3)], [ep(1, "192.0.2.1", ifindex=2)], mine, next_id=2)
    assert kinds(p) == [(DELETE, "192.0.2.1", 1), (ADD, "192.0.2.1", 2)]


def test_owned_record_whose_id_now_has_another_address_is_forgotten_not_deleted() -> None:
    mine = {owned(1, "192.0.2.1").key: owned(1, "192.0.2.1")}
    p = plan([], [ep(1, "198.51.100.5")], mine)
    assert p.operations == ()
    assert [f.id for f in p.forgotten] == [1]


def test_eight_slots_go_by_priority_foreign_ones_count_and_the_rest_wait() -> None:
    wanted = [want(f"192.0.2.{i}", prio=i) for i in range(1, 11)]
    p = plan(wanted, [ep(200, "203.0.113.1", F.SIGNAL)], {})
    added = [str(op.endpoint.address) for op in p.operations]
    assert added == [f"192.0.2.{i}" for i in range(1, 8)]
    assert [str(i.address) for i in p.waiting] == ["192.0.2.8", "192.0.2.9", "192.0.2.10"]


def test_higher_priority_newcomer_evicts_the_lowest_owned_endpoint() -> None:
    mine = {o.key: o for o in (owned(i, f"192.0.2.{i}") for i in range(1, 9))}
    observed = [ep(i, f"192.0.2.{i}") for i in range(1, 9)]
    wanted = [want(f"192.0.2.{i}", prio=i) for i in range(1, 9)] + [want("198.51.100.1", prio=0)]
    p = plan(wanted, observed, mine, next_id=9)
    assert kinds(p) == [(DELETE, "192.0.2.8", 8), (ADD, "198.51.100.1", 9)]
    assert p.operations[0].reason.startswith("evicted")


def test_flags_the_kernel_does_not_keep_are_masked_to_avoid_endless_churn() -> None:
    mine = {owned(1, "192.0.2.1").key: owned(1, "192.0.2.1")}
    p = plan([want("192.0.2.1", F.SUBFLOW | F.LAMINAR)], [ep(1, "192.0.2.1")], mine,
             kept_flags=F.SIGNAL | F.SUBFLOW | F.BACKUP | F.FULLMESH)
    assert p.operations == ()


def test_ids_wrap_after_255_and_skip_used_ones() -> None:
    p = plan([want("192.0.2.1"), want("192.0.2.2")], [ep(255, "203.0.113.1"), ep(1, "203.0.113.2")],
             {}, next_id=255)
    assert [op.endpoint.id for op in p.operations] == [2, 3]


def test_contested_address_waits_instead_of_being_re_added() -> None:
    intent = want("192.0.2.1")
    p = plan([intent], [], {}, contested=frozenset({intent.key}))
    assert p.operations == () and p.waiting == (intent,)


# ----------------------------------------------------------------- reconciler


class FakeKernel:
    """Endpoints in a dict; ``fail`` maps an operation to an exception to raise once."""

    def __init__(self) -> None:
        self.eps: dict[int, Endpoint] = {}
        self.fail: dict[tuple[str, str], KernelError] = {}
        self.calls: list[tuple[str, Any]] = []

    def _maybe_fail(self, op: str, addr: Any) -> None:
        exc = self.fail.pop((op, str(addr)), None)
        if exc is not None:
            raise exc

    async def add_endpoint(self, address: Any, flags: EndpointFlags = F.NONE, *, id: int = 0,
                           ifindex: int = 0, port: int = 0) -> Endpoint:
        self.calls.append(("add", (str(address), id)))
        self._maybe_fail("add", address)
        same = [e for e in self.eps.values() if e.address == address]
        if same and F.IMPLICIT not in same[0].flags:
            raise EndpointExists(errno.EEXIST, "", "add endpoint")
        if same and id:  # the kernel replaces an implicit endpoint only without an id
            raise InvalidArgument(errno.EINVAL, "", "add endpoint")
        if same:
            id = same[0].id
            del self.eps[id]
        if id in self.eps:
            raise EndpointIdBusy(errno.EBUSY, "", "add endpoint")
        if len(self.eps) >= 8:
            raise EndpointTableFull(errno.ERANGE, "", "add endpoint")
        id = id or min(set(range(1, 256)) - set(self.eps))
        self.eps[id] = Endpoint(id, address, flags, ifindex, port)
        return self.eps[id]

    async def get_endpoint(self, id: int, token: int | None = None) -> Endpoint:
        self.calls.append(("get", id))
        if id not in self.eps:
            raise NoSuchEndpoint(errno.EINVAL, "address not found", "get endpoint")
        return self.eps[id]

    async def delete_endpoint(self, id: int, address: Any = None) -> None:
        self.calls.append(("delete", id))
        self._maybe_fail("delete", address)
        if id not in self.eps:
            raise NoSuchEndpoint(errno.EINVAL, "address not found", "delete endpoint")
        del self.eps[id]

    async def endpoints(self, token: int | None = None) -> list[Endpoint]:
        self.calls.append(("dump", None))
        return list(self.eps.values())

    async def set_endpoint_flags(self, flags: EndpointFlags, *, id: int | None = None,
                                 address: Any = None) -> None:
        self.calls.append(("set_flags", id))
        assert id is not None
        self.eps[id] = replace(self.eps[id], flags=flags)

    async def get_limits(self) -> Limits:
        return Limits(2, 0)

    async def set_limits(self, subflows: int | None = None,
                         add_addr_accepted: int | None = None) -> None:
        return None




@pytest.fixture
def rig(tmp_path: Path) -> tuple[FakeKernel, EndpointReconciler, StateStore, Log]:
    kernel = FakeKernel()
    store = StateStore(str(tmp_path))
    log = Log()
    return kernel, EndpointReconciler(kernel, store, log), store, log


async def test_reconcile_adds_records_and_survives_restart_by_adoption(rig, tmp_path) -> None:
    kernel, rec, _store, _ = rig
    await rec.reconcile([want("192.0.2.1"), want("192.0.2.2")], full=True)
    assert {str(e.address) for e in kernel.eps.values()} == {"192.0.2.1", "192.0.2.2"}
    # A new daemon (crash + restart) adopts instead of re-adding.
    store2 = StateStore(str(tmp_path))
    store2.load()
    again = EndpointReconciler(kernel, store2, Log())
    kernel.calls.clear()
    await again.reconcile([want("192.0.2.1"), want("192.0.2.2")], full=True)
    assert [c for c in kernel.calls if c[0] != "dump"] == []
    assert len(store2.state.endpoints) == 2


async def test_before_add_runs_ahead_of_each_kernel_add_and_only_for_adds(rig) -> None:
    kernel, rec, _, _ = rig
    await rec.reconcile([want("192.0.2.1"), want("192.0.2.2")], full=True)
    kernel.calls.clear()

    async def before_add(endpoint: Any) -> None:
        kernel.calls.append(("before_add", str(endpoint.address)))

    await rec.reconcile([want("192.0.2.2"), want("198.51.100.1")], before_add=before_add)
    assert [c for c in kernel.calls if c[0] != "get"] == [
        ("delete", 1), ("before_add", "198.51.100.1"), ("add", ("198.51.100.1", 3))]


async def test_readd_deletes_and_adds_the_same_endpoint_or_does_nothing(rig) -> None:
    kernel, rec, store, log = rig
    await rec.reconcile([want("192.0.2.1"), want("192.0.2.2")], full=True)
    first = rec.owned[(A("192.0.2.1"), 0)]
    kernel.calls.clear()
    assert await rec.readd(first, "routed now")
    assert [c for c in kernel.calls if c[0] != "get"] == [("delete", 1), ("add", ("192.0.2.1", 1))]
    assert rec.owned[(A("192.0.2.1"), 0)] == first and kernel.eps[1].flags == first.flags
    assert ("info", "endpoint re-added", "192.0.2.1") in [
        (level, event, fields.get("addr")) for level, event, fields in log.lines]
    # Someone else's endpoint now has our id: left alone, ours forgotten.
    del kernel.eps[1]
    kernel.eps[1] = Endpoint(1, A("203.0.113.9"), F.SIGNAL)
    kernel.calls.clear()
    assert not await rec.readd(first, "routed now")
    assert [c[0] for c in kernel.calls] == ["get"]
    assert first.key not in rec.owned and 1 not in {e.id for e in rec.observed}
    # Refused on the add: not kept as ours (the next pass adds it back).
    second = rec.owned[(A("192.0.2.2"), 0)]
    kernel.fail[("add", "192.0.2.2")] = KernelError(errno.EIO, "mystery", "add endpoint")
    result = PassResult()
    assert not await rec.readd(second, "routed now", result)
    assert [(op.endpoint.address, exc.errno) for op, exc in result.failed] == \
        [(A("192.0.2.2"), errno.EIO)]
    assert (A("192.0.2.2"), 0) not in store.state.endpoints and 2 not in kernel.eps
    assert any(level == "warning" and event == "endpoint add failed"
               for level, event, _ in log.lines)
    # Deleted by someone else between our check and our delete: added back.
    await rec.reconcile([want("198.51.100.1")])
    third = rec.owned[(A("198.51.100.1"), 0)]

    async def deleted_just_before(id: int, address: Any = None) -> None:
        del kernel.eps[id]
        raise NoSuchEndpoint(errno.EINVAL, "address not found", "delete endpoint")

    kernel.delete_endpoint = deleted_just_before  # type: ignore[method-assign]
    assert await rec.readd(third, "routed now")
    assert rec.owned[third.key] == third and kernel.eps[third.id].address == third.address


async def test_id_taken_behind_our_back_is_resolved_by_re_planning(rig) -> None:
    kernel, rec, _, _ = rig
    await rec.reconcile([], full=True)
    kernel.eps[1] = Endpoint(1, A("203.0.113.5"), F.SIGNAL)  # appeared after our dump
    await rec.reconcile([want("192.0.2.1")])
    assert {e.id: str(e.address) for e in kernel.eps.values()} == {1: "203.0.113.5",
                                                                  2: "192.0.2.1"}
    assert rec.owned[(A("192.0.2.1"), 0)].id == 2


async def test_table_full_leaves_the_intent_waiting_without_a_stale_record(rig) -> None:
    kernel, rec, store, log = rig
    for i in range(1, 9):
        kernel.eps[100 + i] = Endpoint(100 + i, A(f"203.0.113.{i}"), F.SIGNAL)
    await rec.reconcile([want("192.0.2.1")])  # our cache thinks the table is empty
    assert store.state.endpoints == {}
    assert [str(i.address) for i in rec.last_plan.waiting] == ["192.0.2.1"]
    assert not any(level == "error" for level, _, _ in log.lines)


async def test_a_kernel_refusal_is_logged_and_the_rest_still_applied(rig) -> None:
    kernel, rec, store, log = rig
    kernel.fail[("add", "192.0.2.1")] = KernelError(errno.EIO, "mystery", "add endpoint")
    result = await rec.reconcile([want("192.0.2.1"), want("192.0.2.2")], full=True)
    assert {str(e.address) for e in kernel.eps.values()} == {"192.0.2.2"}
    assert [op.endpoint.address for op, _ in result.failed] == [A("192.0.2.1")]
    assert (A("192.0.2.1"), 0) not in store.state.endpoints
    assert any(level == "error" and event == "endpoint add failed" for level, event, _
               in log.lines)


async def test_endpoint_deleted_by_someone_else_is_restored_then_contested(rig) -> None:
    kernel, rec, _, log = rig
    for _ in range(EndpointReconciler.CONTEST_LIMIT):
        await rec.reconcile([want("192.0.2.1")], full=True)
        assert any(e.address == A("192.0.2.1") for e in kernel.eps.values())
        kernel.eps.clear()  # an admin (or NetworkManager) deletes it again
    await rec.reconcile([want("192.0.2.1")], full=True)
    assert kernel.eps == {}
    assert any("keeps being deleted" in event for _, event, _ in log.lines)


async def test_remove_all_deletes_only_what_we_own(rig) -> None:
    kernel, rec, store, _ = rig
    kernel.eps[50] = Endpoint(50, A("203.0.113.50"), F.SIGNAL)
    await rec.reconcile([want("192.0.2.1")], full=True)
    removed = await rec.remove_all()
    assert [str(r.address) for r in removed] == ["192.0.2.1"]
    assert list(kernel.eps) == [50]
    assert store.state.endpoints == {}


async def test_an_id_someone_else_reused_is_never_deleted_or_changed(rig) -> None:
    """Events plan against a cached dump; the kernel deletes by id alone. After
    an admin's flush the same id can name the admin's endpoint."""
    kernel, rec, store, _ = rig
    await rec.reconcile([want("192.0.2.1"), want("192.0.2.2")], full=True)
    ours = {str(e.address): e.id for e in kernel.eps.values()}
    kernel.eps.clear()  # ip mptcp endpoint flush; ip mptcp endpoint add 203.0.113.7 ...
    kernel.eps[ours["192.0.2.1"]] = Endpoint(ours["192.0.2.1"], A("203.0.113.7"), F.SIGNAL)
    kernel.eps[ours["192.0.2.2"]] = Endpoint(ours["192.0.2.2"], A("203.0.113.8"), F.SUBFLOW)
    # 192.0.2.1 goes away (a delete is planned); 192.0.2.2 becomes backup (a SET_FLAGS).
    await rec.reconcile([want("192.0.2.2", F.SUBFLOW | F.BACKUP)])
    assert kernel.eps[ours["192.0.2.1"]].address == A("203.0.113.7")
    assert kernel.eps[ours["192.0.2.2"]] == Endpoint(ours["192.0.2.2"], A("203.0.113.8"),
                                                     F.SUBFLOW)
    assert ("delete", ours["192.0.2.1"]) not in kernel.calls
    assert ("set_flags", ours["192.0.2.2"]) not in kernel.calls
    mine = {str(r.address): r for r in store.state.endpoints.values()}
    assert set(mine) == {"192.0.2.2"}  # re-added under a fresh id, with backup
    assert kernel.eps[mine["192.0.2.2"].id].flags == F.SUBFLOW | F.BACKUP


async def test_implicit_endpoint_is_replaced_in_the_kernel_and_owned(rig) -> None:
    kernel, rec, store, log = rig
    kernel.eps[4] = Endpoint(4, A("192.0.2.1"), F.IMPLICIT)
    await rec.reconcile([want("192.0.2.1")], full=True)
    assert kernel.eps == {4: Endpoint(4, A("192.0.2.1"), F.SUBFLOW, 2)}
    assert [r.id for r in store.state.endpoints.values()] == [4]
    assert not [line for line in log.lines if line[0] in ("warning", "error")]


async def test_an_interrupted_add_keeps_its_record_so_the_endpoint_is_not_leaked(
        rig, tmp_path) -> None:
    kernel, rec, store, _ = rig
    real_add = kernel.add_endpoint

    async def add_then_cancelled(*args: Any, **kwargs: Any) -> Endpoint:
        await real_add(*args, **kwargs)  # the kernel made it...
        raise asyncio.CancelledError  # ...and the daemon was stopped before the ack

    kernel.add_endpoint = add_then_cancelled  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await rec.reconcile([want("192.0.2.1")], full=True)
    assert [str(r.address) for r in store.state.endpoints.values()] == ["192.0.2.1"]
    removed = await rec.remove_all()
    assert [str(r.address) for r in removed] == ["192.0.2.1"]
    assert kernel.eps == {}


async def test_records_missing_after_a_restart_are_forgotten_without_blame(tmp_path) -> None:
    """A crash between the journal line and ADD_ADDR leaves a record for an
    endpoint that never existed: no warning, no strike towards 'contested'."""
    kernel = FakeKernel()
    for _ in range(EndpointReconciler.CONTEST_LIMIT + 1):
        store = StateStore(str(tmp_path))
        store.load()
        store.put_endpoint(owned(9, "192.0.2.1"))  # journaled; the daemon dies here
        store.close()
        store = StateStore(str(tmp_path))
        store.load()
        log = Log()
        rec = EndpointReconciler(kernel, store, log)
        await rec.reconcile([want("192.0.2.1")], full=True)
        assert [str(e.address) for e in kernel.eps.values()] == ["192.0.2.1"]
        assert not [line for line in log.lines if line[0] in ("warning", "error")], log.lines
        await rec.remove_all()
        store.close()


async def test_records_left_by_a_killed_run_are_forgotten_quietly_at_start(rig, tmp_path) -> None:
    """An add journaled but never made (killed in between) is not someone
    else's deletion: no warning, and it does not count towards contesting."""
    kernel, _rec, store, _ = rig
    store.put_endpoint(OwnedEndpoint(5, A("192.0.2.9"), 0, F.SUBFLOW, 0))  # then killed
    store2 = StateStore(str(tmp_path))
    store2.load()
    log = Log()
    again = EndpointReconciler(kernel, store2, log)
    await again.reconcile([want("192.0.2.9")], full=True)
    assert [str(e.address) for e in kernel.eps.values()] == ["192.0.2.9"]
    assert [(level, event) for level, event, _ in log.lines if "forgetting" in event
            or "someone else" in event] == [("info", "owned endpoint not in the kernel; "
                                             "forgetting it")]
    assert again.contested() == frozenset()
