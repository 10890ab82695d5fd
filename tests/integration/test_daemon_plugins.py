"""Plugins dropped in plugin_dirs: loaded like shipped ones, refused when
unsafe, contained when they misbehave."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from mptcpd_py.lab import Lab, Netns, daemon_config, wait_for

ROOT = Path(__file__).resolve().parents[2]


def example_plugin_source() -> str:
    """The complete example of docs/plugins.md, as the docs show it."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (source,) = [b for b in blocks if "class PreferWired" in b]
    return source


@pytest.fixture
def box(lab: Lab) -> Netns:
    ns = lab.netns("plug")
    for name, addr in (("eth0", "192.0.2.1/24"), ("wlan0", "198.51.100.1/24")):
        ns.stub_link(name)
        ns.ip("addr", "add", addr, "dev", name)
    return ns


def flags(ns: Netns) -> dict[str, set[str]]:
    return {row["address"]: row["flags"] for row in ns.endpoints()}


def write_plugin(directory: Path, name: str, source: str, mode: int = 0o644) -> Path:
    directory.mkdir(mode=0o755, exist_ok=True)
    os.chmod(directory, 0o755)
    path = directory / name
    path.write_text(source)
    os.chmod(path, mode)
    return path


def test_documented_example_plugin_loads_from_a_dropin_dir_and_acts(
        box: Netns, daemons, tmp_path: Path) -> None:
    plugdir = tmp_path / "plugins.d"
    write_plugin(plugdir, "prefer_wired.py", example_plugin_source())
    cfg = daemon_config(str(tmp_path / "state"), plugins=["addr_adv", "prefer_wired"],
                        plugin_dirs=[str(plugdir)])
    d = daemons(box, cfg).start()
    wait_for(lambda: flags(box).get("198.51.100.1") == {"subflow", "backup"}, what="backup")
    assert flags(box)["192.0.2.1"] == {"subflow"}
    d.wait_log("plugin enabled", plugin="prefer_wired", origin=str(plugdir / "prefer_wired.py"))
    box.ip("link", "set", "eth0", "down")  # cable out: Wi-Fi is no longer a backup
    wait_for(lambda: flags(box).get("198.51.100.1") == {"subflow"}, what="backup dropped")
    assert d.stop() == 0


def test_group_writable_or_foreign_owned_plugin_files_are_refused(
        box: Netns, daemons, tmp_path: Path) -> None:
    plugdir = tmp_path / "plugins.d"
    write_plugin(plugdir, "prefer_wired.py", example_plugin_source(), mode=0o664)
    other = write_plugin(plugdir, "other.py", example_plugin_source().replace(
        '"prefer_wired"', '"other_owner"'))
    os.chown(other, 65534, 65534)
    cfg = daemon_config(str(tmp_path / "state"), plugins=["addr_adv"],
                        plugin_dirs=[str(plugdir)])
    d = daemons(box, cfg).start()
    line = d.wait_log("plugin not loaded")
    errors = " ".join(e["error"] for e in d.logs() if e["event"] == "plugin not loaded")
    assert f"{plugdir}/prefer_wired.py: refused: writable by group (mode 0664)" in errors
    assert f"{plugdir}/other.py: refused: owned by uid 65534, not root" in errors
    assert line["level"] == "error"
    wait_for(lambda: "192.0.2.1" in flags(box))  # the daemon serves on
    assert d.stop() == 0


FAULTY = {
    "raises": """
from mptcpd_py.plugin import Plugin
class Raises(Plugin):
    name = "raises"
    def endpoints(self, net, proposed):
        raise RuntimeError("boom")
""",
    "hangs": """
import time
from mptcpd_py.plugin import Plugin
class Hangs(Plugin):
    name = "hangs"
    def endpoints(self, net, proposed):
        while True:
            time.sleep(0.01)
""",
    "nonsense": """
from mptcpd_py.plugin import Plugin
class Nonsense(Plugin):
    name = "nonsense"
    def endpoints(self, net, proposed):
        return ["not an intent", 42]
""",
    "syntax": "def broken(:\n",
    "missing_import": "import no_such_module_xyz\n",
    "typo_hook": """
from mptcpd_py.plugin import Plugin
class Typo(Plugin):
    name = "typo_hook"
    def endpoint(self, net, proposed):
        return proposed
""",
    "bad_signature": """
from mptcpd_py.plugin import Plugin
class BadSig(Plugin):
    name = "bad_signature"
    def endpoints(self, net):
        return []
""",
}


