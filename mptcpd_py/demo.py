"""``mptcpd-py demo``: Multipath TCP over shaped paths in network namespaces.

A client and a server namespace joined by three veth links shaped with tbf
(eth0 and wlan0 at --rate, a cellular wwan0 at a fifth of it). mptcpd-py
runs in the client namespace with the shipped configuration; one MPTCP
upload runs through four phases: both primary paths together, wlan0 down,
eth0 down too (the cellular backup carries the connection) and both back.
Everything is deleted at the end; the host namespace is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from mptcpd_py.lab import (
    BulkTransfer,
    DaemonProcess,
    Lab,
    LabError,
    Netns,
    sample_rates,
    shape,
    wait_for,
)
from mptcpd_py.netlink.diag import SockDiag

PATHS = (
    # client ifname, server ifname, client address, server address, rate factor
    ("eth0", "srv0", "192.0.2.1", "192.0.2.2", 1.0),
    ("wlan0", "srv1", "198.51.100.1", "198.51.100.2", 1.0),
    ("wwan0", "srv2", "203.0.113.1", "203.0.113.2", 0.2),
)
IFNAMES = tuple(p[0] for p in PATHS)

BOLD, DIM, GREEN, YELLOW, RED, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[33m", "\033[31m", \
    "\033[0m"


@dataclass
class Phase:
    name: str
    rates: dict[str, float]
    total: float
    stall: float | None = None
    alive: bool = True


class Screen:
    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()

    def c(self, code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if self.tty else text

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def live(self, sample: dict[str, float], scale: float) -> None:
        parts = []
        for name in IFNAMES:
            value = sample.get(name, 0.0)
            bar = "█" * round(8 * min(value, scale) / scale) if scale else ""
            parts.append(f"{name:<5} {bar:<8} {value:5.1f}")
        line = "   ".join(parts) + f"   total {sample['total']:6.1f} Mbit/s"
        if self.tty:
            print("\r      " + line + "   ", end="", flush=True)

    def end_live(self) -> None:
        if self.tty:
            print("\r" + " " * 110 + "\r", end="", flush=True)


def _config_text(state_dir: str) -> str:
    """The shipped configuration, with state in a temporary directory and
    no system plugin directory (the demo must not pick up local plugins)."""
    text = resources.files("mptcpd_py").joinpath("default.toml").read_text("utf-8")
    text = text.replace('state_dir = "/run/mptcpd-py"', f'state_dir = "{state_dir}"')
    text = text.replace('plugin_dirs = ["/etc/mptcpd-py/plugins.d"]', "plugin_dirs = []")
    # Three paths: after a failover the returning primary needs a third
    # extra subflow while the backup one is still up.
    return text.replace("[kernel.limits]                 # ip mptcp limits; an omitted key is "
                        "left as is\nsubflows = 2", "[kernel.limits]\nsubflows = 4")


def _default_route(path: int) -> tuple[str, ...]:
    """The client's default route over PATHS[path] (eth0 preferred)."""
    c_if, _s, _c, s_addr, _f = PATHS[path]
    return ("route", "replace", "default", "via", s_addr, "dev", c_if,
            "metric", str(100 * (path + 1)))


def _log_time(entry: dict[str, Any]) -> float:
    try:
        return datetime.datetime.fromisoformat(str(entry["timestamp"])).timestamp()
    except (KeyError, ValueError):
        return 0.0


