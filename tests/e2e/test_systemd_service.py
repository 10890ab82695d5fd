"""mptcpd-py as users run it: installed with scripts/install.sh into a
Debian 12 container where systemd is PID 1, then `systemctl enable --now`.

The tests run in order as one scenario on one booted container (install,
start, journal, a new address, reload, a refused reload, the watchdog,
mptcpize on a unit, stop, an upgrade that may not restart, upgrade,
uninstall); each first brings the service to the state it needs, so one
can also run alone with -k.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import SOURCE_INSIDE, WHEELHOUSE_INSIDE, Container, StepLog

from mptcpd_py.lab import wait_for
from mptcpd_py.mptcpize import parse_environment_property

pytestmark = [pytest.mark.timeout(900)]

SERVICE = "mptcpd-py.service"
CONFIG = "/etc/mptcpd-py/mptcpd.toml"
UNIT_PATH = "/usr/local/lib/systemd/system/mptcpd-py.service"
SHIM = "/opt/mptcpd-py/lib/mptcpd-py/libmptcpize.so"
OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELHOUSE_INSIDE}
# An administrator's own endpoint: the daemon must never touch it.
ADMIN_ENDPOINT = ("203.0.113.99", 99)
SIGNAL_CONFIG = '[plugins.addr_adv]\nflags = ["signal"]\n'
KEEP_CONFIG = '[daemon]\non_exit = "keep"\n'
PROBE_UNIT = "webprobe.service"
PROBE_UNIT_TEXT = """[Unit]
Description=An unmodified TCP server for the mptcpize test

