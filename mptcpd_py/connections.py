"""The MPTCP connection table, kept from events (both path managers) and
rebuilt from sock_diag after an event overflow, so it stays exact."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from mptcpd_py.netlink.diag import DiagSubflow, SockDiag
from mptcpd_py.netlink.types import (
    Address,
    AddressAnnounced,
    AddressRemoved,
    ConnectionClosed,
    ConnectionEvent,
    MptcpEvent,
    MptcpEventType,
    SubflowEvent,
)
from mptcpd_py.plugin import Connection, RemoteAddress, Subflow

SubflowKey = tuple[Address, int, Address, int]
MAX_LOCAL_ID = 255


@dataclass
class ConnectionRecord:
    token: int
    local: Address
    local_port: int
    remote: Address
    remote_port: int
    server_side: bool = False
    established: bool = False
    created: float = field(default_factory=time.monotonic)
    subflows: dict[SubflowKey, Subflow] = field(default_factory=dict)
    remotes: dict[int, RemoteAddress] = field(default_factory=dict)
    local_ids: dict[Address, int] = field(default_factory=dict)
    announced: dict[int, tuple[Address, int]] = field(default_factory=dict)
    # userspace PM bookkeeping
    pending: dict[tuple[Address, Address, int], float] = field(default_factory=dict)
    backoff: dict[tuple[Address, Address, int], tuple[int, float]] = field(default_factory=dict)
    # Started while net.mptcp.path_manager was not "userspace": the kernel
    # keeps it with the in-kernel PM for good and refuses our commands.
    kernel_managed: bool = False
    _snapshot: Connection | None = None
    _snapshot_stale_at: float = math.inf  # when a pending subflow in it times out

    def __post_init__(self) -> None:
        self.local_ids.setdefault(self.local, 0)
        self.remotes.setdefault(0, RemoteAddress(0, self.remote, self.remote_port))

    def changed(self) -> None:
        self._snapshot = None

    def snapshot(self) -> Connection:
        if self._snapshot is None or (
                self.pending and time.monotonic() >= self._snapshot_stale_at):
            pending: tuple[tuple[Address, Address, int], ...] = ()
            self._snapshot_stale_at = math.inf
            if self.pending:
                now = time.monotonic()
                # A create past its timeout may be tried again: no longer pending.
                pending = tuple(pair for pair, until in self.pending.items() if until > now)
                self._snapshot_stale_at = min((until for until in self.pending.values()
                                               if until > now), default=math.inf)
            self._snapshot = Connection(
                token=self.token, local=self.local, local_port=self.local_port,
                remote=self.remote, remote_port=self.remote_port,
                server_side=self.server_side, established=self.established,
                subflows=tuple(self.subflows.values()),
                remotes=tuple(sorted(self.remotes.values(), key=lambda r: r.id)),
                announced=tuple((i, a, p) for i, (a, p) in sorted(self.announced.items())),
                pending=pending,
            )
        return self._snapshot

    def local_id(self, address: Address) -> int:
        """This connection's id for a local address: 0 for the initial one,
        otherwise stable and never 0 (the kernel refuses 0 and refuses the
        same address under another id)."""
        if address in self.local_ids:
            return self.local_ids[address]
        used = set(self.local_ids.values())
        for candidate in range(1, MAX_LOCAL_ID + 1):
            if candidate not in used:
                self.local_ids[address] = candidate
                return candidate
        raise ValueError("no free local address id on this connection")

    def initial_subflow(self) -> Subflow:
        return Subflow(self.local, self.local_port, self.remote, self.remote_port)


async def dump_subflows(netns: str | None = None
                        ) -> tuple[list[DiagSubflow], list[tuple[Address, int]]]:
    """Every MPTCP subflow and listener as the kernel has them now (what
    ``ss -M`` reads). Raises KernelError when the kernel cannot be asked."""
    diag = SockDiag(netns)
    try:
        return await diag.subflows(), await diag.mptcp_listeners()
    finally:
        diag.close()


class ConnectionTable:
    """token -> ConnectionRecord, updated event by event."""

    def __init__(self) -> None:
        self.connections: dict[int, ConnectionRecord] = {}
        self.listeners: set[tuple[Address, int]] = set()

    def __len__(self) -> int:
        return len(self.connections)

    def get(self, token: int) -> ConnectionRecord | None:
        return self.connections.get(token)

    def lacking_subflow_from(self, address: Address) -> int:
        """Established connections this host opened, of ``address``'s
        family, with no subflow from it (the in-kernel path manager opens
        subflows only on the side that connected)."""
        return sum(1 for c in self.connections.values()
                   if c.established and not c.server_side
                   and c.remote.version == address.version
                   and all(key[0] != address for key in c.subflows))

    def apply(self, event: MptcpEvent) -> ConnectionRecord | None:
        """Apply one event; returns the connection it concerns (None for
        listener events and events of unknown connections)."""
        if isinstance(event, ConnectionEvent):
            rec = self.connections.get(event.token)
            if rec is None:
                rec = ConnectionRecord(event.token, event.saddr, event.sport, event.daddr,
                                       event.dport, server_side=event.server_side)
                # The kernel sends no SUB_ESTABLISHED for the initial subflow
                # (SUB_CLOSED, yes): it is a subflow here as in sock_diag.
                initial = rec.initial_subflow()
                rec.subflows[(initial.local, initial.local_port, initial.remote,
                              initial.remote_port)] = initial
                self.connections[event.token] = rec
            if event.type == MptcpEventType.ESTABLISHED:
                rec.established = True
            rec.changed()
            return rec
        if isinstance(event, ConnectionClosed):
            return self.connections.pop(event.token, None)
        if isinstance(event, AddressAnnounced):
            rec = self.connections.get(event.token)
            if rec is not None:
                rec.remotes[event.remote_id] = RemoteAddress(event.remote_id, event.daddr,
                                                             event.dport)
                rec.changed()
            return rec
        if isinstance(event, AddressRemoved):
            rec = self.connections.get(event.token)
            if rec is not None:
                rec.remotes.pop(event.remote_id, None)
                rec.changed()
            return rec
        if isinstance(event, SubflowEvent):
            rec = self.connections.get(event.token)
            if rec is None:
                return None
            key = (event.saddr, event.sport, event.daddr, event.dport)
            pair = (event.saddr, event.daddr, event.dport)
            if event.type == MptcpEventType.SUB_CLOSED:
                rec.subflows.pop(key, None)
                rec.pending.pop(pair, None)
            else:
                rec.subflows[key] = Subflow(event.saddr, event.sport, event.daddr, event.dport,
                                            event.local_id, event.remote_id, event.backup,
                                            event.ifindex)
                rec.pending.pop(pair, None)
                rec.backoff.pop(pair, None)
                if event.saddr not in rec.local_ids:
                    rec.local_ids[event.saddr] = event.local_id
            rec.changed()
            return rec
        return None

    async def resync(self, netns: str | None = None,
                     superseded: Sequence[MptcpEvent] = ()) -> None:
        """Re-read every subflow and MPTCP listener (sock_diag) and rebuild.

        ``superseded``: events received before the dump and not applied
        (:meth:`EventStream.take_superseded`). Those that add state
        (created, established, subflow up) are superseded by the dump: applied
        after it, they would bring back connections closed since. Those that
        only take state away (closed, subflow closed, address removed) are
        applied after it: the kernel reports CLOSED while the subflows are
        still established, so the dump may show a connection already gone.
        Announcements, which no dump shows, are applied too.
        Raises KernelError when the kernel cannot be asked."""
        subflows, listeners = await dump_subflows(netns)
        self.listeners = set(listeners)
        self.rebuild(subflows, {port for _, port in listeners})
        for event in superseded:
            if isinstance(event, ConnectionClosed | AddressAnnounced | AddressRemoved) or (
                    isinstance(event, SubflowEvent)
                    and event.type == MptcpEventType.SUB_CLOSED):
                self.apply(event)

    def rebuild(self, subflows: list[DiagSubflow], listener_ports: set[int]) -> None:
        """Replace the table with what sock_diag shows (after lost events).
        Connections keep what only events could tell (announced remotes)
        when they still exist."""
        by_token: dict[int, list[DiagSubflow]] = {}
        for sub in subflows:
            by_token.setdefault(sub.token, []).append(sub)
        old = self.connections
        fresh: dict[int, ConnectionRecord] = {}
        for token, subs in by_token.items():
            rec = old.get(token)
            if rec is None:
                # The initial subflow may be gone: another stands in for the
                # connection's addresses, and every address keeps the id the
                # kernel reports (the stand-in must not be taken for id 0).
                initial = next((s for s in subs if s.local_id == 0 and s.remote_id == 0),
                               subs[0])
                rec = ConnectionRecord(
                    token, initial.local, initial.local_port, initial.remote,
                    initial.remote_port, server_side=initial.local_port in listener_ports,
                    local_ids={s.local: s.local_id for s in subs},
                    remotes={s.remote_id: RemoteAddress(s.remote_id, s.remote, s.remote_port)
                             for s in subs})
            rec.established = True
            rec.subflows = {}
            for s in subs:
                rec.subflows[(s.local, s.local_port, s.remote, s.remote_port)] = Subflow(
                    s.local, s.local_port, s.remote, s.remote_port, s.local_id, s.remote_id,
                    s.backup, s.ifindex)
                rec.local_ids.setdefault(s.local, s.local_id)
                rec.remotes.setdefault(s.remote_id, RemoteAddress(s.remote_id, s.remote,
                                                                  s.remote_port))
            rec.pending.clear()
            rec.changed()
            fresh[token] = rec
        self.connections = fresh