# Hooks that hang in the ways SIGALRM alone does not stop; each records how
# long it really ran (its finally: runs when the daemon stops it).
HANGING_PRELUDE = """
import asyncio
import time
from mptcpd_py.plugin import Plugin

def record(name, started):
    with open("RAN_DIR/" + name, "a") as f:
        f.write(f"{time.monotonic() - started:.3f}\\n")
"""
HANGING = {
    "swallows": """
class Swallows(Plugin):
    name = "swallows"
    def endpoints(self, net, proposed):
        started = time.monotonic()
        try:
            while time.monotonic() < started + 30:
                try:
                    time.sleep(0.01)
                except Exception:
                    pass
        finally:
            record(self.name, started)
""",
    "blocks_async": """
class BlocksAsync(Plugin):
    name = "blocks_async"
    async def endpoints(self, net, proposed):
        started = time.monotonic()
        try:
            await asyncio.sleep(0)
            while time.monotonic() < started + 30:
                pass
        finally:
            record(self.name, started)
""",
    "awaits_forever": """
class AwaitsForever(Plugin):
    name = "awaits_forever"
    async def endpoints(self, net, proposed):
        started = time.monotonic()
        try:
            await asyncio.sleep(30)
        finally:
            record(self.name, started)
""",
}


def test_faulty_plugins_are_contained_and_disabled_while_the_others_go_on(
        box: Netns, daemons, tmp_path: Path) -> None:
    plugdir = tmp_path / "plugins.d"
    for name, source in FAULTY.items():
        write_plugin(plugdir, f"{name}.py", source)
    ran = tmp_path / "ran"
    ran.mkdir()
    for name, source in HANGING.items():
        write_plugin(plugdir, f"{name}.py",
                     HANGING_PRELUDE.replace("RAN_DIR", str(ran)) + source)
    cfg = daemon_config(str(tmp_path / "state"),
                        plugins=["raises", "hangs", *HANGING, "addr_adv", "nonsense"],
                        plugin_dirs=[str(plugdir)], plugin_timeout=0.2, plugin_max_failures=2,
                        reconcile_interval=0.3)
    d = daemons(box, cfg).start()
    wait_for(lambda: {"192.0.2.1", "198.51.100.1"} <= set(flags(box)), what="endpoints")
    for name in ("raises", "hangs", *HANGING, "nonsense"):
        d.wait_log("plugin disabled", timeout=10, plugin=name)
    logs = d.logs()
    failures = " | ".join(e.get("error", "") for e in logs if e["event"] == "plugin failed")
    assert "hook endpoints raised RuntimeError: boom" in failures
    for name in ("hangs", *HANGING):
        errors = [e["error"] for e in logs if e["event"] == "plugin failed"
                  and e["plugin"] == name]
        assert errors == ["hook endpoints took longer than 0.2s"] * 2, (name, errors)
    for name in HANGING:  # stopped at about the timeout, not when they gave up
        ran_for = [float(x) for x in (ran / name).read_text().split()]
        assert len(ran_for) == 2 and max(ran_for) < 0.2 + 0.3, (name, ran_for)
    assert "invalid result: returned str, not EndpointIntent" in failures
    not_loaded = " | ".join(e["error"] for e in logs if e["event"] == "plugin not loaded")
    assert f"{plugdir}/syntax.py:1: syntax error" in not_loaded
    assert "missing_import.py: import failed: ModuleNotFoundError" in not_loaded
    assert "plugin typo_hook" in not_loaded and "unknown hook 'endpoint'" in not_loaded
    assert "hook endpoints(self, net) does not match the specification " \
           "endpoints(self, net, proposed)" in not_loaded
    assert not any("Traceback" in line for line in d.log_text().splitlines())
    box.ip("addr", "add", "192.0.2.50/24", "dev", "eth0")  # still serving
    wait_for(lambda: "192.0.2.50" in flags(box), what="new endpoint after failures")
    d.send(signal.SIGTERM)
    assert d.proc.wait(timeout=20) == 0


