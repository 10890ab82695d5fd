"""The control socket and ``mptcpd-py ctl`` against a daemon in a namespace:
every subcommand agrees with the kernel (``ip mptcp``, ``ss -M``) in both
output forms, ``monitor`` streams events and decisions as they happen, the
Prometheus endpoint agrees with ``ctl status``, and only root and the
control group may change anything."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py.lab import (
    DaemonProcess,
    Lab,
    MptcpPair,
    Netns,
    TwoPaths,
    daemon_config,
    mptcp_connect,
    mptcp_listen,
    run_ctl,
    wait_for,
)
from mptcpd_py.netns import in_netns

ADMIN_ENDPOINT = "203.0.113.99"
CONFIG_EXTRA = """
[kernel.limits]
subflows = 4
add_addr_accepted = 2
[plugins.addr_adv]
flags = ["subflow"]
[[plugins.addr_adv.interface]]
match = "eth1"
flags = ["subflow", "backup"]
"""


# ---------------------------------------------------------------- kernel views


def kernel_endpoints(ns: Netns) -> set[tuple[str, int, frozenset[str], str]]:
    return {(row["address"], row["id"], frozenset(row["flags"]), row.get("dev", ""))
            for row in ns.endpoints()}


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]").split("%", 1)[0].strip("[]")
    return host, int(port)


@dataclass(frozen=True)
class SsConnection:
    token: int
    local: tuple[str, int]
    remote: tuple[str, int]
    extra_subflows: int


def ss_connections(ns: Netns) -> list[SsConnection]:
    """``ss -M`` (MPTCP sockets), established ones."""
    out = ns.run("ss", "-MniH", "state", "established")
    found = []
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if not line or line[0].isspace():
            continue
        words = line.split()
        detail = lines[i + 1] if i + 1 < len(lines) else ""
        token = re.search(r"token:([0-9a-f]+)", detail)
        extra = re.search(r"\bsubflows:(\d+)", detail)
        assert token, detail
        found.append(SsConnection(int(token.group(1), 16), _address(words[-2]),
                                  _address(words[-1]), int(extra.group(1)) if extra else 0))
    return found


def ss_subflows(ns: Netns) -> set[tuple[int, tuple[str, int], tuple[str, int], int, int]]:
    """(token, local, remote, local id, remote id) of every established TCP
    subflow with the mptcp ULP (``ss -tni``)."""
    out = ns.run("ss", "-tniH", "state", "established")
    found = set()
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if not line or line[0].isspace():
            continue
        detail = lines[i + 1] if i + 1 < len(lines) else ""
        ulp = re.search(r"tcp-ulp-mptcp flags:\S+ token:[0-9a-f]+\(id:(\d+)\)/"
                        r"([0-9a-f]+)\(id:(\d+)\)", detail)
        if not ulp:
            continue
        words = line.split()
        found.add((int(ulp.group(2), 16), _address(words[-2]), _address(words[-1]),
                   int(ulp.group(3)), int(ulp.group(1))))
    return found


def kernel_limits(ns: Netns) -> dict[str, int]:
    words = ns.ip("mptcp", "limits", "show").split()
    return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}


# ---------------------------------------------------------------- set-up


class Box:
    """A daemon on the client side of TwoPaths, an admin's endpoint, and
    helpers to run ``ctl`` next to it."""

    def __init__(self, lab: Lab, daemons: Any, state_dir: str, extra: str = CONFIG_EXTRA,
                 prefix: tuple[str, ...] = (), **daemon: Any) -> None:
        self.paths = TwoPaths(lab)
        self.client = self.paths.client
        self.server = self.paths.server
        self.client.ip("mptcp", "endpoint", "add", ADMIN_ENDPOINT, "id", "99", "signal")
        self.server.ip("mptcp", "limits", "set", "subflows", "4", "add_addr_accepted", "4")
        self.state_dir = state_dir
        self.socket = os.path.join(state_dir, "control")
        daemon.setdefault("reconcile_interval", 3600)
        self.config = daemon_config(state_dir, extra=extra, **daemon)
        self.daemon: DaemonProcess = daemons(self.client, self.config, prefix=prefix)
        self.pairs: list[MptcpPair] = []

    def start(self) -> Box:
        self.daemon.start()
        wait_for(lambda: len(self.client.endpoints()) == 5, what="the daemon's endpoints")
        return self

    def ctl(self, *args: str, setpriv: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return run_ctl(self.client, self.socket, *args, setpriv=setpriv)

    def ok(self, *args: str) -> str:
        done = self.ctl(*args)
        assert done.returncode == 0, f"ctl {' '.join(args)}: {done.returncode} {done.stderr}"
        assert done.stderr == ""
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok("--json", *args))

    def connect(self) -> MptcpPair:
        """An MPTCP connection over path 0 that gains a backup subflow on path 1."""
        listener = mptcp_listen(self.server, "0.0.0.0")
        pair = mptcp_connect(self.client, listener, address=self.paths.server_addr(0))
        pair.server.sendall(b"!")
        self.pairs.append(pair)
        wait_for(lambda: any(c.extra_subflows == 1 for c in ss_connections(self.client)),
                 what="the second subflow")
        return pair

    def close(self) -> None:
        for pair in self.pairs:
            pair.close()


@pytest.fixture
def box(lab: Lab, daemons: Any, tmp_path: Path) -> Iterator[Box]:
    """box: TwoPaths with a running daemon (addr_adv, eth1 as backup,
    limits 4/2) on the client, an admin endpoint, one MPTCP connection with
    two subflows; function scope; depends on lab and daemons."""
    made = Box(lab, daemons, str(tmp_path / "state")).start()
    made.connect()
    yield made
    made.close()


# ---------------------------------------------------------------- subcommands


def table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [line.split() for line in lines[1:]]


def test_ctl_endpoints_matches_ip_mptcp_endpoint_show_in_both_forms(box: Box) -> None:
    kernel = kernel_endpoints(box.client)
    rows = box.json("endpoints")["endpoints"]
    in_kernel = [r for r in rows if r["state"] in ("owned", "foreign")]
    assert {(r["address"], r["id"], frozenset(r["flags"]), r["ifname"]) for r in in_kernel} \
        == kernel
    assert [r for r in rows if r["state"] not in ("owned", "foreign")] == []
    states = {r["address"]: (r["state"], r["plugin"]) for r in rows}
    assert states.pop(ADMIN_ENDPOINT) == ("foreign", "")
    assert set(states.values()) == {("owned", "addr_adv")}
    assert {r["reason"] for r in rows if r["state"] == "owned"} == {
        "eligible address; flags from [plugins.addr_adv]",
        "eligible address; interface rule 'eth1'"}

    human = box.ok("endpoints")
    assert human.splitlines()[0].split() == ["ID", "ADDRESS", "PORT", "FLAGS", "DEV", "STATE",
                                             "PLUGIN", "WHY"]
    parsed = {(w[1], int(w[0]), frozenset(w[3].split(",")), "" if w[4] == "-" else w[4])
              for w in table_rows(human)}
    assert parsed == kernel
    foreign = next(w for w in table_rows(human) if w[1] == ADMIN_ENDPOINT)
    assert foreign[5] == "foreign" and "never touched" in " ".join(foreign)


def test_ctl_connections_matches_ss_in_both_forms(box: Box) -> None:
    (conn,) = ss_connections(box.client)
    subflows = ss_subflows(box.client)
    assert len(subflows) == 2
    (row,) = box.json("connections")["connections"]
    assert row["token"] == conn.token and row["side"] == "client"
    assert (row["local"], row["local_port"]) == conn.local
    assert (row["remote"], row["remote_port"]) == conn.remote
    assert len(row["subflows"]) == conn.extra_subflows + 1
    assert {(row["token"], (s["local"], s["local_port"]), (s["remote"], s["remote_port"]),
             s["local_id"], s["remote_id"]) for s in row["subflows"]} == subflows
    by_local = {s["local"]: s for s in row["subflows"]}
    assert (by_local["192.0.2.1"]["ifname"], by_local["192.0.2.1"]["backup"]) == ("eth0", False)
    assert (by_local["198.51.100.1"]["ifname"], by_local["198.51.100.1"]["backup"]) == \
        ("eth1", True)

    human = box.ok("connections")
    lines = human.splitlines()
    assert lines[0].split() == ["TOKEN", "SIDE", "LOCAL", "REMOTE", "IDS", "DEV", "BACKUP"]
    assert lines[1].split()[:2] == [f"{conn.token:08x}", "client"]
    shown = {tuple(line.split()[-5:]) for line in lines[1:3]}
    assert shown == {(f"{s['local']}:{s['local_port']}", f"{s['remote']}:{s['remote_port']}",
                      f"{s['local_id']}/{s['remote_id']}", s["ifname"],
                      "yes" if s["backup"] else "no") for s in row["subflows"]}
    assert lines[-1] == "1 connection, 2 subflows"


def test_ctl_limits_matches_ip_mptcp_limits_in_both_forms(box: Box) -> None:
    kernel = kernel_limits(box.client)
    assert kernel == {"subflows": 4, "add_addr_accepted": 2}
    result = box.json("limits")
    assert {r["name"]: r["kernel"] for r in result["limits"]} == kernel
    assert {r["name"]: r["configured"] for r in result["limits"]} == kernel
    assert {r["name"]: r["before"] for r in result["limits"]} == \
        {"subflows": 2, "add_addr_accepted": 0}  # the kernel's defaults, restored at exit
    rows = {w[0]: w[1:] for w in table_rows(box.ok("limits"))[:2]}
    assert rows == {"subflows": ["4", "4", "2"], "add_addr_accepted": ["2", "2", "0"]}


def test_ctl_status_counts_what_the_kernel_has_in_both_forms(box: Box) -> None:
    status = box.json("status")
    (conn,) = ss_connections(box.client)
    owned = len(kernel_endpoints(box.client)) - 1
    assert status["counts"]["endpoints"] == {"owned": owned, "foreign": 1, "waiting": 0,
                                             "missing": 0}
    assert status["counts"]["connections"] == 1
    assert status["counts"]["subflows"] == conn.extra_subflows + 1
    assert status["limits"] == kernel_limits(box.client)
    assert status["path_manager"] == "kernel" == box.client.read_sysctl("net.mptcp.path_manager")
    assert status["pid"] > 0 and status["uptime"] > 0
    assert [(p["name"], p["state"]) for p in status["plugins"]] == [
        ("addr_adv", "active"), ("backup_cellular", "active")]
    assert status["events"]["mptcp_created"] == 1
    assert status["events"]["mptcp_sub_established"] == 1
    assert status["last_error"] is None and status["kernel_errors"] == {}

    human = dict(line.split(":", 1) for line in box.ok("status").splitlines())
    human = {key: value.strip() for key, value in human.items()}
    assert human["endpoints"] == f"{owned} owned, 1 foreign, 0 waiting for a slot"
    assert human["connections"] == "1 (2 subflows)"
    assert human["limits"] == "subflows 4, add_addr_accepted 2"
    assert human["path manager"] == "kernel"
    assert human["plugins"] == "addr_adv (active), backup_cellular (active)"
    assert human["control"] == f"{box.socket} (group root only)"
    assert human["last error"] == "none"


def test_ctl_plugins_lists_the_enabled_plugins_in_both_forms(box: Box) -> None:
    rows = box.json("plugins")["plugins"]
    assert [(r["name"], r["state"], r["failures"]) for r in rows] == [
        ("addr_adv", "active", 0), ("backup_cellular", "active", 0)]
    assert all(r["calls"] >= 1 for r in rows)
    assert "endpoints" in rows[0]["hooks"]
    human = table_rows(box.ok("plugins"))
    assert [(w[0], w[1], w[3]) for w in human] == [("addr_adv", "active", "0/0"),
                                                   ("backup_cellular", "active", "0/0")]


def test_ctl_reload_applies_a_new_config_and_refuses_a_broken_one(box: Box) -> None:
    box.daemon.write_config(box.config.replace('flags = ["subflow"]\n',
                                               'flags = ["subflow", "fullmesh"]\n', 1))
    assert box.ok("reload") == (f"reloaded {box.daemon.config_path} "
                                "(plugins: addr_adv, backup_cellular)\n")
    # The reply comes after the reconcile pass: the kernel has it already.
    flags = {e[0]: e[2] for e in kernel_endpoints(box.client)}
    assert flags["192.0.2.1"] == {"subflow", "fullmesh"}
    assert flags["198.51.100.1"] == {"subflow", "backup"}  # the interface rule still wins
    result = box.json("reload")
    assert result["reloaded"] is True and result["config"] == box.daemon.config_path
    before = kernel_endpoints(box.client)

    box.daemon.write_config(box.config + "[plugins.fullmesh]\nmax_subflows = 'many'\n")
    for args in (("reload",), ("--json", "reload")):
        done = box.ctl(*args)
        assert done.returncode == 78, done
        err = done.stderr.splitlines()
        assert err[0] == ("mptcpd-py ctl: reload refused: configuration error; the old "
                          "configuration stays in force")
        assert re.fullmatch(rf"{re.escape(box.daemon.config_path)}:\d+: "
                            r"plugins\.fullmesh\.max_subflows: .*", err[1]), err
        assert done.stdout == ""
    assert kernel_endpoints(box.client) == before
    assert box.daemon.proc.poll() is None


def test_ctl_metrics_prints_the_exposition_in_both_forms(box: Box) -> None:
    text = box.ok("metrics")
    owned = len(kernel_endpoints(box.client)) - 1
    assert f'mptcpd_endpoints{{state="owned"}} {owned}.0' in text
    assert "mptcpd_connections 1.0" in text
    result = box.json("metrics")
    samples = result["metrics"]
    assert {s["labels"]["state"]: s["value"] for s in samples["mptcpd_endpoints"]} == \
        {"owned": owned, "foreign": 1, "waiting": 0, "missing": 0}
    assert {(s["labels"]["ifname"], s["labels"]["backup"]): s["value"]
            for s in samples["mptcpd_subflows"]} == {("eth0", "0"): 1, ("eth1", "1"): 1}


def test_ctl_without_a_daemon_says_so_and_exits_69(lab: Lab, tmp_path: Path) -> None:
    ns = lab.netns("idle")
    done = run_ctl(ns, str(tmp_path / "control"), "status")
    assert done.returncode == 69
    assert done.stderr == ("mptcpd-py ctl: the daemon is not running (no control socket at "
                           f"{tmp_path / 'control'})\n")


def test_the_socket_goes_away_with_the_daemon(lab: Lab, daemons: Any, tmp_path: Path) -> None:
    box = Box(lab, daemons, str(tmp_path / "state")).start()
    assert box.json("status")["pid"] == box.daemon.pid
    assert box.daemon.stop() == 0
    assert not os.path.exists(box.socket)
    done = box.ctl("endpoints")
    assert done.returncode == 69 and "the daemon is not running" in done.stderr


# ---------------------------------------------------------------- monitor


class Lines:
    """A child's stdout, read by a thread, waited on with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, predicate: Any, what: str, timeout: float = 10.0) -> str:
        def find() -> str | None:
            return next((line for line in list(self.lines) if predicate(line)), None)
        found: str = wait_for(find, timeout, what=what)
        return found


