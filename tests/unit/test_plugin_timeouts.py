"""Plugin hook containment: a hook that hangs, in any of the ways a plugin
can hang, is stopped at about its timeout and counted as a failure, and the
timer never interrupts anything but plugin code."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from typing import Any

import pytest

from mptcpd_py.plugin import Plugin, PluginState
from mptcpd_py.plugins_host import FAILED, PluginHost

TIMEOUT = 0.2
# A stopped hook returns within its timeout plus this (re-fire interval,
# scheduling on a loaded 2-core machine); a hook that is not stopped runs
# for HANG seconds, far beyond it.
SLACK = 0.4
HANG = 3.0


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def error(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


def _host(timeout: float = TIMEOUT, max_failures: int = 2) -> PluginHost:
    return PluginHost(timeout, max_failures, _Log())


def _state(hook: Any) -> PluginState:
    cls = type("Hooked", (Plugin,), {"name": "hooked", "connection_created": hook})
    return PluginState(cls({}, None), "test", hooks=("connection_created",))


async def _timed_call(host: PluginHost, state: PluginState) -> tuple[Any, float]:
    started = time.monotonic()
    result = await host.call(state, "connection_created", None)
    return result, time.monotonic() - started


def _spin(seconds: float) -> None:
    """Busy Python code (the kind a signal interrupts between bytecodes)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _assert_disarmed() -> None:
    """No timer left behind, and no alarm pending that would raise in the
    core (here) a moment later."""
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    _spin(0.01)


def sync_swallowing_exception(self: Any, ctx: Any) -> None:
    end = time.monotonic() + HANG
    while time.monotonic() < end:
        try:  # noqa: SIM105 (written the way plugins write it)
            time.sleep(0.005)
        except Exception:  # the timeout must not be an Exception
            pass


def sync_swallowing_the_first_timeout(self: Any, ctx: Any) -> None:
    end = time.monotonic() + HANG
    try:
        while time.monotonic() < end:
            time.sleep(0.005)
    except BaseException:  # a bare except: only the next alarm can stop it
        pass
    while time.monotonic() < end:
        try:  # noqa: SIM105
            _spin(0.005)
        except Exception:
            pass


async def async_blocking_at_once(self: Any, ctx: Any) -> None:
    _spin(HANG)


async def async_blocking_after_an_await(self: Any, ctx: Any) -> None:
    await asyncio.sleep(0.01)
    end = time.monotonic() + HANG
    while time.monotonic() < end:
        try:  # noqa: SIM105
            time.sleep(0.005)
        except Exception:
            pass


async def async_awaiting_forever(self: Any, ctx: Any) -> None:
    await asyncio.Event().wait()


async def async_ignoring_its_cancellation(self: Any, ctx: Any) -> None:
    end = time.monotonic() + HANG
    while time.monotonic() < end:
        try:  # noqa: SIM105
            await asyncio.sleep(HANG)
        except asyncio.CancelledError:
            pass


@pytest.mark.parametrize("hook", [
    sync_swallowing_exception,
    sync_swallowing_the_first_timeout,
    async_blocking_at_once,
    async_blocking_after_an_await,
    async_awaiting_forever,
    async_ignoring_its_cancellation,
], ids=lambda f: f.__name__)
async def test_a_hanging_hook_is_stopped_at_its_timeout_and_counted_as_a_failure(
        hook: Any) -> None:
    host = _host()
    state = _state(hook)
    try:
        result, elapsed = await _timed_call(host, state)
        assert result is FAILED
        assert elapsed < TIMEOUT + SLACK, f"the hook ran {elapsed:.2f}s"
        assert state.failures == 1
        assert state.last_error == f"hook connection_created took longer than {TIMEOUT:g}s"
        _assert_disarmed()
        result, _ = await _timed_call(host, state)
        assert result is FAILED and not state.enabled  # max_failures = 2
    finally:
        host.close()


async def test_a_hook_that_finishes_in_time_succeeds_and_leaves_no_timer_behind() -> None:
    async def quick_async(self: Any, ctx: Any) -> str:
        await asyncio.sleep(0.01)
        return "async done"

    host = _host()
    try:
        assert await host.call(_state(lambda self, ctx: "done"), "connection_created",
                               None) == "done"
        _assert_disarmed()
        assert await host.call(_state(quick_async), "connection_created", None) == "async done"
        _assert_disarmed()
    finally:
        host.close()


async def test_the_alarm_never_fires_in_another_task_while_an_async_hook_awaits() -> None:
    """The hook is suspended (not running) while another task blocks the
    loop past the hook's deadline: that task must not be interrupted."""
    async def sleeps(self: Any, ctx: Any) -> str:
        await asyncio.sleep(0.05)
        return "slept"

    async def blocks_the_loop() -> float:
        await asyncio.sleep(0.01)  # the hook is suspended now
        started = time.monotonic()
        _spin(TIMEOUT * 2)
        return time.monotonic() - started

    host = _host()
    try:
        other = asyncio.create_task(blocks_the_loop())
        await host.call(_state(sleeps), "connection_created", None)
        assert await other >= TIMEOUT * 2  # ran to its end: never interrupted
        _assert_disarmed()
    finally:
        host.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_hook_ending_right_at_its_deadline_never_leaks_the_timeout_into_the_core(
        kind: str) -> None:
    """Hooks that end a hair before or after their deadline, many times: the
    alarm raises inside the hook or not at all, never after call() returns."""
    timeout = 0.004
    rng = random.Random(7)

    def near_deadline(self: Any, ctx: Any) -> str:
        _spin(timeout * rng.uniform(0.8, 1.2))
        return "done"

    async def near_deadline_async(self: Any, ctx: Any) -> str:
        await asyncio.sleep(0)
        _spin(timeout * rng.uniform(0.8, 1.2))
        return "done"

    host = PluginHost(timeout, 10**6, _Log())
    state = _state(near_deadline if kind == "sync" else near_deadline_async)
    outcomes = set()
    try:
        for _ in range(150):
            result = await host.call(state, "connection_created", None)
            outcomes.add("failed" if result is FAILED else result)
            _assert_disarmed()
    finally:
        host.close()
    assert outcomes == {"done", "failed"}, outcomes  # both sides of the deadline were hit
