"""Address added -> endpoint present, address deleted -> endpoint gone, and
the daemon's CPU time per add + delete; plus the kernel's floor."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.daemons import BareResponder, CDaemon, Daemon, PyDaemon
from bench.nl import Address, MptcpPm, Rtnl
from bench.plan import Plan
from bench.report import FLOOR, PY, C, Row, Summary
from mptcpd_py.lab import Lab, LabError, Netns

BARE = "bare"  # bench/bare_responder.py: the yardstick for what Python allows
SUBFLOW = 2
POLL_TIMEOUT = 2.0
SETTLE = 0.03  # let the daemon finish what follows the kernel write before the next step
WARMUP = 5
ROUNDS = 4  # the subjects take turns, so that each sees the machine in every state


@dataclass
class Timings:
    add: list[float] = field(default_factory=list)
    delete: list[float] = field(default_factory=list)
    cpu_per_cycle: float | None = None
    cpu_add: float = 0.0  # ms, summed over the measured cycles
    cpu_delete: float = 0.0
    failures: int = 0

    def merge(self, other: Timings) -> None:
        """Add another round's cycles (CPU per cycle weighted by cycles)."""
        if other.cpu_per_cycle is not None:
            mine, theirs = len(self.add), len(other.add)
            total = (self.cpu_per_cycle or 0.0) * mine + other.cpu_per_cycle * theirs
            self.cpu_per_cycle = total / (mine + theirs) if mine + theirs else None
        self.add += other.add
        self.delete += other.delete
        self.cpu_add += other.cpu_add
        self.cpu_delete += other.cpu_delete
        self.failures += other.failures


def _wait(pm: MptcpPm, address: Address, present: bool) -> bool:
    """Busy-poll GET_ADDR dumps until ``address`` is (not) an endpoint."""
    deadline = time.perf_counter() + POLL_TIMEOUT
    while (address in pm.endpoint_addresses()) != present:
        if time.perf_counter() > deadline:
            return False
        # Let a daemon woken onto this CPU run now rather than after our slice.
        os.sched_yield()
    return True


def _addresses() -> list[Address]:
    base = ipaddress.ip_address("203.0.113.0")
    return [base + i for i in range(10, 250)]


def _bed(lab: Lab) -> tuple[Netns, int]:
    dut, peer = lab.netns("dut"), lab.netns("peer")
    lab.veth(dut, "eth0", peer, "peer0")
    ifindex = int(dut.ip_json("link", "show", "eth0")[0]["ifindex"])
    return dut, ifindex


def measure(subject: str, reps: int, workdir: str, *,
            on_measuring: Callable[[Daemon, bool], None] | None = None,
            py_env: dict[str, str] | None = None) -> Timings:
    """``subject``: PY, C, BARE or FLOOR (the harness writes the endpoints itself).
    ``on_measuring(daemon, True)`` runs before the first measured cycle,
    ``(daemon, False)`` after the last (bench.stages reads its probe then);
    ``py_env``: added to mptcpd-py's environment."""
    timings = Timings()
    with Lab("bench-ep") as lab:
        dut, ifindex = _bed(lab)
        rt, pm = Rtnl(dut.name), MptcpPm(dut.name)
        daemon: Daemon | None = None
        try:
            if subject == PY:
                daemon = PyDaemon(dut, os.path.join(workdir, "endpoints-py"), env=py_env)
            elif subject == C:
                daemon = CDaemon(dut, os.path.join(workdir, "endpoints-c"))
            elif subject == BARE:
                daemon = BareResponder(dut)
            if daemon is not None:
                daemon.start()
                time.sleep(0.3)
            pool = _addresses()
            cpu0 = daemon.cpu_ns() if daemon else 0
            measured = 0
            for i in range(reps + WARMUP):
                address = pool[i % len(pool)]
                if i == WARMUP and daemon is not None:
                    if on_measuring is not None:
                        on_measuring(daemon, True)
                    cpu0 = daemon.cpu_ns()
                c0 = daemon.cpu_ns() if daemon else 0
                t0 = time.perf_counter()
                rt.add_address(ifindex, address, 32)
                if subject == FLOOR:
                    pm.add(address, 1, SUBFLOW, ifindex)
                ok = _wait(pm, address, True)
                t1 = time.perf_counter()
                time.sleep(SETTLE)
                if daemon is not None:
                    daemon.drain()
                c1 = daemon.cpu_ns() if daemon else 0
                t2 = time.perf_counter()
                rt.delete_address(ifindex, address, 32)
                if subject == FLOOR:
                    pm.delete(1)
                gone = _wait(pm, address, False)
                t3 = time.perf_counter()
                time.sleep(SETTLE)
                c2 = daemon.cpu_ns() if daemon else 0
                if not (ok and gone):
                    timings.failures += 1
                    if timings.failures > 3:
                        raise LabError(f"{subject}: endpoint for {address} never "
                                       f"{'appeared' if not ok else 'went away'}")
                    continue
                if i >= WARMUP:
                    timings.add.append(t1 - t0)
                    timings.delete.append(t3 - t2)
                    timings.cpu_add += (c1 - c0) / 1e6
                    timings.cpu_delete += (c2 - c1) / 1e6
                    measured += 1
            if daemon is not None and measured:
                timings.cpu_per_cycle = (daemon.cpu_ns() - cpu0) / measured / 1e6
            if daemon is not None and on_measuring is not None:
                on_measuring(daemon, False)
        finally:
            if daemon is not None:
                daemon.stop()
            rt.close()
            pm.close()
    return timings