def _monitor(box: Box, *args: str) -> Lines:
    proc = box.client.popen([sys.executable, "-m", "mptcpd_py", "ctl", "--socket", box.socket,
                             *args, "monitor"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return Lines(proc)


def test_monitor_shows_an_address_the_endpoint_decision_and_subflows_as_they_happen(
        lab: Lab, daemons: Any, tmp_path: Path) -> None:
    box = Box(lab, daemons, str(tmp_path / "state"))
    box.client.ip("addr", "flush", "dev", "eth1")
    box.daemon.start()
    wait_for(lambda: len(box.client.endpoints()) == 3, what="path 0's endpoints")
    human = _monitor(box)
    as_json = _monitor(box, "--json")
    human.wait(lambda line: line.startswith("monitoring mptcpd-py"), "the human monitor")
    wait_for(lambda: box.json("status")["counts"]["monitor_clients"] == 2,
             what="both monitors subscribed")

    added_at = time.time()
    box.paths.add_client_addresses(1)
    box.paths.add_default_routes(1)

    def event(**fields: Any) -> Any:
        def match(line: str) -> bool:
            item = json.loads(line)
            return all(item.get(k) == v for k, v in fields.items())
        return json.loads(as_json.wait(match, f"event {fields}"))

    address = event(kind="address", action="added", addr="198.51.100.1")
    decision = event(kind="endpoint", action="add", addr="198.51.100.1")
    assert decision["plugin"] == "addr_adv" and decision["ifname"] == "eth1"
    assert decision["flags"] == "subflow,backup"
    assert decision["reason"] == "eligible address; interface rule 'eth1'"
    assert "address 198.51.100.1 added" in decision["trigger"]
    assert decision["endpoint_id"] == next(e["id"] for e in box.client.endpoints()
                                           if e["address"] == "198.51.100.1")
    assert address["time"] <= decision["time"] < added_at + 2.0

    box.pairs.append(mptcp_connect(box.client, mptcp_listen(box.server, "0.0.0.0"),
                                   address=box.paths.server_addr(0)))
    box.pairs[-1].server.sendall(b"!")
    created = event(kind="mptcp", event="created")
    joined = event(kind="mptcp", event="sub_established", saddr="198.51.100.1")
    assert joined["token"] == created["token"] and joined["daddr"] == "192.0.2.2"
    assert joined["ifname"] == "eth1"
    (conn,) = ss_connections(box.client)
    assert created["token"] == conn.token

    token = f"{created['token']:08x}"
    human.wait(lambda line: " address  added 198.51.100.1 dev eth1" in line, "address line")
    line = human.wait(lambda line: " endpoint add 198.51.100.1 id " in line, "decision line")
    assert " subflow,backup dev eth1 by addr_adv: eligible address; interface rule 'eth1' " \
           "(after address 198.51.100.1 added" in line
    human.wait(lambda line: re.search(rf" mptcp    created token {token} 192\.0\.2\.1:\d+ -> "
                                      r"192\.0\.2\.2:\d+$", line) is not None, "created line")
    human.wait(lambda line: re.search(rf" mptcp    sub_established token {token} "
                                      r"198\.51\.100\.1:\d+ -> 192\.0\.2\.2:\d+ ids \d+/0 "
                                      r"dev eth1$", line) is not None, "subflow line")

    for monitor in (human, as_json):
        monitor.proc.send_signal(signal.SIGINT)
        assert monitor.proc.wait(timeout=10) == 0
    wait_for(lambda: box.json("status")["counts"]["monitor_clients"] == 0,
             what="unsubscribed")
    box.close()


def test_monitor_ends_cleanly_when_the_daemon_stops(lab: Lab, daemons: Any,
                                                    tmp_path: Path) -> None:
    box = Box(lab, daemons, str(tmp_path / "state")).start()
    monitor = _monitor(box, "--json")
    wait_for(lambda: box.json("status")["counts"]["monitor_clients"] == 1, what="subscribed")
    assert box.daemon.stop() == 0
    assert monitor.proc.wait(timeout=10) == 0
    last = json.loads(monitor.wait(lambda line: '"stopping"' in line, "stopping event"))
    assert last["reason"] == "the daemon is stopping"


# ---------------------------------------------------------------- metrics


def scrape(ns: Netns, url: str) -> tuple[int, str, str]:
    """GET with urllib from inside the namespace (the socket stays there)."""
    with in_netns(ns.name):
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.headers["Content-Type"], \
                    response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_metrics_over_http_agree_with_ctl_status(lab: Lab, daemons: Any,
                                                 tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    box = Box(lab, daemons, str(tmp_path / "state"),
              extra=CONFIG_EXTRA + '[metrics]\nlisten = "127.0.0.1:9464"\n').start()
    box.connect()
    box.client.ip("addr", "add", "192.0.2.50/24", "dev", "eth0")  # one more event ...
    wait_for(lambda: any(e["address"] == "192.0.2.50" for e in box.client.endpoints()))
    # ... and one more subflow: its endpoint joins the open connection.
    wait_for(lambda: ss_connections(box.client)[0].extra_subflows == 2, what="third subflow")
    status = box.json("status")
    assert status["metrics_listen"] == "127.0.0.1:9464"

    code, content_type, text = scrape(box.client, "http://127.0.0.1:9464/metrics")
    assert code == 200 and content_type.startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value

    def by(name: str, label: str) -> dict[str, float]:
        return {dict(k)[label]: v for k, v in samples.get(name, {}).items()}

    assert by("mptcpd_endpoints", "state") == status["counts"]["endpoints"]
    assert samples["mptcpd_connections"][()] == status["counts"]["connections"] == 1
    assert sum(samples["mptcpd_subflows"].values()) == status["counts"]["subflows"] == 3
    assert by("mptcpd_events_total", "type") == status["events"]
    assert status["events"]["rtnl_address_added"] >= 1
    assert by("mptcpd_resyncs_total", "source") == status["resyncs"]
    assert by("mptcpd_kernel_errors_total", "errno") == status["kernel_errors"]
    assert by("mptcpd_plugin_failures_total", "plugin") == status["plugin_failures"]
    assert samples["mptcpd_reconciles_total"][()] == status["reconciles"]
    assert by("mptcpd_kernel_limit", "limit") == status["limits"]
    assert samples["mptcpd_event_handling_seconds_count"][()] == \
        status["latency"]["observed"] >= 1
    assert samples["process_resident_memory_bytes"][()] > 0

    assert scrape(box.client, "http://127.0.0.1:9464/nothing")[0] == 404
    assert scrape(box.client, "http://127.0.0.1:9464/")[0] == 200
    # The metrics are the daemon's: the host namespace has no such listener.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=2)


def test_metrics_listener_that_cannot_start_is_reported_not_fatal(
        lab: Lab, daemons: Any, tmp_path: Path) -> None:
    box = Box(lab, daemons, str(tmp_path / "state"),
              extra=CONFIG_EXTRA + '[metrics]\nlisten = "203.0.113.77:9464"\n').start()
    status = box.json("status")
    assert status["metrics_listen"] == ""
    assert status["metrics_error"] == "203.0.113.77:9464: Cannot assign requested address"
    assert "metrics:         error: 203.0.113.77:9464" in box.ok("status")


# ---------------------------------------------------------------- who may


@pytest.fixture
def open_state_dir() -> Iterator[str]:
    """open_state_dir: a state_dir whose parents every uid may traverse (so
    only the socket's own mode decides); function scope; removed after."""
    base = tempfile.mkdtemp(prefix="mptcpd-py-ctl-")
    os.chmod(base, 0o755)
    yield os.path.join(base, "state")
    shutil.rmtree(base, ignore_errors=True)


NOBODY = ("--reuid", "65534", "--regid", "65534", "--clear-groups")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_only_root_and_control_group_members_may_change_anything(
        lab: Lab, daemons: Any, open_state_dir: str) -> None:
    users = "users"
    box = Box(lab, daemons, open_state_dir, control_group=users).start()
    member = ("--reuid", "65534", "--regid", "100", "--clear-groups")
    supplementary = ("--reuid", "65534", "--regid", "65534", "--groups", "100")

    denied = box.ctl("status", setpriv=NOBODY)
    assert denied.returncode == 77
    assert denied.stderr == (f"mptcpd-py ctl: permission denied on {box.socket}: the control "
                             "socket is for root and the daemon's control_group\n")
    for who in (member, supplementary):
        assert box.ctl("status", setpriv=who).returncode == 0
        done = box.ctl("reload", setpriv=who)
        assert done.returncode == 0 and done.stdout.startswith("reloaded "), done

    # An admin opened the socket to everyone for reading: reading works,
    # changing does not, and nothing is changed.
    os.chmod(box.socket, 0o666)
    assert box.ctl("--json", "endpoints", setpriv=NOBODY).returncode == 0
    reloads = len([e for e in box.daemon.logs() if e.get("event") == "reloading"])
    refused = box.ctl("reload", setpriv=NOBODY)
    assert refused.returncode == 77
    assert refused.stderr == ("mptcpd-py ctl: permission denied: reload is allowed to root or "
                              "members of group users only (you are uid 65534)\n")
    box.daemon.wait_log("control request refused", command="reload", uid=65534)
    assert len([e for e in box.daemon.logs() if e.get("event") == "reloading"]) == reloads
    assert box.daemon.proc.poll() is None


def test_a_reload_that_cannot_change_the_control_group_says_so_and_keeps_the_old_one(
        lab: Lab, daemons: Any, tmp_path: Path) -> None:
    """As at start, where the same file is exit 78: without CAP_CHOWN (the
    shipped unit) a new control_group cannot be applied, and ``ctl reload``
    fails instead of printing "reloaded"."""
    box = Box(lab, daemons, str(tmp_path / "state"),
              prefix=("setpriv", "--inh-caps=-chown", "--bounding-set=-chown")).start()
    box.daemon.write_config(daemon_config(box.state_dir, extra=CONFIG_EXTRA,
                                          reconcile_interval=3600, control_group="users"))
    for args in (("reload",), ("--json", "reload")):
        done = box.ctl(*args)
        assert (done.returncode, done.stdout) == (1, ""), done
        assert done.stderr == (
            f"mptcpd-py ctl: reload partly failed: control socket {box.socket}: cannot give "
            "it to group 'users': changing a file's group needs CAP_CHOWN (under systemd, "
            "add it with the drop-in in docs/service.md, 'control_group')\n")
    assert os.stat(box.socket).st_gid == 0
    assert box.json("status")["control_group"] == ""
    assert box.daemon.proc is not None and box.daemon.proc.poll() is None


def test_a_control_socket_that_cannot_be_made_stops_the_start_before_the_kernel(
        lab: Lab, daemons: Any, tmp_path: Path) -> None:
    box = Box(lab, daemons, str(tmp_path / "state"))
    os.makedirs(box.socket)  # a directory where the socket should be
    box.daemon.start(wait_ready=False)
    # 78: systemd does not restart it (a restart would not remove the directory).
    assert box.daemon.proc is not None and box.daemon.proc.wait(timeout=20) == 78
    (error,) = box.daemon.errors()
    assert error["event"] == "cannot start"
    assert error["error"] == (f"control socket {box.socket}: exists and is not a socket; "
                              "remove it or choose another daemon.state_dir")
    # Refused before the first reconcile: no endpoint was added, then removed.
    assert "endpoint added" not in [line["event"] for line in box.daemon.logs()]
    assert {e["address"] for e in box.client.endpoints()} == {ADMIN_ENDPOINT}


def test_monitor_piped_into_head_ends_quietly(box: Box) -> None:
    python = f"{sys.executable} -m mptcpd_py ctl --socket {box.socket} --json monitor"
    proc = box.client.popen(["sh", "-c", f"{python} | head -n 1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: box.json("status")["counts"]["monitor_clients"] == 1, what="subscribed")
    for i in range(3):
        box.client.ip("addr", "add", f"192.0.2.{60 + i}/24", "dev", "eth0")
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert json.loads(out)["kind"] in ("address", "endpoint", "route", "mptcp")
    assert err == ""
    wait_for(lambda: box.json("status")["counts"]["monitor_clients"] == 0,
             what="the monitor unsubscribed")


def test_userspace_pm_connections_and_the_plugins_actions_show_in_ctl(
        lab: Lab, daemons: Any, tmp_path: Path) -> None:
    paths = TwoPaths(lab)
    paths.server.ip("mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "8")
    state_dir = str(tmp_path / "state")
    daemon = daemons(paths.client, daemon_config(
        state_dir, plugins=["fullmesh"], reconcile_interval=3600,
        extra='[kernel]\npath_manager = "userspace"\n')).start()
    sock = os.path.join(state_dir, "control")
    monitor = Lines(paths.client.popen(
        [sys.executable, "-m", "mptcpd_py", "ctl", "--socket", sock, "--json", "monitor"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    wait_for(lambda: json.loads(run_ctl(paths.client, sock, "--json", "status").stdout)
             ["counts"]["monitor_clients"] == 1, what="subscribed")
    pair = mptcp_connect(paths.client, mptcp_listen(paths.server, "0.0.0.0"),
                         address=paths.server_addr(0))
    pair.server.sendall(b"!")
    action = json.loads(monitor.wait(
        lambda line: '"action"' in line and '"create_subflow"' in line, "a plugin's action"))
    assert action["plugin"] == "fullmesh" and action["local"] == "198.51.100.1"
    assert action["reason"] == "fullmesh 198.51.100.1 -> 192.0.2.2"
    wait_for(lambda: any(c.extra_subflows == 1 for c in ss_connections(paths.client)),
             what="the plugin's subflow")

    status = json.loads(run_ctl(paths.client, sock, "--json", "status").stdout)
    assert status["path_manager"] == "userspace"
    assert status["counts"]["connections"] == 1 and status["counts"]["subflows"] == 2
    (conn,) = ss_connections(paths.client)
    (row,) = json.loads(run_ctl(paths.client, sock, "--json", "connections").stdout)[
        "connections"]
    assert row["token"] == conn.token
    assert {(row["token"], (s["local"], s["local_port"]), (s["remote"], s["remote_port"]),
             s["local_id"], s["remote_id"]) for s in row["subflows"]} == \
        ss_subflows(paths.client)
    human = run_ctl(paths.client, sock, "endpoints")
    assert human.returncode == 0 and human.stdout == "no endpoints\n"
    monitor.proc.send_signal(signal.SIGINT)
    assert monitor.proc.wait(timeout=10) == 0
    pair.close()
    assert daemon.stop() == 0
    assert daemon.errors() == []
