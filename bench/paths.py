"""Two tbf-shaped paths: the throughput of one MPTCP upload, and what a 5 s
outage of one path costs it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.daemons import CDaemon, Daemon, PyDaemon
from bench.plan import Plan
from bench.report import PY, C, Row, Summary
from mptcpd_py.lab import (
    BulkTransfer,
    Lab,
    LabError,
    TwoPaths,
    diag_subflows,
    sample_rates,
    shape,
    wait_for,
)

RATE = 50.0  # Mbit/s per path
INTERVAL = 0.1


@dataclass
class Outage:
    rate: float  # Mbit/s goodput while path 1 is down
    stall: float  # s, the longest pause of the receiver during the outage
    back_to_90: float | None  # s from the path's return to 90% of the goodput before


@dataclass
class PathRun:
    total: float  # Mbit/s goodput, both paths
    per_path: list[float]  # Mbit/s on each link (headers included)
    outages: list[Outage]
    alive: bool


def _mean(samples: list[dict[str, float]], key: str) -> float:
    return sum(s[key] for s in samples) / len(samples) if samples else 0.0


def measure(subject: str, plan: Plan, workdir: str) -> PathRun:
    seconds, outage = plan.path_seconds, plan.outage
    with Lab("bench-paths") as lab:
        tp = TwoPaths(lab)
        for ifname in tp.ifnames:
            shape(tp.client, ifname, RATE)
        tp.server.ip("mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "8")
        work = os.path.join(workdir, f"paths-{subject}")
        daemon: Daemon = PyDaemon(tp.client, work) if subject == PY else \
            CDaemon(tp.client, work)
        second = tp.client_addr(1)
        transfer = None
        try:
            daemon.start()
            wait_for(lambda: {tp.client_addr(0), second} <= {
                e["address"] for e in tp.client.endpoints()}, 10, what="both endpoints")
            transfer = BulkTransfer(tp.client, tp.server, tp.server_addr(0),
                                    max_seconds=2 * seconds + plan.outages * (outage + seconds)
                                    + 30).start()
            wait_for(lambda: any(str(s.local) == second for s in diag_subflows(tp.client)),
                     10, 0.05, what="a subflow on the second path")
            time.sleep(min(2.0, seconds))  # slow start on both subflows
            steady = sample_rates(transfer, tp.client, tp.ifnames, seconds, interval=INTERVAL)
            total = _mean(steady, "total")
            per_path = [_mean(steady, name) for name in tp.ifnames]
            outages = []
            for _ in range(plan.outages):
                transfer.reset_gap()
                tp.client.ip("link", "set", tp.ifnames[1], "down")
                during = sample_rates(transfer, tp.client, tp.ifnames, outage,
                                      interval=INTERVAL)
                stall = transfer.max_gap
                tp.client.ip("link", "set", tp.ifnames[1], "up")
                back_at = time.monotonic()
                tp.add_default_routes(1, v6=False)  # as DHCP would, right after the link
                after = sample_rates(transfer, tp.client, tp.ifnames, seconds,
                                     interval=INTERVAL)
                back = next((s["t"] - back_at for s in after if s["total"] >= 0.9 * total),
                            None)
                outages.append(Outage(_mean(during, "total"), stall, back))
            daemon.check_alive()
            return PathRun(total, per_path, outages, transfer.alive())
        finally:
            if transfer is not None:
                transfer.stop()
            daemon.stop()


def run(plan: Plan, workdir: str, *, with_c: bool, log: Callable[[str], None]) -> list[Row]:
    seconds, outage = plan.path_seconds, plan.outage
    subjects = [PY] + ([C] if with_c else [])
    results: dict[str, PathRun | None] = {}
    for subject in subjects:
        log(f"paths: {subject}, {seconds:g} s over two {RATE:g} Mbit/s paths, "
            f"{plan.outages} outages of {outage:g} s")
        try:
            results[subject] = measure(subject, plan, workdir)
        except (LabError, TimeoutError) as exc:
            log(f"paths: {subject}: {exc}")
            results[subject] = None

    def value(subject: str, get: Callable[[PathRun], object]) -> object:
        found = results.get(subject)
        return get(found) if found is not None else None

    def row(metric: str, unit: str, get: Callable[[PathRun], object], digits: int = 2) -> Row:
        return Row("paths", metric, unit, {s: value(s, get) for s in subjects}, digits=digits)

    def back(r: PathRun) -> object:
        times = [o.back_to_90 for o in r.outages if o.back_to_90 is not None]
        if len(times) < len(r.outages):
            return f"never in {len(r.outages) - len(times)} of {len(r.outages)}"
        return Summary.of(times)

    total = {s: value(s, lambda r: r.total / (2 * RATE)) for s in subjects}
    stall = {s: value(s, lambda r: Summary.of([o.stall for o in r.outages])) for s in subjects}
    back_90 = {s: value(s, back) for s in subjects}
    n = plan.outages
    return [
        Row("paths", "one upload: goodput / sum of link rates", "ratio", total,
            digits=3).check(lambda: total[PY] >= 0.92, ">= 0.92"),
        row("one upload: goodput", "Mbit/s", lambda r: r.total, 1),
        row("one upload: on each link (headers incl.)", "Mbit/s",
            lambda r: " + ".join(f"{x:.1f}" for x in r.per_path)),
        row(f"{n} outages: connection survived", "", lambda r: "yes" if r.alive else "NO")
        .check(lambda: results[PY].alive, "yes"),
        Row("paths", f"{n} outages: longest stall in each", "s", stall, digits=3).check(
            lambda: stall[PY].max <= 0.3, "<= 0.3 every outage"),
        row(f"{n} outages: goodput during the {outage:g} s", "Mbit/s",
            lambda r: Summary.of([o.rate for o in r.outages]), 1),
        Row("paths", f"{n} outages: path back -> 90% of before", "s", back_90,
            digits=2).check(lambda: back_90[PY].max <= 2.0, "<= 2.0 every outage"),
    ]
