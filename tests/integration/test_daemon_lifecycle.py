"""The daemon stays responsive whatever a plugin hands it, and a stop is
never held up by a reload in progress."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py.lab import DaemonProcess, Lab, Netns, daemon_config, wait_for


@pytest.fixture
def box(lab: Lab) -> Netns:
    ns = lab.netns("life")
    ns.stub_link("eth0")
    ns.ip("addr", "add", "192.0.2.1/24", "dev", "eth0")
    return ns


def endpoints(ns: Netns) -> set[str]:
    return {row["address"] for row in ns.endpoints()}


def plugin_dir(tmp_path: Path, name: str, source: str) -> Path:
    directory = tmp_path / "plugins.d"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    (directory / f"{name}.py").write_text(source)
    os.chmod(directory / f"{name}.py", 0o644)
    return directory


def start_with_plugin(box: Netns, daemons: Any, tmp_path: Path, name: str,
                      source: str) -> DaemonProcess:
    """A daemon running addr_adv and the plugin ``name`` (from ``source``)."""
    plugdir = plugin_dir(tmp_path, name, source)
    cfg = daemon_config(str(tmp_path / "state"), plugins=["addr_adv", name],
                        plugin_dirs=[str(plugdir)])
    return daemons(box, cfg).start()


NUMBER_PRIORITY = '''
from dataclasses import replace
from mptcpd_py.plugin import Plugin

class Urgent(Plugin):
    """Puts IPv4 first, as the docs put it: a lower priority wins."""
    name = "urgent"

    def endpoints(self, net, proposed):
        return [replace(i, priority=0) if i.address.version == 4 else i for i in proposed]
'''

BAD_PRIORITY = '''
from dataclasses import replace
from mptcpd_py.plugin import Plugin

class Muddled(Plugin):
    """Hands the planner priorities it cannot sort."""
    name = "muddled"

    def endpoints(self, net, proposed):
        return [replace(i, priority=("high",)) for i in proposed]
'''


def test_a_plain_number_priority_sorts_with_the_shipped_ones(
        box: Netns, daemons, tmp_path: Path) -> None:
    box.ip("addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad")  # keeps a tuple
    d = start_with_plugin(box, daemons, tmp_path, "urgent", NUMBER_PRIORITY)
    wait_for(lambda: {"192.0.2.1", "2001:db8::1"} <= endpoints(box), what="existing")
    box.ip("addr", "add", "198.51.100.1/24", "dev", "eth0")  # an event-driven pass
    wait_for(lambda: "198.51.100.1" in endpoints(box), what="new address")
    assert d.stop() == 0
    assert d.errors() == []


def test_an_unsortable_priority_is_a_plugin_failure_not_a_dead_daemon(
        box: Netns, daemons, tmp_path: Path) -> None:
    d = start_with_plugin(box, daemons, tmp_path, "muddled", BAD_PRIORITY)
    line = d.wait_log("plugin failed", plugin="muddled")
    assert "invalid priority ('high',)" in line["error"]
    wait_for(lambda: "192.0.2.1" in endpoints(box), what="addr_adv's endpoint")
    box.ip("addr", "add", "198.51.100.1/24", "dev", "eth0")
    wait_for(lambda: "198.51.100.1" in endpoints(box), what="still reacting")
    assert d.stop() == 0


SLOW_RELOAD = '''
import asyncio
from mptcpd_py.plugin import Plugin

class Slow(Plugin):
    """Waits most of its time budget on every pass (the event loop stays
    free meanwhile: a hook that blocks it would hold up any signal)."""
    name = "slow"

    async def endpoints(self, net, proposed):
        await asyncio.sleep(0.6)
        return proposed
'''


def test_sigterm_during_a_reload_stops_without_waiting_for_it(
        box: Netns, daemons, tmp_path: Path) -> None:
    d = start_with_plugin(box, daemons, tmp_path, "slow", SLOW_RELOAD)
    wait_for(lambda: "192.0.2.1" in endpoints(box), what="endpoint")
    mark = len(d.messages)
    d.send(signal.SIGHUP)
    d.wait_notify("RELOADING=1", 10, after=mark)
    d.send(signal.SIGTERM)
    assert d.proc.wait(timeout=20) == 0
    events = [line["event"] for line in d.logs()]
    assert "reload interrupted by stop" in events
    assert "reloaded" not in events
    assert endpoints(box) == set()
