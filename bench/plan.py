"""How much each section measures: the full run and the smoke test's tiny one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    endpoint_reps: int = 200  # address add + delete cycles per daemon
    start_counts: tuple[int, ...] = (1, 50, 500)  # existing addresses at start
    start_reps: int = 5  # starts per daemon and count
    idle_seconds: float = 10.0
    burst_sizes: tuple[int, ...] = (100, 1000)  # connections per burst
    bursts: int = 5  # bursts in a row per size
    burst_timeout: float = 3.0  # s to wait for every extra subflow of a burst
    path_seconds: float = 5.0  # steady-state measurement over two paths
    outage: float = 5.0  # s one path is down
    outages: int = 3  # in a row, each followed by path_seconds with the path back


FULL = Plan()
QUICK = Plan(endpoint_reps=5, start_counts=(1, 10), start_reps=1, idle_seconds=0.5,
             burst_sizes=(10,), bursts=2, burst_timeout=2.0, path_seconds=1.0, outage=1.0,
             outages=1)
