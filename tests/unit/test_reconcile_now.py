"""``reconcile_now`` (what a reload waits on) returns when its pass has run,
with the pass's KernelError when it failed: it does not wait for the next
pass that succeeds (up to ``reconcile_interval`` later). The kernel does not
refuse a pass on demand: a fake reconciler does."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py.config import parse_config
from mptcpd_py.core import Core
from mptcpd_py.endpoints import PassResult
from mptcpd_py.errors import KernelError
from mptcpd_py.netlink.types import Capabilities


class Log:
    def __getattr__(self, level: str) -> Any:
        return lambda *args, **kwargs: None

    def bind(self, **fields: Any) -> Log:
        return self


class FailingReconciler:
    """Refuses the passes while ``failing``; owns nothing."""

    owned: dict[Any, Any] = {}

    def __init__(self) -> None:
        self.failing = True
        self.last_plan = PassResult().plan

    async def reconcile(self, desired: Any, **kwargs: Any) -> PassResult:
        if self.failing:
            raise KernelError(errno.ENOBUFS, "injected", "dump endpoints")
        return PassResult()

    def contested(self) -> frozenset[Any]:
        return frozenset()


class NoRouting:
    async def reconcile(self, wanted: Any, *, verify: bool = False) -> None:
        return None


async def test_a_failed_pass_ends_the_wait_of_reconcile_now_with_its_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An hour between periodic passes: only the requested one can end the wait.
    config = parse_config(f'[daemon]\nstate_dir = "{tmp_path}"\nplugins = []\n'
                          "reconcile_interval = 3600\n", "t.toml", {})
    core = Core(config, {}, log=Log())
    # No sysctl of this (the host's) namespace is read for the check either.
    monkeypatch.setattr(core, "_check_kernel_settings", lambda: None)
    core.caps = Capabilities(mptcp_enabled=True, family_present=True, path_manager="kernel")
    reconciler = FailingReconciler()
    core.reconciler = reconciler  # type: ignore[assignment]
    core.routing = NoRouting()  # type: ignore[assignment]
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
