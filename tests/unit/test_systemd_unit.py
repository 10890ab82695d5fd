"""systemd/mptcpd-py.service: rated 2.0 or lower by systemd-analyze
security, and consistent with what the daemon and install.sh expect (the
e2e test runs it under a real systemd)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from mptcpd_py.cli import EX_CONFIG
from mptcpd_py.daemon import EX_NOPERM, EX_UNAVAILABLE
from mptcpd_py.sysctl import MPTCP_SYSCTL_DIR

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "mptcpd-py.service"


def directives() -> dict[str, list[str]]:
    """KEY -> values in order (a unit may repeat a key, e.g. ExecReload)."""
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_analyze_security_rates_the_unit_2_0_or_lower() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                           str(UNIT)], capture_output=True, text=True, timeout=60, check=False)
    if "--offline" in proc.stderr:
        pytest.skip("systemd-analyze too old for --offline (needs systemd 250)")
    match = re.search(r"Overall exposure level for mptcpd-py\.service: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout


def test_unit_runs_what_install_sh_installs_as_a_notify_service_with_a_watchdog() -> None:
    unit = directives()
    prefix = re.search(r"^PREFIX=(\S+)$",
                       (ROOT / "scripts" / "install-paths.sh").read_text(), re.MULTILINE)
    assert prefix
    assert unit["ExecStart"] == [f"{prefix.group(1)}/bin/mptcpd-py run"]
    assert unit["Type"] == ["notify"]
    assert unit["WatchdogSec"]
    # SIGHUP reloads; the config is checked first so a broken one fails the reload.
    assert unit["ExecReload"] == [f"{prefix.group(1)}/bin/mptcpd-py check-config",
                                  "/bin/kill -HUP $MAINPID"]
    assert unit["RestartPreventExitStatus"] == [f"{EX_UNAVAILABLE} {EX_NOPERM} {EX_CONFIG}"]


def test_unit_gives_the_daemon_its_state_dir_config_dir_and_mptcp_sysctls() -> None:
    unit = directives()
    defaults = tomllib.loads((ROOT / "conf" / "mptcpd.toml").read_text())
    assert f"/run/{unit['RuntimeDirectory'][0]}" == defaults["daemon"]["state_dir"]
    # A restart after a crash or the watchdog, and a start after a stop with
    # on_exit = "keep", must find the state file to adopt what it owned.
    assert unit["RuntimeDirectoryPreserve"] == ["yes"]
    assert unit["ConfigurationDirectory"] == ["mptcpd-py"]
    assert unit["ProtectKernelTunables"] == ["yes"]
    assert MPTCP_SYSCTL_DIR in unit["ReadWritePaths"][0].split()
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
