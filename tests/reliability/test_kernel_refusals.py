"""Kernel refusals: no CAP_NET_ADMIN, read-only sysctls (MPTCP disabled,
the userspace PM not selectable), limits above the maximum, a full
endpoint table, the path manager or MPTCP switched off behind the
daemon's back. Each is one clear line and an exit code that does not
restart (77, 78), or a logged action the daemon retries or stops
retrying for a reason it states; never a crash, never a loop of errors."""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py import kernel_settings
from mptcpd_py.config import KernelConfig, LimitsConfig
from mptcpd_py.errors import InvalidArgument
from mptcpd_py.kernel_settings import KernelSettingsError, apply_kernel_settings
from mptcpd_py.lab import (
    DaemonProcess,
    Lab,
    Netns,
    TwoPaths,
    close_connections,
    daemon_config,
    mptcp_listen,
    open_connections,
    subflows_by_token,
    wait_for,
)
from mptcpd_py.netlink.types import Capabilities, Limits
from mptcpd_py.state import StateStore

NO_NET_ADMIN = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
# A mount namespace of its own where /proc/sys is read-only (as under the
# hardened unit's ProtectKernelTunables=yes); the host's stays as it is.
READ_ONLY_SYSCTLS = ["unshare", "--mount", "sh", "-c",
                     "mount --bind /proc/sys /proc/sys && "
                     'mount -o remount,bind,ro /proc/sys && exec "$@"', "sh"]
USERSPACE = '[kernel]\npath_manager = "userspace"\n'


@pytest.fixture
def box(lab: Lab) -> Netns:
    """box: one namespace, eth0 (192.0.2.1/24) up; depends on ``lab``."""
    ns = lab.netns("refuse")
    ns.stub_link("eth0")
    ns.ip("addr", "add", "192.0.2.1/24", "dev", "eth0")
    return ns


def endpoints(ns: Netns) -> dict[str, dict[str, Any]]:
    return {row["address"]: row for row in ns.endpoints()}


def refused_start(d: DaemonProcess, code: int) -> str:
    """The daemon exits by itself, at once, with ``code`` and one error line."""
    d.start(wait_ready=False)
    assert d.proc is not None
    started = time.monotonic()
    assert d.proc.wait(timeout=20) == code, d.log_text()
    assert time.monotonic() - started < 10
    d.close()
    errors = d.errors()
    assert len(errors) == 1, errors
    assert "Traceback" not in d.log_text()
    assert "READY=1" not in d.messages
    return str(errors[0]["error"])


def test_without_cap_net_admin_start_is_refused_with_exit_77_and_one_line(
        box: Netns, daemons, tmp_path: Path) -> None:
    d = daemons(box, daemon_config(str(tmp_path / "state")), prefix=NO_NET_ADMIN)
    error = refused_start(d, 77)
    assert error == ("join mptcp_pm_events: permission denied (CAP_NET_ADMIN is needed in "
                     "this network namespace) (EPERM); run as root or with CAP_NET_ADMIN")
    assert endpoints(box) == {}


def test_read_only_sysctls_refuse_start_with_exit_78_naming_the_setting(
        box: Netns, daemons, tmp_path: Path) -> None:
    box.sysctl("net.mptcp.enabled", 0)
    d = daemons(box, daemon_config(str(tmp_path / "state")), name="enable",
                prefix=READ_ONLY_SYSCTLS)
    assert refused_start(d, 78) == \
        "kernel.enable_mptcp: cannot set net.mptcp.enabled=1: Read-only file system"
    assert box.read_sysctl("net.mptcp.enabled") == "0"

    box.sysctl("net.mptcp.enabled", 1)
    d = daemons(box, daemon_config(str(tmp_path / "state2"), plugins=["fullmesh"],
                                   extra=USERSPACE), name="userspace", prefix=READ_ONLY_SYSCTLS)
    assert refused_start(d, 78) == \
        "kernel.path_manager: cannot switch to userspace: Read-only file system"
    assert box.read_sysctl("net.mptcp.path_manager") == "kernel"
    assert endpoints(box) == {}


def test_mptcp_disabled_is_enabled_and_restored_or_left_off_with_a_warning(
        box: Netns, daemons, tmp_path: Path) -> None:
    box.sysctl("net.mptcp.enabled", 0)
    d = daemons(box, daemon_config(str(tmp_path / "state")), name="enables").start()
    assert box.read_sysctl("net.mptcp.enabled") == "1"
    assert d.stop() == 0
    assert box.read_sysctl("net.mptcp.enabled") == "0"  # as it found it

    cfg = daemon_config(str(tmp_path / "state"), reconcile_interval=0.2,
                        extra="[kernel]\nenable_mptcp = false\n")
    d = daemons(box, cfg, name="leaves").start()
    line = d.wait_log("MPTCP is disabled in this network namespace (net.mptcp.enabled = 0) "
                      "and kernel.enable_mptcp = false: endpoints are set up, but no "
                      "connection uses MPTCP until it is enabled")
    assert line["level"] == "warning"
    wait_for(lambda: "192.0.2.1" in endpoints(box), what="endpoint all the same")
    box.sysctl("net.mptcp.enabled", 1)
    d.wait_log("net.mptcp.enabled is as expected again")
    box.sysctl("net.mptcp.enabled", 0)  # and off again, behind its back
    d.wait_log("net.mptcp.enabled was changed by someone else; new connections are not "
               "handled as configured", value="0")
    time.sleep(0.6)  # three more periodic resyncs: said once, not on each
    changed = [e for e in d.logs() if e["event"].startswith("net.mptcp.enabled was changed")]
    assert len(changed) == 1
    assert d.errors() == []
    assert d.stop() == 0


