"""Plugin hooks are timed and contained, whatever the hook does: a hook
that swallows exceptions while it hangs, an async hook that blocks the
event loop instead of awaiting, one that awaits forever."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from recording_log import RecordingLog as Log

from mptcpd_py.plugin import Plugin, PluginState
from mptcpd_py.plugins_host import FAILED, PluginHost

TIMEOUT = 0.2




@pytest.fixture
def host() -> Iterator[PluginHost]:
    """A PluginHost; its SIGALRM handler is put back as it was afterwards
    (pytest-timeout uses the same signal)."""
    previous = signal.getsignal(signal.SIGALRM)
    made = PluginHost(TIMEOUT, 5, Log())
    yield made
    made.close()
    signal.signal(signal.SIGALRM, previous)


def state_of(plugin_cls: type[Plugin]) -> PluginState:
    return PluginState(plugin_cls({}, Log()), "test", hooks=("endpoints",))


class SwallowsExceptions(Plugin):
    name = "swallows"

    def endpoints(self, net: Any, proposed: Any) -> Any:
        while True:
            try:  # noqa: SIM105 (the point: a hook that swallows every Exception)
                time.sleep(0.01)
            except Exception:
                pass


class BlocksTheLoop(Plugin):
    name = "blocks"

    async def endpoints(self, net: Any, proposed: Any) -> Any:  # type: ignore[override]
        time.sleep(5)  # the point: blocking inside async
        return proposed


class AwaitsForever(Plugin):
    name = "awaits"

    async def endpoints(self, net: Any, proposed: Any) -> Any:  # type: ignore[override]
        await asyncio.sleep(3600)


class SlowButInTime(Plugin):
    name = "slow"

    async def endpoints(self, net: Any, proposed: Any) -> Any:  # type: ignore[override]
        await asyncio.sleep(TIMEOUT / 4)
        time.sleep(TIMEOUT / 4)
        return ["kept"]


@pytest.mark.parametrize("plugin_cls", [SwallowsExceptions, BlocksTheLoop, AwaitsForever])
async def test_a_hanging_hook_is_stopped_at_its_timeout_whatever_it_does(
        host: PluginHost, plugin_cls: type[Plugin]) -> None:
    state = state_of(plugin_cls)
    started = time.monotonic()
    assert await host.call(state, "endpoints", None, ()) is FAILED
    assert time.monotonic() - started < TIMEOUT + 0.5
    assert state.last_error == f"hook endpoints took longer than {TIMEOUT:g}s"


async def test_a_slow_hook_within_its_time_is_not_a_failure(host: PluginHost) -> None:
    state = state_of(SlowButInTime)
    assert await host.call(state, "endpoints", None, (), materialize=True) == ["kept"]
    assert state.failures == 0
