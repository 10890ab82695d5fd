"""Endpoints are reconciled, not just added.

:func:`plan` is pure: desired (from the plugins) x observed (the kernel) x
owned (the state file) -> operations. :class:`EndpointReconciler` applies
a plan, keeps the state file and its view of the kernel current, and
re-plans after a surprise (someone else changed the kernel meanwhile).

Rules the plan follows:
- only endpoints the daemon created are ever changed or deleted; one is
  "ours" when its id *and* address match the state file. The kernel deletes
  and changes flags by id alone, so the id is read back just before: an id
  that someone else re-used (after a flush, say) is never touched;
- the in-kernel PM holds 8 endpoints; foreign ones count, ours go to the
  highest-priority desired addresses, the rest wait and are promoted when
  a slot frees;
- a flag change the kernel can make in place (backup, fullmesh) is a
  SET_FLAGS; any other difference is delete + add;
- an implicit endpoint (the kernel's, for a subflow on an address without
  one) is replaced by an add *without* an id: the kernel refuses an explicit
  id there (EINVAL) and gives the new endpoint the implicit one's id;
- deletes run first (they free slots), then flag changes, then adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from mptcpd_py.errors import (
    EndpointExists,
    EndpointIdBusy,
    EndpointTableFull,
    KernelError,
    NoSuchEndpoint,
)
from mptcpd_py.netlink.types import (
    CHANGEABLE_FLAGS,
    Address,
    Endpoint,
    EndpointFlags,
    Limits,
)
from mptcpd_py.plugin import EndpointIntent
from mptcpd_py.state import OwnedEndpoint, StateStore

MAX_ENDPOINTS = 8
ALL_KEPT = EndpointFlags(63) & ~EndpointFlags.IMPLICIT
MAX_ID = 255
Key = tuple[Address, int]
Matched = tuple[dict[Key, tuple[OwnedEndpoint, Endpoint]], list[OwnedEndpoint], list[Endpoint]]
_IMPLICIT = int(EndpointFlags.IMPLICIT)
_CHANGEABLE = int(CHANGEABLE_FLAGS)

ADD, DELETE, SET_FLAGS = "add", "delete", "set_flags"


class PathManagerAPI(Protocol):
    """What the reconciler needs of the kernel (the netlink layer, or a fake)."""

    async def add_endpoint(self, address: Address, flags: EndpointFlags = ..., *,
                           id: int = 0, ifindex: int = 0, port: int = 0) -> Endpoint: ...
    async def delete_endpoint(self, id: int, address: Address | None = None) -> None: ...
    async def get_endpoint(self, id: int, token: int | None = None) -> Endpoint: ...
    async def endpoints(self, token: int | None = None) -> list[Endpoint]: ...
    async def set_endpoint_flags(self, flags: EndpointFlags, *, id: int | None = None,
                                 address: Address | None = None) -> None: ...
    async def get_limits(self) -> Limits: ...
    async def set_limits(self, subflows: int | None = None,
                         add_addr_accepted: int | None = None) -> None: ...


BeforeAdd = Callable[[OwnedEndpoint], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Operation:
    kind: str
    endpoint: OwnedEndpoint
    reason: str
    old_flags: EndpointFlags = EndpointFlags.NONE
    replaces_implicit: bool = False  # add without an id; the kernel keeps the implicit's id


@dataclass(frozen=True)
class Plan:
    operations: tuple[Operation, ...] = ()
    forgotten: tuple[OwnedEndpoint, ...] = ()  # ours in the state file, gone from the kernel
    waiting: tuple[EndpointIntent, ...] = ()  # wanted, but no slot (or contested)
    foreign: tuple[EndpointIntent, ...] = ()  # wanted, but someone else's endpoint has it
    kept: tuple[OwnedEndpoint, ...] = ()
    next_id: int = 1

    @property
    def empty(self) -> bool:
        return not self.operations and not self.forgotten


def _allocate_id(used: set[int], cursor: int) -> tuple[int, int]:
    """Next free id from the cursor upward, wrapping 255 -> 1 (the kernel
    does the same, so a just-deleted id is not reused at once)."""
    cursor = cursor if 1 <= cursor <= MAX_ID else 1
    for step in range(MAX_ID):
        candidate = (cursor - 1 + step) % MAX_ID + 1
        if candidate not in used:
            return candidate, candidate % MAX_ID + 1
    raise EndpointTableFull(34, "no free endpoint id", "add endpoint")


def match_owned(observed: Iterable[Endpoint], owned: Mapping[Key, OwnedEndpoint]) -> Matched:
    """(ours present in the kernel, ours gone from the kernel, foreign)."""
    by_id = {e.id: e for e in observed}
    present: dict[Key, tuple[OwnedEndpoint, Endpoint]] = {}
    gone: list[OwnedEndpoint] = []
    for key, rec in owned.items():
        ep = by_id.get(rec.id)
        if ep is not None and ep.key == key:
            present[key] = (rec, ep)
        else:
            gone.append(rec)
    ours = {rec.id for rec, _ in present.values()}
    foreign = [e for e in by_id.values() if e.id not in ours]
    return present, gone, foreign


def plan(
    desired: Sequence[EndpointIntent],
    observed: Sequence[Endpoint],
    owned: Mapping[Key, OwnedEndpoint],
    *,
    kept_flags: EndpointFlags = ALL_KEPT,
    max_endpoints: int = MAX_ENDPOINTS,
    next_id: int = 1,
    contested: frozenset[Key] = frozenset(),
    matched: Matched | None = None,
) -> Plan:
    """``matched``: :func:`match_owned` of the same observed and owned, when
    the caller has it already. Flags are tested as ints below: an IntFlag
    operation costs a call into the enum machinery each."""
    present, gone, foreign = matched or match_owned(observed, owned)
    foreign_by_key = {e.key: e for e in foreign}

    wanted: list[EndpointIntent] = []
    seen: set[Key] = set()
    mask = int(kept_flags) & ~_IMPLICIT
    for proposal in sorted(desired, key=_by_priority) if len(desired) > 1 else desired:
        key = proposal.key
        if key in seen:
            continue
        seen.add(key)
        wanted.append(proposal if not int(proposal.flags) & ~mask
                      else replace(proposal, flags=EndpointFlags(int(proposal.flags) & mask)))

    # Someone else's endpoint for an address we want: leave it alone. An
    # implicit one (made by the kernel for a subflow) is replaced by an add.
    blocked = [i for i in wanted if i.key in foreign_by_key
               and not int(foreign_by_key[i.key].flags) & _IMPLICIT]
    replaceable = {i.key for i in wanted if i.key in foreign_by_key} - {i.key for i in blocked}
    occupied = sum(1 for e in foreign if e.key not in replaceable)
    slots = max(0, max_endpoints - occupied)

    candidates = [i for i in wanted if i.key not in foreign_by_key or i.key in replaceable]
    waiting = [i for i in candidates if i.key in contested and i.key not in present]
    candidates = [i for i in candidates if not (i.key in contested and i.key not in present)]
    selected, waiting_for_slot = candidates[:slots], candidates[slots:]
    waiting.extend(waiting_for_slot)

    used = {e.id for e in observed} | {rec.id for rec in owned.values()}
    deletes: list[Operation] = []
    changes: list[Operation] = []
    adds: list[Operation] = []
    kept: list[OwnedEndpoint] = []
    selected_keys = {i.key for i in selected}
    waiting_keys = {i.key for i in waiting_for_slot}

    for key, (rec, _ep) in present.items():
        if key not in selected_keys:
            why = "evicted: a higher-priority address needs the slot" if key in waiting_keys \
                else "no longer wanted"
            deletes.append(Operation(DELETE, rec, why))

    def record(intent: EndpointIntent, id: int) -> OwnedEndpoint:
        return OwnedEndpoint(id, intent.address, intent.port, intent.flags, intent.ifindex,
                             intent.plugin)

    for intent in selected:
        key = intent.key
        if key in present:
            rec, ep = present[key]
            have = int(ep.flags) & ~_IMPLICIT
            diff = have ^ int(intent.flags)
            if diff & ~_CHANGEABLE or ep.ifindex != intent.ifindex:
                deletes.append(Operation(DELETE, rec, "flags or device changed: re-adding"))
                new_id, next_id = _allocate_id(used, next_id)
                used.add(new_id)
                adds.append(Operation(ADD, record(intent, new_id), intent.reason or "wanted"))
            elif diff:
                changes.append(Operation(SET_FLAGS, replace(rec, flags=intent.flags,
                                                            plugin=intent.plugin),
                                         intent.reason or "flags changed",
                                         old_flags=EndpointFlags(have)))
            else:
                kept.append(replace(rec, plugin=intent.plugin) if rec.plugin != intent.plugin
                            else rec)
            continue
        if key in replaceable:
            implicit = foreign_by_key[key]
            adds.append(Operation(ADD, record(intent, implicit.id), intent.reason or "wanted",
                                  replaces_implicit=True))
            continue
        new_id, next_id = _allocate_id(used, next_id)
        used.add(new_id)
        adds.append(Operation(ADD, record(intent, new_id), intent.reason or "wanted"))

    return Plan(
        operations=tuple(deletes + changes + adds),
        forgotten=tuple(gone),
        waiting=tuple(waiting),
        foreign=tuple(blocked),
        kept=tuple(kept),
        next_id=next_id,
    )


def _by_priority(intent: EndpointIntent) -> Any:
    return intent.priority


@dataclass
class PassResult:
    applied: list[Operation] = field(default_factory=list)
    failed: list[tuple[Operation, KernelError]] = field(default_factory=list)
    forgotten: list[OwnedEndpoint] = field(default_factory=list)
    plan: Plan = field(default_factory=Plan)


class EndpointReconciler:
    """Applies plans to the kernel; owns the state file's endpoint records."""

    CONTEST_WINDOW = 600.0
    CONTEST_LIMIT = 3

    def __init__(
        self,
        pm: PathManagerAPI,
        store: StateStore,
        log: Any,
        *,
        kept_flags: EndpointFlags = ALL_KEPT,
        max_endpoints: int = MAX_ENDPOINTS,
        on_operation: Any = None,
        ifname_of: Any = None,
    ) -> None:
        self.pm = pm
        self.store = store
        self.log = log
        self.kept_flags = kept_flags
        self.max_endpoints = max_endpoints
        self.observed: list[Endpoint] = []
        self.last_plan = Plan()
        self.last_error = ""
        self.errors = 0
        self.on_operation = on_operation  # callback(kind, OwnedEndpoint, reason, ok, error)
        self.ifname_of = ifname_of or (lambda index: "")
        self._deleted_externally: dict[Key, list[float]] = {}
        # Records that may not exist in the kernel: loaded from the state file
        # (a crash may have come between the journal line and the kernel's
        # reply) or left by an interrupted add. One found missing is simply
        # forgotten, not blamed on someone else.
        self._unconfirmed: set[Key] = set(self.owned)

    @property
    def owned(self) -> dict[Key, OwnedEndpoint]:
        return self.store.state.endpoints

    async def resync(self) -> None:
        """Re-read the kernel's endpoints (the only way to see others' changes)."""
        self.observed = await self.pm.endpoints()

    def contested(self, now: float | None = None) -> frozenset[Key]:
        now = time.monotonic() if now is None else now
        out = set()
        for key, times in list(self._deleted_externally.items()):
            recent = [t for t in times if now - t < self.CONTEST_WINDOW]
            self._deleted_externally[key] = recent
            if len(recent) >= self.CONTEST_LIMIT:
                out.add(key)
        return frozenset(out)

    async def reconcile(self, desired: Sequence[EndpointIntent], *, full: bool = False,
                        before_add: BeforeAdd | None = None) -> PassResult:
        """One pass; ``full`` re-reads the kernel first. Re-plans (at most
        twice) when the kernel surprises it. ``before_add`` is awaited with
        each endpoint about to be added (its source route goes in first)."""
        result = PassResult()
        if full or (not self.observed and self.owned):
            await self.resync()
        for _attempt in range(3):
            # Forget what vanished first, so this very pass knows whether the
            # address is now contested.
            matched = match_owned(self.observed, self.owned)
            present, gone, _foreign = matched
            if self._unconfirmed:
                self._unconfirmed.difference_update(present)
            if gone:
                self._forget(gone, result)
            current = plan(
                desired, self.observed, self.owned, kept_flags=self.kept_flags,
                max_endpoints=self.max_endpoints, next_id=self.store.state.next_id,
                contested=self.contested() if self._deleted_externally else frozenset(),
                matched=None if gone else matched,  # forgetting changed what is owned
            )
            result.plan = current
            self.last_plan = current
            if current.forgotten:
                self._forget(current.forgotten, result)
            if not current.operations:
                break
            surprised = await self._apply(current, result, before_add)
            if not surprised:
                break
            await self.resync()
        if full:
            self.store.flush()
        else:
            self.store.checkpoint()
        return result

    def _forget(self, gone: Iterable[OwnedEndpoint], result: PassResult) -> None:
        now = time.monotonic()
        for rec in gone:
            self.store.drop_endpoint(rec)
            result.forgotten.append(rec)
            if rec.key in self._unconfirmed:
                self._unconfirmed.discard(rec.key)
                self.log.info("owned endpoint not in the kernel; forgetting it",
                              addr=str(rec.address), endpoint_id=rec.id)
                continue
            self._deleted_externally.setdefault(rec.key, []).append(now)
            self.log.warning("endpoint deleted by someone else", addr=str(rec.address),
                             endpoint_id=rec.id, ifname=self.ifname_of(rec.ifindex))
            if len(self._deleted_externally[rec.key]) == self.CONTEST_LIMIT:
                self.log.warning(
                    "endpoint keeps being deleted by someone else (NetworkManager?); "
                    "not restoring it for 10 minutes", addr=str(rec.address))

    async def _apply(self, current: Plan, result: PassResult,
                     before_add: BeforeAdd | None = None) -> bool:
        """Apply operations in order; True when the kernel state was not what
        we thought (re-read and re-plan)."""
        surprised = False
        self.store.state.next_id = current.next_id
        for index, planned in enumerate(current.operations):
            if index and not index % 8:
                # The kernel's answers are read as soon as they are sent, so
                # a long plan would never let the loop run: it does here.
                await asyncio.sleep(0)
            op, rec = planned, planned.endpoint
            try:
                if op.kind in (DELETE, SET_FLAGS) and not await self._still_ours(rec):
                    # Our id now names nothing, or someone else's endpoint.
                    surprised = True
                    self.observed = [e for e in self.observed if e.id != rec.id]
                    self._forget([rec], result)
                    continue
                if op.kind == DELETE:
                    try:
                        await self.pm.delete_endpoint(rec.id, rec.address)
                    except NoSuchEndpoint:
                        surprised = True
                    self.store.drop_endpoint(rec)
                    self.observed = [e for e in self.observed if e.id != rec.id]
                elif op.kind == SET_FLAGS:
                    await self.pm.set_endpoint_flags(rec.flags, id=rec.id)
                    self.store.put_endpoint(rec)
                    self.observed = [
                        replace(e, flags=(e.flags & ~CHANGEABLE_FLAGS)
                                | (rec.flags & CHANGEABLE_FLAGS))
                        if e.id == rec.id else e for e in self.observed
                    ]
                else:
                    op = Operation(ADD, await self._add(planned, before_add), planned.reason,
                                   planned.old_flags, planned.replaces_implicit)
            except (EndpointExists, EndpointIdBusy, NoSuchEndpoint) as exc:
                surprised = True
                self._failed(op, exc, result, level="info")
                continue
            except EndpointTableFull as exc:
                surprised = True
                self._failed(op, exc, result, level="warning")
                continue
            except KernelError as exc:
                self._failed(op, exc, result, level="error")
                continue
            result.applied.append(op)
            self._log_op(op)
            if self.on_operation is not None:
                self.on_operation(op, None)
        return surprised

    async def readd(self, rec: OwnedEndpoint, reason: str,
                    result: PassResult | None = None) -> bool:
        """Delete one owned endpoint and add it again with the same id: the
        kernel opens an endpoint's subflows only when it is added, so this
        is how connections get the ones that failed before. False when it
        is no longer ours (forgotten, as a pass would) or the kernel refused
        the add (not kept as ours; a full pass puts it back; the refusal is
        in ``result.failed``)."""
        result = result if result is not None else PassResult()
        op = Operation(ADD, rec, reason)
        try:
            if not await self._still_ours(rec):
                self.observed = [e for e in self.observed if e.id != rec.id]
                self._forget([rec], result)
                return False
            with contextlib.suppress(NoSuchEndpoint):  # gone already: add it all the same
                await self.pm.delete_endpoint(rec.id, rec.address)
            self.store.drop_endpoint(rec)
            self.observed = [e for e in self.observed if e.id != rec.id]
            op = Operation(ADD, await self._add(op), reason)
        except KernelError as exc:
            self._failed(op, exc, result, level="warning")
            return False
        finally:
            self.store.checkpoint()
        self.log.info("endpoint re-added", addr=str(rec.address), endpoint_id=op.endpoint.id,
                      flags=str(rec.flags), ifname=self.ifname_of(rec.ifindex), reason=reason)
        if self.on_operation is not None:
            self.on_operation(op, None)
        return True

    async def _still_ours(self, rec: OwnedEndpoint) -> bool:
        """Read the id back: the kernel acts on the id alone, whatever the address."""
        try:
            current = await self.pm.get_endpoint(rec.id)
        except NoSuchEndpoint:
            return False
        return current.key == rec.key

    async def _add(self, op: Operation, before_add: BeforeAdd | None = None) -> OwnedEndpoint:
        """Journal first, so a crash right after the kernel's reply is adoptable."""
        rec = op.endpoint
        if before_add is not None:
            await before_add(rec)
        self.store.put_endpoint(rec)
        try:
            added = await self.pm.add_endpoint(
                rec.address, rec.flags, id=0 if op.replaces_implicit else rec.id,
                ifindex=rec.ifindex, port=rec.port)
        except KernelError:
            self.store.drop_endpoint(rec)  # refused: nothing was made
            raise
        except BaseException:
            # Interrupted (cancelled at shutdown, a socket error): the kernel
            # may have made it. The record stays; a dump settles it.
            self._unconfirmed.add(rec.key)
            raise
        if added.id != rec.id:  # an implicit endpoint's id, read back by the add
            self.store.drop_endpoint(rec)
            rec = replace(rec, id=added.id)
            self.store.put_endpoint(rec)
        self.observed = [e for e in self.observed if e.key != rec.key and e.id != rec.id]
        self.observed.append(Endpoint(rec.id, rec.address, rec.flags, rec.ifindex, rec.port))
        return rec

    def _failed(self, op: Operation, exc: KernelError, result: PassResult, level: str) -> None:
        result.failed.append((op, exc))
        self.errors += 1
        self.last_error = str(exc)
        getattr(self.log, level)(
            f"endpoint {op.kind.replace('_', ' ')} failed", addr=str(op.endpoint.address),
            endpoint_id=op.endpoint.id, ifname=self.ifname_of(op.endpoint.ifindex),
            error=str(exc),
        )
        if self.on_operation is not None:
            self.on_operation(op, str(exc))

    def _log_op(self, op: Operation) -> None:
        rec = op.endpoint
        words = {ADD: "endpoint added", DELETE: "endpoint removed",
                 SET_FLAGS: "endpoint flags changed"}
        self.log.info(words[op.kind], addr=str(rec.address), endpoint_id=rec.id,
                      flags=str(rec.flags), ifname=self.ifname_of(rec.ifindex),
                      plugin=rec.plugin or None, reason=op.reason)

    async def remove_all(self, *, keep: Collection[Key] = (),
                         reason: str = "daemon stopping") -> list[OwnedEndpoint]:
        """Delete every endpoint we own (shutdown with on_exit = "remove")
        but those of ``keep``, which stay owned (a failed start leaves
        what it inherited to the next)."""
        removed = []
        with contextlib.suppress(KernelError):  # go on with what we know
            await self.resync()
        present, gone, _ = match_owned(
            self.observed, {key: rec for key, rec in self.owned.items() if key not in keep})
        for rec in gone:
            self.store.drop_endpoint(rec)
        for rec, _ep in list(present.values()):
            try:
                await self.pm.delete_endpoint(rec.id, rec.address)
                removed.append(rec)
                self.log.info("endpoint removed", addr=str(rec.address), endpoint_id=rec.id,
                              ifname=self.ifname_of(rec.ifindex), reason=reason)
            except NoSuchEndpoint:
                pass
            except KernelError as exc:
                self.log.error("endpoint remove failed", addr=str(rec.address),
                               endpoint_id=rec.id, error=str(exc))
                continue
            self.store.drop_endpoint(rec)
        self.store.save()
        return removed
