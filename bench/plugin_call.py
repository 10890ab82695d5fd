"""Per-call overhead of the plugin host (timer, containment) on the hot path.

Runs a trivial hook N times through ``PluginHost.call`` and directly, in one
event loop, and prints the median (over rounds) of the per-call cost and the
difference: what the containment adds to each hook call.

    .venv/bin/python bench/plugin_call.py [--calls 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from mptcpd_py.plugin import Plugin, PluginState
from mptcpd_py.plugins_host import PluginHost


class _Log:
    def error(self, *_args: Any, **_kwargs: Any) -> None:
        pass


class Trivial(Plugin):
    name = "trivial"

    def endpoints(self, net: Any, proposed: Any) -> Any:
        return proposed


class TrivialAsync(Plugin):
    name = "trivial_async"

    async def endpoints(self, net: Any, proposed: Any) -> Any:  # type: ignore[override]
        return proposed


async def per_call(host: PluginHost, state: PluginState, calls: int, direct: bool,
                   materialize: bool) -> float:
    fn = state.plugin.endpoints
    proposed: tuple[Any, ...] = ()
    started = time.perf_counter()
    if direct:
        for _ in range(calls):
            result = fn(None, proposed)
            if asyncio.iscoroutine(result):
                result = await result
            if materialize:
                result = list(result)
    else:
        for _ in range(calls):
            await host.call(state, "endpoints", None, proposed, materialize=materialize)
    return (time.perf_counter() - started) / calls


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    host = PluginHost(1.0, 5, _Log())
    cases = ((Trivial, True, "sync, as endpoints"), (Trivial, False, "sync"),
             (TrivialAsync, False, "async"))
    for cls, materialize, label in cases:
        state = PluginState(cls({}, None), "bench", hooks=("endpoints",))
        direct, hosted = [], []
        for _ in range(args.rounds):
            direct.append(await per_call(host, state, args.calls, True, materialize))
            hosted.append(await per_call(host, state, args.calls, False, materialize))
        d, h = statistics.median(direct), statistics.median(hosted)
        print(f"{label:18s} direct {d * 1e6:6.2f} us  via host {h * 1e6:6.2f} us  "
              f"overhead {(h - d) * 1e6:6.2f} us/call")
    host.close()


if __name__ == "__main__":
    asyncio.run(main())
