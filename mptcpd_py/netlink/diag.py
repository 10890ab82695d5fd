"""sock_diag: MPTCP subflows and listeners as the kernel has them now.

After an event overflow the userspace path manager's connection table is
rebuilt from this (``ss -M`` reads the same): every TCP subflow that runs
the "mptcp" ULP reports its connection's token, its local and remote
address ids and its backup flags.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from mptcpd_py.netlink.socket import NLM_F_DUMP, NLM_F_REQUEST, NetlinkSocket
from mptcpd_py.netlink.types import Address, unmapped

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_INFO = 2
INET_DIAG_ULP_INFO = 19
INET_DIAG_REQ_PROTOCOL = 3
INET_ULP_INFO_NAME = 1
INET_ULP_INFO_MPTCP = 3
SUBFLOW_ATTR_TOKEN_LOC = 2
SUBFLOW_ATTR_FLAGS = 8
SUBFLOW_ATTR_ID_REM = 9
SUBFLOW_ATTR_ID_LOC = 10
SUBFLOW_FLAG_BKUP_REM = 1 << 4
SUBFLOW_FLAG_BKUP_LOC = 1 << 5
IPPROTO_MPTCP = 262
TCP_ESTABLISHED = 1
TCP_LISTEN = 10

_REQ = struct.Struct("=BBBBI2H4I4II2I")  # inet_diag_req_v2 (sockid zeroed)
_MSG = struct.Struct("=BBBB2H4I4II2IIIIII")  # inet_diag_msg
_NLA = struct.Struct("=HH")


@dataclass(frozen=True, slots=True)
class DiagSubflow:
    token: int
    local: Address
    local_port: int
    remote: Address
    remote_port: int
    local_id: int
    remote_id: int
    backup: bool
    ifindex: int


class _Raw:
    """The minimal message object NetlinkSocket.request expects."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.header: dict[str, int] = {}
        self.data = b""

    def __getitem__(self, key: str) -> dict[str, int]:
        return self.header

    def encode(self) -> None:
        h = self.header
        length = 16 + len(self.payload)
        self.data = struct.pack("=IHHII", length, h["type"], h["flags"], h["sequence_number"],
                                h["pid"]) + self.payload


def _addr(family: int, words: tuple[int, ...]) -> Address:
    raw = struct.pack("=4I", *words)
    return ipaddress.ip_address(raw[:4] if family == socket.AF_INET else raw)


def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4: offset + length]
        offset += (length + 3) & ~3
    return out


class SockDiag:
    def __init__(self, netns: str | None = None) -> None:
        self.sock = NetlinkSocket(NETLINK_SOCK_DIAG, rcvbuf=4 << 20, netns=netns)

    def close(self) -> None:
        self.sock.close()

    async def _dump(self, family: int, protocol: int, states: int, ext: int) -> list[bytes]:
        # Protocols above 255 (MPTCP is 262) travel in an INET_DIAG_REQ_PROTOCOL attribute.
        payload = _REQ.pack(family, protocol if protocol < 256 else 0, ext, 0, states,
                            *([0] * 13))
        if protocol >= 256:
            payload += struct.pack("=HHI", 8, INET_DIAG_REQ_PROTOCOL, protocol)
        req = _Raw(payload)
        replies = await self.sock.request(req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                                          "sock_diag dump")
        return [r.data for r in replies if r.type == SOCK_DIAG_BY_FAMILY]

    async def subflows(self) -> list[DiagSubflow]:
        """Every established TCP subflow of an MPTCP connection."""
        out: list[DiagSubflow] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for data in await self._dump(family, socket.IPPROTO_TCP, 1 << TCP_ESTABLISHED,
                                         1 << (INET_DIAG_INFO - 1)):
                sub = self._parse_subflow(data)
                if sub is not None:
                    out.append(sub)
        return out

    def _parse_subflow(self, data: bytes) -> DiagSubflow | None:
        fields = _MSG.unpack_from(data, 16)
        family = fields[0]
        sport, dport = socket.ntohs(fields[4]), socket.ntohs(fields[5])
        src, dst = fields[6:10], fields[10:14]
        ifindex = fields[14]
        attrs = _attrs(data, 16 + _MSG.size, len(data))
        ulp = attrs.get(INET_DIAG_ULP_INFO)
        if ulp is None:
            return None
        ulp_attrs = _attrs(ulp, 0, len(ulp))
        if ulp_attrs.get(INET_ULP_INFO_NAME, b"").rstrip(b"\0") != b"mptcp":
            return None
        info = _attrs(ulp_attrs.get(INET_ULP_INFO_MPTCP, b""), 0,
                      len(ulp_attrs.get(INET_ULP_INFO_MPTCP, b"")))
        token = struct.unpack("=I", info[SUBFLOW_ATTR_TOKEN_LOC])[0] \
            if SUBFLOW_ATTR_TOKEN_LOC in info else 0
        flags = struct.unpack("=I", info[SUBFLOW_ATTR_FLAGS])[0] \
            if SUBFLOW_ATTR_FLAGS in info else 0
        local_id = info.get(SUBFLOW_ATTR_ID_LOC, b"\0")[0]
        remote_id = info.get(SUBFLOW_ATTR_ID_REM, b"\0")[0]
        local, remote = unmapped(_addr(family, src)), unmapped(_addr(family, dst))
        return DiagSubflow(token, local, sport, remote, dport, local_id, remote_id,
                           bool(flags & SUBFLOW_FLAG_BKUP_LOC), ifindex)

    async def mptcp_listeners(self) -> list[tuple[Address, int]]:
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for data in await self._dump(family, IPPROTO_MPTCP, 1 << TCP_LISTEN, 0):
                fields = _MSG.unpack_from(data, 16)
                out.append((_addr(family, fields[6:10]), socket.ntohs(fields[4])))
        return out
