"""Prometheus metrics, served on ``[metrics] listen`` and by ``ctl metrics``.

Every value is computed at scrape time from what the daemon keeps anyway
(the counters in :class:`~mptcpd_py.core.Stats`, the reconciler's
ownership, a fresh look at the kernel from :mod:`mptcpd_py.report`), so
handling an event costs nothing extra for them. The numbers are those of
``ctl status``: both come from the same report functions.

The HTTP listener runs on the daemon's event loop (no thread reads state
the loop is changing): GET ``/metrics`` only, small bounded requests, a
few connections at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, generate_latest

from mptcpd_py.config import parse_listen
from mptcpd_py.core import LATENCY_BUCKETS, Core
from mptcpd_py.report import (
    DaemonInfo,
    KernelView,
    connection_rows,
    endpoint_counts,
    endpoint_rows,
    subflow_counts,
)

MAX_HTTP_CONNECTIONS = 16
HTTP_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 8192


def families(core: Core, info: DaemonInfo, kernel: KernelView) -> list[Metric]:
    stats = core.stats
    out: list[Metric] = []

    def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=labels or [])
        out.append(family)
        return family

    def counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=labels or [])
        out.append(family)
        return family

    gauge("mptcpd_info", "The running daemon (value 1).", ["version", "path_manager"]) \
        .add_metric([info.version, core.config.kernel.path_manager], 1)
    gauge("mptcpd_start_time_seconds", "When the daemon started (unix time).") \
        .add_metric([], info.started)

    if kernel.endpoints is not None:
        family = gauge("mptcpd_endpoints", "MPTCP endpoints: in the kernel (owned by the "
                       "daemon or foreign), wanted but waiting for a slot, or owned and "
                       "deleted by someone else (missing).", ["state"])
        for state, count in endpoint_counts(endpoint_rows(core, kernel.endpoints)).items():
            family.add_metric([state], count)
    if kernel.subflows is not None:
        rows = connection_rows(core, kernel.subflows, kernel.listeners or [])
        gauge("mptcpd_connections", "MPTCP connections in the namespace.") \
            .add_metric([], len(rows))
        family = gauge("mptcpd_subflows", "MPTCP subflows by interface and backup flag.",
                       ["ifname", "backup"])
        for (ifname, backup), count in sorted(subflow_counts(rows).items()):
            family.add_metric([ifname, "1" if backup else "0"], count)
    if kernel.limits is not None:
        family = gauge("mptcpd_kernel_limit", "The in-kernel path manager's limits "
                       "(ip mptcp limits).", ["limit"])
        family.add_metric(["subflows"], kernel.limits.subflows)
        family.add_metric(["add_addr_accepted"], kernel.limits.add_addr_accepted)

    family_c = counter("mptcpd_events", "Kernel events handled, by type.", ["type"])
    for kind, count in sorted(stats.events.items()):
        family_c.add_metric([kind], count)
    family_c = counter("mptcpd_kernel_errors", "Kernel commands refused, by errno.", ["errno"])
    for code, count in sorted(stats.errors_by_errno.items()):
        family_c.add_metric([code], count)
    family_c = counter("mptcpd_resyncs", "Resyncs with the kernel: full reconcile passes "
                       "(start, periodic, reload, overflow) and event-stream overflows by "
                       "socket.", ["source"])
    for source, count in sorted(stats.resyncs.items()):
        family_c.add_metric([source], count)
    counter("mptcpd_reconciles", "Reconcile passes.").add_metric([], stats.reconciles)
    gauge("mptcpd_last_resync_timestamp_seconds", "When the last full resync ran "
          "(unix time).").add_metric([], stats.last_resync)

    family_c = counter("mptcpd_plugin_failures", "Plugin hook failures (raised, timed out, "
                       "invalid result).", ["plugin"])
    for plugin, count in sorted(stats.plugin_failures.items()):
        family_c.add_metric([plugin], count)
    family = gauge("mptcpd_plugin_enabled", "1 while a plugin is active, 0 once disabled.",
                   ["plugin"])
    for plugin_state in core.host.states:
        family.add_metric([plugin_state.name], 1 if plugin_state.enabled else 0)

    latencies = stats.latencies
    histogram = HistogramMetricFamily(
        "mptcpd_event_handling_seconds", "From the first event that made work to the end "
        "of the pass that handled it (kernel PM), or one MPTCP event's handling (userspace PM).",
        labels=[])
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*LATENCY_BUCKETS, float("inf")), latencies.buckets, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    histogram.add_metric([], buckets, latencies.total_seconds)
    out.append(histogram)

    control = info.control
    if control:
        family_c = counter("mptcpd_control_requests", "Control socket requests, by command.",
                           ["command"])
        for name, count in sorted(control.get("requests", {}).items()):
            family_c.add_metric([name], count)
        family_c = counter("mptcpd_control_errors", "Control socket error replies, by code.",
                           ["code"])
        for code, count in sorted(control.get("errors", {}).items()):
            family_c.add_metric([code], count)
        counter("mptcpd_control_replies_dropped", "Replies dropped: the client was gone or "
                "did not read.").add_metric([], control.get("replies_dropped", 0))
        counter("mptcpd_monitor_events_dropped", "Monitor events a slow client missed.") \
            .add_metric([], control.get("events_dropped", 0))
    gauge("mptcpd_monitor_clients", "Clients of `ctl monitor`.") \
        .add_metric([], info.monitor_clients)
    return out


class _Families:
    """A collector that hands out families computed beforehand."""

    def __init__(self, computed: list[Metric]) -> None:
        self.computed = computed

    def collect(self) -> Iterator[Metric]:
        return iter(self.computed)


def registry_for(computed: list[Metric]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(computed))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def exposition(computed: list[Metric], accept: str = "") -> tuple[bytes, str]:
    """(body, content type) in the format the scraper asked for."""
    registry = registry_for(computed)
    if not accept:
        return generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8"
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


# ---------------------------------------------------------------- HTTP

Scrape = Callable[[str], Awaitable[tuple[bytes, str]]]


class MetricsListener:
    """GET /metrics on ``HOST:PORT``."""

    def __init__(self, listen: str, scrape: Scrape, log: Any) -> None:
        parsed = parse_listen(listen)
        assert parsed is not None
        self.listen = listen
        self.host, self.port = parsed
        self.scrape = scrape
        self.log = log
        self.server: asyncio.Server | None = None
        self._connections = 0
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Raises OSError (address in use, not an address of this host)."""
        self.server = await asyncio.start_server(self._serve, self.host, self.port,
                                                 limit=MAX_REQUEST_HEAD, reuse_address=True)
        self.log.info("metrics listening", listen=self.listen,
                      url=f"http://{self.listen}/metrics")

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self._handlers):
                task.cancel()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._connections += 1
        try:
            if self._connections > MAX_HTTP_CONNECTIONS:
                return
            await asyncio.wait_for(self._exchange(reader, writer), HTTP_TIMEOUT)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            pass
        finally:
            self._connections -= 1
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                        ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._respond(writer, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"only GET\n", extra="Allow: GET, HEAD\r\n")
            return
        if path == "/":
            await self._respond(writer, 200, b"mptcpd-py: metrics at /metrics\n",
                                head_only=method == "HEAD")
            return
        if path != "/metrics":
            await self._respond(writer, 404, b"not found: metrics are at /metrics\n")
            return
        body, content_type = await self.scrape(headers.get("accept", ""))
        await self._respond(writer, 200, body, content_type=content_type,
                            head_only=method == "HEAD")

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, *,
                       content_type: str = "text/plain; charset=utf-8", extra: str = "",
                       head_only: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found",
                  405: "Method Not Allowed"}[status]
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
        writer.write(head.encode("latin-1") + (b"" if head_only else body))
        await writer.drain()
