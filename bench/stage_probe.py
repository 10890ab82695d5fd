"""Loaded into a running ``mptcpd-py`` by ``bench.stages`` (through a
``sitecustomize`` on its PYTHONPATH): wraps the functions at the stage
boundaries of the address path so that the main thread's CPU time inside
each is added up. The daemon's code is not changed.

SIGUSR2 once: start counting (everything so far is forgotten); SIGUSR2
again: write the counts to ``$MPTCPD_PY_STAGES_OUT`` as JSON.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import signal
import time
from collections.abc import Callable, Generator
from typing import Any

# (label, depth, "module:Class.method"): a stage's time includes the deeper
# stages below it; only time on the CPU counts (a coroutine's waits do not).
STAGES: tuple[tuple[str, int, str], ...] = (
    ("event loop iterations", 0, "asyncio.base_events:BaseEventLoop._run_once"),
    ("netlink socket reads (events, answers)", 1,
     "mptcpd_py.netlink.socket:NetlinkSocket._on_readable"),
    ("model: apply an rtnetlink event", 1, "mptcpd_py.model:NetworkModel.apply"),
    ("reconcile pass", 1, "mptcpd_py.core:Core._reconcile_pass"),
    ("snapshot of the network", 2, "mptcpd_py.model:NetworkModel.snapshot"),
    ("plugins' endpoints pipeline", 2, "mptcpd_py.core:Core.compute_desired"),
    ("plugin hook calls (under the time limit)", 3, "mptcpd_py.plugins_host:PluginHost.call"),
    ("checking what they returned", 3, "mptcpd_py.core:Core._validate_intents"),
    ("endpoints: plan and apply", 2, "mptcpd_py.endpoints:EndpointReconciler.reconcile"),
    ("kernel: add endpoint", 3, "mptcpd_py.netlink.mptcp:MptcpPM.add_endpoint"),
    ("kernel: read the id back before a delete", 3,
     "mptcpd_py.netlink.mptcp:MptcpPM.get_endpoint"),
    ("kernel: delete endpoint (sent by a thread)", 3,
     "mptcpd_py.netlink.mptcp:MptcpPM.delete_endpoint"),
    ("state journal line", 3, "mptcpd_py.state:StateStore._journal"),
    ("log line of the change", 3, "mptcpd_py.endpoints:EndpointReconciler._log_op"),
    ("source routes", 2, "mptcpd_py.routing:SourceRouting.reconcile"),
)

_time: dict[str, int] = {}
_calls: dict[str, int] = {}
_started = [0]
_clock = time.thread_time_ns


def _add(target: str, start: int) -> None:
    """The time since ``start``, counted from the window's opening at the
    earliest. The signal handler may run between any two lines here: it
    swaps the dicts, so a count in flight lands in the discarded one."""
    times = _time
    times[target] = times.get(target, 0) + _clock() - max(start, _started[0])


def _count_call(target: str) -> None:
    calls = _calls
    calls[target] = calls.get(target, 0) + 1


def _timed_steps(coro: Any, target: str) -> Generator[Any, Any, Any]:
    """Drive ``coro`` step by step, timing only the steps."""
    value: Any = None
    error: BaseException | None = None
    while True:
        start = _clock()
        try:
            yielded = coro.send(value) if error is None else coro.throw(error)
        except StopIteration as stop:
            return stop.value
        finally:  # a step that raises counts too
            _add(target, start)
        try:
            value, error = (yield yielded), None
        except BaseException as exc:  # handed to the coroutine
            value, error = None, exc


class _Timed:
    def __init__(self, coro: Any, target: str) -> None:
        self.coro, self.target = coro, target

    def __await__(self) -> Generator[Any, Any, Any]:
        return _timed_steps(self.coro.__await__(), self.target)


def _wrap(target: str) -> None:
    module_name, qualname = target.split(":")
    owner_name, method = qualname.split(".")
    wrap(getattr(importlib.import_module(module_name), owner_name), method, target)


def wrap(owner: Any, method: str, target: str) -> None:
    """Replace ``owner.method`` by a timed version counted under ``target``."""
    original: Callable[..., Any] = getattr(owner, method)
    if inspect.iscoroutinefunction(original):
        @functools.wraps(original)
        async def timed_coroutine(*args: Any, **kwargs: Any) -> Any:
            _count_call(target)
            return await _Timed(original(*args, **kwargs), target)
        setattr(owner, method, timed_coroutine)
        return

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        _count_call(target)
        start = _clock()
        try:
            return original(*args, **kwargs)
        finally:
            _add(target, start)
    setattr(owner, method, timed)


def _on_signal(_signum: int, _frame: Any) -> None:
    global _time, _calls
    if not _started[0]:
        _started[0] = _clock()
        _time, _calls = {}, {}
        return
    out = {"main_thread_ns": _clock() - _started[0], "time_ns": dict(_time),
           "calls": dict(_calls)}
    path = os.environ["MPTCPD_PY_STAGES_OUT"]
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)


def install() -> None:
    if not os.environ.get("MPTCPD_PY_STAGES_OUT"):
        return
    for _label, _depth, target in STAGES:
        _wrap(target)
    signal.signal(signal.SIGUSR2, _on_signal)