[Service]
ExecStart=/usr/bin/python3 -m http.server --bind 127.0.0.1 8080 --directory /usr/share/doc
Environment=GODEBUG=http2client=0
"""


def install(machine: Container, *, expect_status: int = 0) -> str:
    proc = machine.run([f"{SOURCE_INSIDE}/scripts/install.sh"], env=OFFLINE_PIP, timeout=300,
                       check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect_status, out
    return out


def endpoints(machine: Container) -> dict[str, dict[str, Any]]:
    rows = json.loads(machine.run(["ip", "-j", "mptcp", "endpoint", "show"]).stdout or "[]")
    return {row["address"]: {"id": row["id"], "dev": row.get("dev", ""),
                             "flags": {k for k, v in row.items() if v is True}}
            for row in rows}


def prop(machine: Container, name: str, unit: str = SERVICE) -> str:
    return machine.run(["systemctl", "show", "-p", name, "--value", unit]).stdout.strip()


def journal_entry(machine: Container, message_prefix: str, *,
                  after_pid: int = 0, timeout: float = 10.0) -> dict[str, Any]:
    """The first journal entry of the service whose MESSAGE starts with
    ``message_prefix`` (from process ``after_pid`` when given)."""
    def find() -> dict[str, Any] | None:
        for entry in machine.journal(SERVICE):
            if not str(entry.get("MESSAGE", "")).startswith(message_prefix):
                continue
            if after_pid and entry.get("_PID") != str(after_pid):
                continue
            return entry
        return None
    found: dict[str, Any] = wait_for(find, timeout, 0.2, what=f"journal: {message_prefix!r}")
    return found


def mptcp_enabled(machine: Container) -> str:
    # Read inside: through /proc/LEADER/root, /proc/sys/net would be the host's.
    return machine.run(["cat", "/proc/sys/net/mptcp/enabled"]).stdout.strip()


@pytest.fixture(scope="module")
def installed(machine: Container, steps: StepLog) -> Container:
    """installed: the container after `scripts/install.sh` (offline, from the
    wheelhouse), with a veth eth1 holding 192.0.2.10/24, an admin endpoint,
    and net.mptcp.enabled=0 so the daemon has a sysctl to set; module scope."""
    with steps.step("install: scripts/install.sh"):
        steps.note(install(machine).strip())
    machine.sh("""
        ip link add eth1 type veth peer name eth1p
        ip link set eth1p up && ip link set eth1 up
        ip addr add 192.0.2.10/24 dev eth1
        ip mptcp endpoint add 203.0.113.99 id 99 signal
        echo 0 > /proc/sys/net/mptcp/enabled
    """)
    return machine


def ensure_running(machine: Container) -> int:
    """Start the service if needed; its MainPID."""
    if prop(machine, "ActiveState") != "active":
        machine.run(["systemctl", "start", SERVICE])
    return int(prop(machine, "MainPID"))


def test_install_puts_venv_unit_config_plugin_dir_and_shim_in_place(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    with steps.step("check the installed files"):
        shipped = (machine.path(f"{SOURCE_INSIDE}/conf/mptcpd.toml")).read_text()
        assert machine.path(CONFIG).read_text() == shipped
        assert machine.path("/etc/mptcpd-py/plugins.d").is_dir()
        assert machine.path(SHIM).is_file()
        assert machine.path(UNIT_PATH).is_file()
        assert prop(machine, "LoadState") == "loaded"
        version = machine.run(["mptcpd-py", "--version"]).stdout
        assert version.startswith("mptcpd-py ")
        assert machine.run(["mptcpd-py", "check-config"]).returncode == 0


def test_hardened_unit_rates_exposure_2_0_or_lower_on_the_real_systemd(
        installed: Container, steps: StepLog) -> None:
    with steps.step("systemd-analyze security mptcpd-py.service"):
        out = installed.run(["systemd-analyze", "security", "--no-pager", SERVICE]).stdout
        match = re.search(r"Overall exposure level for mptcpd-py\.service: ([0-9.]+)", out)
        assert match, out[-2000:]
        steps.note(f"exposure {match.group(1)}")
        assert float(match.group(1)) <= 2.0, out


def test_enable_now_starts_it_and_it_sets_the_sysctl_despite_the_hardening(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    with steps.step("systemctl enable --now mptcpd-py"):
        machine.run(["systemctl", "enable", "--now", SERVICE])
        assert machine.run(["systemctl", "is-active", SERVICE]).stdout.strip() == "active"
        assert machine.run(["systemctl", "is-enabled", SERVICE]).stdout.strip() == "enabled"
        # ProtectKernelTunables with ReadWritePaths=/proc/sys/net/mptcp.
        assert mptcp_enabled(machine) == "1"
        eps = wait_for(lambda: (e := endpoints(machine)) and "192.0.2.10" in e and e, 10,
                       0.1, what="an endpoint for the address present at start")
        assert eps["192.0.2.10"]["flags"] == {"subflow"}
        assert eps[ADMIN_ENDPOINT[0]]["id"] == ADMIN_ENDPOINT[1]


def test_journal_shows_structured_startup_fields(installed: Container, steps: StepLog) -> None:
    machine = installed
    pid = ensure_running(machine)
    with steps.step("journalctl -u mptcpd-py -o json: start-up fields"):
        starting = journal_entry(machine, "mptcpd-py starting", after_pid=pid)
        assert starting["SYSLOG_IDENTIFIER"] == "mptcpd-py"
        assert starting["PRIORITY"] == "6"
        assert starting["VERSION"]
        assert starting["CONFIG"] == CONFIG
        assert starting["LOG_FORMAT"] == "journal"
        assert starting["PID"] == str(pid)
        ready = journal_entry(machine, "ready", after_pid=pid)
        assert float(ready["STARTUP_MS"]) > 0
        assert int(ready["ENDPOINTS"]) >= 1
        steps.note(f"ready after {ready['STARTUP_MS']} ms")


def test_ctl_reaches_the_service_through_its_control_socket(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    ensure_running(machine)
    with steps.step("mptcpd-py ctl --json status (control socket in the sandbox)"):
        proc = machine.run(["mptcpd-py", "ctl", "--json", "status"], check=False)
        if "not available in this build" in proc.stdout + proc.stderr:
            pytest.skip("mptcpd-py ctl is not in this build")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)


def test_an_address_added_on_a_veth_becomes_an_endpoint(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    pid = ensure_running(machine)
    with steps.step("a new address on a veth becomes an endpoint"):
        machine.sh("""
            ip link add eth2 type veth peer name eth2p
            ip link set eth2p up && ip link set eth2 up
            ip addr add 198.51.100.10/24 dev eth2
        """)
        eps = wait_for(lambda: (e := endpoints(machine)) and "198.51.100.10" in e and e, 10,
                       0.05, what="an endpoint for 198.51.100.10")
        assert eps["198.51.100.10"]["dev"] == "eth2"
        added = journal_entry(machine, "endpoint added", after_pid=pid)
        assert {"ADDR", "IFNAME", "ENDPOINT_ID", "PLUGIN"} <= set(added)


def test_reload_applies_a_new_config_without_a_restart(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    pid = ensure_running(machine)
    with steps.step("systemctl reload: new flags applied"):
        machine.path(CONFIG).write_text(SIGNAL_CONFIG)
        machine.run(["systemctl", "reload", SERVICE])
        wait_for(lambda: endpoints(machine).get("192.0.2.10", {}).get("flags") == {"signal"},
                 10, 0.1, what="flags from the reloaded config")
        assert int(prop(machine, "MainPID")) == pid
        journal_entry(machine, "reloaded", after_pid=pid)


def test_reload_refuses_a_broken_config_and_keeps_the_old_one(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    machine.path(CONFIG).write_text(SIGNAL_CONFIG)
    pid = ensure_running(machine)
    machine.run(["systemctl", "reload", SERVICE])
    with steps.step("systemctl reload with a broken config: refused"):
        machine.path(CONFIG).write_text(SIGNAL_CONFIG + "[daemon]\nlog_level = 'chatty'\n")
        proc = machine.run(["systemctl", "reload", SERVICE], check=False)
        assert proc.returncode != 0
        assert prop(machine, "ActiveState") == "active"
        assert int(prop(machine, "MainPID")) == pid
        problem = wait_for(lambda: [e for e in machine.journal(SERVICE)
                                    if f"{CONFIG}:4: daemon.log_level" in e.get("MESSAGE", "")],
                           10, 0.2, what="the configuration error in the journal")
        steps.note(problem[-1]["MESSAGE"])
        # The old configuration stays in force: a new address gets its flags.
        machine.sh("ip addr add 192.0.2.11/24 dev eth1")
        wait_for(lambda: endpoints(machine).get("192.0.2.11", {}).get("flags") == {"signal"},
                 10, 0.05, what="an endpoint with the old config's flags")
        machine.path(CONFIG).write_text(SIGNAL_CONFIG)


def test_watchdog_restarts_a_hung_daemon_which_adopts_its_endpoints(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    with steps.step("watchdog: SIGSTOP the daemon, systemd restarts it"):
        # A short watchdog for the test (a runtime drop-in; the unit is untouched).
        dropin = machine.path("/run/systemd/system/mptcpd-py.service.d/watchdog.conf")
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text("[Service]\nWatchdogSec=2s\n")
        machine.run(["systemctl", "daemon-reload"])
        machine.run(["systemctl", "restart", SERVICE])
        pid = int(prop(machine, "MainPID"))
        before = wait_for(lambda: (e := endpoints(machine)) and "192.0.2.10" in e and e,
                          10, 0.05, what="endpoints after the restart")
        restarts = int(prop(machine, "NRestarts"))
        stopped_at = time.monotonic()
        machine.run(["kill", "-STOP", str(pid)])
        wait_for(lambda: int(prop(machine, "NRestarts")) > restarts
                 and prop(machine, "ActiveState") == "active", 30, 0.2,
                 what="a restart by the watchdog")
        steps.note(f"hung at 0 s, running again after {time.monotonic() - stopped_at:.1f} s "
                   f"(WatchdogSec=2s, RestartSec=2s)")
        new_pid = int(prop(machine, "MainPID"))
        assert new_pid != pid
        assert any("Watchdog timeout" in e.get("MESSAGE", "") for e in machine.journal(SERVICE))
        journal_entry(machine, "ready", after_pid=new_pid)
        # Adopted, not re-created: same ids, no duplicates.
        assert endpoints(machine) == before
        dropin.unlink()
        machine.run(["systemctl", "daemon-reload"])


def test_a_start_after_a_stop_with_on_exit_keep_adopts_what_it_kept(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    machine.path(CONFIG).write_text(SIGNAL_CONFIG + KEEP_CONFIG)
    machine.run(["systemctl", "restart", SERVICE])
    machine.sh("ip addr add 192.0.2.12/24 dev eth1")
    kept = wait_for(lambda: (e := endpoints(machine)) and "192.0.2.12" in e and e, 10, 0.05,
                    what="an endpoint for 192.0.2.12")
    try:
        with steps.step('on_exit = "keep": stop, start, the kept endpoints are still its own'):
            machine.run(["systemctl", "stop", SERVICE])
            assert endpoints(machine) == kept
            machine.run(["systemctl", "start", SERVICE])
            journal_entry(machine, "ready", after_pid=int(prop(machine, "MainPID")))
            assert endpoints(machine) == kept  # adopted: same ids, no duplicates
            # Only an owner removes an endpoint whose address went away.
            machine.sh("ip addr del 192.0.2.12/24 dev eth1")
            wait_for(lambda: "192.0.2.12" not in endpoints(machine), 10, 0.05,
                     what="the kept endpoint of a deleted address removed")
    finally:  # the later tests expect on_exit = "remove" and no stray endpoint
        machine.sh("ip addr del 192.0.2.12/24 dev eth1 2>/dev/null || true")
        machine.path(CONFIG).write_text(SIGNAL_CONFIG)
        machine.run(["systemctl", "restart", SERVICE])
        stray = endpoints(machine).get("192.0.2.12")
        if stray is not None:
            machine.run(["ip", "mptcp", "endpoint", "delete", "id", str(stray["id"])])


def add_probe_unit(machine: Container) -> Path:
    unit_file = machine.path(f"/etc/systemd/system/{PROBE_UNIT}")
    unit_file.write_text(PROBE_UNIT_TEXT)
    machine.run(["systemctl", "daemon-reload"])
    return unit_file


def test_mptcpize_enable_makes_a_unit_listen_on_mptcp_and_disable_undoes_it(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    ensure_running(machine)  # it sets net.mptcp.enabled=1 (the fixture left 0)
    unit_file = add_probe_unit(machine)
    machine.run(["systemctl", "start", PROBE_UNIT])

    def listeners(kind: str) -> list[str]:
        # ss -t lists TCP sockets (an MPTCP listener has one too), ss -M MPTCP ones.
        out = machine.run(["ss", "-Hltn" if kind == "tcp" else "-HMln",
                           "sport", "= :8080"]).stdout
        return [line for line in out.splitlines() if line.strip()]

    with steps.step("mptcpize enable webprobe: its listener is MPTCP"):
        wait_for(lambda: listeners("tcp"), 10, 0.05, what="the probe listening")
        assert not listeners("mptcp")
        out = machine.run(["mptcpd-py", "mptcpize", "enable", "webprobe"]).stdout
        assert "restarted" in out
        wait_for(lambda: listeners("mptcp"), 10, 0.05, what="an MPTCP listener")
        assert unit_file.read_text() == PROBE_UNIT_TEXT
        env = prop(machine, "Environment", PROBE_UNIT)
        assert f"LD_PRELOAD={SHIM}" in env
        assert "GODEBUG=http2client=0,multipathtcp=1" in env
    with steps.step("mptcpize run: an unmodified client talks MPTCP to it"):
        syn_rx = "MPTcpExtMPCapableSYNRX"
        before = int(machine.run(["nstat", "-saz", syn_rx]).stdout.split()[-2])
        fetched = machine.run(["mptcpd-py", "mptcpize", "run", "python3", "-c",
                               "import urllib.request as u; "
                               "print(len(u.urlopen('http://127.0.0.1:8080/', timeout=10)"
                               ".read()))"]).stdout
        assert int(fetched) > 0
        after = int(machine.run(["nstat", "-saz", syn_rx]).stdout.split()[-2])
        assert after > before, "the server saw no MP_CAPABLE SYN"
    with steps.step("mptcpize disable webprobe: TCP again"):
        machine.run(["mptcpd-py", "mptcpize", "disable", "webprobe"])
        wait_for(lambda: not listeners("mptcp") and listeners("tcp"), 10, 0.05,
                 what="a plain TCP listener")
        assert not machine.path(f"/etc/systemd/system/{PROBE_UNIT}.d").exists()
        assert unit_file.read_text() == PROBE_UNIT_TEXT


def test_mptcpize_enable_again_follows_the_units_changed_environment(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    unit_file = add_probe_unit(machine)

    def enable_with_unit_environment(line: str) -> str:
        # Edited in place, as an administrator would, then `enable` again.
        unit_file.write_text(PROBE_UNIT_TEXT.replace("Environment=GODEBUG=http2client=0", line))
        proc = machine.run(["mptcpd-py", "mptcpize", "enable", "--no-restart", "webprobe"])
        assert "MPTCP enabled" in proc.stdout
        return proc.stderr

    def preload() -> str:
        env = parse_environment_property(prop(machine, "Environment", PROBE_UNIT))
        return env.get("LD_PRELOAD", "")

    with steps.step("mptcpize enable, change the unit's LD_PRELOAD, enable again"):
        enable_with_unit_environment("Environment=LD_PRELOAD=/usr/lib/a.so")
        assert preload() == f"/usr/lib/a.so {SHIM}"
        enable_with_unit_environment("Environment=LD_PRELOAD=/usr/lib/b.so")
        assert preload() == f"/usr/lib/b.so {SHIM}"
        enable_with_unit_environment("Environment=")
        assert preload() == SHIM
    with steps.step("an EnvironmentFile= setting LD_PRELOAD: enable warns"):
        machine.path("/etc/webprobe.env").write_text("LD_PRELOAD=/usr/lib/c.so\n")
        err = enable_with_unit_environment("EnvironmentFile=/etc/webprobe.env")
        assert "/etc/webprobe.env (EnvironmentFile=) sets LD_PRELOAD" in err
    machine.run(["mptcpd-py", "mptcpize", "disable", "--no-restart", "webprobe"])
    machine.path("/etc/webprobe.env").unlink()
    add_probe_unit(machine)


def test_stop_removes_its_endpoints_and_restores_the_sysctl(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    pid = ensure_running(machine)
    assert len(endpoints(machine)) > 1
    with steps.step("systemctl stop: its endpoints go, the admin's stays"):
        machine.run(["systemctl", "stop", SERVICE])
        assert prop(machine, "ActiveState") == "inactive"
        eps = endpoints(machine)
        assert list(eps) == [ADMIN_ENDPOINT[0]]
        assert mptcp_enabled(machine) == "0"
        journal_entry(machine, "stopped", after_pid=pid)
    # Nothing in the sandbox got in the daemon's way (a denied write or
    # system call would be logged as an error).
    errors = [e["MESSAGE"] for e in machine.journal(SERVICE)
              if e.get("SYSLOG_IDENTIFIER") == "mptcpd-py" and int(e.get("PRIORITY", 6)) <= 3]
    assert errors == []


def test_reinstall_with_a_config_the_new_version_rejects_leaves_the_old_daemon_running(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    machine.path(CONFIG).write_text(SIGNAL_CONFIG)
    pid = ensure_running(machine)
    wait_for(lambda: "192.0.2.10" in endpoints(machine), 10, 0.1, what="the daemon's endpoint")
    running_endpoints = endpoints(machine)
    rejected = SIGNAL_CONFIG + "[daemon]\nno_such_key = 1\n"
    machine.path(CONFIG).write_text(rejected)
    with steps.step("install again with a rejected config: no restart, exit 1"):
        out = install(machine, expect_status=1)
        steps.note(out.strip())
        assert "no_such_key" in out
        assert "NOT restarting mptcpd-py" in out
        assert "systemctl restart mptcpd-py" in out
        assert "restarting the running" not in out
        assert machine.path(CONFIG).read_text() == rejected
        assert prop(machine, "ActiveState") == "active"
        assert int(prop(machine, "MainPID")) == pid
        assert endpoints(machine) == running_endpoints
    with steps.step("the old daemon still answers ctl"):
        machine.run(["mptcpd-py", "ctl", "status"])
    machine.path(CONFIG).write_text(SIGNAL_CONFIG)


def test_reinstall_upgrades_in_place_restarts_and_keeps_the_users_config(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    user_config = SIGNAL_CONFIG + "# my own edit\n"
    machine.path(CONFIG).write_text(user_config)
    pid = ensure_running(machine)
    # A change in the source tree, as a `git pull` would bring.
    marker = f"# upgrade check {time.time_ns()}\n"
    with machine.path(f"{SOURCE_INSIDE}/mptcpd_py/__init__.py").open("a") as f:
        f.write(marker)
    with steps.step("install again (upgrade): config kept, service restarted"):
        out = install(machine)
        assert f"kept your {CONFIG}" in out
        assert machine.path(CONFIG).read_text() == user_config
        installed_init = machine.run(["/opt/mptcpd-py/bin/python", "-c",
                                      "import mptcpd_py; print(mptcpd_py.__file__)"]).stdout
        assert machine.path(installed_init.strip()).read_text().endswith(marker)
        assert prop(machine, "ActiveState") == "active"
        assert int(prop(machine, "MainPID")) != pid


def test_uninstall_removes_everything_but_the_users_config(
        installed: Container, steps: StepLog) -> None:
    machine = installed
    user_config = machine.path(CONFIG).read_text()
    ensure_running(machine)
    # A service still made MPTCP by mptcpize when the shim goes away.
    add_probe_unit(machine)
    machine.run(["mptcpd-py", "mptcpize", "enable", "--no-restart", "webprobe"])
    with steps.step("scripts/uninstall.sh"):
        out = machine.run([f"{SOURCE_INSIDE}/scripts/uninstall.sh"]).stdout
        steps.note(out.strip())
        assert not machine.path("/opt/mptcpd-py").exists()
        assert not machine.path(UNIT_PATH).exists()
        assert not machine.path("/usr/local/bin/mptcpd-py").is_symlink()
        assert prop(machine, "LoadState") == "not-found"
        assert not machine.path("/run/mptcpd-py").exists()
        assert list(endpoints(machine)) == [ADMIN_ENDPOINT[0]]
        # Other services' mptcpize drop-ins go with the shim; their unit files stay.
        assert not machine.path(f"/etc/systemd/system/{PROBE_UNIT}.d/mptcpize.conf").exists()
        assert machine.path(f"/etc/systemd/system/{PROBE_UNIT}").read_text() == PROBE_UNIT_TEXT
        assert machine.path(CONFIG).read_text() == user_config
        assert machine.path("/etc/mptcpd-py/plugins.d").is_dir()
