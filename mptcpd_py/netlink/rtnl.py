"""rtnetlink: links, addresses, routes and rules, dumped and watched.

One socket serves dumps and commands; another joins the multicast groups
*before* the first dump, so nothing that happens between the two is missed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from typing import Any

from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from mptcpd_py.netlink.socket import (
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    DumpInterrupted,
    NetlinkSocket,
    RawMessage,
)
from mptcpd_py.netlink.stream import EventStream
from mptcpd_py.netlink.types import (
    AddressEvent,
    AddressFlags,
    IfAddress,
    Link,
    LinkEvent,
    Network,
    Route,
    RouteEvent,
    RtnlEvent,
    Rule,
    parse_address,
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
FR_ACT_TO_TBL = 1

_DUMP_RETRIES = 5


def _attrs(msg: Any) -> dict[str, Any]:
    return {name: value for name, value, *_ in msg["attrs"]}


def decode_link(data: bytes) -> Link:
    msg = ifinfmsg(data)
    msg.decode()
    attrs = _attrs(msg)
    kind = ""
    info = attrs.get("IFLA_LINKINFO")
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND") or ""
    return Link(
        index=int(msg["index"]),
        name=str(attrs.get("IFLA_IFNAME", "")),
        flags=int(msg["flags"]),
        link_type=int(msg["ifi_type"]),
        kind=str(kind),
        operstate=str(attrs.get("IFLA_OPERSTATE", "")).lower(),
        mtu=int(attrs.get("IFLA_MTU", 0)),
    )


_IFADDRMSG = struct.Struct("=BBBBI")
_NLA_HDR = struct.Struct("=HH")
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_FLAGS = 1, 2, 3, 8


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
    return IfAddress(
        index=index,
        address=ipaddress.ip_address(bytes(raw)),
        prefixlen=prefixlen,
        scope=scope,
        flags=AddressFlags(flags),
        label=label,
    )


def _network(family: int, dst: str | None, dst_len: int) -> Network:
    if dst is None:
        dst = "0.0.0.0" if family == socket.AF_INET else "::"
    return ipaddress.ip_network(f"{dst}/{dst_len}", strict=False)


def decode_route(data: bytes) -> Route:
    msg = rtmsg(data)
    msg.decode()
    attrs = _attrs(msg)
    family = int(msg["family"])
    gateway = attrs.get("RTA_GATEWAY")
    oif = int(attrs.get("RTA_OIF", 0))
    multipath = attrs.get("RTA_MULTIPATH")
    if multipath and gateway is None:
        first = multipath[0]
        gateway = first.get_attr("RTA_GATEWAY")
        oif = int(first.get("oif", oif) or oif)
    prefsrc = attrs.get("RTA_PREFSRC")
    return Route(
        family=family,
        dst=_network(family, attrs.get("RTA_DST"), int(msg["dst_len"])),
        table=int(attrs.get("RTA_TABLE", msg["table"])),
        gateway=parse_address(gateway) if gateway else None,
        oif=oif,
        priority=int(attrs.get("RTA_PRIORITY", 0)),
        protocol=int(msg["proto"]),
        scope=int(msg["scope"]),
        type=int(msg["type"]),
        prefsrc=parse_address(prefsrc) if prefsrc else None,
    )


def decode_rule(data: bytes) -> Rule:
    msg = fibmsg(data)
    msg.decode()
    attrs = _attrs(msg)
    family = int(msg["family"])
    src = attrs.get("FRA_SRC")
    return Rule(
        family=family,
        table=int(attrs.get("FRA_TABLE", msg["table"])),
        priority=int(attrs.get("FRA_PRIORITY", 0)),
        src=_network(family, src, int(msg["src_len"])) if src else None,
    )


RT_TABLE_COMPAT = 252
RT_TABLE_MAIN_ID = 254


def _interesting_route(data: bytes) -> bool:
    """Only default routes of the main table matter to the model; the rtmsg
    header says so before an expensive full decode (an address change brings
    several local / broadcast route events)."""
    if len(data) < 28:
        return False
    dst_len, table = data[17], data[20]
    return dst_len == 0 and table in (RT_TABLE_MAIN_ID, RT_TABLE_COMPAT)


def decode_event(raw: RawMessage) -> RtnlEvent | None:
    """A multicast rtnetlink message -> typed event (None: not ours to watch)."""
    if raw.type in (RTM_NEWROUTE, RTM_DELROUTE) and not _interesting_route(raw.data):
        return None
    if raw.type in (RTM_NEWLINK, RTM_DELLINK):
        return LinkEvent(decode_link(raw.data), removed=raw.type == RTM_DELLINK)
    if raw.type in (RTM_NEWADDR, RTM_DELADDR):
        return AddressEvent(decode_address(raw.data), removed=raw.type == RTM_DELADDR)
    if raw.type in (RTM_NEWROUTE, RTM_DELROUTE):
        return RouteEvent(decode_route(raw.data), removed=raw.type == RTM_DELROUTE)
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

    async def _dump(self, msg: Any, msg_type: int, what: str) -> list[RawMessage]:
        for attempt in range(_DUMP_RETRIES):
            try:
                return await self.sock.request(msg, msg_type, NLM_F_REQUEST | NLM_F_DUMP, what)
            except DumpInterrupted:
                if attempt == _DUMP_RETRIES - 1:
                    raise
                await asyncio.sleep(0)
        raise AssertionError("unreachable")

    async def links(self) -> list[Link]:
        msg = ifinfmsg()
        msg["family"] = socket.AF_UNSPEC
        return [decode_link(r.data) for r in await self._dump(msg, RTM_GETLINK, "dump links")
                if r.type == RTM_NEWLINK]

    async def addresses(self) -> list[IfAddress]:
        msg = ifaddrmsg()
        msg["family"] = socket.AF_UNSPEC
        return [decode_address(r.data)
                for r in await self._dump(msg, RTM_GETADDR, "dump addresses")
                if r.type == RTM_NEWADDR]

    async def routes(self) -> list[Route]:
        msg = rtmsg()
        msg["family"] = socket.AF_UNSPEC
        return [decode_route(r.data) for r in await self._dump(msg, RTM_GETROUTE, "dump routes")
                if r.type == RTM_NEWROUTE]

    async def rules(self) -> list[Rule]:
        msg = fibmsg()
        msg["family"] = socket.AF_UNSPEC
        return [decode_rule(r.data) for r in await self._dump(msg, RTM_GETRULE, "dump rules")
                if r.type == RTM_NEWRULE]

    # ------------------------------------------------------------ commands

    def _route_msg(self, route: Route) -> Any:
        msg = rtmsg()
        msg["family"] = route.family
        msg["dst_len"] = route.dst.prefixlen
        msg["table"] = route.table if route.table < 256 else 252  # RT_TABLE_COMPAT
        msg["proto"] = route.protocol or RTPROT_STATIC
        msg["scope"] = route.scope
        msg["type"] = route.type
        attrs: list[tuple[str, Any]] = [("RTA_TABLE", route.table)]
        if route.dst.prefixlen:
            attrs.append(("RTA_DST", str(route.dst.network_address)))
        if route.gateway is not None:
            attrs.append(("RTA_GATEWAY", str(route.gateway)))
        if route.oif:
            attrs.append(("RTA_OIF", route.oif))
        if route.priority:
            attrs.append(("RTA_PRIORITY", route.priority))
        if route.prefsrc is not None:
            attrs.append(("RTA_PREFSRC", str(route.prefsrc)))
        msg["attrs"] = attrs
        return msg

    async def add_route(self, route: Route) -> None:
        """Add a route (EEXIST raises :class:`~mptcpd_py.errors.EndpointExists`)."""
        await self.sock.request(
            self._route_msg(route),
            RTM_NEWROUTE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            f"add route {route.dst} table {route.table}",
        )

    async def delete_route(self, route: Route) -> None:
        await self.sock.request(
            self._route_msg(route),
            RTM_DELROUTE,
            NLM_F_REQUEST | NLM_F_ACK,
            f"delete route {route.dst} table {route.table}",
        )

    def _rule_msg(self, rule: Rule) -> Any:
        msg = fibmsg()
        msg["family"] = rule.family
        msg["table"] = rule.table if rule.table < 256 else 252
        msg["action"] = FR_ACT_TO_TBL
        attrs: list[tuple[str, Any]] = [
            ("FRA_TABLE", rule.table),
            ("FRA_PRIORITY", rule.priority),
        ]
        if rule.src is not None:
            msg["src_len"] = rule.src.prefixlen
            attrs.append(("FRA_SRC", str(rule.src.network_address)))
        msg["attrs"] = attrs
        return msg

    async def add_rule(self, rule: Rule) -> None:
        await self.sock.request(
            self._rule_msg(rule),
            RTM_NEWRULE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            f"add rule from {rule.src} table {rule.table}",
        )

    async def delete_rule(self, rule: Rule) -> None:
        await self.sock.request(
            self._rule_msg(rule),
            RTM_DELRULE,
            NLM_F_REQUEST | NLM_F_ACK,
            f"delete rule from {rule.src} table {rule.table}",
        )


class RtnlEvents(EventStream[RtnlEvent]):
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
        super().__init__("rtnetlink", max_queued)
        self.sock = sock
        self.malformed = 0
        sock.on_multicast = self._on_message
        sock.on_overflow = self.overflow

    @classmethod
    def open(
        cls,
        netns: str | None = None,
        rcvbuf: int = 16 * 1024 * 1024,
        max_queued: int = 100_000,
    ) -> RtnlEvents:
        sock = NetlinkSocket(NETLINK_ROUTE, rcvbuf=rcvbuf, netns=netns)
        try:
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

    def _drain(self) -> None:
        self.sock.drain()

    def close(self) -> None:
        super().close()
        self.sock.close()
