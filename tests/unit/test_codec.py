"""The struct codec of the mptcp_pm family agrees with the declarative
pyroute2 message classes (the reference) in both directions."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

import pytest

from mptcpd_py.netlink import codec as c
from mptcpd_py.netlink import messages as m
from mptcpd_py.netlink.mptcp import decode_event
from mptcpd_py.netlink.types import (
    AddressAnnounced,
    ConnectionEvent,
    EndpointFlags,
    ListenerEvent,
    MptcpEventType,
    SubflowEvent,
    UnknownMptcpEvent,
)

A = ipaddress.ip_address


def as_message(payload: bytes, family_id: int = 30) -> bytes:
    """A netlink header in front of a generic netlink payload."""
    return struct.pack("=IHHII", 16 + len(payload), family_id, 0, 0, 0) + payload


def decoded_by_pyroute2(payload: bytes) -> Any:
    msg = m.mptcp_pm_msg(as_message(payload))
    msg.decode()
    return msg


@pytest.mark.parametrize("address", ["192.0.2.7", "2001:db8::7"])
def test_subflow_create_encoding_reads_back_through_pyroute2(address: str) -> None:
    local, remote = A(address), A("198.51.100.9" if ":" not in address else "2001:db8::9")
    payload = c.genl_payload(
        m.CMD_SUBFLOW_CREATE, 1,
        c.address_attr(c.ATTR_ADDR, local, id=5, flags=EndpointFlags.BACKUP, ifindex=3),
        c.u32(c.ATTR_TOKEN, 0xDEADBEEF),
        c.address_attr(c.ATTR_ADDR_REMOTE, remote, port=4242),
    )
    msg = decoded_by_pyroute2(payload)
    assert msg["cmd"] == m.CMD_SUBFLOW_CREATE
    assert msg.get_attr("MPTCP_PM_ATTR_TOKEN") == 0xDEADBEEF
    loc = msg.get_attr("MPTCP_PM_ATTR_ADDR")
    family = socket.AF_INET if local.version == 4 else socket.AF_INET6
    assert loc.get_attr("MPTCP_PM_ADDR_ATTR_FAMILY") == family
    assert A(loc.get_attr("MPTCP_PM_ADDR_ATTR_ADDR4") or loc.get_attr(
        "MPTCP_PM_ADDR_ATTR_ADDR6")) == local
    assert loc.get_attr("MPTCP_PM_ADDR_ATTR_ID") == 5
    assert loc.get_attr("MPTCP_PM_ADDR_ATTR_FLAGS") == int(EndpointFlags.BACKUP)
    assert loc.get_attr("MPTCP_PM_ADDR_ATTR_IF_IDX") == 3
    rem = msg.get_attr("MPTCP_PM_ATTR_ADDR_REMOTE")
    assert rem.get_attr("MPTCP_PM_ADDR_ATTR_PORT") == 4242


def test_limits_encoding_reads_back_through_pyroute2() -> None:
    payload = c.genl_payload(m.CMD_SET_LIMITS, 1, c.u32(c.ATTR_RCV_ADD_ADDRS, 3),
                             c.u32(c.ATTR_SUBFLOWS, 7))
    msg = decoded_by_pyroute2(payload)
    assert msg.get_attr("MPTCP_PM_ATTR_SUBFLOWS") == 7
    assert msg.get_attr("MPTCP_PM_ATTR_RCV_ADD_ADDRS") == 3


def event_bytes(kind: MptcpEventType | int, attrs: list[tuple[str, Any]]) -> bytes:
    msg = m.mptcp_event_msg()
    msg["cmd"] = int(kind)
    msg["version"] = 1
    msg["attrs"] = attrs
    msg["header"]["type"] = 30
    msg.encode()
    return bytes(msg.data)


def test_subflow_event_decodes_like_pyroute2_encodes_it() -> None:
    data = event_bytes(MptcpEventType.SUB_ESTABLISHED, [
        ("MPTCP_ATTR_TOKEN", 12345), ("MPTCP_ATTR_FAMILY", 10), ("MPTCP_ATTR_LOC_ID", 4),
        ("MPTCP_ATTR_REM_ID", 2), ("MPTCP_ATTR_SADDR6", "2001:db8::1"),
        ("MPTCP_ATTR_DADDR6", "2001:db8::2"), ("MPTCP_ATTR_SPORT", 40000),
        ("MPTCP_ATTR_DPORT", 443), ("MPTCP_ATTR_BACKUP", 1), ("MPTCP_ATTR_IF_IDX", 9),
        ("MPTCP_ATTR_ERROR", 111), ("MPTCP_ATTR_RESET_REASON", 3),
    ])
    event = decode_event(data)
    assert event == SubflowEvent(MptcpEventType.SUB_ESTABLISHED, 12345, 4, 2, A("2001:db8::1"),
                                 A("2001:db8::2"), 40000, 443, True, 9, 111, 3, None)


@pytest.mark.parametrize("kind", [MptcpEventType.CREATED, MptcpEventType.SUB_ESTABLISHED,
                                  MptcpEventType.ANNOUNCED])
def test_v4_mapped_addresses_of_a_dual_stack_socket_decode_as_ipv4(
        kind: MptcpEventType) -> None:
    """An AF_INET6 socket's IPv4 peer comes as ::ffff:a.b.c.d in the *6
    attributes (what this kernel sends); events carry it as plain IPv4, as
    sock_diag's subflows do, so the peer compares equal to an IPv4 address."""
    event = decode_event(event_bytes(kind, [
        ("MPTCP_ATTR_TOKEN", 7), ("MPTCP_ATTR_FAMILY", 10),
        ("MPTCP_ATTR_SADDR6", "::ffff:192.0.2.1"), ("MPTCP_ATTR_DADDR6", "::ffff:192.0.2.2"),
        ("MPTCP_ATTR_SPORT", 1234), ("MPTCP_ATTR_DPORT", 80)]))
    assert isinstance(event, ConnectionEvent | SubflowEvent | AddressAnnounced)
    assert event.daddr == A("192.0.2.2") and event.daddr.version == 4
    if not isinstance(event, AddressAnnounced):
        assert event.saddr == A("192.0.2.1") and event.saddr.version == 4
    ordinary_v6 = decode_event(event_bytes(kind, [
        ("MPTCP_ATTR_TOKEN", 7), ("MPTCP_ATTR_FAMILY", 10), ("MPTCP_ATTR_SADDR6", "::1"),
        ("MPTCP_ATTR_DADDR6", "2001:db8::ffff:c000:202")]))
    assert ordinary_v6.daddr == A("2001:db8::ffff:c000:202")  # type: ignore[union-attr]