def run(plan: Plan, workdir: str, *, with_c: bool, log: Callable[[str], None]) -> list[Row]:
    reps = plan.endpoint_reps
    subjects = [FLOOR, PY] + ([C] if with_c else [])
    results: dict[str, Timings] = {subject: Timings() for subject in [*subjects, BARE]}
    rounds = max(1, min(ROUNDS, reps // 10))
    for round_ in range(rounds):
        share = reps // rounds + (1 if round_ < reps % rounds else 0)
        log(f"endpoints: round {round_ + 1} of {rounds}, {share} add/delete cycles each")
        for subject, timings in results.items():
            timings.merge(measure(subject, share, workdir))

    def ms(subject: str, kind: str) -> Summary | None:
        t = results.get(subject)
        found = Summary.of(getattr(t, kind)) if t else None
        return found.scaled(1000) if found else None

    add = {s: ms(s, "add") for s in subjects}
    delete = {s: ms(s, "delete") for s in subjects}
    cpu: dict[str, float | None] = {s: results[s].cpu_per_cycle for s in (PY, C)
                                    if s in results}
    rows = []
    row = Row("endpoints", "address added -> endpoint present", "ms", dict(add), digits=3)
    if with_c:
        row.check(lambda: add[PY].median <= 1.2 * add[C].median and add[PY].p95 <= 1.0,
                  "median <= 1.2x mptcpd, p95 <= 1.0")
    else:
        row.check(lambda: add[PY].p95 <= 1.0, "p95 <= 1.0 (no mptcpd here)")
    row.note = f"n = {add[PY].n if add[PY] else 0} per column"
    rows.append(row)
    row = Row("endpoints", "address deleted -> endpoint gone", "ms", dict(delete), digits=2)
    row.check(lambda: delete[PY].median <= delete[FLOOR].median + 1.0, "median <= floor + 1")
    rows.append(row)
    row = Row("endpoints", "daemon CPU per add + delete", "ms", dict(cpu), digits=3)
    row.check(lambda: cpu[PY] <= 1.0, "<= 1.0")
    rows.append(row)
    # The yardstick, in the mptcpd-py column so that py/C compares it with mptcpd.
    bare = results[BARE]
    bare_add = Summary.of(bare.add)
    row = Row("endpoints", "yardstick: bare Python responder, added -> present", "ms",
              {PY: bare_add.scaled(1000) if bare_add else None, C: add.get(C)}, digits=3)
    row.note = ("bench/bare_responder.py: an asyncio process that sends ADD_ADDR as soon as "
                "RTM_NEWADDR arrives (DEL_ADDR from a thread): no policy, no state, no logs. "
                "What no Python daemon can beat on this machine")
    rows.append(row)
    rows.append(Row("endpoints", "yardstick: bare Python responder, CPU per add + delete",
                    "ms", {PY: bare.cpu_per_cycle, C: cpu.get(C)}, digits=3))
    return rows
