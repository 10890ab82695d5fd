"""A start that fails leaves the namespace as it found it: sysctls, limits,
endpoints and source routes the start had changed are taken back (even
with on_exit = "keep"), while what a previous daemon left for it to adopt
stays; and a control socket that cannot be made stops the start with exit
78 (not restarted) before the kernel is touched."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py.lab import DaemonProcess, Lab, Netns, daemon_config

ROOT = Path(__file__).resolve().parents[2]
PATH_MANAGER = "/proc/sys/net/mptcp/path_manager"
# A mount namespace of its own where net.mptcp.path_manager alone is
# read-only: the start gets past net.mptcp.enabled, then fails.
READ_ONLY_PATH_MANAGER = ["unshare", "--mount", "sh", "-c",
                          f"mount --bind {PATH_MANAGER} {PATH_MANAGER} && "
                          f'mount -o remount,bind,ro {PATH_MANAGER} && exec "$@"', "sh"]
# Runs the daemon (the arguments after PYTHON -m mptcpd_py) with the source
# routes' reconcile failing: by default a KernelError in the first pass,
# after its endpoints and their routes were added, which the kernel does not
# give on demand.
KERNEL_REFUSAL = 'KernelError(errno.ENOBUFS, "injected", "route dump")'
FAILING_FIRST_PASS = """
import errno, sys
sys.path.insert(0, {root!r})
from mptcpd_py.errors import KernelError, NetlinkError
from mptcpd_py.routing import SourceRouting

async def refuse(self, *args, **kwargs):
    raise {error}

SourceRouting.reconcile = refuse
from mptcpd_py.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture
def box(lab: Lab) -> Netns:
    """box: eth0 (192.0.2.1/24, gateway 192.0.2.254), MPTCP off, limits
    1/1; depends on ``lab``."""
    ns = lab.netns("start")
    ns.stub_link("eth0")
    ns.ip("addr", "add", "192.0.2.1/24", "dev", "eth0")
    ns.ip("route", "add", "default", "via", "192.0.2.254")
    ns.sysctl("net.mptcp.enabled", 0)
    ns.ip("mptcp", "limits", "set", "subflows", "1", "add_addr_accepted", "1")
    return ns


def refused_start(d: DaemonProcess, code: int) -> str:
    """The daemon exits by itself with ``code`` and one error line, never ready."""
    d.start(wait_ready=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=20) == code, d.log_text()
    d.close()
    errors = d.errors()
    assert len(errors) == 1, errors
    assert "Traceback" not in d.log_text()
    assert "READY=1" not in d.messages
    return str(errors[0]["error"])


def untouched(ns: Netns) -> dict[str, Any]:
    """What the daemon may change, as the box fixture left it."""
    return {"enabled": ns.read_sysctl("net.mptcp.enabled"),
            "path_manager": ns.read_sysctl("net.mptcp.path_manager"),
            "limits": ns.ip("mptcp", "limits", "show").split(),
            "endpoints": ns.ip("mptcp", "endpoint", "show"),
            "rules": [r for r in ns.ip_json("rule", "show") if r.get("priority") == 10000]}


def saved(state_dir: Path) -> dict[str, Any]:
    data = json.loads((state_dir / "state.json").read_text())
    return {key: data[key] for key in ("endpoints", "routes", "saved_limits",
                                       "saved_sysctls")}


NOTHING_SAVED = {"endpoints": [], "routes": [], "saved_limits": None, "saved_sysctls": {}}


def test_a_kernel_setting_refused_part_way_takes_back_the_ones_before_it(
        box: Netns, daemons: Any, tmp_path: Path) -> None:
    before = untouched(box)
    state = tmp_path / "state"
    cfg = daemon_config(str(state), plugins=["fullmesh"], on_exit="keep",
                        extra='[kernel]\npath_manager = "userspace"\n')
    d = daemons(box, cfg, prefix=READ_ONLY_PATH_MANAGER)
    assert refused_start(d, 78) == \
        "kernel.path_manager: cannot switch to userspace: Read-only file system"
    assert untouched(box) == before  # net.mptcp.enabled is 0 again
    assert saved(state) == NOTHING_SAVED


def failing_first_pass(tmp_path: Path, error: str = KERNEL_REFUSAL) -> list[str]:
    """The prefix that runs the daemon with its first pass failing with ``error``."""
    wrapper = tmp_path / "failing_first_pass.py"
    wrapper.write_text(FAILING_FIRST_PASS.format(root=str(ROOT), error=error))
    return [sys.executable, str(wrapper)]


@pytest.mark.parametrize(("error", "message"), [
    (KERNEL_REFUSAL, "route dump: kernel refused the request (injected)"),
    ('NetlinkError("injected: netlink socket closed")', "injected: netlink socket closed"),
])
def test_a_first_pass_that_fails_takes_back_endpoints_routes_limits_and_sysctls(
        box: Netns, daemons: Any, tmp_path: Path, error: str, message: str) -> None:
    before = untouched(box)
    state = tmp_path / "state"
    cfg = daemon_config(str(state), plugins=["addr_adv"], on_exit="keep",
                        extra="[kernel.limits]\nsubflows = 4\n")
    d = daemons(box, cfg, prefix=failing_first_pass(tmp_path, error))
    assert refused_start(d, 1) == message
    events = [line["event"] for line in d.logs()]
    # It had got that far: all of it is undone.
    for done in ("MPTCP enabled", "limits set", "endpoint added", "source route added",
                 "endpoint removed", "source route removed", "limits restored",
                 "sysctl restored"):
        assert done in events, done
    assert untouched(box) == before
    assert saved(state) == NOTHING_SAVED
    assert not (state / "control").exists()


