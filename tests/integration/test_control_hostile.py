"""Hostile control peers (reliability suite, part 5): fuzzed, oversized,
truncated, wrong-version and flooding requests are refused with an error
reply (when there is an address to reply to); the daemon stays alive, its
event loop keeps serving the network, and nothing in the kernel or in its
state changes. (An unauthorised uid: test_control.py.)

Short forms run by default; ``-m long`` runs the big ones."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py.control import encode_request
from mptcpd_py.lab import DaemonProcess, Lab, daemon_config, rss_kib, run_ctl, wait_for
from mptcpd_py.netns import in_netns
from mptcpd_py.state import StateStore

ADMIN_ENDPOINT = "203.0.113.99"
COMMANDS = ("status", "endpoints", "connections", "plugins", "limits", "metrics")


# ---------------------------------------------------------------- the datagrams


def hostile_datagrams(count: int, seed: int) -> Iterator[tuple[bytes, set[str]]]:
    """(datagram, the error codes it may earn) - deterministic for a seed.
    Every 97th is a valid read-only request (expects an "ok" reply), so the
    daemon is seen answering properly in the middle of it all."""
    rng = random.Random(seed)
    for n in range(count):
        if n % 97 == 0:
            yield encode_request(rng.choice(("plugins", "limits", "endpoints")), n), {"ok"}
            continue
        kind = n % 12
        if kind == 0:
            yield rng.randbytes(rng.randrange(0, 600)), {"malformed"}
        elif kind == 1:  # truncated
            whole = encode_request(rng.choice(COMMANDS), n)
            yield whole[: rng.randrange(0, len(whole))], {"malformed"}
        elif kind == 2:  # a version this daemon does not speak
            version = rng.choice([0, 2, 3, -1, 99, 2**40])
            yield json.dumps({"version": version, "id": n, "command": "status"}).encode(), \
                {"unsupported_version"}
        elif kind == 3:  # a version of the wrong type, or none
            message: dict[str, Any] = {"id": n, "command": "status"}
            choice = rng.randrange(7)
            if choice < 6:
                message["version"] = ["1", None, 1.5, True, [], {}][choice]
            yield json.dumps(message).encode(), {"malformed"}
        elif kind == 4:  # unknown commands
            name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_-!/ ") for _ in
                           range(rng.randrange(1, 30)))
            if name in (*COMMANDS, "monitor", "unsubscribe", "reload"):
                name += "?"
            yield encode_request(name, n), {"unknown_command"}
        elif kind == 5:  # unknown fields, arguments nobody takes
            if rng.random() < 0.5:
                yield json.dumps({"version": 1, "id": n, "command": "status",
                                  rng.choice(["sudo", "cmd", "Version"]): 1}).encode(), \
                    {"malformed"}
            else:
                yield encode_request(rng.choice(COMMANDS), n, {"force": True}), \
                    {"bad_arguments"}
        elif kind == 6:  # nested deeper than any parser should go
            depth = rng.randrange(1000, 30000)
            yield (b"[" * depth + b"]" * depth)[: 60000], {"malformed"}
        elif kind == 7:  # numbers too long for an integer, ids out of range
            yield (b'{"version": 1, "id": ' + b"7" * rng.randrange(4400, 9000)
                   + b', "command": "status"}'), {"malformed"}
        elif kind == 8:  # JSON, but not an object
            yield rng.choice([b"[]", b'"status"', b"1", b"null", b"true", b"[1, 2]"]), \
                {"malformed"}
        elif kind == 9:  # invalid UTF-8 inside a string
            yield b'{"version": 1, "id": 1, "command": "st\xc3\x28tus"}', {"malformed"}
        elif kind == 10:  # types all wrong
            yield json.dumps({"version": 1, "id": rng.choice([-5, 1.5, "x", [1], 2**60]),
                              "command": rng.choice([None, 1, [], {}, ""]),
                              "args": rng.choice([[], 1, "x"])}).encode(), {"malformed"}
        else:  # an almost valid request with garbage appended
            yield encode_request(rng.choice(COMMANDS), n) + rng.randbytes(5), {"malformed"}


def oversized_datagrams(count: int) -> Iterator[bytes]:
    for n in range(count):
        size = (65 * 1024, 100 * 1024, 200 * 1024)[n % 3]
        head = encode_request("status", n)[:-1] + b', "args": {"pad": "'
        yield head + b"x" * (size - len(head) - 3) + b'"}}'


# ---------------------------------------------------------------- the daemon


class Target:
    """A daemon with endpoints, limits, source routes and an admin's
    endpoint: the state that must not change."""

    def __init__(self, lab: Lab, daemons: Any, tmp_path: Path) -> None:
        self.ns = lab.netns("hostile")
        for i, name in enumerate(("eth0", "eth1")):
            self.ns.stub_link(name)
            self.ns.ip("addr", "add", f"{('192.0.2', '198.51.100')[i]}.1/24", "dev", name)
            self.ns.ip("route", "add", "default", "via", f"{('192.0.2', '198.51.100')[i]}.254",
                       "dev", name, "metric", str(100 + i))
        self.ns.ip("mptcp", "endpoint", "add", ADMIN_ENDPOINT, "id", "99", "signal")
        state_dir = str(tmp_path / "state")
        self.socket = os.path.join(state_dir, "control")
        self.state_dir = state_dir
        self.daemon: DaemonProcess = daemons(self.ns, daemon_config(
            state_dir, reconcile_interval=3600,
            extra="[kernel.limits]\nsubflows = 3\nadd_addr_accepted = 1\n"))
        self.daemon.start()
        wait_for(lambda: len(self.ns.endpoints()) == 3, what="the daemon's endpoints")

    def snapshot(self) -> dict[str, Any]:
        status = json.loads(self.ctl_ok("--json", "status"))
        return {
            "endpoints": self.ns.ip("mptcp", "endpoint", "show"),
            "limits": self.ns.ip("mptcp", "limits", "show"),
            "rules": self.ns.ip("rule", "show"),
            "routes": self.ns.ip("route", "show", "table", "all"),
            # What the daemon owns: the snapshot plus its journal, as a restart reads it.
            "owned": sorted((e.to_json() for e in
                             StateStore(self.state_dir).load().endpoints.values()),
                            key=lambda e: e["id"]),
            "status": {k: status[k] for k in ("pid", "counts", "plugins", "limits", "config",
                                              "reconciles", "resyncs", "kernel_errors",
                                              "plugin_failures", "last_error", "events")},
        }

    def ctl_ok(self, *args: str) -> str:
        done = run_ctl(self.ns, self.socket, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def rss(self) -> int:
        return rss_kib(self.daemon.pid) * 1024

    def client(self, *, bind: bool = True, connect: bool = True) -> socket.socket:
        """A datagram socket made inside the namespace (abstract addresses
        are per namespace), so the daemon can answer it."""
        with in_netns(self.ns.name):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        if bind:
            sock.bind("")
        if connect:
            sock.connect(self.socket)
        return sock

    def assert_unharmed(self, before: dict[str, Any], rss_before: int, *,
                        network_changed: bool = False) -> dict[str, Any]:
        """Alive, same kernel state, same daemon state, no error logged, no
        reload, RSS within 8 MiB. ``network_changed``: addresses came and
        went meanwhile, so event and pass counters moved (nothing else)."""
        assert self.daemon.proc is not None and self.daemon.proc.poll() is None
        after = self.snapshot()
        if network_changed:
            for snap in (before, after):
                for moved in ("events", "reconciles"):
                    snap["status"].pop(moved)
        assert after == before
        assert self.daemon.errors() == []
        assert not any(e.get("event") == "reloading" for e in self.daemon.logs())
        grown = self.rss() - rss_before
        print(f"daemon RSS {rss_before / 2**20:.1f} -> {(rss_before + grown) / 2**20:.1f} MiB")
        assert grown < 8 << 20, f"RSS grew {grown / 2**20:.1f} MiB"
        return after


@pytest.fixture
def target(lab: Lab, daemons: Any, tmp_path: Path) -> Target:
    """target: a daemon in a namespace with two interfaces, limits and an
    admin endpoint; function scope; depends on lab and daemons."""
    return Target(lab, daemons, tmp_path)


def fuzz(target: Target, count: int, seed: int) -> Counter[str]:
    """Send ``count`` hostile datagrams one at a time; every one must earn a
    reply with an expected code. Returns the codes seen."""
    sock = target.client()
    sock.settimeout(10)
    seen: Counter[str] = Counter()
    try:
        for data, expected in hostile_datagrams(count, seed):
            sock.send(data)
            reply = json.loads(sock.recv(1 << 17))
            code = "ok" if reply.get("ok") else reply["error"]["code"]
            assert code in expected, (data[:200], reply)
            assert reply["version"] == 1
            seen[code] += 1
        for data in oversized_datagrams(30):
            sock.send(data)
            reply = json.loads(sock.recv(1 << 17))
            assert reply["error"]["code"] == "oversized", reply
            assert reply["error"]["message"] == "request larger than 65536 bytes"
            seen["oversized"] += 1
        # A descriptor pushed along with a request is not kept.
        r, w = os.pipe()
        sock.sendmsg([encode_request("status", 1, {"x": 1})],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, sys.byteorder))])
        assert json.loads(sock.recv(1 << 17))["error"]["code"] == "bad_arguments"
        os.close(r)
        os.close(w)
    finally:
        sock.close()
    # Nowhere to reply: an unbound sender is ignored.
    anonymous = target.client(bind=False, connect=False)
    for data, _ in hostile_datagrams(50, seed + 1):
        anonymous.sendto(data, target.socket)
    anonymous.close()
    return seen


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_ten_thousand_hostile_datagrams_are_refused_and_change_nothing(
        target: Target) -> None:
    before = target.snapshot()
    rss_before = target.rss()
    fds_before = open_fds(target.daemon.pid)
    seen = fuzz(target, 10_000, seed=6)
    assert sum(seen.values()) == 10_030
    assert set(seen) >= {"ok", "malformed", "unsupported_version", "unknown_command",
                         "bad_arguments", "oversized"}
    after = target.assert_unharmed(before, rss_before)
    assert open_fds(target.daemon.pid) == fds_before
    control = json.loads(target.ctl_ok("--json", "status"))["control"]
    # Every refusal counted: the fuzz's, the one carrying a descriptor; the
    # anonymous datagrams could not be answered and were not parsed.
    assert sum(control["errors"].values()) == sum(seen.values()) - seen["ok"] + 1
    assert control["unanswerable"] == 50
    # A flood of bad requests is not a flood in the log.
    bad = [e for e in target.daemon.logs() if e.get("event") == "bad control request"]
    assert 0 < len(bad) <= 40
    assert after["status"]["pid"] == target.daemon.pid


@pytest.mark.long
def test_two_hundred_thousand_hostile_datagrams_are_refused_and_change_nothing(
        target: Target) -> None:
    before = target.snapshot()
    rss_before = target.rss()
    fds_before = open_fds(target.daemon.pid)
    total = Counter[str]()
    for seed in range(20):
        total += fuzz(target, 10_000, seed=100 + seed)
    assert sum(total.values()) == 20 * 10_030
    target.assert_unharmed(before, rss_before)
    assert open_fds(target.daemon.pid) == fds_before


# ---------------------------------------------------------------- floods


FLOODER = r"""
import json, os, random, socket, sys, time
path, count, seconds, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rng = random.Random(os.getpid())
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("")
if mode == "connected":
    sock.connect(path)
