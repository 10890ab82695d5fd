"""Userspace path manager under bursts of connections: does every connection
get its extra subflow, how soon, and at what CPU cost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.daemons import BareResponder, CDaemon, Daemon, PyDaemon
from bench.plan import Plan
from bench.recorder import COUNTERS, ESTABLISHED, SUB_ESTABLISHED
from bench.report import FLOOR, PY, C, Row, Summary
from mptcpd_py.lab import (
    Lab,
    LabError,
    Netns,
    TwoPaths,
    close_connections,
    mptcp_listen,
    open_connections,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA_SOURCE = TwoPaths.V4[1][0]  # the client's second interface
SERVER = TwoPaths.V4[0][1]
BARE = "bare"  # bench/bare_responder.py: the yardstick for what Python allows


@dataclass
class Burst:
    k: int
    share: float  # connections with a subflow from the second interface
    all_within: float | None  # s from the first connect() to the last of them (all had one)
    latencies: list[float] = field(default_factory=list)  # s, ESTABLISHED -> that subflow
    cpu_per_connection: float = 0.0  # ms, whole life: open, subflow, close
    opened_in: float = 0.0  # s the harness took to open the burst
    floor: list[float] = field(default_factory=list)  # s, see serial_floor (yardstick only)


class Recorder:
    """bench.recorder as a child process, with its live counters."""

    def __init__(self, ns: Netns, workdir: str) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.out = os.path.join(workdir, "events.jsonl")
        self.counters_path = os.path.join(workdir, "counters")
        with open(self.counters_path, "wb") as f:
            f.write(b"\0" * COUNTERS.size)
        env = {**os.environ, "PYTHONPATH": REPO}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.recorder", ns.name, self.out, self.counters_path,
             EXTRA_SOURCE], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise LabError("event recorder did not start")

    def counters(self) -> tuple[int, int, int]:
        """(ESTABLISHED, SUB_ESTABLISHED from the extra source, CLOSED) so far."""
        with open(self.counters_path, "rb") as f:
            established, extra, closed = COUNTERS.unpack(f.read(COUNTERS.size))
        return established, extra, closed

    def stop(self) -> tuple[list[list[object]], int]:
        """(events, overflows)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        events = []
        overflows = 0
        with open(self.out) as f:
            for i, line in enumerate(f):
                if i == 0:
                    overflows = int(json.loads(line)["overflows"])
                else:
                    events.append(json.loads(line))
        return events, overflows

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _wait_counter(recorder: Recorder, index: int, target: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while recorder.counters()[index] < target:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def serial_floor(arrivals: list[int], services: list[int]) -> list[float]:
    """Latencies (s) of a responder that spends no time outside its
    SUBFLOW_CREATE calls: the i-th ESTABLISHED to arrive (ns) waits until
    the calls before it have returned, then takes as long as the i-th call
    measured (ns). The kernel opens the subflow inside that call, so no
    responder that makes these calls one after another, in any language,
    does better under the same load."""
    latencies = []
    free = 0
    for arrival, service in zip(sorted(arrivals), services, strict=True):
        free = max(arrival, free) + service
        latencies.append((free - arrival) / 1e9)
    return latencies


def _analyse(events: list[list[object]], start: float, end: float, ports: set[int], k: int
             ) -> tuple[float, float | None, list[float], list[int]]:
    t0, t1 = int(start * 1e9), int(end * 1e9)
    established: dict[int, int] = {}
    extra: dict[int, int] = {}
    for t, cmd, token, saddr, sport in events:
        assert isinstance(t, int) and isinstance(token, int)
        if not t0 <= t < t1:
            continue
        if cmd == ESTABLISHED and sport in ports:
            established.setdefault(token, t)
        elif cmd == SUB_ESTABLISHED and saddr == EXTRA_SOURCE and token in established:
            extra.setdefault(token, t)
    share = len(extra) / k
    all_within = (max(extra.values()) - t0) / 1e9 if len(extra) == k else None
    latencies = [(extra[tok] - established[tok]) / 1e9 for tok in extra]
    return share, all_within, latencies, list(established.values())


def _read_sends(path: str) -> list[tuple[int, int]]:
    """bench.bare_responder's SUBFLOW_CREATE times: (start, duration) in ns."""
    try:
        with open(path) as f:
            return [(int(start), int(duration)) for start, duration in map(str.split, f)]
    except FileNotFoundError:
        return []


def _use_userspace_pm(ns: Netns) -> None:
    """What mptcpd-py does from its [kernel] path_manager; mptcpd cannot."""
    try:
        ns.sysctl("net.mptcp.path_manager", "userspace")
    except LabError:
        ns.sysctl("net.mptcp.pm_type", 1)


def measure(subject: str, plan: Plan, workdir: str, log: Callable[[str], None]
            ) -> dict[int, list[Burst]]:
    ks, bursts, timeout = plan.burst_sizes, plan.bursts, plan.burst_timeout
    results: dict[int, list[Burst]] = {k: [] for k in ks}
    with Lab("bench-us") as lab:
        tp = TwoPaths(lab)
        tp.server.ip("mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "0")
        work = os.path.join(workdir, f"userspace-{subject}")
        os.makedirs(work, exist_ok=True)
        sends_path = os.path.join(work, "sends")
        daemon: Daemon
        if subject == PY:
            daemon = PyDaemon(tp.client, work, plugins=("sspi",), path_manager="userspace")
        elif subject == BARE:
            _use_userspace_pm(tp.client)
            daemon = BareResponder(tp.client, "userspace", str(EXTRA_SOURCE), sends_path)
        else:
            _use_userspace_pm(tp.client)
            daemon = CDaemon(tp.client, work, plugin="sspi")
        recorder = Recorder(tp.client, os.path.join(work, "recorder"))
        listener = mptcp_listen(tp.server, "0.0.0.0", backlog=4096)
        marks = []
        try:
            daemon.start()
            time.sleep(0.3)
            for k in ks:
                for burst in range(bursts):
                    _, extra0, closed0 = recorder.counters()
                    cpu0 = daemon.cpu_ns()
                    started = time.monotonic()
                    pairs = open_connections(tp.client, listener, SERVER, k, timeout=60)
                    opened = time.monotonic()
                    ports = {p.client.getsockname()[1] for p in pairs}
                    _wait_counter(recorder, 1, extra0 + k, timeout)
                    ended = time.monotonic()
                    close_connections(pairs)
                    if not _wait_counter(recorder, 2, closed0 + k, 30):
                        log(f"userspace: {subject}: burst {burst} of {k}: connections did not "
                            "all close")
                    time.sleep(0.2)  # the daemon handles the closes
                    daemon.check_alive()
                    cpu = (daemon.cpu_ns() - cpu0) / 1e6 / k
                    marks.append((k, started, ended + 0.5, ports, cpu, opened - started))
            daemon.stop()
        finally:
            listener.close()
            if daemon.alive():
                daemon.stop()
            events, overflows = recorder.stop()
            recorder.kill()
        if overflows:
            log(f"userspace: the recorder lost events {overflows} times (ENOBUFS)")
        sends = _read_sends(sends_path)
        for i, (k, started, ended, ports, cpu, opened_in) in enumerate(marks):
            # A window ends where the next burst begins: that burst may reuse
            # this one's source ports, and its events would count here.
            until = min(ended, marks[i + 1][1]) if i + 1 < len(marks) else ended
            share, within, latencies, arrivals = _analyse(events, started, until, ports, k)
            measured = Burst(k, share, within, latencies, cpu, opened_in)
            services = [d for t, d in sends if started * 1e9 <= t < until * 1e9]
            if len(services) == len(arrivals):
                measured.floor = serial_floor(arrivals, services)
            elif sends:
                log(f"userspace: {subject}: burst {i} of {k}: {len(services)} SUBFLOW_CREATE "
                    f"for {len(arrivals)} connections; no floor for it")
            results[k].append(measured)
    return results


def run(plan: Plan, workdir: str, *, with_c: bool, log: Callable[[str], None]) -> list[Row]:
    ks, bursts = plan.burst_sizes, plan.bursts
    subjects = [PY] + ([C] if with_c else [])
    results = {}
    for subject in [*subjects, BARE]:
        log(f"userspace: {subject}, bursts of {', '.join(map(str, ks))} connections, "
            f"{bursts} each")
        results[subject] = measure(subject, plan, workdir, log)
    rows = []
    for k in ks:
        def per(subject: str, k: int = k) -> list[Burst]:
            return results[subject][k]
        share = {s: min(b.share for b in per(s)) * 100 for s in subjects}
        first = {s: per(s)[0].share * 100 for s in subjects}
        within = {s: Summary.of([b.all_within for b in per(s) if b.all_within is not None])
                  for s in subjects}
        latency = {s: (Summary.of([x for b in per(s) for x in b.latencies]) or None)
                   for s in subjects}
        latency = {s: v.scaled(1000) if v else None for s, v in latency.items()}
        cpu = {s: Summary.of([b.cpu_per_connection for b in per(s)]) for s in subjects}
        opened = Summary.of([b.opened_in for b in per(PY)])
        big = k == max(ks)
        row = Row("userspace", f"K = {k}: share with their subflow, first burst", "%",
                  dict(first), digits=1)
        rows.append(row.check(lambda first=first: first[PY] == 100, "100") if big else row)
        row = Row("userspace", f"K = {k}: share, worst of {len(per(PY))} bursts", "%",
                  dict(share), digits=1)
        rows.append(row.check(lambda share=share: share[PY] == 100, "100") if big else row)
        row = Row("userspace", f"K = {k}: first connect() -> all have it", "s", dict(within),
                  digits=3, note=f"the harness itself takes {opened.median:.3f} s (median) "
                                 f"to open {k} connections" if opened else "")
        if big:
            row.check(lambda within=within: within[PY].n == len(per(PY))
                      and within[PY].max <= 1.0, "<= 1.0 every burst")
        rows.append(row)
        # The floor where a queue forms (see bench/README.md for the small burst).
        floor = Summary.of([x for b in results[BARE][k] for x in b.floor]) if big else None
        row = Row("userspace", f"K = {k}: ESTABLISHED -> SUB_ESTABLISHED", "ms",
                  {**latency, FLOOR: floor.scaled(1000) if floor else None}, digits=2,
                  note="floor: a responder that spends no time outside its SUBFLOW_CREATE "
                       "calls (each ESTABLISHED waits for the calls before it; each call "
                       "takes as long as the kernel took for the bare responder's in this "
                       "run)" if floor else "")
        rows.append(row.check(lambda latency=latency: latency[PY].median <= 5,
                              "median <= 5") if big else row)
        row = Row("userspace", f"K = {k}: daemon CPU per connection", "ms", dict(cpu),
                  digits=3, note="median over the bursts; a connection's whole life: "
                                 "created, established, subflow, closed" if big else "")
        rows.append(row.check(lambda cpu=cpu: cpu[PY].median <= 0.3, "<= 0.3") if big
                    else row)
    # The yardstick for the largest burst, in the mptcpd-py column.
    k = max(ks)
    bare = results[BARE][k]
    bare_latency = Summary.of([x for b in bare for x in b.latencies])
    rows.append(Row(
        "userspace", f"yardstick: bare Python responder, K = {k}: ESTABLISHED -> "
        "SUB_ESTABLISHED", "ms", {PY: bare_latency.scaled(1000) if bare_latency else None},
        digits=2, note=f"bench/bare_responder.py: SUBFLOW_CREATE as soon as each ESTABLISHED "
                       f"event is read, nothing else; worst share of {len(bare)} bursts: "
                       f"{min(b.share for b in bare) * 100:.1f}%"))
    rows.append(Row(
        "userspace", f"yardstick: bare Python responder, K = {k}: CPU per connection", "ms",
        {PY: Summary.of([b.cpu_per_connection for b in bare])}, digits=3))
    return rows