def test_an_unexpected_exception_in_start_is_exit_1_and_takes_back_what_it_did(
        box: Netns, daemons: Any, tmp_path: Path) -> None:
    """A bug: said as one (with its traceback in the log), and the start is
    taken back as any other failed start, the control socket closed."""
    before = untouched(box)
    state = tmp_path / "state"
    cfg = daemon_config(str(state), plugins=["addr_adv"], on_exit="keep")
    d = daemons(box, cfg, prefix=failing_first_pass(tmp_path, 'RuntimeError("injected bug")'))
    d.start(wait_ready=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=20) == 1, d.log_text()
    d.close()
    assert [e["error"] for e in d.errors()] == ["internal error: RuntimeError: injected bug"]
    events = [line["event"] for line in d.logs()]
    for done in ("endpoint added", "endpoint removed", "source route removed",
                 "sysctl restored"):
        assert done in events, done
    assert untouched(box) == before
    assert saved(state) == NOTHING_SAVED
    assert not (state / "control").exists()


def test_a_failed_start_leaves_what_a_previous_daemon_left_for_it_to_adopt(
        box: Netns, daemons: Any, tmp_path: Path) -> None:
    """A daemon stopped with on_exit = "keep" leaves its endpoint, its source
    route and its record of net.mptcp.enabled's original for the next one.
    A next one whose first pass fails (exit 1: systemd starts another) takes
    back what it did itself (an endpoint and route for a new address, the
    limits), not what it inherited: that would close live subflows on each
    attempt."""
    before = untouched(box)
    state = tmp_path / "state"
    cfg = daemon_config(str(state), plugins=["addr_adv"], on_exit="keep")
    first = daemons(box, cfg, name="first").start()
    assert first.stop() == 0
    kept = saved(state)
    assert [e["address"] for e in kept["endpoints"]] == ["192.0.2.1"]
    assert [r["address"] for r in kept["routes"]] == ["192.0.2.1"]
    assert kept["saved_sysctls"] == {"enabled": "0"}
    kept_endpoints = box.ip("mptcp", "endpoint", "show")
    assert "192.0.2.1" in kept_endpoints
    box.stub_link("eth1")
    box.ip("addr", "add", "198.51.100.1/24", "dev", "eth1")
    box.ip("route", "add", "default", "via", "198.51.100.254", "metric", "200")
    second = daemons(box, cfg + "[kernel.limits]\nsubflows = 4\n", name="second",
                     prefix=failing_first_pass(tmp_path))
    assert refused_start(second, 1) == "route dump: kernel refused the request (injected)"
    logs = second.logs()
    added = [line["addr"] for line in logs if line["event"] == "endpoint added"]
    assert added == ["198.51.100.1"]
    assert [line["addr"] for line in logs if line["event"] == "endpoint removed"] == added
    # Inherited: the endpoint (same id), its rule, MPTCP enabled and the
    # record of the original; its own: the limits, put back.
    assert box.ip("mptcp", "endpoint", "show") == kept_endpoints
    assert [r["src"] for r in untouched(box)["rules"]] == ["192.0.2.1"]
    assert box.read_sysctl("net.mptcp.enabled") == "1"
    assert untouched(box)["limits"] == before["limits"]
    assert saved(state) == kept
    # The next start adopts all of it; its stop (on_exit = "remove") removes
    # and restores it: the namespace is as it was before the first.
    third = daemons(box, daemon_config(str(state), plugins=["addr_adv"]), name="third")
    third.start()
    assert third.stop() == 0
    box.ip("route", "del", "default", "via", "198.51.100.254")
    box.ip("link", "del", "eth1")
    assert untouched(box) == before



def test_a_control_socket_path_too_long_is_exit_78_before_the_kernel_is_touched(
        box: Netns, daemons: Any, tmp_path: Path) -> None:
    before = untouched(box)
    state = tmp_path / ("s" * (107 - len(str(tmp_path)) - len("/control")))
    assert len(str(state / "control")) == 108
    d = daemons(box, daemon_config(str(state)))
    error = refused_start(d, 78)
    assert error.endswith(f": daemon.state_dir: the control socket {state}/control would be "
                          "108 bytes long, more than a socket path takes (107)"), error
    assert untouched(box) == before


def test_a_control_group_without_cap_chown_is_exit_78_before_the_kernel_is_touched(
        box: Netns, daemons: Any, tmp_path: Path) -> None:
    before = untouched(box)
    state = tmp_path / "state"
    d = daemons(box, daemon_config(str(state), control_group="users"),
                prefix=["setpriv", "--inh-caps=-chown", "--bounding-set=-chown"])
    assert refused_start(d, 78) == (
        f"control socket {state}/control: cannot give it to group 'users': changing a "
        "file's group needs CAP_CHOWN (under systemd, add it with the drop-in in "
        "docs/service.md, 'control_group')")
    events = [line["event"] for line in d.logs()]
    assert "kernel probed" not in events  # refused before netlink, let alone endpoints
    assert untouched(box) == before
    assert not (state / "control").exists()
