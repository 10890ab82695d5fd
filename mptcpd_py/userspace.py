"""The userspace path manager: per-connection plugin hooks and their actions.

Each MPTCP event updates the connection table, then goes to the enabled
plugins implementing the matching hook, in order. Their actions (announce,
remove, create / destroy subflow, set backup) are validated, de-duplicated
and carried out here: local address ids are managed per connection (1..255,
never 0 except for the initial address), a subflow already open or being
opened is not opened twice, and a path that keeps failing is retried with
backoff instead of in a loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mptcpd_py.connections import ConnectionRecord, ConnectionTable
from mptcpd_py.errors import KernelError, NotConnected
from mptcpd_py.logging import debug_enabled
from mptcpd_py.model import NetworkSnapshot
from mptcpd_py.netlink.types import (
    AddressAnnounced,
    AddressRemoved,
    ConnectionClosed,
    ConnectionEvent,
    ListenerEvent,
    MptcpEvent,
    MptcpEventType,
    SubflowEvent,
    UnknownMptcpEvent,
)
from mptcpd_py.plugin import Action, ConnectionContext, Listener, RemoteAddress, Subflow
from mptcpd_py.plugins_host import FAILED

if TYPE_CHECKING:
    from mptcpd_py.core import Core

PENDING_TIMEOUT = 10.0
#: the kernel's extended ack when a connection belongs to the in-kernel PM
USERSPACE_PM_NOT_SELECTED = "userspace PM not selected"
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0

_HOOK_OF = {
    MptcpEventType.CREATED: "connection_created",
    MptcpEventType.ESTABLISHED: "connection_established",
    MptcpEventType.CLOSED: "connection_closed",
    MptcpEventType.ANNOUNCED: "address_announced",
    MptcpEventType.REMOVED: "address_removed",
    MptcpEventType.SUB_ESTABLISHED: "subflow_established",
    MptcpEventType.SUB_CLOSED: "subflow_closed",
    MptcpEventType.SUB_PRIORITY: "subflow_priority",
}


class UserspacePM:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.table: ConnectionTable = core.connections
        self.log = core.log
        self._debug = debug_enabled(self.log)
        self.actions_done = 0
        self.actions_failed = 0
        self._kept_last: set[int] = set()  # tokens whose last subflow sits on a dead path

    @property
    def connections(self) -> dict[int, ConnectionRecord]:
        return self.table.connections

    async def start(self) -> None:
        await self.resync()

    def config_changed(self) -> None:
        self.log = self.core.log
        self._debug = debug_enabled(self.log)

    async def resync(self, superseded: Sequence[MptcpEvent] = ()) -> None:
        """Rebuild the table from sock_diag (``superseded``: the events
        queued before it, see :meth:`ConnectionTable.resync`), then let the
        plugins act on every established connection as if the network had
        changed."""
        try:
            await self.table.resync(self.core.netns, superseded)
        except KernelError as exc:
            self.log.error("connection table resync failed", error=str(exc))
            return
        self.log.info("connection table rebuilt", connections=len(self.table))
        await self.network_changed(self.core.model.snapshot())

    async def handle(self, event: MptcpEvent) -> None:
        if isinstance(event, ListenerEvent):
            listener = Listener(event.saddr, event.sport)
            hook = "listener_created" if event.type == MptcpEventType.LISTENER_CREATED \
                else "listener_closed"
            key = (event.saddr, event.sport)
            if hook == "listener_created":
                self.table.listeners.add(key)
            else:
                self.table.listeners.discard(key)
            net = self.core.model.snapshot()
            for state in self.core.host.implementing(hook):
                if await self.core.host.call(state, hook, listener, net) is not FAILED:
                    self.core.host.succeeded(state)
            return
        if isinstance(event, UnknownMptcpEvent):
            return
        closing = isinstance(event, ConnectionClosed)
        before = self.table.get(event.token) if closing else None
        rec = self.table.apply(event) if not closing else before
        if closing:
            self.table.apply(event)
        if rec is None:
            return
        hook_name = _HOOK_OF.get(event.type)
        if hook_name is None:
            return
        extra: tuple[Any, ...] = ()
        if isinstance(event, AddressAnnounced):
            extra = (RemoteAddress(event.remote_id, event.daddr, event.dport),)
        elif isinstance(event, AddressRemoved):
            extra = (event.remote_id,)
        elif isinstance(event, SubflowEvent):
            extra = (Subflow(event.saddr, event.sport, event.daddr, event.dport, event.local_id,
                             event.remote_id, event.backup, event.ifindex),)
            if event.type == MptcpEventType.SUB_CLOSED and event.error:
                self._note_failure(rec, (event.saddr, event.daddr, event.dport))
        await self._run_hook(rec, hook_name, extra, run_actions=not closing)
        if isinstance(event, ConnectionEvent) and event.type == MptcpEventType.ESTABLISHED:
            rec.backoff.clear()

    async def _run_hook(self, rec: ConnectionRecord, hook: str, extra: tuple[Any, ...],
                        run_actions: bool = True) -> None:
        net = self.core.model.snapshot()
        for state in self.core.host.implementing(hook):
            ctx = ConnectionContext(rec.snapshot(), net, state.name)
            result = await self.core.host.call(state, hook, ctx, *extra)
            if result is FAILED:
                continue
            problem = self._invalid(ctx.actions, rec, net)
            if problem:
                self.core.host.fail(state, hook, f"invalid action: {problem}")
                continue
            self.core.host.succeeded(state)
            if not run_actions:
                continue
            for action in ctx.actions:
                await self._execute(rec, action, net)

    async def network_changed(self, net: NetworkSnapshot) -> None:
        """A path that went away takes its subflows and announcements with it
        (as deleting an endpoint does for the in-kernel PM), except a
        connection's last subflow; then the plugins see the new network."""
        self._kept_last &= self.table.connections.keys()
        for rec in list(self.table.connections.values()):
            await self._prune_dead_paths(rec, net)
        if not self.core.host.implementing("network_changed"):
            return
        for rec in list(self.table.connections.values()):
            if rec.established and rec.token in self.table.connections:
                rec.backoff.clear()
                await self._run_hook(rec, "network_changed", ())

    async def _prune_dead_paths(self, rec: ConnectionRecord, net: NetworkSnapshot) -> None:
        usable = {a.address for a in net.addresses
                  if (iface := net.interfaces.get(a.index)) is not None and iface.running}
        dead = [sub for sub in rec.subflows.values() if sub.local not in usable]
        if dead and len(dead) == len(rec.subflows):
            # Its last path: closing it would end the connection (a server can
            # never reopen it); a flap may bring the path back, as for TCP.
            if rec.token not in self._kept_last:
                self._kept_last.add(rec.token)
                self.log.info("keeping the connection's last subflow on a dead path",
                              token=rec.token, addr=str(dead[0].local))
            dead = []
        else:
            self._kept_last.discard(rec.token)
        for sub in dead:
            await self._execute(rec, Action("destroy_subflow", rec.token, sub.local,
                                            sub.local_port, sub.remote, sub.remote_port,
                                            plugin="core", reason="path gone"), net)
        for _id, (address, _port) in list(rec.announced.items()):
            if address not in usable:
                await self._execute(rec, Action("remove", rec.token, address, plugin="core",
                                                reason="path gone"), net)

    # ------------------------------------------------------------------ actions

    def _invalid(self, actions: list[Action], rec: ConnectionRecord, net: NetworkSnapshot
                 ) -> str:
        for action in actions:
            if action.kind in ("announce", "create_subflow") and \
                    action.local not in net.local_addresses:
                return f"{action.kind}: {action.local} is not an address of this host"
            if action.kind == "create_subflow":
                assert action.local is not None and action.remote is not None
                if action.local.version != action.remote.version:
                    return f"create_subflow: {action.local} and {action.remote} differ in family"
                if not 0 < action.remote_port < 65536:
                    return f"create_subflow: bad remote port {action.remote_port}"
            if not 0 <= action.local_port < 65536:
                return f"{action.kind}: bad port {action.local_port}"
        return ""

    def _note_failure(self, rec: ConnectionRecord, pair: tuple[Any, Any, int]) -> None:
        failures, _ = rec.backoff.get(pair, (0, 0.0))
        delay = min(BACKOFF_MAX, BACKOFF_BASE * (2 ** failures))
        rec.backoff[pair] = (failures + 1, time.monotonic() + delay)

    async def _execute(self, rec: ConnectionRecord, action: Action, net: NetworkSnapshot
                       ) -> None:
        pm = self.core.pm
        assert pm is not None
        token = rec.token
        if token not in self.table.connections or rec.kernel_managed:
            return
        publish = self.core.monitor.publish
        try:
            if action.kind == "create_subflow":
                assert action.local is not None and action.remote is not None
                pair = (action.local, action.remote, action.remote_port)
                now = time.monotonic()
                if any((s.local, s.remote, s.remote_port) == pair for s in rec.subflows.values()):
                    return
                if rec.pending.get(pair, 0.0) > now:
                    return
                _failures, not_before = rec.backoff.get(pair, (0, 0.0))
                if not_before > now:
                    return
                local_id = rec.local_id(action.local)
                cand = net.candidate(action.local)
                ifindex = cand.interface.index if cand is not None else 0
                rec.pending[pair] = now + PENDING_TIMEOUT
                rec.changed()  # the next hook sees it pending (a subflow budget counts it)
                try:
                    await pm.subflow_create(token, action.local, local_id, action.remote,
                                            action.remote_port, ifindex=ifindex,
                                            backup=action.backup)
                except BaseException:
                    rec.pending.pop(pair, None)
                    rec.changed()
                    raise
            elif action.kind == "destroy_subflow":
                assert action.local is not None and action.remote is not None
                await pm.subflow_destroy(token, action.local, action.local_port, action.remote,
                                         action.remote_port)
            elif action.kind == "set_backup":
                assert action.local is not None and action.remote is not None
                await pm.set_subflow_backup(token, action.local, action.remote, action.backup,
                                            local_port=action.local_port,
                                            remote_port=action.remote_port)
                for key, sub in list(rec.subflows.items()):
                    if (sub.local, sub.local_port, sub.remote, sub.remote_port) == \
                            (action.local, action.local_port, action.remote, action.remote_port):
                        rec.subflows[key] = Subflow(sub.local, sub.local_port, sub.remote,
                                                    sub.remote_port, sub.local_id,
                                                    sub.remote_id, action.backup, sub.ifindex)
                rec.changed()
            elif action.kind == "announce":
                assert action.local is not None
                if any(a == action.local for a, _ in rec.announced.values()):
                    return
                local_id = rec.local_id(action.local)
                if local_id == 0:
                    return  # the peer knows the initial address already
                await pm.announce(token, action.local, local_id, port=action.local_port)
                rec.announced[local_id] = (action.local, action.local_port)
                rec.changed()
            elif action.kind == "remove":
                found = [i for i, (a, _) in rec.announced.items() if a == action.local]
                if not found:
                    return
                await pm.remove(token, found[0])
                rec.announced.pop(found[0], None)
                rec.changed()
            else:
                return
        except NotConnected:
            # Not established yet: the connection_established hook will come.
            return
        except KernelError as exc:
            self.actions_failed += 1
            self.core.stats.errors_by_errno[_errno_name(exc.errno)] += 1
            if USERSPACE_PM_NOT_SELECTED in exc.detail:
                # Retrying cannot help: say so once and leave it alone.
                rec.kernel_managed = True
                self.log.warning("connection is managed by the in-kernel path manager "
                                 "(it started while net.mptcp.path_manager was not "
                                 "userspace); leaving it alone", token=token,
                                 error=str(exc))
                return
            if action.kind == "create_subflow":
                assert action.local is not None and action.remote is not None
                self._note_failure(rec, (action.local, action.remote, action.remote_port))
            self.log.warning(f"{action.kind.replace('_', ' ')} failed", token=token,
                             plugin=action.plugin, local=str(action.local),
                             remote=str(action.remote), error=str(exc))
            publish("action", action=action.kind, token=token, plugin=action.plugin,
                    local=str(action.local), remote=str(action.remote), error=str(exc))
            return
        self.actions_done += 1
        if not (self._debug or self.core.monitor.subscribers):
            return  # nobody reads the lines below: skip formatting the addresses
        local, remote = str(action.local), str(action.remote)
        self.log.debug(action.kind.replace("_", " "), token=token, plugin=action.plugin,
                       local=local, remote=remote, reason=action.reason)
        publish("action", action=action.kind, token=token, plugin=action.plugin,
                local=local, remote=remote, remote_port=action.remote_port,
                backup=action.backup, reason=action.reason)


def _errno_name(code: int) -> str:
    import errno  # noqa: PLC0415

    return errno.errorcode.get(code, str(code))
