"""The least a Python path manager can do, as a yardstick for the targets.

``python -m bench.bare_responder endpoints``: RTM_NEWADDR -> ADD_ADDR, and
RTM_DELADDR -> DEL_ADDR from a thread (the kernel waits for an RCU grace
period there).

``python -m bench.bare_responder userspace SOURCE [SENDS]``: each MPTCP
ESTABLISHED event -> SUBFLOW_CREATE from SOURCE to the connection's peer,
answer read at once (userspace path manager). On SIGTERM it writes to SENDS
one line per SUBFLOW_CREATE: when its sendmsg(2) began and how long it took
(ns, CLOCK_MONOTONIC). The kernel opens the subflow inside that call (over
veth even the handshake runs there), so those times are the kernel's share
of each connection: the benchmark derives the floor of the latency from them.

No policy, no state file, no logs, no checks: it answers how close to a C
daemon, or to a target, *any* asyncio daemon gets on this machine. The
benchmark runs it in the namespace like the daemons and reports it in
"yardstick" rows; it is not a path manager.
"""

from __future__ import annotations

import asyncio
import ipaddress
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from mptcpd_py.netlink import codec as c
from mptcpd_py.netlink.codec import _GENL, _NLA
from mptcpd_py.netlink.mptcp import resolve_family
from mptcpd_py.netlink.rtnl import (
    _IFADDRMSG,
    IFA_LOCAL,
    RTM_DELADDR,
    RTM_NEWADDR,
    RTNLGRP_IPV4_IFADDR,
)
from mptcpd_py.netlink.socket import (
    _HEADER,
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_GENERIC,
    NLM_F_ACK,
    NLM_F_REQUEST,
    SO_RCVBUFFORCE,
    SOL_NETLINK,
    NetlinkSocket,
)
from mptcpd_py.netlink.types import Address, EndpointFlags, MptcpEventType


def _request(family: int, seq: int, cmd: int, *attrs: bytes) -> bytes:
    """One mptcp_pm request, acked."""
    payload = c.genl_payload(cmd, c.MPTCP_PM_VERSION, *attrs)
    return _HEADER.pack(_HEADER.size + len(payload), family, NLM_F_REQUEST | NLM_F_ACK,
                        seq, 0) + payload


def _drain(sock: socket.socket) -> None:
    """Read and drop what the socket holds (the kernel's answers)."""
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            return


class BareResponder:
    def __init__(self, genl: socket.socket, family: int) -> None:
        self.genl = genl
        self.family = family
        self.ids: dict[bytes, int] = {}
        self.seq = 0
        self.slow: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        threading.Thread(target=self._send_slow, daemon=True).start()

    def _send_slow(self) -> None:
        while True:
            self.genl.send(self.slow.get())

    def _message(self, cmd: int, attr: bytes) -> bytes:
        self.seq += 1
        return _request(self.family, self.seq, cmd, attr)

    def on_rtnl(self, data: bytes) -> None:
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind = _HEADER.unpack_from(data, offset)[:2]
            if kind in (RTM_NEWADDR, RTM_DELADDR):
                self._address(kind, data[offset:offset + length])
            offset += (length + 3) & ~3

    def _address(self, kind: int, msg: bytes) -> None:
        family, _plen, _flags, _scope, index = _IFADDRMSG.unpack_from(msg, _HEADER.size)
        offset = _HEADER.size + _IFADDRMSG.size
        while family == socket.AF_INET and offset + _NLA.size <= len(msg):
            length, attr = _NLA.unpack_from(msg, offset)
            if length < _NLA.size:
                return
            if attr == IFA_LOCAL:
                raw = msg[offset + 4:offset + 8]
                if kind == RTM_NEWADDR:
                    ident = next(i for i in range(1, 256) if i not in self.ids.values())
                    self.ids[raw] = ident
                    self.genl.send(self._message(c.CMD_ADD_ADDR, c.address_attr(
                        c.ATTR_ADDR, c.as_address(raw), id=ident,
                        flags=EndpointFlags.SUBFLOW, ifindex=index)))
                elif raw in self.ids:
                    self.slow.put(self._message(c.CMD_DEL_ADDR, c.address_attr(
                        c.ATTR_ADDR, c.as_address(raw), id=self.ids.pop(raw))))
                return
            offset += (length + 3) & ~3


