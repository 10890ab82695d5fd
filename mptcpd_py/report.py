"""What the daemon reports about itself and the kernel: the data behind
``ctl status / endpoints / connections / plugins / limits`` and the
Prometheus metrics, as plain JSON-able dicts.

Kernel facts (endpoints, limits, subflows) are read fresh for each report
(one dump each, off the event path), so what ``ctl`` shows is what ``ip
mptcp endpoint show`` and ``ss -M`` show at that moment; the daemon's own
bookkeeping (ownership, plugins' reasons, counters) is joined to them.
Status and metrics are computed from the same :class:`KernelView`, so
their numbers agree.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mptcpd_py.connections import dump_subflows
from mptcpd_py.core import Core
from mptcpd_py.endpoints import MAX_ENDPOINTS, match_owned
from mptcpd_py.errors import MptcpdError
from mptcpd_py.netlink.diag import DiagSubflow
from mptcpd_py.netlink.types import Address, Endpoint, EndpointFlags, Limits

MAX_KERNEL_LIMIT = 8


@dataclass
class DaemonInfo:
    """What the lifecycle knows that the core does not."""

    version: str
    pid: int
    started: float  # time.time() at start
    config_path: str
    control_socket: str = ""
    control_group: str = ""
    metrics_listen: str = ""
    metrics_error: str = ""
    monitor_clients: int = 0
    control: dict[str, Any] = field(default_factory=dict)


@dataclass
class KernelView:
    """One look at the kernel; a part that could not be read is None with
    its error."""

    endpoints: list[Endpoint] | None = None
    limits: Limits | None = None
    subflows: list[DiagSubflow] | None = None
    listeners: list[tuple[Address, int]] | None = None
    errors: dict[str, str] = field(default_factory=dict)


async def read_kernel(core: Core, *, endpoints: bool = True, limits: bool = True,
                      subflows: bool = True) -> KernelView:
    """Dump what is asked, concurrently; failures are recorded, not raised."""
    view = KernelView()
    pm = core.pm

    async def get_endpoints() -> None:
        assert pm is not None
        try:
            view.endpoints = await pm.endpoints()
        except MptcpdError as exc:
            view.errors["endpoints"] = str(exc)

    async def get_limits() -> None:
        assert pm is not None
        try:
            view.limits = await pm.get_limits()
        except MptcpdError as exc:
            view.errors["limits"] = str(exc)

    async def get_subflows() -> None:
        try:
            view.subflows, view.listeners = await dump_subflows(core.netns)
        except (MptcpdError, OSError) as exc:
            view.errors["connections"] = str(exc)

    jobs = []
    if endpoints and pm is not None:
        jobs.append(get_endpoints())
    if limits and pm is not None:
        jobs.append(get_limits())
    if subflows:
        jobs.append(get_subflows())
    await asyncio.gather(*jobs)
    return view


# ---------------------------------------------------------------- endpoints


def _flags(flags: EndpointFlags) -> list[str]:
    return list(EndpointFlags(flags).names)


def endpoint_rows(core: Core, observed: list[Endpoint]) -> list[dict[str, Any]]:
    """Every kernel endpoint, marked owned or foreign, then what is wanted
    but not there: waiting for a slot, or ours and deleted by someone else."""
    reconciler = core.reconciler
    owned = reconciler.owned if reconciler is not None else {}
    desired = {intent.key: intent for intent in core.desired}
    present, gone, _foreign = match_owned(observed, owned)
    ours = {rec.id for rec, _ in present.values()}
    rows: list[dict[str, Any]] = []
    for ep in sorted(observed, key=lambda e: e.id):
        intent = desired.get(ep.key)
        row: dict[str, Any] = {"id": ep.id, "address": str(ep.address), "port": ep.port,
               "flags": _flags(ep.flags), "ifindex": ep.ifindex,
               "ifname": core.ifname(ep.ifindex) if ep.ifindex else "",
               "state": "owned" if ep.id in ours else "foreign",
               "plugin": "", "reason": ""}
        if ep.id in ours:
            rec = present[ep.key][0]
            row["plugin"] = rec.plugin or (intent.plugin if intent else "")
            row["reason"] = intent.reason if intent else "no longer wanted: removed next pass"
        elif EndpointFlags.IMPLICIT in ep.flags:
            row["reason"] = "made by the kernel for a subflow (implicit)"
            if intent is not None:
                row["plugin"] = intent.plugin
                row["reason"] = "made by the kernel for a subflow (implicit); replaced by " \
                                "the wanted endpoint next pass"
        elif intent is not None:
            row["plugin"] = intent.plugin
            row["reason"] = "someone else's endpoint for a wanted address: left alone"
        else:
            row["reason"] = "not created by mptcpd-py: never touched"
        rows.append(row)
    contested = reconciler.contested() if reconciler is not None else frozenset()
    for rec in gone:
        rows.append({"id": rec.id, "address": str(rec.address), "port": rec.port,
                     "flags": _flags(rec.flags), "ifindex": rec.ifindex,
                     "ifname": core.ifname(rec.ifindex), "state": "missing",
                     "plugin": rec.plugin,
                     "reason": "deleted outside mptcpd-py; restored at the next resync"})
    waiting = reconciler.last_plan.waiting if reconciler is not None else ()
    kernel_keys = {ep.key for ep in observed}
    for intent in waiting:
        if intent.key in kernel_keys:
            continue
        why = ("deleted by someone else again and again: not restored for now"
               if intent.key in contested else
               f"no free slot (the in-kernel path manager holds {MAX_ENDPOINTS})")
        rows.append({"id": None, "address": str(intent.address), "port": intent.port,
                     "flags": _flags(intent.flags), "ifindex": intent.ifindex,
                     "ifname": core.ifname(intent.ifindex), "state": "waiting",
                     "plugin": intent.plugin, "reason": f"{why}; {intent.reason}".rstrip("; ")})
    return rows


def endpoint_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(row["state"] for row in rows)
    return {state: counts.get(state, 0) for state in ("owned", "foreign", "waiting", "missing")}


# ---------------------------------------------------------------- connections


def connection_rows(core: Core, subflows: list[DiagSubflow],
                    listeners: list[tuple[Address, int]]) -> list[dict[str, Any]]:
    """MPTCP connections and their subflows, as sock_diag shows them now.
    A subflow's interface is the one it is bound to, else the one holding
    its local address."""
    listening = {port for _addr, port in listeners}
    holder = {address: index for (index, address) in core.model.addresses}

    def interface_of(address: Address, ifindex: int) -> str:
        return core.ifname(ifindex) or core.ifname(holder.get(address, 0))

    by_token: dict[int, list[DiagSubflow]] = {}
    for sub in subflows:
        by_token.setdefault(sub.token, []).append(sub)
    rows = []
    for token, subs in sorted(by_token.items()):
        subs.sort(key=lambda s: (s.local_id, s.remote_id, str(s.local), s.local_port))
        initial = next((s for s in subs if s.local_id == 0 and s.remote_id == 0), subs[0])
        known = core.connections.get(token)
        server = known.server_side if known is not None else initial.local_port in listening
        rows.append({
            "token": token,
            "local": str(initial.local), "local_port": initial.local_port,
            "remote": str(initial.remote), "remote_port": initial.remote_port,
            "side": "server" if server else "client",
            "subflows": [
                {"local": str(s.local), "local_port": s.local_port,
                 "remote": str(s.remote), "remote_port": s.remote_port,
                 "local_id": s.local_id, "remote_id": s.remote_id, "backup": s.backup,
                 "ifname": interface_of(s.local, s.ifindex)}
                for s in subs
            ],
        })
    return rows


def subflow_counts(rows: list[dict[str, Any]]) -> Counter[tuple[str, bool]]:
    """(interface, backup) -> number of subflows."""
    counts: Counter[tuple[str, bool]] = Counter()
    for conn in rows:
        for sub in conn["subflows"]:
            counts[(sub["ifname"], sub["backup"])] += 1
    return counts


# ---------------------------------------------------------------- plugins, limits


def plugin_rows(core: Core) -> list[dict[str, Any]]:
    rows = []
    started = set()
    for state in core.host.states:
        started.add(state.name)
        rows.append({"name": state.name, "origin": state.origin,
                     "state": "active" if state.enabled else "disabled",
                     "disabled_reason": state.disabled_reason,
                     "hooks": list(state.hooks), "calls": state.calls,
                     "failures": state.failures, "total_failures": state.total_failures,
                     "last_error": state.last_error, "summary": state.plugin.summary()})
    for name in core.config.daemon.plugins:
        if name not in started:
            problem = next((p for p in core.plugin_problems if p.startswith(f"plugin {name}:")),
                           "not available")
            rows.append({"name": name, "origin": "", "state": "not started",
                         "disabled_reason": problem, "hooks": [], "calls": 0, "failures": 0,
                         "total_failures": 0, "last_error": problem, "summary": ""})
    return rows


def limits_view(core: Core, limits: Limits | None) -> dict[str, Any]:
    configured = core.config.kernel.limits
    saved = core.store.state.saved_limits
    out: dict[str, Any] = {"max": MAX_KERNEL_LIMIT, "limits": []}
    for name in ("subflows", "add_addr_accepted"):
        out["limits"].append({
            "name": name,
            "kernel": getattr(limits, name) if limits is not None else None,
            "configured": getattr(configured, name),
            "before": saved.get(name) if saved else None,
        })
    return out


# ---------------------------------------------------------------- status


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def status_view(core: Core, info: DaemonInfo, kernel: KernelView) -> dict[str, Any]:
    stats = core.stats
    now = time.time()
    endpoints = endpoint_rows(core, kernel.endpoints) if kernel.endpoints is not None else []
    conns = connection_rows(core, kernel.subflows or [], kernel.listeners or []) \
        if kernel.subflows is not None else []
    latencies = list(stats.latencies)
    caps = core.caps
    return {
        "version": info.version,
        "pid": info.pid,
        "started": info.started,
        "uptime": round(now - info.started, 3),
        "config": info.config_path,
        "state_dir": core.config.daemon.state_dir,
        "control_socket": info.control_socket,
        "control_group": info.control_group,
        "metrics_listen": info.metrics_listen,
        "metrics_error": info.metrics_error,
        "path_manager": core.config.kernel.path_manager,
        "mptcp_enabled": bool(caps.mptcp_enabled) if caps else None,
        "limits": ({"subflows": kernel.limits.subflows,
                    "add_addr_accepted": kernel.limits.add_addr_accepted}
                   if kernel.limits is not None else None),
        "plugins": [{"name": row["name"], "state": row["state"], "failures": row["failures"]}
                    for row in plugin_rows(core)],
        "counts": {
            "endpoints": endpoint_counts(endpoints),
            "connections": len(conns),
            "subflows": sum(len(c["subflows"]) for c in conns),
            "monitor_clients": info.monitor_clients,
        },
        "events": dict(sorted(stats.events.items())),
        "reconciles": stats.reconciles,
        "resyncs": dict(sorted(stats.resyncs.items())),
        "last_resync": stats.last_resync or None,
        "kernel_errors": dict(sorted(stats.errors_by_errno.items())),
        "plugin_failures": dict(sorted(stats.plugin_failures.items())),
        "last_error": ({"message": stats.last_error, "time": stats.last_error_time}
                       if stats.last_error else None),
        "latency": {
            "observed": stats.latencies.observed,
            "window": len(latencies),
            "p50_ms": round(_percentile(latencies, 0.5) * 1000, 3) if latencies else None,
            "p99_ms": round(_percentile(latencies, 0.99) * 1000, 3) if latencies else None,
        },
        "control": info.control,
        "read_errors": kernel.errors,
        "rss_bytes": _rss(),
    }


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
