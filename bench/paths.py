"""Two tbf-shaped paths: the throughput of one MPTCP upload, and what a 5 s
outage of one path costs it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.daemons import CDaemon, Daemon, PyDaemon
from bench.plan import Plan
from bench.report import PY, C, Row
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
class PathRun:
    total: float  # Mbit/s goodput, both paths
    per_path: list[float]  # Mbit/s on each link (headers included)
    outage_rate: float  # Mbit/s goodput while path 1 is down
    stall: float  # s, the longest pause of the receiver during the outage
    back_to_90: float | None  # s from the path's return to 90% of `total`
    alive: bool


def _mean(samples: list[dict[str, float]], key: str) -> float:
    return sum(s[key] for s in samples) / len(samples) if samples else 0.0


def measure(subject: str, seconds: float, outage: float, workdir: str) -> PathRun:
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
                                    max_seconds=seconds * 2 + outage + 30).start()
            wait_for(lambda: any(str(s.local) == second for s in diag_subflows(tp.client)),
                     10, 0.05, what="a subflow on the second path")
            time.sleep(min(2.0, seconds))  # slow start on both subflows
            steady = sample_rates(transfer, tp.client, tp.ifnames, seconds, interval=INTERVAL)
            total = _mean(steady, "total")
            per_path = [_mean(steady, name) for name in tp.ifnames]

            transfer.reset_gap()
            tp.client.ip("link", "set", tp.ifnames[1], "down")
            during = sample_rates(transfer, tp.client, tp.ifnames, outage, interval=INTERVAL)
            stall = transfer.max_gap
            tp.client.ip("link", "set", tp.ifnames[1], "up")
            back_at = time.monotonic()
            tp.add_default_routes(1, v6=False)  # as DHCP would, right after the link
            after = sample_rates(transfer, tp.client, tp.ifnames, seconds, interval=INTERVAL)
            back = next((s["t"] - back_at for s in after if s["total"] >= 0.9 * total), None)
            daemon.check_alive()
            return PathRun(total, per_path, _mean(during, "total"), stall, back,
                           transfer.alive())
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
            f"{outage:g} s outage")
        try:
            results[subject] = measure(subject, seconds, outage, workdir)
        except (LabError, TimeoutError) as exc:
            log(f"paths: {subject}: {exc}")
            results[subject] = None

    def value(subject: str, get: Callable[[PathRun], object]) -> object:
        found = results.get(subject)
        return get(found) if found is not None else None

    def row(metric: str, unit: str, get: Callable[[PathRun], object], digits: int = 2) -> Row:
        return Row("paths", metric, unit, {s: value(s, get) for s in subjects}, digits=digits)

    total = {s: value(s, lambda r: r.total / (2 * RATE)) for s in subjects}
    return [
        Row("paths", "one upload: goodput / sum of link rates", "ratio", total,
            digits=3).check(lambda: total[PY] >= 0.92, ">= 0.92"),
        row("one upload: goodput", "Mbit/s", lambda r: r.total, 1),
        row("one upload: on each link (headers incl.)", "Mbit/s",
            lambda r: " + ".join(f"{x:.1f}" for x in r.per_path)),
        row("outage: connection survived", "", lambda r: "yes" if r.alive else "NO").check(
            lambda: results[PY].alive, "yes"),
        row("outage: longest stall", "s", lambda r: r.stall, 3).check(
            lambda: results[PY].stall <= 0.3, "<= 0.3"),
        row(f"outage: goodput during the {outage:g} s", "Mbit/s", lambda r: r.outage_rate, 1),
        row("outage: path back -> 90% of before", "s",
            lambda r: r.back_to_90 if r.back_to_90 is not None else "never").check(
            lambda: results[PY].back_to_90 <= 2.0, "<= 2.0"),
    ]