MORE_FAULTY = {
    # Slow but within plugin_timeout: not a failure, and its decision holds.
    "slow": """
import time
from mptcpd_py.plugin import EndpointFlags, Plugin
class Slow(Plugin):
    name = "slow"
    def endpoints(self, net, proposed):
        time.sleep(0.1)
        return [p.with_flags(p.flags | EndpointFlags.BACKUP) if str(p.address) == "198.51.100.1"
                else p for p in proposed]
""",
    # Hangs, and its blanket except swallows ordinary exceptions.
    "swallows": """
import time
from mptcpd_py.plugin import Plugin
class Swallows(Plugin):
    name = "swallows"
    def endpoints(self, net, proposed):
        while True:
            try:
                time.sleep(0.01)
            except Exception:
                pass
""",
    # An async hook that blocks the event loop instead of awaiting.
    "async_blocks": """
import time
from mptcpd_py.plugin import Plugin
class AsyncBlocks(Plugin):
    name = "async_blocks"
    async def endpoints(self, net, proposed):
        time.sleep(30)
        return proposed
""",
    "async_hangs": """
import asyncio
from mptcpd_py.plugin import Plugin
class AsyncHangs(Plugin):
    name = "async_hangs"
    async def endpoints(self, net, proposed):
        await asyncio.sleep(3600)
""",
    "exits": """
import sys
from mptcpd_py.plugin import Plugin
class Exits(Plugin):
    name = "exits"
    def endpoints(self, net, proposed):
        sys.exit(3)
""",
    # A different invalid decision on each call.
    "liar": """
import ipaddress
from mptcpd_py.plugin import EndpointFlags, EndpointIntent, Plugin
class Liar(Plugin):
    name = "liar"
    calls = 0
    def endpoints(self, net, proposed):
        self.calls += 1
        real = proposed[0]
        lies = [
            [EndpointIntent(ipaddress.ip_address("203.0.113.200"), 0, EndpointFlags.SUBFLOW)],
            [EndpointIntent(real.address, 999, EndpointFlags.SUBFLOW)],
            [real.with_flags(EndpointFlags.SIGNAL | EndpointFlags.FULLMESH)],
            [EndpointIntent(real.address, real.ifindex, EndpointFlags(4096))],
            [EndpointIntent(real.address, real.ifindex, EndpointFlags.SUBFLOW, port=70000)],
            None,
        ]
        return lies[(self.calls - 1) % len(lies)]
""",
    "init_fails": """
from mptcpd_py.plugin import Plugin
class InitFails(Plugin):
    name = "init_fails"
    def __init__(self, config, log):
        raise OSError("cannot open /dev/frobnicator")
""",
}


def test_slow_swallowing_blocking_exiting_and_lying_plugins_are_contained(
        box: Netns, daemons, tmp_path: Path) -> None:
    plugdir = tmp_path / "plugins.d"
    for name, source in MORE_FAULTY.items():
        write_plugin(plugdir, f"{name}.py", source)
    faulty = ["swallows", "async_blocks", "async_hangs", "exits", "liar"]
    cfg = daemon_config(str(tmp_path / "state"),
                        plugins=["addr_adv", *faulty, "slow", "init_fails"],
                        plugin_dirs=[str(plugdir)], plugin_timeout=0.3, plugin_max_failures=6,
                        reconcile_interval=0.3)
    d = daemons(box, cfg).start(timeout=30)
    wait_for(lambda: flags(box).get("198.51.100.1") == {"subflow", "backup"}, 10,
             what="the slow plugin's decision applied")
    for name in faulty:
        d.wait_log("plugin disabled", timeout=30, plugin=name)
    logs = d.logs()
    failures = [e for e in logs if e["event"] == "plugin failed"]
    by_plugin: dict[str, list[str]] = {}
    for e in failures:
        by_plugin.setdefault(e["plugin"], []).append(e["error"])
    assert "slow" not in by_plugin
    for name in ("swallows", "async_blocks", "async_hangs"):
        assert set(by_plugin[name]) == {"hook endpoints took longer than 0.3s"}, by_plugin[name]
    assert set(by_plugin["exits"]) == {"hook endpoints raised SystemExit: 3"}
    lies = " | ".join(by_plugin["liar"])
    for expected in ("endpoint 203.0.113.200: not an address of this host",
                     "not on interface index 999", "signal and fullmesh cannot be combined",
                     "invalid flags", "invalid port 70000", "returned None"):
        assert expected in lies, lies
    started = [e["error"] for e in logs if e["event"] == "plugin not started"]
    assert started == ["plugin init_fails: failed to start: OSError: cannot open "
                       "/dev/frobnicator"]
    assert not any("Traceback" in line for line in d.log_text().splitlines())
    box.ip("addr", "add", "192.0.2.50/24", "dev", "eth0")  # still serving, promptly
    added = time.monotonic()
    wait_for(lambda: "192.0.2.50" in flags(box), 2, what="new endpoint after failures")
    assert time.monotonic() - added < 1.0
    assert d.stop() == 0
