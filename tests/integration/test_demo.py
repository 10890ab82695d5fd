"""The main job: the demo runs end to end and shows what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(120)
def test_demo_shows_aggregation_failover_and_cellular_backup(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the demo needs root")
    summary = tmp_path / "summary.json"
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                text=True).stdout.split())
    proc = subprocess.run(
        [sys.executable, "-m", "mptcpd_py", "demo", "--seconds", "3",
         "--summary-json", str(summary)],
        capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for expected in ("endpoints it created", "subflow 192.0.2.1", "wlan0 goes down",
                     "daemon: endpoint removed 198.51.100.1", "cellular backup",
                     "summary", "namespaces deleted"):
        assert expected in out, expected
    figures = json.loads(summary.read_text())
    assert figures["gain"] >= 1.8, figures
    assert figures["longest_stall"] < 0.5, figures
    assert all(p["alive"] for p in figures["phases"])
    cellular = next(p for p in figures["phases"] if "wwan0" in p["name"] and "only" in p["name"])
    assert cellular["rates"]["wwan0"] > 5 and cellular["rates"]["eth0"] < 0.5
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                               text=True).stdout.split())
    # Namespaces the (now finished) demo process made would be left by a dead pid.
    stale = {n for n in after - before if n.startswith("mptcpdpy-")
             and not os.path.exists(f"/proc/{n.split('-')[1]}")}
    assert not stale
