"""The core: one event loop that turns kernel events into plugin calls and
plugin intents into kernel writes.

- rtnetlink events update the network model; a change marks the endpoints
  dirty and one reconciler pass brings the kernel to what the plugins want;
- MPTCP events go to the userspace path manager's connection table and to
  the plugins' per-connection hooks;
- "resync needed" (a netlink overflow), a reload and every
  ``reconcile_interval`` re-read the kernel and reconcile in full;
- kernel commands are serialised: one pass at a time.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import ipaddress
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mptcpd_py.config import Config
from mptcpd_py.connections import ConnectionTable
from mptcpd_py.endpoints import EndpointReconciler, Key, Operation, PassResult
from mptcpd_py.errors import KernelError
from mptcpd_py.kernel_settings import apply_kernel_settings, restore_kernel_settings
from mptcpd_py.loader import Available
from mptcpd_py.logging import get_logger
from mptcpd_py.model import NetworkModel, NetworkSnapshot
from mptcpd_py.netlink.mptcp import MptcpEvents, MptcpPM
from mptcpd_py.netlink.probe import probe_capabilities
from mptcpd_py.netlink.rtnl import Rtnl, RtnlEvents, main_default_route
from mptcpd_py.netlink.types import (
    CHANGEABLE_FLAGS,
    Address,
    AddressEvent,
    Capabilities,
    EndpointFlags,
    LinkEvent,
    MptcpEvent,
    MptcpEventType,
    ResyncNeeded,
    RouteEvent,
    RtnlEvent,
    parse_address,
)
from mptcpd_py.plugin import EndpointIntent, PluginState, idle_plugins_warnings
from mptcpd_py.plugins_host import FAILED, PluginHost
from mptcpd_py.routing import SourceRouting, desired_routes, gateway_of
from mptcpd_py.state import Inherited, OwnedEndpoint, StateStore
from mptcpd_py.supervise import supervise
from mptcpd_py.sysctl import active_path_manager, read_mptcp_sysctl

#: Seconds after an endpoint's add (its interface without a gateway) during
#: which a gateway's arrival re-adds it: DHCP and a link set up again bring
#: theirs within seconds.
UNROUTED_WINDOW = 30.0

#: Passes whose error a waiter of ``reconcile_now`` can still read after
#: they finished (it wakes right away; later passes may run in between).
PASS_ERRORS_KEPT = 16

#: Upper bounds (seconds) of the event-handling latency histogram's buckets.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5)


class LatencyLog(deque[float]):
    """The last few thousand event-handling latencies (for percentiles) plus
    cumulative histogram buckets since start (for Prometheus), so a scrape
    never loses what fell out of the window. One bisect per event."""

    __slots__ = ("buckets", "observed", "total_seconds")

    def __init__(self, maxlen: int = 4096) -> None:
        super().__init__(maxlen=maxlen)
        self.observed = 0  # since start (len() is the window's)
        self.total_seconds = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf

    def append(self, seconds: float, _append: Any = deque.append,
               _bucket: Any = bisect.bisect_left, _bounds: Any = LATENCY_BUCKETS) -> None:
        # ~0.1 us (measured): bound names, no super() lookup.
        _append(self, seconds)
        self.observed += 1
        self.total_seconds += seconds
        self.buckets[_bucket(_bounds, seconds)] += 1


@dataclass
class Stats:
    """Counters read by `ctl status` and the Prometheus exporter (which
    computes its values from these at scrape time: nothing extra per event)."""

    started: float = field(default_factory=time.time)
    events: Counter[str] = field(default_factory=Counter)
    errors_by_errno: Counter[str] = field(default_factory=Counter)
    resyncs: Counter[str] = field(default_factory=Counter)
    plugin_failures: Counter[str] = field(default_factory=Counter)
    reconciles: int = 0
    last_resync: float = 0.0
    last_error: str = ""
    last_error_time: float = 0.0
    latencies: LatencyLog = field(default_factory=LatencyLog)


class Monitor:
    """Fan-out of live events and decisions to `ctl monitor` subscribers."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    def publish(self, kind: str, **fields: Any) -> None:
        if not self.subscribers:
            return
        item = {"time": time.time(), "kind": kind, **fields}
        for queue in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(item)

    def subscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Events go to ``queue`` from now on; when it is full they are
        dropped for it (the queue may count them, as the control server's does)."""
        self.subscribers.add(queue)

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.subscribers.discard(queue)


class Core:
    def __init__(self, config: Config, available: dict[str, Available], *,
                 netns: str | None = None, log: Any = None,
                 rtnl_rcvbuf: int | None = None, mptcp_rcvbuf: int | None = None) -> None:
        self.config = config
        self.available = available
        self.netns = netns
        self.log = log or get_logger()
        self.stats = Stats()
        self.monitor = Monitor()
        self.store = StateStore(config.daemon.state_dir)
        self.model = NetworkModel(config.network)
        self.host = PluginHost(config.daemon.plugin_timeout, config.daemon.plugin_max_failures,
                               self.log, on_failure=self._plugin_failed)
        # MPTCPD_PY_TEST_EVENT_RCVBUF (bytes) shrinks both event sockets: a
        # test-only knob to force ENOBUFS on demand.
        forced = int(os.environ.get("MPTCPD_PY_TEST_EVENT_RCVBUF", "0") or 0)
        self.rtnl_rcvbuf = rtnl_rcvbuf or forced or 16 << 20
        self.mptcp_rcvbuf = mptcp_rcvbuf or forced or 16 << 20
        self.caps: Capabilities | None = None
        self.pm: MptcpPM | None = None
        self.rtnl: Rtnl | None = None
        self.rtnl_events: RtnlEvents | None = None
        self.mptcp_events: MptcpEvents | None = None
        self.reconciler: EndpointReconciler | None = None
        self.routing: SourceRouting | None = None
        self.connections = ConnectionTable()
        self.userspace: Any = None  # mptcpd_py.userspace.UserspacePM in userspace mode
        self.desired: list[EndpointIntent] = []
        self.plugin_problems: list[str] = []  # enabled plugins that did not start
        self.heartbeat: Callable[[], None] = lambda: None
        self.on_status: Callable[[str], None] = lambda text: None
        self._tasks: list[asyncio.Task[Any]] = []
        self._pass_requested = False
        self._kick = asyncio.Event()  # the reconcile loop should run the requested pass
        self._full_requested = False
        self._reasons: list[str | RtnlEvent] = []
        self._pass_lock = asyncio.Lock()
        self._first_pass = asyncio.Event()
        self._pass_done = asyncio.Condition()
        self._passes = 0  # passes run, failed ones too (reconcile_now waits on it)
        # The errors of the last few passes that failed, by pass number: a
        # waiter reports its own pass's, whatever passes ran since.
        self._pass_errors: dict[int, Exception] = {}
        # What triggered the running pass (for monitor): an event is only
        # turned into words when someone asks.
        self._pass_reasons: list[str | RtnlEvent] = []
        self._dirty_since = 0.0
        self._stopping = False
        self._waiting: set[tuple[Any, int]] = set()
        self._kernel_seen: dict[str, str] = {}
        # Endpoints (that open subflows) added while their interface had no
        # gateway, with when: re-added if it gets one soon (_readd_routed).
        self._unrouted: dict[Key, float] = {}
        self.watchdog_interval = 0.0
        # Set when a loop keeps crashing: the daemon exits non-zero (systemd restarts it).
        self.failed = asyncio.Event()
        self.failure = ""
        # Set when start() begins changing the kernel: a start that fails
        # from then on has something to take back (stop(undo=True)).
        self.kernel_touched = False

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """config -> netlink (groups joined before the first dump) -> kernel
        settings -> state -> first full reconcile -> event loops."""
        cfg = self.config
        problem = self.store.load() and self.store.problem
        if problem:
            self.log.warning("state file reset", error=problem)
        self.pm = await MptcpPM.open(self.netns)
        self.rtnl_events = RtnlEvents.open(self.netns, rcvbuf=self.rtnl_rcvbuf)
        self.mptcp_events = await MptcpEvents.open(self.netns, rcvbuf=self.mptcp_rcvbuf)
        self.rtnl = Rtnl.open(self.netns)
        self.caps = await probe_capabilities(self.pm)
        self.log.info("kernel probed", path_manager=self.caps.path_manager,
                      mptcp_enabled=self.caps.mptcp_enabled,
                      kept_flags=str(self.caps.kept_flags))
        self.kernel_touched = True
        await apply_kernel_settings(cfg.kernel, self.caps, self.pm, self.store, self.log)
        self.caps = replace(self.caps, path_manager=cfg.kernel.path_manager,
                            mptcp_enabled=self.caps.mptcp_enabled or cfg.kernel.enable_mptcp)
        self._instantiate_plugins(cfg, self.available)
        self.reconciler = EndpointReconciler(
            self.pm, self.store, self.log, kept_flags=self.caps.kept_flags,
            on_operation=self._on_operation, ifname_of=self.ifname,
        )
        self.routing = SourceRouting(self.rtnl, self.store, self.log)
        if cfg.kernel.path_manager == "userspace":
            from mptcpd_py.userspace import UserspacePM  # noqa: PLC0415

            self.userspace = UserspacePM(self)
        await self._load_network(initial=True)
        await self._reconcile_pass(full=True, reasons=["start"])
        if self.userspace is not None:
            await self.userspace.start()
        loops = (("rtnetlink", self._rtnl_loop, self._recover_network),
                 ("mptcp", self._mptcp_loop, self._recover_connections),
                 ("reconcile", self._reconcile_loop, self._recover_reconciler))
        self._tasks = [
            asyncio.create_task(supervise(name, run, recover, self.log, self._fail,
                                          on_crash=self._record_error), name=f"{name}-loop")
            for name, run, recover in loops
        ]

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self.failed.set()

    async def _recover_network(self, reason: str = "rtnetlink loop restarted") -> None:
        """After a crash of the rtnetlink loop or lost events: what it
        missed is in a dump."""
        await self._load_network()
        self.request_reconcile(reason, full=True)

    async def _recover_connections(self, superseded: Sequence[MptcpEvent] = ()) -> None:
        """Re-read the connections (after lost events or a crash of the MPTCP
        loop); ``superseded``: the events queued before the dump."""
        if self.userspace is not None:
            await self.userspace.resync(superseded)
        else:
            await self._rebuild_connections(superseded)

    async def _recover_reconciler(self) -> None:
        self.request_reconcile("reconcile loop restarted", full=True)

    def _instantiate_plugins(self, cfg: Config, available: dict[str, Available]) -> None:
        problems = self.host.instantiate(
            cfg.daemon.plugins, available, cfg.plugin_config,
            lambda name: self.log.bind(plugin=name),
        )
        self.plugin_problems = problems
        for problem in problems:
            self.log.error("plugin not started", error=problem)
        for state in self.host.states:
            self.log.info("plugin enabled", plugin=state.name, origin=state.origin,
                          hooks=",".join(state.hooks) or "-")
        # At start and on reload: a valid config whose plugins never act
        # under this path manager must not look like one that works.
        for line in idle_plugins_warnings(
                cfg.kernel.path_manager, [type(state.plugin) for state in self.host.states],
                [found.cls for found in available.values()]):
            self.log.warning("plugins do nothing under this path manager", problem=line)

    async def _load_network(self, initial: bool = False) -> None:
        assert self.rtnl is not None
        links, addresses, routes = await asyncio.gather(
            self.rtnl.links(), self.rtnl.addresses(), self.rtnl.routes(main_default_route)
        )
        self.model.load(links, addresses, routes, initial=initial)

    def ifname(self, index: int) -> str:
        """The interface's name, or "" for one the model does not know."""
        link = self.model.links.get(index)
        return link.name if link else ""

    # ------------------------------------------------------------------ events

    async def _rtnl_loop(self) -> None:
        assert self.rtnl_events is not None
        async for event in self.rtnl_events:
            try:
                if isinstance(event, ResyncNeeded):
                    self.stats.resyncs["rtnetlink"] += 1
                    # What is still queued predates the dump below: applied
                    # after it, it would resurrect deleted addresses.
                    superseded = self.rtnl_events.take_superseded()
                    self.log.warning("rtnetlink events lost; re-reading the network",
                                     reason=event.reason, superseded=len(superseded))
                    self.monitor.publish("resync", source="rtnetlink", reason=event.reason)
                    await self._recover_network("rtnetlink overflow")
                    continue
                self.stats.events[_rtnl_kind(event)] += 1
                # Nothing else queued and no pass running: reconcile right
                # here, without waking the reconcile loop for nothing (a
                # burst still coalesces: it is queued by then).
                idle = not len(self.rtnl_events) and not self._pass_lock.locked()
                if self.model.apply(event):
                    if self.monitor.subscribers:  # its fields cost, even unsent
                        self._publish_rtnl(event)
                    self.request_reconcile(event, kick=not idle)  # described if asked
                if idle and self._pass_requested:
                    await self._run_requested_pass()
            except KernelError as exc:
                self._record_error(exc)
                self.log.error("network re-read failed", error=str(exc))

    async def _mptcp_loop(self) -> None:
        assert self.mptcp_events is not None
        async for event in self.mptcp_events:
            if isinstance(event, ResyncNeeded):
                self.stats.resyncs["mptcp_pm_events"] += 1
                # Queued events predate the sock_diag dump below; the table
                # decides which of them the dump supersedes.
                superseded = self.mptcp_events.take_superseded()
                self.log.warning("MPTCP events lost; resyncing", reason=event.reason,
                                 superseded=len(superseded))
                self.monitor.publish("resync", source="mptcp_pm_events", reason=event.reason)
                await self._recover_connections(superseded)
                continue
            kind = _EVENT_KINDS.get(event.type) or str(event.type)
            self.stats.events[f"mptcp_{kind}"] += 1
            if self.monitor.subscribers:
                fields = _event_fields(event)
                if fields.get("ifindex"):
                    fields["ifname"] = self.ifname(fields["ifindex"])
                self.monitor.publish("mptcp", event=kind, **fields)
            if self.userspace is None:
                self.connections.apply(event)
                continue
            started = time.perf_counter()
            try:
                await self.userspace.handle(event)
            except Exception as exc:  # never let one event end the loop
                self._record_error(exc)
                self.log.error("MPTCP event handling failed", event=kind, error=str(exc),
                               exc_info=exc)
            self.stats.latencies.append(time.perf_counter() - started)

    async def _rebuild_connections(self, superseded: Sequence[MptcpEvent] = ()) -> None:
        try:
            await self.connections.resync(self.netns, superseded)
        except KernelError as exc:
            self.log.error("connection table resync failed", error=str(exc))

    def _publish_rtnl(self, event: RtnlEvent) -> None:
        if isinstance(event, AddressEvent):
            self.monitor.publish("address", action="removed" if event.removed else "added",
                                 addr=str(event.address.address),
                                 ifname=self.ifname(event.address.index))
        elif isinstance(event, LinkEvent):
            self.monitor.publish("link", action="removed" if event.removed else "changed",
                                 ifname=event.link.name, up=event.link.up,
                                 running=event.link.running)
        elif isinstance(event, RouteEvent):
            self.monitor.publish("route", action="removed" if event.removed else "added",
                                 dst=str(event.route.dst), gateway=str(event.route.gateway),
                                 ifname=self.ifname(event.route.oif))

    def request_reconcile(self, reason: str | RtnlEvent, full: bool = False, *,
                          kick: bool = True) -> None:
        """Ask for a pass; ``kick=False`` when the caller runs it right away."""
        if not self._pass_requested:
            self._dirty_since = time.perf_counter()
        self._reasons.append(reason)
        self._full_requested |= full
        self._pass_requested = True
        if kick:
            self._kick.set()

    async def reconcile_now(self, reason: str, full: bool = True) -> None:
        """Request a pass and wait until one that includes it has finished;
        raises the error that ended that pass (not a later one's)."""
        target = self._passes + (2 if self._pass_lock.locked() else 1)
        self.request_reconcile(reason, full=full)
        async with self._pass_done:
            await self._pass_done.wait_for(lambda: self._passes >= target)
            error = self._pass_errors.get(target)
            if error is not None:
                raise error

    async def _reconcile_loop(self) -> None:
        interval = self.config.daemon.reconcile_interval
        next_full = time.monotonic() + interval
        while not self._stopping:
            timeout = next_full - time.monotonic()
            if self.watchdog_interval:
                timeout = min(timeout, self.watchdog_interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(timeout, 0.0))
            self._kick.clear()
            self.heartbeat()
            if time.monotonic() >= next_full:
                self.request_reconcile("periodic resync", full=True)
            if not self._pass_requested:
                continue
            if await self._run_requested_pass():
                interval = self.config.daemon.reconcile_interval
                next_full = time.monotonic() + interval

    async def _run_requested_pass(self) -> bool:
        """Run one pass for everything requested so far; True if it was full."""
        self._pass_requested = False
        full, self._full_requested = self._full_requested, False
        reasons, self._reasons = self._reasons, []
        dirty_since = self._dirty_since
        try:
            await self._reconcile_pass(full=full, reasons=reasons)
        except KernelError as exc:
            self._record_error(exc)
            self.log.error("reconcile failed", error=str(exc))
        if dirty_since:
            self.stats.latencies.append(time.perf_counter() - dirty_since)
        return full

    # ------------------------------------------------------------------ reconcile

    async def compute_desired(self, net: NetworkSnapshot) -> list[EndpointIntent]:
        """Run the plugins' ``endpoints`` pipeline; a failing plugin's output
        is dropped and the pipeline goes on with what came before it."""
        proposed: tuple[EndpointIntent, ...] = ()
        for state in self.host.implementing("endpoints"):
            result = await self.host.call(state, "endpoints", net, proposed, materialize=True)
            if result is FAILED:
                continue
            checked = self._validate_intents(state, result, net)
            if checked is not None:
                self.host.succeeded(state)
                proposed = checked
        return list(proposed)

    def _validate_intents(self, state: PluginState, result: Any, net: NetworkSnapshot
                          ) -> tuple[EndpointIntent, ...] | None:
        if result is None:
            self.host.fail(state, "endpoints", "hook endpoints returned None (return a list)")
            return None
        addresses = net.address_interfaces
        known = net.local_addresses
        out = []
        assert self.caps is not None
        for item in result:
            problem = ""
            if not isinstance(item, EndpointIntent):
                problem = f"returned {type(item).__name__}, not EndpointIntent"
            elif type(item.address) not in _ADDRESS_TYPES or item.address not in known:
                # Not local, text to parse, or no address at all (unhashable too).
                item, problem = _local_intent(item, known)  # noqa: PLW2901 (parsed)
            if not problem:
                problem = _intent_problem(item, addresses)
            if problem:
                self.host.fail(state, "endpoints", f"invalid result: {problem}")
                return None
            assert isinstance(item, EndpointIntent)
            if item.plugin and type(item.flags) is EndpointFlags and \
                    type(item.priority) is tuple:
                out.append(item)
                continue
            out.append(EndpointIntent(item.address, item.ifindex, EndpointFlags(item.flags),
                                      item.port, _priority(item.priority) or (),
                                      reason=item.reason, plugin=item.plugin or state.name))
        return tuple(out)

    async def _reconcile_pass(self, *, full: bool, reasons: list[str | RtnlEvent]) -> None:
        try:
            await self._run_pass(full=full, reasons=reasons)
        except Exception as exc:
            # A failed pass has run all the same, whatever ended it (a
            # NetlinkError too): its waiters get its error now, not after
            # the next pass that succeeds.
            await self._pass_finished(exc)
            raise
        await self._pass_finished(None)

    async def _pass_finished(self, error: Exception | None) -> None:
        async with self._pass_done:
            self._passes += 1
            if error is not None:
                self._pass_errors[self._passes] = error
            # Waiters wake at once; a few passes' worth covers a late one.
            for number in [n for n in self._pass_errors if n <= self._passes - PASS_ERRORS_KEPT]:
                del self._pass_errors[number]
            self._pass_done.notify_all()

    async def _run_pass(self, *, full: bool, reasons: list[str | RtnlEvent]) -> None:
        async with self._pass_lock:
            assert self.reconciler is not None and self.routing is not None
            net = self.model.snapshot()
            desired = await self.compute_desired(net) if self.config.kernel.path_manager == \
                "kernel" else []
            self.desired = desired
            if full:
                self.stats.last_resync = time.time()
                self.stats.resyncs["full"] += 1
                self._check_kernel_settings()
            self._pass_reasons = reasons
            result = await self.reconciler.reconcile(
                desired, full=full, before_add=lambda rec: self._route_first(rec, net))
            await self.routing.reconcile(self._desired_routes(net), verify=full)
            if self._unrouted:
                await self._readd_routed(net)
            if self.userspace is not None and reasons and reasons != ["start"]:
                try:
                    await self.userspace.network_changed(net)
                except KernelError as exc:
                    self._record_error(exc)
                    self.log.error("userspace path manager: network change not applied",
                                   error=str(exc))
            self.stats.reconciles += 1
            for _op, error in result.failed:
                self.stats.errors_by_errno[_errno_name(error.errno)] += 1
            self._say_waiting(result.plan.waiting)
            self._first_pass.set()
            self.on_status(self.status_line())

    def _check_kernel_settings(self) -> None:
        """Say once when net.mptcp.path_manager or net.mptcp.enabled no longer
        is what the daemon set at start (the kernel sends no event; someone
        else changed it): new connections then go to the other path manager,
        or do not use MPTCP at all. Not fought: the admin may mean it."""
        seen = {"path_manager": active_path_manager(),
                "enabled": read_mptcp_sysctl("enabled") or ""}
        wanted = {"path_manager": self.config.kernel.path_manager, "enabled": "1"}
        for key, value in seen.items():
            if value == self._kernel_seen.get(key, value):
                continue
            if value != wanted[key]:
                self.log.warning(f"net.mptcp.{key} was changed by someone else; new "
                                 "connections are not handled as configured",
                                 sysctl=f"net.mptcp.{key}", value=value,
                                 expected=wanted[key])
            else:
                self.log.info(f"net.mptcp.{key} is as expected again",
                              sysctl=f"net.mptcp.{key}", value=value)
        self._kernel_seen = seen

    async def _route_first(self, endpoint: OwnedEndpoint, net: NetworkSnapshot) -> None:
        """The kernel opens an endpoint's subflows inside the add: a subflow
        routed by the source route alone (the endpoint names no device, or
        the main table has no route through it) needs that route by then."""
        assert self.routing is not None
        if gateway_of(endpoint, net) is None and \
                endpoint.flags & (EndpointFlags.SUBFLOW | EndpointFlags.FULLMESH):
            self._unrouted[endpoint.key] = time.monotonic()
        else:
            self._unrouted.pop(endpoint.key, None)
        await self.routing.ensure(desired_routes([endpoint], net, self.config.routing))

    async def _readd_routed(self, net: NetworkSnapshot) -> None:
        """An address often gets its gateway a moment after it appears (DHCP,
        a link set up again): the subflows the kernel opened from its
        endpoint in between had no way out, went on-link unanswered, and
        are never tried again. When the interface gets a gateway within
        UNROUTED_WINDOW (this pass has put its source route in, if any),
        the endpoint is added again if a connection lacks a subflow from
        it, and the kernel opens them anew. Later, it is left alone: by then
        its subflows may well be working on-link, and a re-add closes them."""
        assert self.reconciler is not None
        now = time.monotonic()
        for key, since in list(self._unrouted.items()):
            rec = self.reconciler.owned.get(key)
            if rec is None or now - since > UNROUTED_WINDOW:
                del self._unrouted[key]
            elif gateway_of(rec, net) is not None:
                del self._unrouted[key]
                if not self.connections.lacking_subflow_from(rec.address):
                    continue
                result = PassResult()
                if not await self.reconciler.readd(rec, "its interface got a gateway after it",
                                                   result):
                    self.request_reconcile("endpoint re-add not done", full=True)
                for _op, error in result.failed:
                    self._record_error(error)

    def _desired_routes(self, net: NetworkSnapshot) -> dict[Any, Any]:
        """Source routes for our endpoints (kernel PM), or for every eligible
        address (userspace PM: subflows may start from any of them)."""
        assert self.reconciler is not None
        if self.config.kernel.path_manager == "kernel":
            sources = list(self.reconciler.owned.values())
        else:
            sources = [OwnedEndpoint(0, c.address.address, 0, EndpointFlags.NONE,
                                     c.interface.index) for c in net.eligible]
        return desired_routes(sources, net, self.config.routing)

    def _trigger(self) -> str:
        """What caused the running pass, for a monitor line: the first few
        reasons (a burst of events coalesces into one pass)."""
        reasons = self._pass_reasons
        text = ", ".join(r if isinstance(r, str) else _describe(r) for r in reasons[:3])
        return f"{text} (+{len(reasons) - 3} more)" if len(reasons) > 3 else text

    def _say_waiting(self, waiting: Sequence[EndpointIntent]) -> None:
        """Log and publish once when an address starts waiting for a slot, not
        on every pass while it waits (under churn that was thousands of lines)."""
        contested = self.reconciler.contested() if self.reconciler and \
            self.monitor.subscribers else frozenset()
        for intent in waiting:
            if intent.key in self._waiting:
                continue
            self.log.info("endpoint waiting for a slot", addr=str(intent.address),
                          ifname=self.ifname(intent.ifindex), plugin=intent.plugin)
            if self.monitor.subscribers:
                why = "deleted by someone else again and again: not restored for now" \
                    if intent.key in contested else "no free endpoint slot"
                self.monitor.publish(
                    "endpoint", action="wait", addr=str(intent.address), endpoint_id=None,
                    flags=str(intent.flags), ifname=self.ifname(intent.ifindex),
                    plugin=intent.plugin, reason=intent.reason, error=why,
                    trigger=self._trigger())
        self._waiting = {intent.key for intent in waiting}

    def _on_operation(self, op: Operation, error: str | None) -> None:
        rec = op.endpoint
        if self.monitor.subscribers:
            self.monitor.publish(
                "endpoint", action=op.kind, addr=str(rec.address), endpoint_id=rec.id,
                flags=str(rec.flags), ifname=self.ifname(rec.ifindex), plugin=rec.plugin,
                reason=op.reason, error=error, trigger=self._trigger(),
            )
        if error:
            self.stats.last_error = f"{op.kind} {rec.address}: {error}"
            self.stats.last_error_time = time.time()

    def _plugin_failed(self, state: PluginState, message: str) -> None:
        self.stats.plugin_failures[state.name] += 1
        self.stats.last_error = f"plugin {state.name}: {message}"
        self.stats.last_error_time = time.time()
        self.monitor.publish("plugin", plugin=state.name, action="failed", error=message,
                             enabled=state.enabled)

    def _record_error(self, exc: BaseException) -> None:
        self.stats.last_error = str(exc)
        self.stats.last_error_time = time.time()
        if isinstance(exc, KernelError):
            self.stats.errors_by_errno[_errno_name(exc.errno)] += 1

    def status_line(self) -> str:
        owned = len(self.reconciler.owned) if self.reconciler else 0
        waiting = len(self.reconciler.last_plan.waiting) if self.reconciler else 0
        text = f"{owned} endpoints owned"
        if waiting:
            text += f", {waiting} waiting for a slot"
        text += f", {len(self.connections)} connections"
        return text

    # ------------------------------------------------------------------ reload / stop

    async def reload(self, config: Config, available: dict[str, Available]) -> None:
        """Swap in a validated config and plugin set, then reconcile in full."""
        assert self.pm is not None and self.caps is not None
        old = self.config
        if config.daemon.state_dir != old.daemon.state_dir:
            self.log.warning("state_dir change needs a restart; keeping the old one",
                             state_dir=old.daemon.state_dir)
            config = replace(config, daemon=replace(config.daemon,
                                                    state_dir=old.daemon.state_dir))
        if config.kernel.path_manager != old.kernel.path_manager:
            self.log.warning("path_manager change needs a restart; keeping the old one",
                             path_manager=old.kernel.path_manager)
            config = replace(config, kernel=replace(config.kernel,
                                                    path_manager=old.kernel.path_manager))
        await apply_kernel_settings(config.kernel, self.caps, self.pm, self.store, self.log)
        self.config = config
        self.available = available
        self.model.set_config(config.network)
        self.host.timeout = config.daemon.plugin_timeout
        self.host.max_failures = config.daemon.plugin_max_failures
        self._instantiate_plugins(config, available)
        if self.userspace is not None:
            self.userspace.config_changed()
        await self.reconcile_now("reload", full=True)

    async def stop(self, *, undo: bool = False) -> None:
        """Let a running pass finish (cancelled half-way, an add acked by the
        kernel could go unrecorded), then stop the loops and clean up.
        ``undo`` (a start that failed part-way): whatever ``on_exit`` says,
        remove the endpoints and routes this process added and restore the
        settings it changed; what the state file held at start (a previous
        daemon's endpoints and recorded originals) stays, for the next
        start to adopt."""
        self._stopping = True
        try:
            async with self._pass_lock:
                for task in self._tasks:
                    task.cancel()
                for task in self._tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                self._tasks = []
                if undo or self.config.daemon.on_exit == "remove":
                    inherited = self.store.inherited if undo else Inherited()
                    if self.reconciler is not None:
                        await self.reconciler.remove_all(
                            keep=inherited.endpoints,
                            reason="start failed" if undo else "daemon stopping")
                    if self.routing is not None:
                        await self.routing.remove_all(keep=inherited.routes)
                    if self.pm is not None:
                        await restore_kernel_settings(self.pm, self.store, self.log,
                                                      own_only=undo)
                else:
                    owned = len(self.reconciler.owned) if self.reconciler else 0
                    self.log.info("keeping endpoints at exit (on_exit = keep)", endpoints=owned)
        finally:
            self.close()

    def close(self) -> None:
        self.host.close()
        self.store.close()
        for closable in (self.rtnl_events, self.mptcp_events, self.rtnl, self.pm):
            if closable is not None:
                closable.close()

    def endpoint_flags_kept(self) -> EndpointFlags:
        return self.caps.kept_flags if self.caps else CHANGEABLE_FLAGS


def _rtnl_kind(event: RtnlEvent) -> str:
    if isinstance(event, AddressEvent):
        return "rtnl_address_removed" if event.removed else "rtnl_address_added"
    if isinstance(event, LinkEvent):
        return "rtnl_link_removed" if event.removed else "rtnl_link_changed"
    return "rtnl_route_removed" if event.removed else "rtnl_route_added"


def _describe(event: RtnlEvent) -> str:
    if isinstance(event, AddressEvent):
        return f"address {event.address.address} {'removed' if event.removed else 'added'}"
    if isinstance(event, LinkEvent):
        state = "removed" if event.removed else ("up" if event.link.running else "down")
        return f"link {event.link.name} {state}"
    return f"route {event.route.dst} {'removed' if event.removed else 'added'}"


#: an event's type as stats, the monitor and logs name it (an unknown one: its number)
_EVENT_KINDS: dict[object, str] = {t: t.name.lower() for t in MptcpEventType}


def _event_fields(event: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("token", "saddr", "daddr", "sport", "dport", "local_id", "remote_id",
                 "backup", "ifindex", "error", "server_side"):
        if hasattr(event, name):
            value = getattr(event, name)
            out[name] = str(value) if name in ("saddr", "daddr") else value
    return out


_SIGNAL_FULLMESH = int(EndpointFlags.SIGNAL | EndpointFlags.FULLMESH)
_SIGNAL_SUBFLOW = int(EndpointFlags.SIGNAL | EndpointFlags.SUBFLOW)
_SIGNAL = int(EndpointFlags.SIGNAL)
_ADDRESS_TYPES = frozenset((ipaddress.IPv4Address, ipaddress.IPv6Address))


def _local_intent(item: EndpointIntent, known: frozenset[Address]
                  ) -> tuple[EndpointIntent, str]:
    """An intent whose address, as given, is not one of ``known``: with a
    string address parsed (plugins may write addresses as text, as the
    userspace context's methods take them), or what is wrong with it."""
    address: object = item.address
    if isinstance(address, str):
        try:
            address = parse_address(address)
        except ValueError:
            return item, f"endpoint {address!r}: not an IP address"
        item = replace(item, address=address)
    elif not isinstance(address, Address):
        return item, (f"endpoint {address!r}: the address must be an ipaddress address or "
                      f"a string, not {type(address).__name__}")
    if address not in known:
        return item, f"endpoint {address}: not an address of this host"
    return item, ""


def _intent_problem(item: EndpointIntent, addresses: frozenset[tuple[Address, int]]) -> str:
    """What is wrong with an intent for a local address, or ""."""
    if not isinstance(item.ifindex, int) or item.ifindex < 0:
        return f"endpoint {item.address}: invalid interface index {item.ifindex!r}"
    if item.ifindex and (item.address, item.ifindex) not in addresses:
        return f"endpoint {item.address}: not on interface index {item.ifindex}"
    if not isinstance(item.flags, int) or item.flags < 0 or item.flags >= 64:
        return f"endpoint {item.address}: invalid flags {item.flags!r}"
    if item.flags & _SIGNAL_FULLMESH == _SIGNAL_FULLMESH:  # int tests, no enum ops
        return f"endpoint {item.address}: signal and fullmesh cannot be combined"
    if not isinstance(item.port, int) or not 0 <= item.port < 65536:
        return f"endpoint {item.address}: invalid port {item.port!r}"
    if item.port and item.flags & _SIGNAL_SUBFLOW != _SIGNAL:  # as the kernel
        return (f"endpoint {item.address}: a port needs the signal flag and not subflow "
                "(the kernel refuses it otherwise)")
    if _priority(item.priority) is None:
        return (f"endpoint {item.address}: invalid priority {item.priority!r} "
                "(a number or a tuple of numbers, lower wins)")
    return ""


_PLAIN_NUMBERS = frozenset((int, float))


def _priority(value: Any) -> tuple[float, ...] | None:
    """A plugin's priority as a tuple the planner can sort against any other
    (a bare number is a 1-tuple); None when it is not numbers."""
    if type(value) is tuple and {type(v) for v in value} <= _PLAIN_NUMBERS:
        return value  # the usual case, checked without a call per element
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, tuple) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                        for v in value):
        return value
    return None


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))
