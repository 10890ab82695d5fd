"""The hand-written rtnetlink codec agrees with pyroute2's message classes
(the declarative reference), in both directions."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

import pytest
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from mptcpd_py.netlink.rtnl import (
    _nexthops,
    decode_address,
    decode_link,
    decode_route,
    decode_rule,
    in_tables,
    main_default_route,
    route_payload,
    rule_payload,
)
from mptcpd_py.netlink.types import AddressFlags, Link, Nexthop, Route, Rule


def encoded(family: int, addr: str, plen: int, flags: int, label: str | None) -> bytes:
    msg = ifaddrmsg()
    msg["family"], msg["prefixlen"], msg["index"], msg["scope"] = family, plen, 7, 0
    attrs = [("IFA_ADDRESS", addr), ("IFA_LOCAL", addr), ("IFA_FLAGS", flags)]
    if label:
        attrs.append(("IFA_LABEL", label))
    msg["attrs"] = attrs
    msg["header"]["type"] = 20
    msg.encode()
    return bytes(msg.data)


@pytest.mark.parametrize(("family", "addr", "plen", "flags", "label"), [
    (2, "192.0.2.1", 24, 0x80, "eth0"),
    (10, "2001:db8::1", 64, 0x40 | 0x80, None),
    (10, "2001:db8::2", 128, 0x20 | 0x01, None),
])
def test_address_decoder_matches_pyroute2(family: int, addr: str, plen: int, flags: int,
                                          label: str | None) -> None:
    decoded = decode_address(encoded(family, addr, plen, flags, label))
    assert decoded.address == ipaddress.ip_address(addr)
    assert (decoded.index, decoded.prefixlen) == (7, plen)
    assert decoded.flags == AddressFlags(flags)
    assert decoded.label == (label or "")


def test_address_message_without_address_is_rejected() -> None:
    msg = ifaddrmsg()
    msg["family"] = 2
    msg["header"]["type"] = 20
    msg.encode()
    with pytest.raises(ValueError, match="without IFA_LOCAL"):
        decode_address(bytes(msg.data))


# ------------------------------------------------ links, routes, rules (vs pyroute2)

def pyroute2_encoded(msg: Any, msg_type: int) -> bytes:
    msg["header"]["type"] = msg_type
    msg.encode()
    return bytes(msg.data)


def test_link_decoder_matches_pyroute2() -> None:
    msg = ifinfmsg()
    msg["family"], msg["index"], msg["flags"], msg["ifi_type"] = 0, 7, 0x11043, 1
    msg["attrs"] = [("IFLA_IFNAME", "wwan0"), ("IFLA_MTU", 1400), ("IFLA_OPERSTATE", "DORMANT"),
                    ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "veth")]})]
    link = decode_link(pyroute2_encoded(msg, 16))
    assert link == Link(7, "wwan0", 0x11043, 1, "veth", "dormant", 1400)


@pytest.mark.parametrize("route", [
    Route(socket.AF_INET, ipaddress.ip_network("0.0.0.0/0"), 254,
          ipaddress.ip_address("192.0.2.2"), oif=3, priority=100, protocol=4, scope=0,
          type=1),
    Route(socket.AF_INET, ipaddress.ip_network("198.51.100.0/24"), 10003, None, oif=3,
          protocol=4, scope=253, type=1, prefsrc=ipaddress.ip_address("198.51.100.1")),
    Route(socket.AF_INET6, ipaddress.ip_network("::/0"), 10004,
          ipaddress.ip_address("2001:db8:2::2"), oif=4, priority=1024, protocol=4),
], ids=["v4-default", "v4-table-over-255", "v6-default"])
def test_route_codec_round_trips_through_pyroute2(route: Route) -> None:
    # ours -> pyroute2
    ref = rtmsg(struct.pack("=IHHII", 16 + len(route_payload(route)), 24, 0, 0, 0)
                + route_payload(route))
    ref.decode()
    assert ref["dst_len"] == route.dst.prefixlen
    assert ref.get_attr("RTA_TABLE") == route.table
    assert ref.get_attr("RTA_OIF") == route.oif
    assert (ref.get_attr("RTA_GATEWAY") or None) == (str(route.gateway) if route.gateway
                                                     else None)
    # pyroute2 -> ours
    msg = rtmsg()
    msg["family"], msg["dst_len"] = route.family, route.dst.prefixlen
    msg["table"] = route.table if route.table < 256 else 252
    msg["proto"], msg["scope"], msg["type"] = route.protocol, route.scope, route.type
    attrs: list[tuple[str, Any]] = [("RTA_TABLE", route.table), ("RTA_OIF", route.oif)]
    if route.dst.prefixlen:
        attrs.append(("RTA_DST", str(route.dst.network_address)))
    if route.gateway:
        attrs.append(("RTA_GATEWAY", str(route.gateway)))
    if route.priority:
        attrs.append(("RTA_PRIORITY", route.priority))
    if route.prefsrc:
        attrs.append(("RTA_PREFSRC", str(route.prefsrc)))
    msg["attrs"] = attrs
    assert decode_route(pyroute2_encoded(msg, 24)) == route


def _raw_route(dst: str, table: int) -> bytes:
    route = Route(socket.AF_INET, ipaddress.ip_network(dst), table,
                  ipaddress.ip_address("192.0.2.2"), oif=3, protocol=4, type=1)
    payload = route_payload(route)
    return struct.pack("=IHHII", 16 + len(payload), 24, 0, 0, 0) + payload


def test_raw_route_tests_pick_without_decoding_what_a_dump_keeps() -> None:
    main_default, main_host = _raw_route("0.0.0.0/0", 254), _raw_route("10.0.0.1/32", 254)
    ours, other = _raw_route("0.0.0.0/0", 10003), _raw_route("0.0.0.0/0", 10004)
    assert [main_default_route(r) for r in (main_default, main_host, ours)] == \
        [True, False, False]
    # Tables over 255 are in RTA_TABLE; the rtmsg byte says only "see RTA_TABLE".
    assert [in_tables({10003})(r) for r in (ours, other, main_default)] == [True, False, False]
    assert [in_tables({254, 10004})(r) for r in (ours, other, main_host)] == [False, True, True]
    assert not in_tables(set())(ours)
    assert not main_default_route(b"short") and not in_tables({10003})(b"short")


def test_multipath_route_takes_the_first_nexthop() -> None:
    msg = rtmsg()
    msg["family"], msg["table"], msg["proto"], msg["type"] = 2, 254, 4, 1
    msg["attrs"] = [("RTA_MULTIPATH", [
        {"oif": 3, "attrs": [("RTA_GATEWAY", "198.51.100.2")]},
        {"oif": 4, "attrs": [("RTA_GATEWAY", "192.0.2.2")]}])]
    route = decode_route(pyroute2_encoded(msg, 24))
    assert (route.gateway, route.oif) == (ipaddress.ip_address("198.51.100.2"), 3)
    assert route.is_default
    assert route.nexthops == (Nexthop(3, ipaddress.ip_address("198.51.100.2")),
                              Nexthop(4, ipaddress.ip_address("192.0.2.2")))


def test_every_nexthop_is_decoded_with_whether_it_is_dead() -> None:
    msg = rtmsg()
    msg["family"], msg["table"], msg["proto"], msg["type"] = 10, 254, 4, 1
    msg["attrs"] = [("RTA_MULTIPATH", [
        {"oif": 3, "flags": 1, "attrs": [("RTA_GATEWAY", "2001:db8::1")]},  # RTNH_F_DEAD
        {"oif": 5, "attrs": []},  # no gateway: a device path
        {"oif": 4, "flags": 16, "attrs": [("RTA_GATEWAY", "2001:db8::2")]}])]  # linkdown only
    route = decode_route(pyroute2_encoded(msg, 24))
    A6 = ipaddress.IPv6Address
    assert route.nexthops == (Nexthop(3, A6("2001:db8::1"), dead=True), Nexthop(5, None),
                              Nexthop(4, A6("2001:db8::2")))


def _rtnh(length: int, flags: int, ifindex: int, attrs: bytes = b"") -> bytes:
    return struct.pack("=HBBi", length, flags, 0, ifindex) + attrs


@pytest.mark.parametrize("raw, expected", [
    (b"", ()),
    (b"\x08\x00", ()),  # shorter than a header
    (_rtnh(4, 0, 3), ()),  # a length below the header's own: the walk stops
    (_rtnh(8, 0, 3) + _rtnh(200, 0, 4), (Nexthop(3),)),  # the second runs past the end
    # An unaligned length: the next header starts at the 4-byte boundary.
    (_rtnh(14, 0, 3, struct.pack("=HH", 6, 99) + b"ab\0\0") + _rtnh(8, 1, 4),
     (Nexthop(3), Nexthop(4, dead=True))),
])
def test_malformed_multipath_attributes_decode_what_is_whole(raw: bytes,
                                                             expected: tuple[Any, ...]) -> None:
    assert _nexthops(raw) == expected


@pytest.mark.parametrize("rule", [
    Rule(socket.AF_INET, 10003, 10000, ipaddress.ip_network("198.51.100.1/32")),
    Rule(socket.AF_INET6, 200, 32000, ipaddress.ip_network("2001:db8:2::1/128")),
])
def test_rule_codec_round_trips_through_pyroute2(rule: Rule) -> None:
    payload = rule_payload(rule)
    ref = fibmsg(struct.pack("=IHHII", 16 + len(payload), 32, 0, 0, 0) + payload)
    ref.decode()
    assert (ref["family"], ref["src_len"], ref["action"]) == (rule.family, 128
                                                               if rule.family == 10 else 32, 1)
    assert ref.get_attr("FRA_TABLE") == rule.table
    assert ref.get_attr("FRA_PRIORITY") == rule.priority
    assert rule.src is not None
    assert ref.get_attr("FRA_SRC") == str(rule.src.network_address)
    assert decode_rule(struct.pack("=IHHII", 16 + len(payload), 32, 0, 0, 0) + payload) == rule
