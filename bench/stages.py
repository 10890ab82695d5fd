"""Where the live daemon's CPU goes per address add + delete, stage by stage.

``python -m bench.stages [CYCLES]`` (root: it builds a namespace)

Runs the endpoint benchmark's cycles (``bench.endpoints.measure``) against
``mptcpd-py run`` with ``bench.stage_probe`` loaded into it, and prints the
main thread's CPU time inside each stage per cycle. Unlike
``bench.hotpath_endpoints`` (in process, caches hot), this is the daemon as
the benchmark sees it: woken once per event, caches cold. The probe's
wrappers cost a little themselves (the main thread's total goes up by
about the number of wrapped calls times a microsecond).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from typing import Any

from bench.daemons import Daemon
from bench.endpoints import measure
from bench.report import PY
from bench.stage_probe import STAGES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_TIMEOUT = 5.0


def _signal_probe(daemon: Daemon, out: str, *, final: bool) -> None:
    os.kill(daemon.pid, signal.SIGUSR2)
    if not final:
        return
    deadline = time.monotonic() + PROBE_TIMEOUT
    while not os.path.exists(out):
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon's stage probe wrote nothing (was it loaded?)")
        time.sleep(0.01)


def run(cycles: int) -> tuple[dict[str, Any], float, int]:
    """(probe counts, all threads' CPU per cycle in ms, cycles measured:
    a cycle whose endpoint never came is left out, as by the benchmark)."""
    with tempfile.TemporaryDirectory(prefix="mptcpd-py-stages-") as tmp:
        with open(os.path.join(tmp, "sitecustomize.py"), "w") as f:
            f.write("import bench.stage_probe\nbench.stage_probe.install()\n")
        out = os.path.join(tmp, "stages.json")
        path = (tmp, ROOT, os.environ.get("PYTHONPATH", ""))
        env = {"PYTHONPATH": os.pathsep.join(p for p in path if p),
               "MPTCPD_PY_STAGES_OUT": out}
        timings = measure(PY, cycles, tmp, py_env=env, on_measuring=lambda daemon, starting:
                          _signal_probe(daemon, out, final=not starting))
        with open(out) as f:
            counts: dict[str, Any] = json.load(f)
    return counts, timings.cpu_per_cycle or 0.0, len(timings.add)


def table(counts: dict[str, Any], cpu_ms: float, cycles: int) -> list[str]:
    lines = [f"{'per add + delete cycle':<48} {'µs':>8} {'calls':>6}",
             f"{'daemon, all threads (scheduler)':<48} {cpu_ms * 1000:8.1f}",
             f"{'main thread (probe)':<48} {counts['main_thread_ns'] / cycles / 1e3:8.1f}"]
    for label, depth, target in STAGES:
        spent = counts["time_ns"].get(target, 0) / cycles / 1e3
        calls = counts["calls"].get(target, 0) / cycles
        lines.append(f"{'  ' * (depth + 1) + label:<48} {spent:8.1f} {calls:6.2f}")
    return lines


def main(argv: list[str]) -> int:
    counts, cpu_ms, measured = run(int(argv[0]) if argv else 300)
    print("\n".join(table(counts, cpu_ms, measured)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
