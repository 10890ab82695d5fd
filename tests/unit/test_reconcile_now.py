"""``reconcile_now`` (what a reload waits on) returns when its pass has run,
with the error that ended that pass (a KernelError or a NetlinkError): it
does not wait for the next pass that succeeds (up to ``reconcile_interval``
later), nor report a later pass's outcome. The kernel does not refuse a
pass on demand: a fake reconciler does."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py.config import parse_config
from mptcpd_py.core import Core
from mptcpd_py.daemon import Daemon
from mptcpd_py.endpoints import PassResult
from mptcpd_py.errors import KernelError, NetlinkError
from mptcpd_py.netlink.types import Capabilities


class Log:
    def __getattr__(self, level: str) -> Any:
        return lambda *args, **kwargs: None

    def bind(self, **fields: Any) -> Log:
        return self


class FailingReconciler:
    """Refuses the passes with ``error`` while ``failing``; owns nothing."""

    owned: dict[Any, Any] = {}

    def __init__(self, error: Exception | None = None) -> None:
        self.failing = True
        self.error = error or KernelError(errno.ENOBUFS, "injected", "dump endpoints")
        self.last_plan = PassResult().plan

    async def reconcile(self, desired: Any, **kwargs: Any) -> PassResult:
        if self.failing:
            raise self.error
        return PassResult()

    def contested(self) -> frozenset[Any]:
        return frozenset()


class NoRouting:
    async def reconcile(self, wanted: Any, *, verify: bool = False) -> None:
        return None


def faked_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               reconciler: FailingReconciler) -> Core:
    # An hour between periodic passes: only the requested one can end the wait.
    config = parse_config(f'[daemon]\nstate_dir = "{tmp_path}"\nplugins = []\n'
                          "reconcile_interval = 3600\n", "t.toml", {})
    core = Core(config, {}, log=Log())
    # No sysctl of this (the host's) namespace is read for the check either.
    monkeypatch.setattr(core, "_check_kernel_settings", lambda: None)
    core.caps = Capabilities(mptcp_enabled=True, family_present=True, path_manager="kernel")
    core.reconciler = reconciler  # type: ignore[assignment]
    core.routing = NoRouting()  # type: ignore[assignment]
    return core


async def test_a_failed_pass_ends_the_wait_of_reconcile_now_with_its_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reconciler = FailingReconciler()
    core = faked_core(tmp_path, monkeypatch, reconciler)
    loop = asyncio.create_task(core._reconcile_loop())
    try:
        with pytest.raises(KernelError) as info:
            await asyncio.wait_for(core.reconcile_now("reload"), 10)
        assert str(info.value) == "dump endpoints: kernel refused the request (injected)"
        assert core.stats.last_error == str(info.value)
        reconciler.failing = False
        await asyncio.wait_for(core.reconcile_now("reload"), 10)  # no stale error
    finally:
        core._stopping = True
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
        core.close()


async def test_a_pass_ended_by_a_netlink_error_ends_the_wait_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reconciler = FailingReconciler(NetlinkError("netlink socket closed"))
    core = faked_core(tmp_path, monkeypatch, reconciler)
    loop = asyncio.create_task(core._reconcile_loop())
    try:
        with pytest.raises(NetlinkError, match="netlink socket closed"):
            await asyncio.wait_for(core.reconcile_now("reload"), 10)
    finally:
        core._stopping = True
        loop.cancel()
        with pytest.raises((asyncio.CancelledError, NetlinkError)):
            await loop  # the error ends this unsupervised loop
        core.close()


async def until_requested(core: Core) -> None:
    """Let reconcile_now run up to its wait (it requests its pass first)."""
    while not core._pass_requested:
        await asyncio.sleep(0)


@pytest.mark.parametrize("first_fails", [False, True])
async def test_reconcile_now_reports_its_own_pass_not_a_later_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_fails: bool) -> None:
    """Two passes finish before the waiter runs again (nothing in them
    yields): it reports the first, the one that included its request."""
    reconciler = FailingReconciler()
    core = faked_core(tmp_path, monkeypatch, reconciler)
    waiter = asyncio.create_task(core.reconcile_now("reload"))
    try:
        await asyncio.wait_for(until_requested(core), 10)
        for failing in (first_fails, not first_fails):
            reconciler.failing = failing
            with contextlib.suppress(KernelError):
                await core._reconcile_pass(full=True, reasons=["test"])
        assert core._passes == 2
        if first_fails:
            with pytest.raises(KernelError, match="injected"):
                await asyncio.wait_for(waiter, 10)
        else:
            await asyncio.wait_for(waiter, 10)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError, KernelError):
            await waiter
        core.close()


class NetlinkFailingCore:
    """What Daemon.reload uses of the core; the reload's pass ends with a
    NetlinkError (reconcile_now now raises it)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.log: Any = None

    async def reload(self, config: Any, available: Any) -> None:
        raise NetlinkError("netlink socket closed")

    def status_line(self) -> str:
        return "0 endpoints owned"


async def test_a_reload_whose_pass_ends_with_a_netlink_error_is_reported_as_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = tmp_path / "mptcpd.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\nplugins = []\n')
    daemon = Daemon(str(path))
    config = parse_config(path.read_text(), str(path), {})
    daemon.core = NetlinkFailingCore(config)  # type: ignore[assignment]
    outcome = await asyncio.wait_for(daemon.reload(), 10)
    assert (outcome.ok, outcome.error) == (False, "netlink socket closed")
