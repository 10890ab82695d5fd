"""The userspace path manager's Python cost per connection, hot, in process.

``python -m bench.hotpath [CONNECTIONS]``

A connection's four events (CREATED, ESTABLISHED, SUB_ESTABLISHED from
the second interface, CLOSED), as the kernel packs them, go through
``decode_event`` and the core's MPTCP event loop (connection table, the
``sspi`` plugin, the action checks) with a kernel that answers at once.
Nothing else shares the CPU and the code stays in cache, so this is the
least the event path costs. It isolates changes to that path; the daemon
pays more in a real burst (``python -m bench --sections userspace``).
No namespace, no root: it never opens a socket.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

from mptcpd_py.config import parse_config
from mptcpd_py.core import Core
from mptcpd_py.loader import discover, schemas
from mptcpd_py.logging import configure
from mptcpd_py.netlink import codec as c
from mptcpd_py.netlink.mptcp import decode_event
from mptcpd_py.netlink.socket import _HEADER
from mptcpd_py.netlink.types import (
    IFF_LOOPBACK,
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    AddressFlags,
    IfAddress,
    Link,
    MptcpEventType,
    Route,
)
from mptcpd_py.userspace import UserspacePM

UP = IFF_UP | IFF_RUNNING | IFF_LOWER_UP
E = TypeVar("E")
FIRST, SECOND, PEER = (ipaddress.IPv4Address(a) for a in
                       ("192.0.2.1", "198.51.100.1", "192.0.2.2"))


class AnsweringPM:
    """The kernel's side of SUBFLOW_CREATE: accepted at once."""

    def __init__(self) -> None:
        self.created = 0

    async def subflow_create(self, *args: Any, **kwargs: Any) -> None:
        self.created += 1


def two_interface_core() -> tuple[Core, AnsweringPM]:
    available, _ = discover([])
    config = parse_config(
        f'[daemon]\nplugins = ["sspi"]\nstate_dir = "{tempfile.mkdtemp()}"\n'
        '[kernel]\npath_manager = "userspace"\n', "<hotpath>", schemas(available))
    configure("info", "json", io.StringIO())  # the daemon's logging; lines kept off the terminal
    core = Core(config, available)
    core._instantiate_plugins(config, available)
    default = ipaddress.ip_network("0.0.0.0/0")
    core.model.devtype_reader = lambda name: ""
    core.model.load(
        [Link(index=1, name="lo", flags=UP | IFF_LOOPBACK), Link(index=2, name="eth0", flags=UP),
         Link(index=3, name="eth1", flags=UP)],
        [IfAddress(index=2, address=FIRST, prefixlen=24, flags=AddressFlags.PERMANENT),
         IfAddress(index=3, address=SECOND, prefixlen=24, flags=AddressFlags.PERMANENT)],
        [Route(family=socket.AF_INET, dst=default, gateway=ipaddress.IPv4Address("192.0.2.254"),
               oif=2),
         Route(family=socket.AF_INET, dst=default,
               gateway=ipaddress.IPv4Address("198.51.100.254"), oif=3)])
    pm = AnsweringPM()
    core.pm = pm  # type: ignore[assignment]
    core.userspace = UserspacePM(core)
    return core, pm


def _event(cmd: MptcpEventType, *attrs: bytes) -> bytes:
    payload = c.genl_payload(cmd, c.MPTCP_PM_VERSION, *attrs)
    return _HEADER.pack(_HEADER.size + len(payload), 0x20, 0, 0, 0) + payload


def connection_events(token: int, port: int) -> list[bytes]:
    def be16(kind: int, value: int) -> bytes:
        return c.nla(kind, struct.pack(">H", value))
    common = (c.u32(c.EV_TOKEN, token), c.u16(c.EV_FAMILY, socket.AF_INET),
              c.nla(c.EV_DADDR4, PEER.packed), be16(c.EV_DPORT, 443))
    initial = (*common, c.nla(c.EV_SADDR4, FIRST.packed), be16(c.EV_SPORT, port))
    second = (*common, c.nla(c.EV_SADDR4, SECOND.packed), be16(c.EV_SPORT, port + 1),
              c.u8(c.EV_LOC_ID, 1), c.u8(c.EV_REM_ID, 0))
    return [_event(MptcpEventType.CREATED, *initial),
            _event(MptcpEventType.ESTABLISHED, *initial),
            _event(MptcpEventType.SUB_ESTABLISHED, *second),
            _event(MptcpEventType.CLOSED, c.u32(c.EV_TOKEN, token))]


class Replay(Generic[E]):
    """One of the core's event streams, from a list."""

    def __init__(self, events: list[E]) -> None:
        self.events = iter(events)

    def __len__(self) -> int:
        return 0  # nothing queued behind: each event is handled on its own, as live

    def __aiter__(self) -> AsyncIterator[E]:
        return self

    async def __anext__(self) -> E:
        try:
            return next(self.events)
        except StopIteration:
            raise StopAsyncIteration from None


async def measure(connections: int, rounds: int = 3) -> tuple[int, int]:
    """Prints each round; returns (subflows asked for, connections left)."""
    core, pm = two_interface_core()
    messages = [m for i in range(connections) for m in connection_events(1000 + i, 20000 + i)]
    for round_ in range(rounds):
        started = time.perf_counter_ns()
        events = [decode_event(m) for m in messages]
        decoded = time.perf_counter_ns()
        core.mptcp_events = Replay(events)  # type: ignore[assignment]
        await core._mptcp_loop()
        handled = time.perf_counter_ns()
        print(f"round {round_ + 1}: decode {(decoded - started) / connections / 1e3:.2f} µs, "
              f"handle {(handled - decoded) / connections / 1e3:.2f} µs per connection "
              f"({pm.created} subflows asked for, {len(core.connections)} connections left)")
    return pm.created, len(core.connections)


if __name__ == "__main__":
    asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 3000))