class BareUserspace:
    """ESTABLISHED -> SUBFLOW_CREATE(token, SOURCE id 1 -> peer address:port)."""

    def __init__(self, genl: socket.socket, family: int, source: str) -> None:
        self.genl = genl
        self.family = family
        self.source = ipaddress.ip_address(source)
        self.seq = 0
        self.sends: list[tuple[int, int]] = []  # (start, duration) of each SUBFLOW_CREATE

    def on_events(self, data: bytes) -> None:
        offset = 0
        while offset + _HEADER.size + _GENL.size <= len(data):
            length = _HEADER.unpack_from(data, offset)[0]
            if length < _HEADER.size:
                return
            if data[offset + _HEADER.size] == MptcpEventType.ESTABLISHED:
                attrs = c.parse_attrs(data, offset + _HEADER.size + _GENL.size, offset + length)
                daddr = attrs.get(c.EV_DADDR4)
                if daddr is not None and c.EV_SERVER_SIDE not in attrs:
                    self._create(c.as_u32(attrs.get(c.EV_TOKEN)), c.as_address(daddr),
                                 c.as_be16(attrs.get(c.EV_DPORT)))
            offset += (length + 3) & ~3

    def _create(self, token: int, remote: Address, port: int) -> None:
        self.seq += 1
        request = _request(
            self.family, self.seq, c.CMD_SUBFLOW_CREATE,
            c.address_attr(c.ATTR_ADDR, self.source, id=1), c.u32(c.ATTR_TOKEN, token),
            c.address_attr(c.ATTR_ADDR_REMOTE, remote, port=port))
        started = time.monotonic_ns()
        self.genl.send(request)
        self.sends.append((started, time.monotonic_ns() - started))
        _drain(self.genl)  # the answer is queued by now (the kernel ran it in send)


def _netlink(protocol: int, groups: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, protocol)
    sock.bind((0, groups))
    return sock


def _reader(sock: socket.socket, handle: Callable[[bytes], None]) -> Callable[[], None]:
    def read() -> None:
        while True:
            try:
                handle(sock.recv(1 << 17))
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: events lost; a yardstick goes on
                continue
    return read


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def userspace(source: str, sends_path: str | None) -> None:
    resolver = NetlinkSocket(NETLINK_GENERIC)
    family, groups = await resolve_family(resolver, "mptcp_pm")
    resolver.close()
    events = _netlink(NETLINK_GENERIC)
    events.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    events.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, groups[c.GROUP_EVENTS])
    responder = BareUserspace(_netlink(NETLINK_GENERIC), family, source)
    asyncio.get_running_loop().add_reader(events.fileno(), _reader(events, responder.on_events))
    await _until_sigterm()
    if sends_path is not None:
        with open(sends_path, "w") as f:
            f.writelines(f"{start} {duration}\n" for start, duration in responder.sends)


async def endpoints() -> None:
    resolver = NetlinkSocket(NETLINK_GENERIC)
    family, _groups = await resolve_family(resolver, "mptcp_pm")
    resolver.close()
    genl = _netlink(NETLINK_GENERIC)
    rtnl = _netlink(0, 1 << (RTNLGRP_IPV4_IFADDR - 1))
    responder = BareResponder(genl, family)
    loop = asyncio.get_running_loop()
    loop.add_reader(rtnl.fileno(), _reader(rtnl, responder.on_rtnl))
    loop.add_reader(genl.fileno(), _drain, genl)
    await _until_sigterm()


if __name__ == "__main__":
    if sys.argv[1:2] == ["userspace"]:
        asyncio.run(userspace(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
    else:
        asyncio.run(endpoints())
