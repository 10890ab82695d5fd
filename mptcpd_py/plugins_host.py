"""Calling plugin hooks safely: every call timed, every failure contained.

A hook that raises, hangs past ``plugin_timeout`` or returns nonsense is
logged and counted; after ``plugin_max_failures`` consecutive failures the
plugin is disabled (the others go on). A synchronous hook that hangs is
interrupted with SIGALRM (pure-Python loops and sleeps stop at once), and
so is each step of an async hook (one that calls ``time.sleep`` instead of
awaiting would otherwise stall the whole event loop); an async hook that
awaits too long is cancelled. The interruption is a BaseException, so a
hook's own ``except Exception`` cannot swallow it, and it repeats while the
hook runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Iterator, Sequence
from typing import Any

from mptcpd_py.loader import Available
from mptcpd_py.plugin import Plugin, PluginState


class PluginTimeout(BaseException):
    """Raised inside a plugin hook that ran past its time (a BaseException,
    like KeyboardInterrupt: a plugin's ``except Exception`` lets it through)."""


FAILED = object()
#: after the first interruption, again every so often while the hook runs on
ALARM_REPEAT = 0.05


class PluginHost:
    def __init__(self, timeout: float, max_failures: int, log: Any,
                 on_failure: Callable[[PluginState, str], None] | None = None) -> None:
        self.timeout = timeout
        self.max_failures = max_failures
        self.log = log
        self.states: list[PluginState] = []
        self.on_failure = on_failure
        self._armed = False
        self._use_alarm = threading.current_thread() is threading.main_thread()
        if self._use_alarm:
            signal.signal(signal.SIGALRM, self._on_alarm)

    def _on_alarm(self, _signum: int, _frame: Any) -> None:
        if self._armed:
            raise PluginTimeout()

    @contextlib.contextmanager
    def _alarm(self, seconds: float) -> Iterator[None]:
        """SIGALRM in ``seconds`` (then every ALARM_REPEAT) while the block runs."""
        if not self._use_alarm:
            yield
            return
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001), ALARM_REPEAT)
        try:
            yield
        finally:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def instantiate(self, enabled: Sequence[str], available: dict[str, Available],
                    configs: Any, make_log: Callable[[str], Any]) -> list[str]:
        """Create the enabled plugins in order; returns one line per failure."""
        problems = []
        states = []
        for name in enabled:
            found = available.get(name)
            if found is None:
                problems.append(f"plugin {name}: not available")
                continue
            try:
                plugin = found.cls(configs(name), make_log(name))
            except Exception as exc:
                problems.append(f"plugin {name}: failed to start: {type(exc).__name__}: {exc}")
                continue
            if plugin.name != name:
                problems.append(f"plugin {name}: instance renamed itself to {plugin.name!r}")
                continue
            states.append(PluginState(plugin, found.origin, hooks=found.cls.implemented_hooks()))
        self.states = states
        return problems

    def implementing(self, hook: str) -> list[PluginState]:
        return [s for s in self.states if s.enabled and hook in s.hooks]

    async def call(self, state: PluginState, hook: str, *args: Any,
                   materialize: bool = False) -> Any:
        """Run one hook; returns its result, or FAILED (already logged)."""
        if not state.enabled:
            return FAILED
        state.calls += 1
        fn = getattr(state.plugin, hook)
        deadline = time.monotonic() + self.timeout
        try:
            result = self._timed(fn, args, materialize)
            if inspect.isawaitable(result):
                remaining = max(0.001, deadline - time.monotonic())
                if inspect.iscoroutine(result):
                    result = self._stepwise(result, deadline)
                result = await asyncio.wait_for(result, remaining)
                if materialize and result is not None:
                    result = list(result)
        except (TimeoutError, PluginTimeout):
            self.fail(state, hook, f"hook {hook} took longer than {self.timeout:g}s")
            return FAILED
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.fail(state, hook, f"hook {hook} raised {type(exc).__name__}: {exc}",
                      exc_info=exc)
            return FAILED
        return result

    @staticmethod
    def succeeded(state: PluginState) -> None:
        """The caller found the hook's result valid: the failure streak ends."""
        state.failures = 0

    def _timed(self, fn: Callable[..., Any], args: tuple[Any, ...], materialize: bool) -> Any:
        with self._alarm(self.timeout):
            result = fn(*args)
            if materialize and result is not None and not inspect.isawaitable(result):
                result = list(result)  # a generator runs here, under the timer too
            return result

    async def _stepwise(self, coro: Coroutine[Any, Any, Any], deadline: float) -> Any:
        """Await a hook's coroutine with each of its steps (the code between
        two awaits, run inside the event loop) under the alarm."""
        return await _Stepwise(self, coro, deadline)

    def fail(self, state: PluginState, hook: str, message: str,
             exc_info: BaseException | None = None) -> None:
        """Count a failure (also used by the core for invalid results)."""
        state.failures += 1
        state.total_failures += 1
        state.last_error = message
        self.log.error("plugin failed", plugin=state.name, hook=hook, error=message,
                       failures=state.failures, exc_info=exc_info)
        if self.on_failure is not None:
            self.on_failure(state, message)
        if state.failures >= self.max_failures and state.enabled:
            state.enabled = False
            state.disabled_reason = f"{state.failures} consecutive failures, last: {message}"
            self.log.error("plugin disabled", plugin=state.name,
                           reason=state.disabled_reason)

    def by_name(self, name: str) -> PluginState | None:
        for state in self.states:
            if state.name == name:
                return state
        return None

    def close(self) -> None:
        if self._use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)


class _Stepwise:
    """Drives a coroutine by hand, one ``send`` (or ``throw``) at a time,
    each under :meth:`PluginHost._alarm` for what is left of the deadline."""

    def __init__(self, host: PluginHost, coro: Coroutine[Any, Any, Any],
                 deadline: float) -> None:
        self.host = host
        self.coro = coro
        self.deadline = deadline

    def __await__(self) -> Generator[Any, Any, Any]:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                with self.host._alarm(self.deadline - time.monotonic()):
                    yielded = self.coro.send(value) if error is None else \
                        self.coro.throw(error)
            except StopIteration as stop:
                return stop.value
            except PluginTimeout:
                self.coro.close()
                raise
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # cancellation: let the hook clean up
                value, error = None, exc


__all__ = ["FAILED", "Plugin", "PluginHost", "PluginTimeout"]
