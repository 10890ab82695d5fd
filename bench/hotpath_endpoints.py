"""The in-kernel path manager's Python cost per address add + delete, hot,
in process.

``python -m bench.hotpath_endpoints [CYCLES] [--profile]``

Each cycle is what the endpoint benchmark does to the daemon: RTM_NEWADDR
of a /32 on eth0, then RTM_DELADDR, as the kernel packs them, through
``decode_event`` and the core's rtnetlink loop (model, the shipped plugins,
the plan, the journal, the log line, the endpoint add / delete) with a
kernel that answers at once. The code stays in cache, so this is the least
a cycle costs; the live daemon pays more (``python -m bench --sections
endpoints``: CPU per add + delete). ``--profile`` prints cProfile's call
counts per cycle. No namespace, no root: it never opens a socket.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import ipaddress
import pstats
import socket
import struct
import sys
import tempfile
import time
from typing import Any

from bench.daemons import py_config
from bench.hotpath import Replay
from mptcpd_py.config import parse_config
from mptcpd_py.core import Core
from mptcpd_py.endpoints import ALL_KEPT, EndpointReconciler
from mptcpd_py.errors import NoSuchEndpoint
from mptcpd_py.loader import discover, schemas
from mptcpd_py.logging import configure
from mptcpd_py.netlink import codec as c
from mptcpd_py.netlink.rtnl import RTM_DELADDR, RTM_NEWADDR, decode_event
from mptcpd_py.netlink.socket import _HEADER, RawMessage
from mptcpd_py.netlink.types import (
    IFF_LOOPBACK,
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    AddressFlags,
    Capabilities,
    Endpoint,
    EndpointFlags,
    Link,
)
from mptcpd_py.routing import SourceRouting

UP = IFF_UP | IFF_RUNNING | IFF_LOWER_UP
ETH0 = 2
IFA_LOCAL, IFA_ADDRESS, IFA_FLAGS = 2, 1, 8
_IFADDRMSG = struct.Struct("=BBBBI")


class AnsweringPM:
    """The kernel's endpoint table, answering at once."""

    def __init__(self) -> None:
        self.table: dict[int, Endpoint] = {}

    async def add_endpoint(self, address: Any, flags: EndpointFlags = EndpointFlags.NONE, *,
                           id: int = 0, ifindex: int = 0, port: int = 0) -> Endpoint:
        self.table[id] = Endpoint(id, address, flags, ifindex, port)
        return self.table[id]

    async def delete_endpoint(self, id: int, address: Any = None) -> None:
        del self.table[id]

    async def get_endpoint(self, id: int, token: int | None = None) -> Endpoint:
        if id not in self.table:
            raise NoSuchEndpoint(22, "no such endpoint", "get endpoint")
        return self.table[id]

    async def endpoints(self, token: int | None = None) -> list[Endpoint]:
        return list(self.table.values())


class NoRoutes:
    """eth0 has no gateway, as in the endpoint benchmark: never called."""

    async def rules(self) -> list[Any]:
        return []

    async def routes(self, wanted: Any = None) -> list[Any]:
        return []


def address_message(kind: int, address: ipaddress.IPv4Address) -> RawMessage:
    body = _IFADDRMSG.pack(socket.AF_INET, 32, 0, 0, ETH0) + c.nla(IFA_LOCAL, address.packed) \
        + c.nla(IFA_ADDRESS, address.packed) + c.u32(IFA_FLAGS, int(AddressFlags.PERMANENT))
    data = _HEADER.pack(_HEADER.size + len(body), kind, 0, 0, 0) + body
    return RawMessage(kind, 0, 0, 0, data)


def eth0_core() -> tuple[Core, AnsweringPM]:
    available, _ = discover([])
    config = parse_config(py_config(tempfile.mkdtemp()), "<hotpath>", schemas(available))
    configure("info", "json", io.StringIO())  # the daemon's logging; lines kept off the terminal
    core = Core(config, available)
    core._instantiate_plugins(config, available)
    core.model.devtype_reader = lambda name: ""
    core.model.load([Link(index=1, name="lo", flags=UP | IFF_LOOPBACK),
                     Link(index=ETH0, name="eth0", flags=UP)], [], [])
    pm = AnsweringPM()
    core.pm = pm  # type: ignore[assignment]
    core.caps = Capabilities(mptcp_enabled=True, family_present=True, path_manager="kernel",
                             kept_flags=ALL_KEPT)
    core.reconciler = EndpointReconciler(pm, core.store, core.log, kept_flags=ALL_KEPT,
                                         on_operation=core._on_operation, ifname_of=core.ifname)
    core.routing = SourceRouting(NoRoutes(), core.store, core.log)  # type: ignore[arg-type]
    return core, pm


async def measure(cycles: int, rounds: int = 3, profile: bool = False) -> int:
    """Prints each round; returns the endpoints left (0: every add was undone)."""
    core, pm = eth0_core()
    base = ipaddress.IPv4Address("203.0.113.10")
    messages = [address_message(kind, base + i % 200) for i in range(cycles)
                for kind in (RTM_NEWADDR, RTM_DELADDR)]
    profiler = cProfile.Profile() if profile else None
    for round_ in range(rounds):
        started = time.perf_counter_ns()
        events = [decode_event(m) for m in messages]
        decoded = time.perf_counter_ns()
        core.rtnl_events = Replay([e for e in events if e is not None])  # type: ignore[assignment]
        if profiler is not None and round_ == rounds - 1:
            profiler.enable()
        await core._rtnl_loop()
        handled = time.perf_counter_ns()
        print(f"round {round_ + 1}: decode {(decoded - started) / cycles / 1e3:.2f} µs, "
              f"handle {(handled - decoded) / cycles / 1e3:.1f} µs per add + delete "
              f"({len(pm.table)} endpoints left)")
    if profiler is not None:
        profiler.disable()
        stats = pstats.Stats(profiler)
        calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
        print(f"calls per cycle: {calls / cycles:.0f}")
        stats.sort_stats("ncalls").print_stats(25)
    return len(pm.table)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    asyncio.run(measure(int(args[0]) if args else 2000, profile="--profile" in sys.argv))