def test_limits_above_the_maximum_are_refused_before_the_kernel_is_asked(
        box: Netns, daemons, tmp_path: Path) -> None:
    box.ip("mptcp", "limits", "set", "subflows", "1", "add_addr_accepted", "1")
    d = daemons(box, daemon_config(str(tmp_path / "state"),
                                   extra="[kernel.limits]\nsubflows = 9\n"))
    d.start(wait_ready=False)
    assert d.proc is not None and d.proc.wait(timeout=20) == 78
    (error,) = d.errors()
    assert error["error"].endswith(":6: kernel.limits.subflows: must be at most 8 (got 9)")
    assert box.ip("mptcp", "limits", "show").split() == \
        ["add_addr_accepted", "1", "subflows", "1"]


class RefusingLimits:
    """A kernel whose maximum is lower than ours (older or patched): its
    refusal of SET_LIMITS cannot be had from this kernel on demand."""

    async def get_limits(self) -> Limits:
        return Limits(2, 0)

    async def set_limits(self, subflows: int | None = None,
                         add_addr_accepted: int | None = None) -> None:
        raise InvalidArgument(errno.EINVAL, "limit greater than maximum (4)", "set limits")


class Log:
    def __getattr__(self, level: str) -> Any:
        return lambda *args, **kwargs: None


async def test_limits_the_kernel_refuses_are_a_one_line_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No kernel here, and no sysctl of this (the host's) namespace either.
    monkeypatch.setattr(kernel_settings, "read_mptcp_sysctl", lambda name: "1")
    monkeypatch.setattr(kernel_settings, "active_path_manager", lambda: "kernel")
    cfg = KernelConfig("kernel", True, LimitsConfig(subflows=8))
    caps = Capabilities(mptcp_enabled=True, family_present=True, path_manager="kernel",
                        available_path_managers=("kernel", "userspace"))
    store = StateStore(str(tmp_path))
    with pytest.raises(KernelSettingsError) as info:
        await apply_kernel_settings(cfg, caps, RefusingLimits(), store, Log())  # type: ignore[arg-type]
    assert str(info.value) == ("kernel.limits: set limits: invalid argument "
                               "(limit greater than maximum (4))")


def test_endpoint_table_filled_behind_the_daemons_back_is_logged_and_retried(
        box: Netns, daemons, tmp_path: Path) -> None:
    # The first periodic resync comes 2 s after start, long after the add below.
    d = daemons(box, daemon_config(str(tmp_path / "state"), reconcile_interval=2)).start()
    wait_for(lambda: "192.0.2.1" in endpoints(box))
    # The admin takes the 7 free slots; the kernel tells nobody.
    box.batch([f"mptcp endpoint add 203.0.113.{i} id {100 + i} signal" for i in range(1, 8)],
              force=False)
    box.ip("addr", "add", "192.0.2.2/24", "dev", "eth0")
    d.wait_log("endpoint waiting for a slot", addr="192.0.2.2")
    assert "192.0.2.2" not in endpoints(box)
    box.ip("mptcp", "endpoint", "delete", "id", "107")  # a slot frees up
    wait_for(lambda: "192.0.2.2" in endpoints(box), 5, what="added at the next resync")
    assert {a for a in endpoints(box) if not a.startswith("203.0.113.")} == \
        {"192.0.2.1", "192.0.2.2"}
    assert d.errors() == []
    # The add raced the admin (no resync in between): one warning, the reason in it.
    (refused,) = [e for e in d.logs() if e["event"] == "endpoint add failed"]
    assert refused["level"] == "warning" and refused["addr"] == "192.0.2.2"
    assert "endpoint table full" in refused["error"]
    assert d.stop() == 0


def test_userspace_pm_switched_off_behind_the_daemons_back_is_said_once_not_fought(
        lab: Lab, daemons, tmp_path: Path) -> None:
    tp = TwoPaths(lab)
    tp.server.ip("mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "0")
    cfg = daemon_config(str(tmp_path / "state"), plugins=["fullmesh"], reconcile_interval=0.3,
                        extra=USERSPACE)
    d = daemons(tp.client, cfg).start()
    listener = mptcp_listen(tp.server, "0.0.0.0")

    def meshed(pairs: list[Any]) -> int:
        ports = {p.client.getsockname()[1] for p in pairs}
        return sum(1 for subs in subflows_by_token(tp.client).values()
                   if any(s.local_port in ports for s in subs) and len(subs) == 2)

    before = open_connections(tp.client, listener, "192.0.2.2", 2)
    wait_for(lambda: meshed(before) == 2, 5, what="meshed by the daemon")
    tp.client.sysctl("net.mptcp.path_manager", "kernel")
    during = open_connections(tp.client, listener, "192.0.2.2", 3)
    d.wait_log("net.mptcp.path_manager was changed by someone else; new connections are not "
               "handled as configured", value="kernel")
    wait_for(lambda: len([e for e in d.logs() if e["event"].startswith(
        "connection is managed by the in-kernel path manager")]) == 3, 5,
        what="each kernel-managed connection said once")
    time.sleep(1.0)  # several more passes: no repetition, no retry loop
    logs = d.logs()
    assert len([e for e in logs if e["event"].startswith("connection is managed by")]) == 3
    assert not [e for e in logs if e["event"] == "create subflow failed"]
    tp.client.sysctl("net.mptcp.path_manager", "userspace")
    after = open_connections(tp.client, listener, "192.0.2.2", 2)
    wait_for(lambda: meshed(after) == 2, 5, what="meshed again once it is back")
    d.wait_log("net.mptcp.path_manager is as expected again")
    assert d.errors() == []
    for pairs in (before, during, after):
        close_connections(pairs)
    listener.close()
    assert d.stop() == 0