class Demo:
    def __init__(self, rate: float, seconds: float, summary_path: str | None = None) -> None:
        self.rate = rate
        self.seconds = seconds
        self.summary_path = summary_path
        self.screen = Screen()
        self.phases: list[Phase] = []
        self.lab: Lab | None = None
        self.daemon: DaemonProcess | None = None
        self.transfer: BulkTransfer | None = None
        self.workdir = tempfile.mkdtemp(prefix="mptcpd-py-demo-")
        self.log_seen = 0

    # ---------------------------------------------------------------- building

    def build(self) -> tuple[Netns, Netns]:
        lab = self.lab = Lab("demo")
        client, server = lab.netns("client"), lab.netns("server")
        for c_if, s_if, c_addr, s_addr, factor in PATHS:
            lab.veth(client, c_if, server, s_if)
            client.ip("addr", "add", f"{c_addr}/24", "dev", c_if)
            server.ip("addr", "add", f"{s_addr}/24", "dev", s_if)
            shape(client, c_if, self.rate * factor)
            shape(server, s_if, self.rate * factor)
        for path in range(len(PATHS)):
            client.ip(*_default_route(path))
        server.ip("mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "8")
        return client, server

    def new_log(self) -> list[dict[str, Any]]:
        assert self.daemon is not None
        logs = self.daemon.logs()
        fresh, self.log_seen = logs[self.log_seen:], len(logs)
        return fresh

    def show_daemon_reaction(self, since: float) -> None:
        for entry in self.new_log():
            event = entry.get("event", "")
            if event not in ("endpoint added", "endpoint removed", "endpoint flags changed",
                             "endpoint re-added", "source route added",
                             "source route removed"):
                continue
            after = _log_time(entry) - since
            what = f"{event} {entry.get('addr')}"
            if entry.get("endpoint_id"):
                what += f" id {entry['endpoint_id']}"
            if entry.get("ifname"):
                what += f" on {entry['ifname']}"
            if entry.get("flags"):
                what += f" [{entry['flags']}]"
            timing = f"{after * 1000:6.1f} ms after the change" if 0 <= after < 60 else ""
            self.screen.say(f"      daemon: {what:<58} {self.screen.c(DIM, timing)}")

    def show_endpoints(self, client: Netns) -> None:
        rows = client.endpoints()
        self.screen.say(f"      {'id':>3}  {'address':<16} {'dev':<6} flags")
        for row in sorted(rows, key=lambda r: r.get("id", 0)):
            self.screen.say(f"      {row.get('id', ''):>3}  {row['address']:<16} "
                            f"{row.get('dev', ''):<6} {','.join(sorted(row['flags']))}")

    def show_subflows(self, client: Netns) -> None:
        async def dump() -> list[Any]:
            diag = SockDiag(client.name)
            try:
                return await diag.subflows()
            finally:
                diag.close()
        subflows = asyncio.run(dump())
        by_addr = {p[2]: p[0] for p in PATHS}
        for sub in sorted(subflows, key=lambda s: (s.local_id, str(s.local))):
            dev = by_addr.get(str(sub.local), "?")
            flag = " backup" if sub.backup else ""
            self.screen.say(f"      subflow {str(sub.local) + ':' + str(sub.local_port):<22} -> "
                            f"{sub.remote}:{sub.remote_port}  via {dev:<5} local id "
                            f"{sub.local_id}{flag}")

    def run_phase(self, name: str, seconds: float, client: Netns) -> Phase:
        assert self.transfer is not None
        self.transfer.reset_gap()
        samples = sample_rates(self.transfer, client, IFNAMES, seconds, interval=0.2,
                               on_sample=lambda s: self.screen.live(s, self.rate))
        self.screen.end_live()
        steady = samples[len(samples) // 3:] or samples
        rates = {n: sum(s[n] for s in steady) / len(steady) for n in IFNAMES}
        total = sum(s["total"] for s in steady) / len(steady)
        phase = Phase(name, rates, total, self.transfer.max_gap, self.transfer.alive())
        self.phases.append(phase)
        per = "  ".join(f"{n} {rates[n]:5.1f}" for n in IFNAMES)
        self.screen.say(f"      {per}   total {self.screen.c(BOLD, f'{total:.1f}')} Mbit/s")
        return phase

    def change(self, client: Netns, label: str, *commands: tuple[str, ...]) -> float:
        self.screen.say(f"      {self.screen.c(YELLOW, label)}")
        self.new_log()
        at = time.time()
        for cmd in commands:
            client.ip(*cmd)
        time.sleep(0.3)
        self.show_daemon_reaction(at)
        return at

    # ---------------------------------------------------------------- running

    def run(self) -> int:
        s = self.screen
        started = time.monotonic()
        s.say(s.c(BOLD, "mptcpd-py demo: Multipath TCP over shaped paths, in network namespaces"))
        client, server = self.build()
        s.say(f"  client namespace {client.name}  <->  server namespace {server.name}")
        for c_if, _s, c_addr, s_addr, factor in PATHS:
            kind = "cellular" if c_if.startswith("wwan") else "primary"
            s.say(f"    {c_if:<6} {c_addr:<13} -> {s_addr:<13} {self.rate * factor:5.1f} Mbit/s "
                  f"(tbf, {kind})")
        s.say(f"    the upload uses TCP {BulkTransfer.CONGESTION} (set on its socket; the host's "
              "default is not used)")

        s.say("\n" + s.c(BOLD, "[1/5] mptcpd-py starts in the client namespace"))
        s.say("      shipped configuration, except: state in a temporary directory, no "
              "plugin directory, [kernel.limits] subflows = 4 (three paths)")
        self.daemon = DaemonProcess(client, os.path.join(self.workdir, "daemon"),
                                    _config_text(os.path.join(self.workdir, "state")))
        ready = self.daemon.start(timeout=30).wait_notify("READY=1")
        wait_for(lambda: len(client.endpoints()) >= 3, timeout=5, what="endpoints")
        s.say(f"      ready (sd_notify READY=1) {ready * 1000:.0f} ms after exec; endpoints "
              "it created:")
        self.show_endpoints(client)
        rules = [" ".join(line.split()[1:]) for line in client.ip("rule", "show").splitlines()
                 if "lookup 10" in line]
        s.say("      source routing it set up: " + "; ".join(rules))
        self.new_log()

        s.say("\n" + s.c(BOLD, f"[2/5] one MPTCP upload over all paths ({self.seconds:g} s)"))
        self.transfer = BulkTransfer(client, server, PATHS[0][3]).start()
        wait_for(lambda: self.transfer is not None and self.transfer.received > 0, timeout=5)
        time.sleep(0.5)
        self.show_subflows(client)
        both = self.run_phase("eth0 + wlan0 (wwan0 backup)", self.seconds, client)
        s.say(f"      = {both.total / self.rate:.2f} x one path; the cellular backup stays idle")

        s.say("\n" + s.c(BOLD, "[3/5] wlan0 goes down"))
        self.change(client, "$ ip link set wlan0 down", ("link", "set", "wlan0", "down"))
        one = self.run_phase("wlan0 down", self.seconds * 0.7, client)
        s.say(f"      connection {'alive' if one.alive else 'LOST'}; longest stall "
              f"{one.stall or 0:.3f} s")

        s.say("\n" + s.c(BOLD, "[4/5] cellular backup: eth0 goes down too"))
        self.change(client, "$ ip link set eth0 down", ("link", "set", "eth0", "down"))
        cell = self.run_phase("only wwan0 (backup)", self.seconds * 0.7, client)
        s.say(f"      connection {'alive' if cell.alive else 'LOST'} on the backup; longest "
              f"stall {cell.stall or 0:.3f} s")
        # Setting a link down deleted its IPv4 routes: put the default
        # routes back as DHCP (or NetworkManager) would once it is up.
        links_back: list[tuple[str, ...]] = [("link", "set", "eth0", "up"),
                                             ("link", "set", "wlan0", "up")]
        self.change(client, "$ ip link set eth0 up; ip link set wlan0 up; ip route add default "
                    "via 192.0.2.2 / 198.51.100.2 (as DHCP would)",
                    *links_back, *(_default_route(i) for i in (0, 1)))
        back = self.run_phase("eth0 + wlan0 back", self.seconds, client)
        s.say(f"      traffic back on the primary paths; wwan0 carries "
              f"{back.rates['wwan0']:.1f} Mbit/s")
        self.show_subflows(client)

        s.say("\n" + s.c(BOLD, "[5/5] summary (Mbit/s, steady state of each phase)"))
        header = f"      {'phase':<30}" + "".join(f"{n:>8}" for n in IFNAMES) + \
            f"{'total':>9}{'stall':>9}  connection"
        s.say(header)
        for p in self.phases:
            gap = f"{p.stall:.3f}s" if p.stall is not None else "-"
            s.say(f"      {p.name:<30}" + "".join(f"{p.rates[n]:8.1f}" for n in IFNAMES)
                  + f"{p.total:9.1f}{gap:>9}  {'alive' if p.alive else 'LOST'}")
        gain = both.total / one.total if one.total else 0.0
        stall = max(p.stall or 0.0 for p in self.phases)
        ok = all(p.alive for p in self.phases) and gain >= 1.8
        verdict = s.c(GREEN, "OK") if ok else s.c(RED, "UNEXPECTED")
        if self.summary_path:
            with open(self.summary_path, "w") as f:
                json.dump({"gain": gain, "longest_stall": stall, "ok": ok,
                           "phases": [asdict(p) for p in self.phases]}, f, indent=1)
        s.say(f"\n      two paths give {gain:.2f} x one path's throughput; longest stall "
              f"{stall:.3f} s; the connection survived every change: {verdict}")
        self.transfer.stop()
        code = self.daemon.stop()
        s.say(f"      daemon stopped (exit {code}); endpoints left: "
              f"{len(client.endpoints())}; total {time.monotonic() - started:.1f} s")
        return 0 if ok and code == 0 else 1

    def cleanup(self) -> None:
        if self.transfer is not None:
            self.transfer.stop()
        if self.daemon is not None and self.daemon.proc is not None and \
                self.daemon.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.daemon.stop(timeout=10)
        if self.lab is not None:
            self.lab.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def run_demo(rate: float = 50.0, seconds: float = 5.0, summary_path: str | None = None) -> int:
    if os.geteuid() != 0:
        print("mptcpd-py demo: run as root (it creates network namespaces)", file=sys.stderr)
        return 77
    if not os.path.exists("/proc/sys/net/mptcp"):
        print("mptcpd-py demo: this kernel has no MPTCP", file=sys.stderr)
        return 69
    demo = Demo(rate, seconds, summary_path)
    try:
        return demo.run()
    except (LabError, TimeoutError) as exc:
        print(f"\nmptcpd-py demo: {exc}", file=sys.stderr)
        return 1
    finally:
        demo.cleanup()
        print("      namespaces deleted; the host namespace was not touched")
