"""Calling plugin hooks safely: every call timed, every failure contained.

A hook that raises, hangs past ``plugin_timeout`` or returns nonsense is
logged and counted; after ``plugin_max_failures`` consecutive failures the
plugin is disabled (the others go on).

How a hang is stopped: plugin code runs under SIGALRM (an interval timer),
whose handler raises :class:`PluginTimeout` in it. That is a BaseException,
so a plugin's ``except Exception`` does not swallow it, and the alarm keeps
firing every ``REFIRE`` seconds until the hook gives up (a bare ``except:``
must then catch every one of them). An async hook is run step by step:
each ``send``/``throw`` into its coroutine runs under the alarm with what
is left of the budget, and the timer is off while the coroutine is
suspended, so the alarm never interrupts the event loop or another task; a
coroutine that awaits forever is cancelled at the deadline
(``asyncio.timeout``), and one that catches its cancellation and awaits
again is closed. The handler raises only while a guarded frame
(:func:`_guarded`) is on the stack, so a late alarm, one racing the disarm,
can never raise in the core. What no Python code can stop (a C call that
does not return on a signal, or a loop catching BaseException around every
statement) is left to the systemd watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Sequence
from types import FrameType
from typing import Any

from mptcpd_py.loader import Available
from mptcpd_py.plugin import Plugin, PluginState

# Seconds between alarms once a hook is overdue, and the most a step of an
# async hook gets (to handle its cancellation) when its budget is spent.
REFIRE = 0.05


class PluginTimeout(BaseException):
    """Raised inside a plugin hook that ran past its time (a BaseException,
    so the plugin's ``except Exception`` does not catch it)."""


FAILED = object()


def _guarded(fn: Callable[..., Any], args: tuple[Any, ...], materialize: bool = False) -> Any:
    """Plugin code runs below this frame and only there may the alarm raise."""
    result = fn(*args)
    if materialize and result is not None and not _awaitable(result):
        result = list(result)  # a generator runs here, under the timer too
    return result


def _awaitable(value: Any) -> bool:
    # inspect.isawaitable is an ABC check: skip it for what hooks mostly return.
    return value is not None and type(value) not in (list, tuple) and \
        inspect.isawaitable(value)


_GUARD_CODE = _guarded.__code__


class PluginHost:
    def __init__(self, timeout: float, max_failures: int, log: Any,
                 on_failure: Callable[[PluginState, str], None] | None = None) -> None:
        self.timeout = timeout
        self.max_failures = max_failures
        self.log = log
        self.states: list[PluginState] = []
        self.on_failure = on_failure
        self._deadline = 0.0  # monotonic end of the guarded step running; 0 = none
        self._async_hooks: dict[tuple[type[Plugin], str], bool] = {}
        self._use_alarm = threading.current_thread() is threading.main_thread()
        if self._use_alarm:
            signal.signal(signal.SIGALRM, self._on_alarm)

    def _on_alarm(self, _signum: int, frame: FrameType | None) -> None:
        deadline = self._deadline
        # No step running, or an alarm before its deadline: one that raced
        # the disarm of an earlier step (the millisecond is slack between
        # the timer's clock and ours).
        if not deadline or time.monotonic() < deadline - 0.001:
            return
        while frame is not None:
            if frame.f_code is _GUARD_CODE:
                raise PluginTimeout()
            frame = frame.f_back

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
        plugin = state.plugin
        fn = getattr(plugin, hook)
        deadline = time.monotonic() + self.timeout
        try:
            is_async = self._async_hooks.get((type(plugin), hook))
            if is_async is None:
                is_async = inspect.iscoroutinefunction(fn)
                self._async_hooks[(type(plugin), hook)] = is_async
            # An async hook's call only makes the coroutine: no plugin code runs yet.
            result = fn(*args) if is_async else self._step(deadline, fn, args, materialize)
            if _awaitable(result):
                if self._use_alarm and inspect.iscoroutine(result):
                    result = _Stepped(self, result, deadline)
                async with asyncio.timeout(deadline - time.monotonic()):
                    result = await result
                if materialize and result is not None:
                    result = self._step(deadline, list, (result,))
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

    def _step(self, deadline: float, fn: Callable[..., Any], args: tuple[Any, ...],
              materialize: bool = False) -> Any:
        """Run plugin code under the alarm until ``deadline``; past it, a step
        (handling its cancellation) gets REFIRE, or the timeout if shorter.

        The timer is off again before this returns, so no SIGALRM
        interrupts a system call of the core (Python retries one after
        EINTR, C code in an extension may not)."""
        if not self._use_alarm:
            return _guarded(fn, args, materialize)
        now = time.monotonic()
        budget = deadline - now
        if budget < REFIRE:
            budget = max(budget, min(REFIRE, self.timeout))
        self._deadline = now + budget
        signal.setitimer(signal.ITIMER_REAL, budget, REFIRE)
        try:
            return _guarded(fn, args, materialize)
        finally:
            self._deadline = 0.0
            signal.setitimer(signal.ITIMER_REAL, 0)

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
            self._deadline = 0.0
            signal.setitimer(signal.ITIMER_REAL, 0)


class _Stepped:
    """Awaits a hook's coroutine, every step of it under the alarm.

    The task driving it calls ``send``/``throw`` here; each goes into the
    coroutine through :meth:`PluginHost._step`. Between steps the coroutine
    waits on a future and the timer is off.
    """

    __slots__ = ("_coro", "_deadline", "_host")

    def __init__(self, host: PluginHost, coro: Coroutine[Any, Any, Any], deadline: float
                 ) -> None:
        self._host = host
        self._coro = coro
        self._deadline = deadline

    def __await__(self) -> Generator[Any, None, Any]:
        return self  # a generator by protocol: send, throw, close

    def __iter__(self) -> _Stepped:
        return self

    def _run(self, method: Callable[..., Any], arg: Any) -> Any:
        try:
            return self._host._step(self._deadline, method, (arg,))
        except PluginTimeout:
            if inspect.getcoroutinestate(self._coro) == inspect.CORO_SUSPENDED:
                self.close()  # the alarm came just after it yielded: it is still suspended
            raise

    def __next__(self) -> Any:
        return self._run(self._coro.send, None)

    def send(self, value: Any) -> Any:
        return self._run(self._coro.send, value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if isinstance(typ, BaseException):
            exc = typ
        else:
            exc = val if isinstance(val, BaseException) else typ() if val is None else typ(val)
        if tb is not None:
            exc = exc.with_traceback(tb)
        yielded = self._run(self._coro.throw, exc)
        if isinstance(exc, asyncio.CancelledError):
            # It caught its cancellation and waits again: nothing would ever
            # wake it. Close it (its finally blocks run) and be cancelled.
            self.close()
            raise exc
        return yielded

    def close(self) -> None:
        # It may ignore GeneratorExit or raise on the way out: it is gone either way.
        with contextlib.suppress(Exception, PluginTimeout):
            self._host._step(self._deadline, self._coro.close, ())


__all__ = ["FAILED", "Plugin", "PluginHost", "PluginTimeout"]
