"""Start-up with N existing addresses (exec -> READY=1, exec -> endpoints in
the kernel), and the idle daemon: RSS and CPU over a quiet period."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.daemons import CDaemon, Daemon, PyDaemon
from bench.nl import MptcpPm, Rtnl
from bench.plan import Plan
from bench.report import PY, C, Row, Summary
from mptcpd_py.lab import Lab, LabError, Netns

MAX_ENDPOINTS = 8  # the in-kernel path manager's table
START_TIMEOUT = 20.0


@dataclass
class Starts:
    ready: list[float] = field(default_factory=list)  # s, exec -> READY=1
    endpoints: list[float] = field(default_factory=list)  # s, exec -> min(N, 8) endpoints
    cpu: list[float] = field(default_factory=list)  # ms of CPU until then
    rss: list[int] = field(default_factory=list)  # KiB when ready


@dataclass
class Idle:
    cpu_ms: float
    seconds: float
    rss_kib: int


def _addresses(count: int) -> list[ipaddress.IPv4Address]:
    """``count`` documentation addresses, alternating the two /24s."""
    bases = (ipaddress.IPv4Address("198.51.100.0"), ipaddress.IPv4Address("203.0.113.0"))
    return [bases[i % 2] + 1 + i // 2 for i in range(count)]


def _bed(lab: Lab, count: int) -> Netns:
    dut, peer = lab.netns("dut"), lab.netns("peer")
    lab.veth(dut, "eth0", peer, "peer0")
    ifindex = int(dut.ip_json("link", "show", "eth0")[0]["ifindex"])
    rt = Rtnl(dut.name)
    try:
        for address in _addresses(count):
            rt.add_address(ifindex, address, 32)
    finally:
        rt.close()
    return dut


def _make(subject: str, ns: Netns, workdir: str) -> Daemon:
    return PyDaemon(ns, workdir) if subject == PY else CDaemon(ns, workdir)


def _start_once(daemon: Daemon, pm: MptcpPm, want: int, starts: Starts) -> None:
    """Start and watch both readiness signals until both are seen."""
    daemon.start(wait=False)
    ready_at = endpoints_at = None
    expects_ready = isinstance(daemon, PyDaemon)
    deadline = time.monotonic() + START_TIMEOUT
    while endpoints_at is None or (expects_ready and ready_at is None):
        now = time.monotonic()
        if expects_ready and ready_at is None and daemon.ready():
            ready_at = now
        if endpoints_at is None and len(pm.endpoints()) >= want:
            endpoints_at = now
        if now > deadline:
            raise LabError(f"{daemon.name}: not ready with {want} endpoints after "
                           f"{START_TIMEOUT:g} s")
        daemon.check_alive()
        time.sleep(0.0005)
    if ready_at is not None:
        starts.ready.append(ready_at - daemon.started_at)
    starts.endpoints.append(endpoints_at - daemon.started_at)
    starts.cpu.append(daemon.cpu_ns() / 1e6)
    starts.rss.append(daemon.rss_kib())


def _reset(pm: MptcpPm) -> None:
    """What mptcpd leaves behind (endpoints, raised limits) goes."""
    pm.flush()
    pm.set_limits(2, 0)


def measure(subject: str, count: int, reps: int, workdir: str, *,
            idle_seconds: float = 0.0) -> tuple[Starts, Idle | None]:
    starts = Starts()
    idle = None
    with Lab("bench-start") as lab:
        dut = _bed(lab, count)
        pm = MptcpPm(dut.name)
        try:
            want = min(count, MAX_ENDPOINTS)
            for rep in range(reps):
                daemon = _make(subject, dut, os.path.join(workdir, f"start-{subject}-{count}-"
                                                                   f"{rep}"))
                try:
                    _start_once(daemon, pm, want, starts)
                    if idle_seconds and rep == reps - 1:
                        time.sleep(1.0)  # let start-up work (logging, GC) finish
                        cpu0, t0 = daemon.cpu_ns(), time.monotonic()
                        time.sleep(idle_seconds)
                        idle = Idle((daemon.cpu_ns() - cpu0) / 1e6, time.monotonic() - t0,
                                    daemon.rss_kib())
                        daemon.check_alive()
                finally:
                    daemon.stop()
                _reset(pm)
        finally:
            pm.close()
    return starts, idle


def run(plan: Plan, workdir: str, *, with_c: bool, log: Callable[[str], None]) -> list[Row]:
    counts, reps, idle_seconds = plan.start_counts, plan.start_reps, plan.idle_seconds
    subjects = [PY] + ([C] if with_c else [])
    results: dict[tuple[str, int], Starts] = {}
    idles: dict[str, Idle | None] = {}
    for count in counts:
        for subject in subjects:
            log(f"startup: {subject}, {count} addresses, {reps} starts")
            last = count == counts[-1]
            results[(subject, count)], idle = measure(
                subject, count, reps, workdir, idle_seconds=idle_seconds if last else 0.0)
            if last:
                idles[subject] = idle
    rows = []
    for count in counts:
        ready = Summary.of([s * 1000 for s in results[(PY, count)].ready])
        row = Row("startup", f"exec -> READY=1, N = {count}", "ms", {PY: ready}, digits=1)
        if count == max(counts):
            row.check(lambda ready=ready: ready.median <= 300 and ready.p95 <= 300,
                      "<= 300 (N = 500)" if count == 500 else "<= 300")
        rows.append(row)
        endpoints = {s: Summary.of([t * 1000 for t in results[(s, count)].endpoints])
                     for s in subjects}
        rows.append(Row("startup", f"exec -> {min(count, MAX_ENDPOINTS)} endpoint(s), "
                                   f"N = {count}", "ms", dict(endpoints), digits=1,
                        note="mptcpd has no sd_notify: its only readiness signal is its "
                             "endpoints" if count == counts[0] else ""))
        cpu = {s: Summary.of(results[(s, count)].cpu) for s in subjects}
        rows.append(Row("startup", f"CPU until ready, N = {count}", "ms", dict(cpu), digits=1))
    rss = {s: (i.rss_kib / 1024 if i else None) for s, i in idles.items()}
    cpu_idle = {s: (i.cpu_ms / i.seconds * 10 if i else None) for s, i in idles.items()}
    n = counts[-1]
    rows.append(Row("idle", f"RSS, N = {n}", "MiB", dict(rss), digits=1).check(
        lambda: rss[PY] <= 40, "<= 40"))
    rows.append(Row("idle", f"CPU per 10 s idle, N = {n}", "ms", dict(cpu_idle),
                    digits=2).check(lambda: cpu_idle[PY] <= 10, "~0 (<= 10 ms / 10 s)"))
    return rows
