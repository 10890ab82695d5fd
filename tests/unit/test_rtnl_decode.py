"""The hand-written address decoder agrees with pyroute2's."""

from __future__ import annotations

import ipaddress

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from mptcpd_py.netlink.rtnl import decode_address
from mptcpd_py.netlink.types import AddressFlags


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