sock.setblocking(False)
commands = ["plugins", "limits", "endpoints", "status", "nope"]
sent, deadline = 0, time.monotonic() + seconds
while sent < count and time.monotonic() < deadline:
    if sent % 5 == 4:
        data = rng.randbytes(rng.randrange(1, 300))
    else:
        data = json.dumps({"version": 1, "id": sent, "command": rng.choice(commands)}).encode()
    try:
        sock.sendto(data, path)
        sent += 1
    except BlockingIOError:
        time.sleep(0.0002)
    except OSError:
        break
print(sent, flush=True)
"""


def flood_while_the_network_changes(target: Target, flooders: int, count: int,
                                    seconds: float, changes: int) -> list[float]:
    """Flooders (processes in the namespace, one of them connected to the
    socket and never reading) hammer the control socket while addresses
    come and go; returns how long each address took to become an endpoint."""
    procs: list[subprocess.Popen[str]] = []
    for i in range(flooders):
        mode = "connected" if i == 0 else "unconnected"
        procs.append(target.ns.popen([sys.executable, "-c", FLOODER, target.socket, str(count),
                                      str(seconds), mode], stdout=subprocess.PIPE, text=True))
    latencies = []
    try:
        time.sleep(0.5)
        for i in range(changes):
            address = f"192.0.2.{100 + i}"
            added = time.monotonic()
            target.ns.ip("addr", "add", f"{address}/24", "dev", "eth0")
            wait_for(lambda a=address: any(e["address"] == a for e in target.ns.endpoints()),
                     timeout=10, what=f"endpoint {address} during the flood")
            latencies.append(time.monotonic() - added)
            target.ns.ip("addr", "del", f"{address}/24", "dev", "eth0")
            wait_for(lambda a=address: all(e["address"] != a for e in target.ns.endpoints()),
                     timeout=10, what=f"endpoint {address} gone during the flood")
        sent = [int(p.communicate(timeout=seconds + 60)[0]) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert min(sent) > 0
    print(f"flood: {sum(sent)} datagrams from {flooders} clients; address -> endpoint "
          f"during it: max {max(latencies) * 1000:.0f} ms")
    return latencies


def test_a_flood_of_requests_leaves_the_daemon_serving_and_unchanged(target: Target) -> None:
    before = target.snapshot()
    rss_before = target.rss()
    latencies = flood_while_the_network_changes(target, flooders=3, count=20_000,
                                                seconds=10, changes=5)
    # The path manager kept working during the flood.
    assert max(latencies) < 2.0, latencies
    target.assert_unharmed(before, rss_before, network_changed=True)
    control = json.loads(target.ctl_ok("--json", "status"))["control"]
    print("control counters after the flood:", json.dumps(control))
    assert control["errors"]["malformed"] > 0 and control["errors"]["unknown_command"] > 0


@pytest.mark.long
def test_a_long_flood_of_requests_leaves_the_daemon_serving_and_unchanged(
        target: Target) -> None:
    before = target.snapshot()
    rss_before = target.rss()
    latencies = flood_while_the_network_changes(target, flooders=6, count=400_000,
                                                seconds=60, changes=40)
    assert max(latencies) < 2.0, latencies
    target.assert_unharmed(before, rss_before, network_changed=True)


def test_wrong_version_and_truncated_requests_from_ctl_level_clients_are_explained(
        target: Target) -> None:
    """What a client of another version, or a broken one, is told."""
    sock = target.client()
    sock.settimeout(10)
    try:
        sock.send(b'{"version": 2, "id": 5, "command": "status"}')
        reply = json.loads(sock.recv(65536))
        assert reply == {"version": 1, "id": 5, "ok": False, "error": {
            "code": "unsupported_version",
            "message": "protocol version 2 is not supported (this daemon speaks version 1)",
            "details": {"supported": [1]}}}
        sock.send(b'{"version": 1, "id": 6, "comm')
        reply = json.loads(sock.recv(65536))
        assert reply["id"] is None and reply["error"]["code"] == "malformed"
        assert reply["error"]["message"].startswith("request is not JSON: ")
    finally:
        sock.close()

