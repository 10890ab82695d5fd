"""The benchmark harness runs end to end in its tiny configuration (the
figures themselves are not checked: on a shared machine they are not
reproducible; `python -m bench` is where they are taken)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.daemons import mptcpd_available
from mptcpd_py.lab import PREFIX

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


def host_mptcp_state() -> tuple[str, str]:
    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout
    return ip("mptcp", "endpoint", "show"), ip("mptcp", "limits", "show")


def lab_namespaces() -> set[str]:
    try:
        return {n for n in os.listdir("/run/netns") if n.startswith(PREFIX)}
    except FileNotFoundError:
        return set()


def run_bench(tmp_path: Path, *args: str) -> tuple[str, dict]:  # type: ignore[type-arg]
    out, raw = tmp_path / "RESULTS.md", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--json", str(raw),
         *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text(), json.loads(raw.read_text())


@pytest.mark.timeout(150)
def test_quick_bench_measures_every_section_and_leaves_the_host_alone(tmp_path: Path) -> None:
    before = host_mptcp_state()
    mine_before = lab_namespaces()
    markdown, raw = run_bench(tmp_path, "--no-mptcpd")
    sections = {row["section"] for row in raw["rows"]}
    assert sections == {"endpoints", "startup", "idle", "userspace", "paths"}
    for row in raw["rows"]:
        assert row["values"].get("mptcpd-py") is not None, row["metric"]
    assert "| endpoints | address added -> endpoint present |" in markdown
    assert host_mptcp_state() == before
    assert lab_namespaces() <= mine_before


@pytest.mark.skipif(not mptcpd_available(), reason="mptcpd (Debian package) not installed")
@pytest.mark.timeout(60)
def test_quick_bench_runs_the_c_mptcpd_beside_mptcpd_py(tmp_path: Path) -> None:
    _, raw = run_bench(tmp_path, "--sections", "endpoints")
    add = next(r for r in raw["rows"] if r["metric"] == "address added -> endpoint present")
    assert add["values"]["mptcpd"]["n"] == add["values"]["mptcpd-py"]["n"] == 5


def test_stage_probe_times_each_stage_of_the_live_daemon_inside_its_parent() -> None:
    """bench.stages: every stage of an address add + delete is seen as
    often as the daemon goes through it, and a stage never takes longer
    than the stage it runs inside."""
    from bench import stages

    counts, cpu_ms, measured = stages.run(6)
    assert measured == 6
    per_cycle = {target: counts["calls"].get(target, 0) / measured
                 for _label, _depth, target in stages.STAGES}
    assert per_cycle["mptcpd_py.core:Core._reconcile_pass"] == 2  # the add's and the delete's
    assert per_cycle["mptcpd_py.netlink.mptcp:MptcpPM.add_endpoint"] == 1
    assert per_cycle["mptcpd_py.netlink.mptcp:MptcpPM.delete_endpoint"] == 1
    assert per_cycle["mptcpd_py.endpoints:EndpointReconciler._log_op"] == 2
    # Both over the measured cycles; the probe's window opens and closes
    # when a signal reaches the daemon, a little off the scheduler's.
    assert 0 < counts["main_thread_ns"] / measured / 1e6 <= cpu_ms * 1.2
    parents: list[str] = []
    for _label, depth, target in stages.STAGES:
        del parents[depth:]
        spent = counts["time_ns"].get(target, 0)
        assert spent > 0, target
        if parents:
            assert spent <= counts["time_ns"][parents[-1]], (target, parents[-1])
        parents.append(target)
    assert "reconcile pass" in "\n".join(stages.table(counts, cpu_ms, measured))
