"""Blocking netlink for the harness: add / delete addresses and endpoints and
poll the endpoint table with as little overhead as the kernel allows.

The daemon's own netlink layer is asyncio-based; a harness that measures
sub-millisecond latencies wants one blocking syscall per request and no
event loop between a dump and the next. Messages are packed with the
daemon's struct codec (:mod:`mptcpd_py.netlink.codec`), so what the
harness sends is what the daemon sends.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

from mptcpd_py.netlink import codec as c
from mptcpd_py.netlink.rtnl import (
    _IFADDRMSG,
    IFA_ADDRESS,
    IFA_FLAGS,
    IFA_LOCAL,
    RTM_DELADDR,
    RTM_NEWADDR,
)
from mptcpd_py.netlink.socket import (
    _HEADER,
    NETLINK_CAP_ACK,
    NETLINK_GENERIC,
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
)
from mptcpd_py.netns import in_netns

IFA_F_NODAD = 0x02

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Netlink:
    """One blocking netlink socket opened inside a namespace."""

    def __init__(self, protocol: int, netns: str | None) -> None:
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                      protocol)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.sock.bind((0, 0))
        self.port = self.sock.getsockname()[0]
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, msg_type: int, flags: int, payload: bytes) -> list[bytes]:
        """Send and collect the replies; raises OSError(errno) on a refusal."""
        self.seq += 1
        seq = self.seq
        self.sock.send(_HEADER.pack(_HEADER.size + len(payload), msg_type, flags, seq,
                                    self.port) + payload)
        replies: list[bytes] = []
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, mtype, _flags, mseq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    break
                message = data[offset:offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", message, _HEADER.size)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return replies
                if mtype == NLMSG_DONE:
                    return replies
                replies.append(message)


def resolve_family(nl: Netlink, name: str) -> tuple[int, dict[str, int]]:
    """(family id, {multicast group name: id})."""
    (reply,) = nl.request(c.GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, c.get_family_payload(name))
    return c.decode_family(reply)


class MptcpPm:
    """The mptcp_pm commands the harness needs (in-kernel endpoints)."""

    def __init__(self, netns: str | None) -> None:
        self.nl = Netlink(NETLINK_GENERIC, netns)
        self.family, self.groups = resolve_family(self.nl, "mptcp_pm")

    def close(self) -> None:
        self.nl.close()

    def _call(self, cmd: int, *attrs: bytes, dump: bool = False) -> list[bytes]:
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        return self.nl.request(self.family, flags, c.genl_payload(cmd, c.MPTCP_PM_VERSION,
                                                                  *attrs))

    def endpoint_addresses(self) -> set[Address]:
        """One GET_ADDR dump: the addresses of every endpoint."""
        out = set()
        for reply in self._call(c.CMD_GET_ADDR, dump=True):
            raw = c.genl_attrs(reply)[1].get(c.ATTR_ADDR)
            if raw is not None:
                address = c.decode_address_attr(raw)["address"]
                if address is not None:
                    out.add(address)
        return out

    def endpoints(self) -> list[dict[str, object]]:
        out = []
        for reply in self._call(c.CMD_GET_ADDR, dump=True):
            raw = c.genl_attrs(reply)[1].get(c.ATTR_ADDR)
            if raw is not None:
                out.append(c.decode_address_attr(raw))
        return out

    def add(self, address: Address, id: int, flags: int, ifindex: int = 0) -> None:
        self._call(c.CMD_ADD_ADDR, c.address_attr(c.ATTR_ADDR, address, id=id, flags=flags,
                                                  ifindex=ifindex))

    def delete(self, id: int) -> None:
        self._call(c.CMD_DEL_ADDR, c.address_attr(c.ATTR_ADDR, id=id))

    def flush(self) -> None:
        self._call(c.CMD_FLUSH_ADDRS, c.address_attr(c.ATTR_ADDR))

    def set_limits(self, subflows: int, add_addr_accepted: int) -> None:
        self._call(c.CMD_SET_LIMITS, c.u32(c.ATTR_RCV_ADD_ADDRS, add_addr_accepted),
                   c.u32(c.ATTR_SUBFLOWS, subflows))


class Rtnl:
    """Address add / delete as ``ip addr`` does it, without a subprocess."""

    def __init__(self, netns: str | None) -> None:
        self.nl = Netlink(NETLINK_ROUTE, netns)

    def close(self) -> None:
        self.nl.close()

    @staticmethod
    def _ifaddr(address: Address, prefixlen: int, ifindex: int) -> bytes:
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        flags = IFA_F_NODAD if address.version == 6 else 0
        return (_IFADDRMSG.pack(family, prefixlen, flags, 0, ifindex)
                + c.nla(IFA_LOCAL, address.packed) + c.nla(IFA_ADDRESS, address.packed)
                + c.u32(IFA_FLAGS, flags))

    def add_address(self, ifindex: int, address: Address, prefixlen: int) -> None:
        self.nl.request(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                        self._ifaddr(address, prefixlen, ifindex))

    def delete_address(self, ifindex: int, address: Address, prefixlen: int) -> None:
        try:
            self.nl.request(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK,
                            self._ifaddr(address, prefixlen, ifindex))
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