def test_connection_announce_listener_and_unknown_events() -> None:
    created = decode_event(event_bytes(MptcpEventType.CREATED, [
        ("MPTCP_ATTR_TOKEN", 7), ("MPTCP_ATTR_FAMILY", 2), ("MPTCP_ATTR_SADDR4", "192.0.2.1"),
        ("MPTCP_ATTR_DADDR4", "192.0.2.2"), ("MPTCP_ATTR_SPORT", 1234), ("MPTCP_ATTR_DPORT", 80),
        ("MPTCP_ATTR_SERVER_SIDE", 1), ("MPTCP_ATTR_FLAGS", 1)]))
    assert isinstance(created, ConnectionEvent) and created.server_side
    assert (created.saddr, created.dport, int(created.flags)) == (A("192.0.2.1"), 80, 1)
    announced = decode_event(event_bytes(MptcpEventType.ANNOUNCED, [
        ("MPTCP_ATTR_TOKEN", 7), ("MPTCP_ATTR_REM_ID", 3), ("MPTCP_ATTR_FAMILY", 2),
        ("MPTCP_ATTR_DADDR4", "198.51.100.2"), ("MPTCP_ATTR_DPORT", 8080)]))
    assert announced == AddressAnnounced(7, 3, A("198.51.100.2"), 8080)
    listener = decode_event(event_bytes(MptcpEventType.LISTENER_CREATED, [
        ("MPTCP_ATTR_FAMILY", 2), ("MPTCP_ATTR_SPORT", 8080),
        ("MPTCP_ATTR_SADDR4", "0.0.0.0")]))
    assert listener == ListenerEvent(MptcpEventType.LISTENER_CREATED, A("0.0.0.0"), 8080)
    assert isinstance(decode_event(event_bytes(99, [("MPTCP_ATTR_TOKEN", 1)])),
                      UnknownMptcpEvent)


def test_truncated_attributes_end_the_walk_instead_of_raising() -> None:
    assert c.parse_attrs(b"\x08\x00\x01\x00\x01\x00") == {}
    assert c.parse_attrs(b"\x02\x00\x01\x00") == {}
