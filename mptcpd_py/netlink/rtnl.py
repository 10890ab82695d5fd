"""rtnetlink: links, addresses, routes and rules, dumped and watched.

One socket serves dumps and commands; another joins the multicast groups
*before* the first dump, so nothing that happens between the two is missed.

The messages are packed and unpacked here with ``struct`` (the kernel's
``ifinfomsg``, ``ifaddrmsg``, ``rtmsg`` and ``fib_rule_hdr`` plus their
attributes): pyroute2's message classes cost ~10x per message, and
importing pyroute2 alone was a quarter of the daemon's start-up. The unit
tests check this codec against pyroute2's classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable, Collection

from mptcpd_py.netlink.codec import _NLA as _NLA_HDR
from mptcpd_py.netlink.codec import as_address, as_u32, nla, parse_attrs, u32
from mptcpd_py.netlink.socket import (
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    DumpInterrupted,
    NetlinkSocket,
    RawMessage,
)
from mptcpd_py.netlink.stream import MulticastStream
from mptcpd_py.netlink.types import (
    Address,
    AddressEvent,
    AddressFlags,
    IfAddress,
    Link,
    LinkEvent,
    Network,
    Nexthop,
    Route,
    RouteEvent,
    RtnlEvent,
    Rule,
)

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34

RTNLGRP_LINK = 1
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV6_IFADDR = 9
RTNLGRP_IPV6_ROUTE = 11

RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
RTNH_F_DEAD = 1
FR_ACT_TO_TBL = 1

_DUMP_RETRIES = 5


_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope,
#                                       type, flags (fib_rule_hdr has the same layout:
#                                       ..., table, res1, res2, action, flags)
_RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex
IFLA_IFNAME, IFLA_MTU, IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 4, 16, 18, 1
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_FLAGS = 1, 2, 3, 8
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_MULTIPATH, RTA_TABLE = \
    1, 4, 5, 6, 7, 9, 15
FRA_SRC, FRA_PRIORITY, FRA_TABLE = 2, 6, 15
OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")


def _string(raw: bytes | None) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace") if raw else ""


def decode_link(data: bytes) -> Link:
    _family, link_type, index, flags, _change = _IFINFOMSG.unpack_from(data, 16)
    attrs = parse_attrs(data, 16 + _IFINFOMSG.size)
    info = attrs.get(IFLA_LINKINFO)
    kind = _string(parse_attrs(info, 0).get(IFLA_INFO_KIND)) if info else ""
    state = attrs.get(IFLA_OPERSTATE)
    return Link(
        index=index,
        name=_string(attrs.get(IFLA_IFNAME)),
        flags=flags,
        link_type=link_type,
        kind=kind,
        operstate=(OPERSTATES[state[0]] if state[0] < len(OPERSTATES) else str(state[0]))
        if state else "",
        mtu=as_u32(attrs.get(IFLA_MTU)),
    )


def decode_address(data: bytes) -> IfAddress:
    """RTM_NEWADDR / RTM_DELADDR, decoded by hand: this is the hot path of
    "address added -> endpoint" (pyroute2's generic decoder costs ~10x)."""
    family, prefixlen, flags, scope, index = _IFADDRMSG.unpack_from(data, 16)
    offset, end = 16 + _IFADDRMSG.size, len(data)
    local = address = None
    label = ""
    while offset + 4 <= end:
        length, kind = _NLA_HDR.unpack_from(data, offset)
        if length < 4:
            break
        value = data[offset + 4: offset + length]
        kind &= 0x3FFF
        if kind == IFA_LOCAL:
            local = value
        elif kind == IFA_ADDRESS:
            address = value
        elif kind == IFA_FLAGS and len(value) >= 4:
            (flags,) = struct.unpack_from("=I", value)
        elif kind == IFA_LABEL:
            label = value.split(b"\0", 1)[0].decode("utf-8", "replace")
        offset += (length + 3) & ~3
    raw = local or address
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError("address message without IFA_LOCAL / IFA_ADDRESS")
    address_flags = _ADDRESS_FLAGS.get(flags)
    if address_flags is None:  # an enum call per event costs more than the rest
        address_flags = AddressFlags(flags)
        if len(_ADDRESS_FLAGS) < 4096:
            _ADDRESS_FLAGS[flags] = address_flags
    return IfAddress(
        index=index,
        address=as_address(raw),
        prefixlen=prefixlen,
        scope=scope,
        flags=address_flags,
        label=label,
    )


_ADDRESS_FLAGS: dict[int, AddressFlags] = {}


_ANY: dict[int, bytes] = {int(socket.AF_INET): bytes(4), int(socket.AF_INET6): bytes(16)}


def _network(family: int, raw: bytes | None, prefixlen: int) -> Network:
    packed = raw if raw else _ANY.get(family, bytes(4))
    return ipaddress.ip_network((packed, prefixlen), strict=False)


def _address(raw: bytes | None) -> Address | None:
    return as_address(raw) if raw and len(raw) in (4, 16) else None


def decode_route(data: bytes) -> Route:
    family, dst_len, _src_len, _tos, table, proto, scope, kind, _flags = \
        _RTMSG.unpack_from(data, 16)
    attrs = parse_attrs(data, 16 + _RTMSG.size)
    gateway = _address(attrs.get(RTA_GATEWAY))
    oif = as_u32(attrs.get(RTA_OIF))
    multipath = attrs.get(RTA_MULTIPATH)
    nexthops: tuple[Nexthop, ...] = ()
    if multipath and gateway is None:
        nexthops = _nexthops(multipath)
        if nexthops:
            gateway, oif = nexthops[0].gateway, nexthops[0].oif or oif
    return Route(
        family=family,
        dst=_network(family, attrs.get(RTA_DST), dst_len),
        table=as_u32(attrs.get(RTA_TABLE), table),
        gateway=gateway,
        oif=oif,
        priority=as_u32(attrs.get(RTA_PRIORITY)),
        protocol=proto,
        scope=scope,
        type=kind,
        prefsrc=_address(attrs.get(RTA_PREFSRC)),
        nexthops=nexthops,
    )


def _nexthops(multipath: bytes) -> tuple[Nexthop, ...]:
    """RTA_MULTIPATH: rtnexthop headers, each followed by its attributes."""
    out = []
    offset = 0
    while offset + _RTNEXTHOP.size <= len(multipath):
        length, flags, _hops, oif = _RTNEXTHOP.unpack_from(multipath, offset)
        if length < _RTNEXTHOP.size or offset + length > len(multipath):
            break
        nh_attrs = parse_attrs(multipath, offset + _RTNEXTHOP.size, offset + length)
        out.append(Nexthop(oif, _address(nh_attrs.get(RTA_GATEWAY)),
                           bool(flags & RTNH_F_DEAD)))
        offset += (length + 3) & ~3
    return tuple(out)


def decode_rule(data: bytes) -> Rule:
    family, _dst_len, src_len, _tos, table, *_ = _RTMSG.unpack_from(data, 16)
    attrs = parse_attrs(data, 16 + _RTMSG.size)
    src = attrs.get(FRA_SRC)
    return Rule(
        family=family,
        table=as_u32(attrs.get(FRA_TABLE), table),
        priority=as_u32(attrs.get(FRA_PRIORITY)),
        src=_network(family, src, src_len) if src else None,
    )


RT_TABLE_COMPAT = 252
RT_TABLE_MAIN_ID = 254


def route_payload(route: Route) -> bytes:
    """rtmsg + attributes of an RTM_NEWROUTE / RTM_DELROUTE request."""
    header = _RTMSG.pack(route.family, route.dst.prefixlen, 0, 0,
                         route.table if route.table < 256 else RT_TABLE_COMPAT,
                         route.protocol or RTPROT_STATIC, route.scope, route.type, 0)
    attrs = [u32(RTA_TABLE, route.table)]
    if route.dst.prefixlen:
        attrs.append(nla(RTA_DST, route.dst.network_address.packed))
    if route.gateway is not None:
        attrs.append(nla(RTA_GATEWAY, route.gateway.packed))
    if route.oif:
        attrs.append(u32(RTA_OIF, route.oif))
    if route.priority:
        attrs.append(u32(RTA_PRIORITY, route.priority))
    if route.prefsrc is not None:
        attrs.append(nla(RTA_PREFSRC, route.prefsrc.packed))
    return header + b"".join(attrs)


def rule_payload(rule: Rule) -> bytes:
    """fib_rule_hdr + attributes of an RTM_NEWRULE / RTM_DELRULE request."""
    src_len = rule.src.prefixlen if rule.src is not None else 0
    header = _RTMSG.pack(rule.family, 0, src_len, 0,
                         rule.table if rule.table < 256 else RT_TABLE_COMPAT, 0, 0,
                         FR_ACT_TO_TBL, 0)
    attrs = [u32(FRA_TABLE, rule.table),
             u32(FRA_PRIORITY, rule.priority)]
    if rule.src is not None:
        attrs.append(nla(FRA_SRC, rule.src.network_address.packed))
    return header + b"".join(attrs)


def main_default_route(data: bytes) -> bool:
    """Only default routes of the main table matter to the model; the rtmsg
    header says so before an expensive full decode (an address change brings
    several local / broadcast route events, a full routing table thousands)."""
    if len(data) < 28:
        return False
    # The kernel puts a table id below 256 in the byte itself (main: 254).
    return data[17] == 0 and data[20] == RT_TABLE_MAIN_ID


def _host_u16_as_loaded(value: int) -> int:
    """What a classic BPF half-word load (network order) reads for a
    host-order u16 such as nlmsg_type."""
    return int.from_bytes(struct.pack("=H", value), "big")


# Classic BPF: (code, jt, jf, k). Keeps every message but the route ones
# that main_default_route would drop, so that a host with dynamic routing
# (thousands of route changes a second) does not wake the daemon for each.
_LD_H, _LD_B, _JEQ, _RET = 0x28, 0x30, 0x15, 0x06
_KEEP, _DROP = 0xFFFFFFFF, 0
ROUTE_EVENT_FILTER = (
    (_LD_H, 0, 0, 4),                                         # nlmsg_type
    (_JEQ, 2, 0, _host_u16_as_loaded(RTM_NEWROUTE)),
    (_JEQ, 1, 0, _host_u16_as_loaded(RTM_DELROUTE)),
    (_RET, 0, 0, _KEEP),                                      # not a route
    (_LD_B, 0, 0, 16 + 1),                                    # rtm_dst_len
    (_JEQ, 0, 3, 0),
    (_LD_B, 0, 0, 16 + 4),                                    # rtm_table
    (_JEQ, 0, 1, RT_TABLE_MAIN_ID),
    (_RET, 0, 0, _KEEP),                                      # a main default route
    (_RET, 0, 0, _DROP),
)


def in_tables(tables: Collection[int]) -> Callable[[bytes], bool]:
    """A raw-route test for "in one of these tables" that decodes nothing
    of a route in another table below 256 (main, local: the big ones)."""
    wanted = frozenset(tables)
    compat = any(t >= 256 for t in wanted)

    def test(data: bytes) -> bool:
        if len(data) < 28:
            return False
        table = data[20]
        if table != RT_TABLE_COMPAT or not compat:
            return table in wanted
        return as_u32(parse_attrs(data, 16 + _RTMSG.size).get(RTA_TABLE), table) in wanted

    return test


def decode_event(raw: RawMessage) -> RtnlEvent | None:
    """A multicast rtnetlink message -> typed event (None: not ours to watch)."""
    if raw.type in (RTM_NEWROUTE, RTM_DELROUTE) and not main_default_route(raw.data):
        return None
    if raw.type in (RTM_NEWLINK, RTM_DELLINK):
        return LinkEvent(decode_link(raw.data), removed=raw.type == RTM_DELLINK)
    if raw.type in (RTM_NEWADDR, RTM_DELADDR):
        return AddressEvent(decode_address(raw.data), removed=raw.type == RTM_DELADDR)
    if raw.type in (RTM_NEWROUTE, RTM_DELROUTE):
        return RouteEvent(decode_route(raw.data), removed=raw.type == RTM_DELROUTE,
                          replaced=bool(raw.flags & NLM_F_REPLACE))
    return None


class Rtnl:
    """Dumps and the few route / rule commands source routing needs."""

    def __init__(self, sock: NetlinkSocket) -> None:
        self.sock = sock

    @classmethod
    def open(cls, netns: str | None = None) -> Rtnl:
        return cls(NetlinkSocket(NETLINK_ROUTE, rcvbuf=4 << 20, netns=netns))

    def close(self) -> None:
        self.sock.close()

    async def _dump(self, header: bytes, msg_type: int, what: str) -> list[RawMessage]:
        for attempt in range(_DUMP_RETRIES):
            try:
                return await self.sock.request_bytes(header, msg_type,
                                                     NLM_F_REQUEST | NLM_F_DUMP, what)
            except DumpInterrupted:
                if attempt == _DUMP_RETRIES - 1:
                    raise
                await asyncio.sleep(0)
        raise AssertionError("unreachable")

    async def links(self) -> list[Link]:
        header = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        return [decode_link(r.data) for r in await self._dump(header, RTM_GETLINK, "dump links")
                if r.type == RTM_NEWLINK]

    async def addresses(self) -> list[IfAddress]:
        header = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        return [decode_address(r.data)
                for r in await self._dump(header, RTM_GETADDR, "dump addresses")
                if r.type == RTM_NEWADDR]

    async def routes(self, wanted: Callable[[bytes], bool] | None = None) -> list[Route]:
        """Every route, or those whose raw message passes ``wanted`` (see
        :func:`main_default_route`, :func:`in_tables`): decoding a full
        routing table costs about 10 µs a route."""
        header = _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
        return [decode_route(r.data)
                for r in await self._dump(header, RTM_GETROUTE, "dump routes")
                if r.type == RTM_NEWROUTE and (wanted is None or wanted(r.data))]

    async def rules(self) -> list[Rule]:
        header = _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
        return [decode_rule(r.data) for r in await self._dump(header, RTM_GETRULE, "dump rules")
                if r.type == RTM_NEWRULE]

    # ------------------------------------------------------------ commands

    async def add_route(self, route: Route) -> None:
        """Add a route (EEXIST raises :class:`~mptcpd_py.errors.EndpointExists`)."""
        await self.sock.request_bytes(
            route_payload(route),
            RTM_NEWROUTE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            f"add route {route.dst} table {route.table}",
        )

    async def delete_route(self, route: Route) -> None:
        await self.sock.request_bytes(
            route_payload(route),
            RTM_DELROUTE,
            NLM_F_REQUEST | NLM_F_ACK,
            f"delete route {route.dst} table {route.table}",
        )

    async def add_rule(self, rule: Rule) -> None:
        await self.sock.request_bytes(
            rule_payload(rule),
            RTM_NEWRULE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            f"add rule from {rule.src} table {rule.table}",
        )

    async def delete_rule(self, rule: Rule) -> None:
        await self.sock.request_bytes(
            rule_payload(rule),
            RTM_DELRULE,
            NLM_F_REQUEST | NLM_F_ACK,
            f"delete rule from {rule.src} table {rule.table}",
        )


class RtnlEvents(MulticastStream[RtnlEvent]):
    """Link, address and route changes as an async iterator; ENOBUFS becomes
    a :class:`ResyncNeeded` item and the stream goes on."""

    GROUPS = (
        RTNLGRP_LINK,
        RTNLGRP_IPV4_IFADDR,
        RTNLGRP_IPV6_IFADDR,
        RTNLGRP_IPV4_ROUTE,
        RTNLGRP_IPV6_ROUTE,
    )

    def __init__(self, sock: NetlinkSocket, max_queued: int) -> None:
        super().__init__("rtnetlink", sock, max_queued)

    @classmethod
    def open(
        cls,
        netns: str | None = None,
        rcvbuf: int = 16 * 1024 * 1024,
        max_queued: int = 100_000,
    ) -> RtnlEvents:
        sock = NetlinkSocket(NETLINK_ROUTE, rcvbuf=rcvbuf, netns=netns)
        try:
            with contextlib.suppress(OSError):  # without it, decode_event drops the same
                sock.attach_filter(ROUTE_EVENT_FILTER)
            for group in cls.GROUPS:
                sock.add_membership(group)
        except BaseException:
            sock.close()
            raise
        stream = cls(sock, max_queued)
        sock.start()
        return stream

    def _on_message(self, raw: RawMessage) -> None:
        try:
            event = decode_event(raw)
        except Exception:
            self.malformed += 1
            return
        if event is not None:
            self.push(event)
