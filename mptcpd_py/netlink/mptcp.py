"""Typed commands and events of the kernel's ``mptcp_pm`` generic netlink family.

Facts that shape this code (see ``kernel-mptcp-netlink.md``):
- the kernel sends no event when an endpoint changes: only dumps show it;
- a missing endpoint id is EINVAL ("address not found"), not ENOENT;
- delete works by id only; ANNOUNCE / SUBFLOW_CREATE need a non-zero id;
- events and command replies share the message type, so events are read on
  a socket of their own.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Any

from pyroute2.netlink import ctrlmsg

from mptcpd_py.errors import FamilyMissing, KernelError, NoSuchEndpoint, PermissionDenied
from mptcpd_py.netlink import messages as m
from mptcpd_py.netlink.socket import (
    NETLINK_GENERIC,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NetlinkSocket,
    RawMessage,
)
from mptcpd_py.netlink.stream import EventStream
from mptcpd_py.netlink.types import (
    Address,
    AddressAnnounced,
    AddressRemoved,
    ConnectionClosed,
    ConnectionEvent,
    Endpoint,
    EndpointFlags,
    Limits,
    ListenerEvent,
    MptcpEvent,
    MptcpEventFlags,
    MptcpEventType,
    SubflowEvent,
    UnknownMptcpEvent,
    family_of,
    parse_address,
)

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3


async def resolve_family(sock: NetlinkSocket, name: str) -> tuple[int, dict[str, int]]:
    """(family id, {multicast group name: id}) of a generic netlink family."""
    msg = ctrlmsg()
    msg["cmd"] = CTRL_CMD_GETFAMILY
    msg["version"] = 1
    msg["attrs"] = [("CTRL_ATTR_FAMILY_NAME", name)]
    try:
        replies = await sock.request(
            msg, GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, f"resolve {name}"
        )
    except KernelError as exc:
        if exc.errno == errno.ENOENT:
            raise FamilyMissing(
                f"generic netlink family {name!r} not found: this kernel has no MPTCP "
                "(CONFIG_MPTCP) or the module is not loaded"
            ) from None
        raise
    reply = ctrlmsg(replies[0].data)
    reply.decode()
    groups: dict[str, int] = {}
    for group in reply.get_attr("CTRL_ATTR_MCAST_GROUPS") or []:
        groups[group.get_attr("CTRL_ATTR_MCAST_GRP_NAME")] = group.get_attr(
            "CTRL_ATTR_MCAST_GRP_ID"
        )
    return int(reply.get_attr("CTRL_ATTR_FAMILY_ID")), groups


def _addr_attrs(
    address: Address | None = None,
    *,
    id: int | None = None,
    flags: EndpointFlags | int | None = None,
    ifindex: int = 0,
    port: int = 0,
) -> dict[str, Any]:
    attrs: list[tuple[Any, ...]] = []
    if address is not None:
        attrs.append(("MPTCP_PM_ADDR_ATTR_FAMILY", family_of(address)))
        if address.version == 4:
            attrs.append(("MPTCP_PM_ADDR_ATTR_ADDR4", str(address)))
        else:
            attrs.append(("MPTCP_PM_ADDR_ATTR_ADDR6", str(address)))
    if id is not None:
        attrs.append(("MPTCP_PM_ADDR_ATTR_ID", id))
    if port:
        attrs.append(("MPTCP_PM_ADDR_ATTR_PORT", port))
    if flags is not None:
        attrs.append(("MPTCP_PM_ADDR_ATTR_FLAGS", int(flags)))
    if ifindex:
        attrs.append(("MPTCP_PM_ADDR_ATTR_IF_IDX", ifindex))
    return {"attrs": attrs}


def _endpoint_from(addr: Any) -> Endpoint:
    raw = addr.get_attr("MPTCP_PM_ADDR_ATTR_ADDR4") or addr.get_attr("MPTCP_PM_ADDR_ATTR_ADDR6")
    return Endpoint(
        id=int(addr.get_attr("MPTCP_PM_ADDR_ATTR_ID") or 0),
        address=parse_address(raw),
        flags=EndpointFlags(int(addr.get_attr("MPTCP_PM_ADDR_ATTR_FLAGS") or 0)),
        ifindex=int(addr.get_attr("MPTCP_PM_ADDR_ATTR_IF_IDX") or 0),
        port=int(addr.get_attr("MPTCP_PM_ADDR_ATTR_PORT") or 0),
    )


class MptcpPM:
    """The path-manager commands: in-kernel endpoints and limits, and the
    userspace-PM per-connection commands (announce, remove, subflows)."""

    def __init__(self, sock: NetlinkSocket, family_id: int, groups: dict[str, int]) -> None:
        self.sock = sock
        self.family_id = family_id
        self.groups = groups

    @classmethod
    async def open(cls, netns: str | None = None) -> MptcpPM:
        sock = NetlinkSocket(NETLINK_GENERIC, rcvbuf=1 << 20, netns=netns)
        try:
            family_id, groups = await resolve_family(sock, "mptcp_pm")
        except BaseException:
            sock.close()
            raise
        return cls(sock, family_id, groups)

    def close(self) -> None:
        self.sock.close()

    async def _call(
        self, cmd: int, attrs: Iterable[tuple[Any, ...]] = (), dump: bool = False,
        slow: bool = False,
    ) -> list[Any]:
        msg = m.mptcp_pm_msg()
        msg["cmd"] = cmd
        msg["version"] = m.MPTCP_PM_VERSION
        msg["attrs"] = list(attrs)
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        replies = await self.sock.request(msg, self.family_id, flags, m.COMMAND_NAMES[cmd],
                                          slow=slow)
        out = []
        for raw in replies:
            reply = m.mptcp_pm_msg(raw.data)
            reply.decode()
            out.append(reply)
        return out

    # ------------------------------------------------------------ endpoints

    async def add_endpoint(
        self,
        address: Address,
        flags: EndpointFlags = EndpointFlags.NONE,
        *,
        id: int = 0,
        ifindex: int = 0,
        port: int = 0,
    ) -> Endpoint:
        """Add an in-kernel PM endpoint; with ``id=0`` the kernel picks one
        and a dump finds out which."""
        addr = _addr_attrs(address, id=id or None, flags=flags, ifindex=ifindex, port=port)
        await self._call(m.CMD_ADD_ADDR, [("MPTCP_PM_ATTR_ADDR", addr, m.NLA_F_NESTED)])
        if id:
            return Endpoint(id, address, EndpointFlags(flags), ifindex, port)
        for endpoint in await self.endpoints():
            if endpoint.address == address and endpoint.port == port:
                return endpoint
        raise NoSuchEndpoint(errno.ENOENT, "added endpoint not found in dump", "add endpoint")

    async def delete_endpoint(self, id: int, address: Address | None = None) -> None:
        """Delete by id (the kernel ignores the address for a non-zero id;
        id 0 with an address means the initial subflow's address)."""
        addr = _addr_attrs(address, id=id)
        await self._call(m.CMD_DEL_ADDR, [("MPTCP_PM_ATTR_ADDR", addr, m.NLA_F_NESTED)],
                         slow=True)

    async def get_endpoint(self, id: int, token: int | None = None) -> Endpoint:
        attrs: list[tuple[Any, ...]] = [
            ("MPTCP_PM_ATTR_ADDR", _addr_attrs(id=id), m.NLA_F_NESTED)
        ]
        if token is not None:
            attrs.append(("MPTCP_PM_ATTR_TOKEN", token))
        replies = await self._call(m.CMD_GET_ADDR, attrs)
        if not replies:
            raise NoSuchEndpoint(errno.ENOENT, f"id {id}", "get endpoint")
        return _endpoint_from(replies[0].get_attr("MPTCP_PM_ATTR_ADDR"))

    async def endpoints(self, token: int | None = None) -> list[Endpoint]:
        """All in-kernel endpoints, or a userspace-PM connection's local addresses."""
        attrs: list[tuple[Any, ...]] = []
        if token is not None:
            attrs.append(("MPTCP_PM_ATTR_TOKEN", token))
        replies = await self._call(m.CMD_GET_ADDR, attrs, dump=True)
        return [_endpoint_from(r.get_attr("MPTCP_PM_ATTR_ADDR")) for r in replies]

    async def flush_endpoints(self) -> None:
        """Remove every endpoint. The kernel also resets add_addr_accepted to
        0 here (mptcp_net-next#579): the daemon deletes one by one instead."""
        await self._call(m.CMD_FLUSH_ADDRS,
                         [("MPTCP_PM_ATTR_ADDR", _addr_attrs(), m.NLA_F_NESTED)], slow=True)

    async def set_endpoint_flags(
        self,
        flags: EndpointFlags,
        *,
        id: int | None = None,
        address: Address | None = None,
    ) -> None:
        """Change backup / fullmesh of an in-kernel endpoint (by id or address)."""
        addr = _addr_attrs(address, id=id, flags=flags)
        await self._call(m.CMD_SET_FLAGS, [("MPTCP_PM_ATTR_ADDR", addr, m.NLA_F_NESTED)])

    # ------------------------------------------------------------ limits

    async def get_limits(self) -> Limits:
        (reply,) = await self._call(m.CMD_GET_LIMITS)
        return Limits(
            subflows=int(reply.get_attr("MPTCP_PM_ATTR_SUBFLOWS") or 0),
            add_addr_accepted=int(reply.get_attr("MPTCP_PM_ATTR_RCV_ADD_ADDRS") or 0),
        )

    async def set_limits(
        self, subflows: int | None = None, add_addr_accepted: int | None = None
    ) -> None:
        attrs: list[tuple[Any, ...]] = []
        if add_addr_accepted is not None:
            attrs.append(("MPTCP_PM_ATTR_RCV_ADD_ADDRS", add_addr_accepted))
        if subflows is not None:
            attrs.append(("MPTCP_PM_ATTR_SUBFLOWS", subflows))
        await self._call(m.CMD_SET_LIMITS, attrs)

    # ------------------------------------------------------------ userspace PM

    async def announce(
        self, token: int, address: Address, id: int, *, port: int = 0, ifindex: int = 0
    ) -> None:
        """ADD_ADDR to the peer of one connection (userspace PM). ``id`` > 0."""
        addr = _addr_attrs(
            address, id=id, flags=EndpointFlags.SIGNAL, port=port, ifindex=ifindex
        )
        await self._call(
            m.CMD_ANNOUNCE,
            [("MPTCP_PM_ATTR_ADDR", addr, m.NLA_F_NESTED), ("MPTCP_PM_ATTR_TOKEN", token)],
        )

    async def remove(self, token: int, local_id: int) -> None:
        """RM_ADDR of an announced address id to the peer (userspace PM)."""
        await self._call(
            m.CMD_REMOVE, [("MPTCP_PM_ATTR_TOKEN", token), ("MPTCP_PM_ATTR_LOC_ID", local_id)]
        )

    async def subflow_create(
        self,
        token: int,
        local: Address,
        local_id: int,
        remote: Address,
        remote_port: int,
        *,
        ifindex: int = 0,
        backup: bool = False,
    ) -> None:
        """Open a subflow local -> remote:port on one connection (userspace PM)."""
        flags = EndpointFlags.BACKUP if backup else EndpointFlags.NONE
        loc = _addr_attrs(local, id=local_id, flags=flags, ifindex=ifindex)
        rem = _addr_attrs(remote, port=remote_port)
        await self._call(
            m.CMD_SUBFLOW_CREATE,
            [
                ("MPTCP_PM_ATTR_ADDR", loc, m.NLA_F_NESTED),
                ("MPTCP_PM_ATTR_TOKEN", token),
                ("MPTCP_PM_ATTR_ADDR_REMOTE", rem, m.NLA_F_NESTED),
            ],
        )

    async def subflow_destroy(
        self, token: int, local: Address, local_port: int, remote: Address, remote_port: int
    ) -> None:
        """Close one subflow, named by its four-tuple (userspace PM)."""
        loc = _addr_attrs(local, port=local_port)
        rem = _addr_attrs(remote, port=remote_port)
        await self._call(
            m.CMD_SUBFLOW_DESTROY,
            [
                ("MPTCP_PM_ATTR_ADDR", loc, m.NLA_F_NESTED),
                ("MPTCP_PM_ATTR_TOKEN", token),
                ("MPTCP_PM_ATTR_ADDR_REMOTE", rem, m.NLA_F_NESTED),
            ],
        )

    async def set_subflow_backup(
        self,
        token: int,
        local: Address,
        remote: Address,
        backup: bool,
        *,
        local_port: int = 0,
        remote_port: int = 0,
    ) -> None:
        """MP_PRIO on one connection's subflow(s) local -> remote (userspace PM)."""
        flags = EndpointFlags.BACKUP if backup else EndpointFlags.NONE
        loc = _addr_attrs(local, flags=flags, port=local_port)
        rem = _addr_attrs(remote, port=remote_port)
        await self._call(
            m.CMD_SET_FLAGS,
            [
                ("MPTCP_PM_ATTR_ADDR", loc, m.NLA_F_NESTED),
                ("MPTCP_PM_ATTR_TOKEN", token),
                ("MPTCP_PM_ATTR_ADDR_REMOTE", rem, m.NLA_F_NESTED),
            ],
        )


# ----------------------------------------------------------------- events

_CONNECTION_TYPES = (MptcpEventType.CREATED, MptcpEventType.ESTABLISHED)
_SUBFLOW_TYPES = (
    MptcpEventType.SUB_ESTABLISHED,
    MptcpEventType.SUB_CLOSED,
    MptcpEventType.SUB_PRIORITY,
)
_LISTENER_TYPES = (MptcpEventType.LISTENER_CREATED, MptcpEventType.LISTENER_CLOSED)


def _attr_dict(msg: Any) -> dict[str, Any]:
    return {name: value for name, value, *_ in msg["attrs"]}


def _addr(attrs: dict[str, Any], which: str) -> Address:
    raw = attrs.get(f"MPTCP_ATTR_{which}4") or attrs.get(f"MPTCP_ATTR_{which}6")
    if raw is None:
        family = attrs.get("MPTCP_ATTR_FAMILY", socket.AF_INET)
        return parse_address("::" if family == socket.AF_INET6 else "0.0.0.0")
    return parse_address(raw)


def decode_event(data: bytes) -> MptcpEvent:
    """One ``mptcp_pm_events`` message -> its typed event."""
    msg = m.mptcp_event_msg(data)
    msg.decode()
    attrs = _attr_dict(msg)
    cmd = int(msg["cmd"])
    token = int(attrs.get("MPTCP_ATTR_TOKEN", 0))
    try:
        kind = MptcpEventType(cmd)
    except ValueError:
        return UnknownMptcpEvent(cmd, tuple(sorted(attrs.items())))
    if kind in _CONNECTION_TYPES:
        flags = MptcpEventFlags(int(attrs.get("MPTCP_ATTR_FLAGS", 0)))
        return ConnectionEvent(
            type=kind,
            token=token,
            saddr=_addr(attrs, "SADDR"),
            daddr=_addr(attrs, "DADDR"),
            sport=int(attrs.get("MPTCP_ATTR_SPORT", 0)),
            dport=int(attrs.get("MPTCP_ATTR_DPORT", 0)),
            server_side=bool(attrs.get("MPTCP_ATTR_SERVER_SIDE", 0))
            or MptcpEventFlags.SERVER_SIDE in flags,
            flags=flags,
            timeout=attrs.get("MPTCP_ATTR_TIMEOUT"),
        )
    if kind is MptcpEventType.CLOSED:
        return ConnectionClosed(token)
    if kind is MptcpEventType.ANNOUNCED:
        return AddressAnnounced(
            token=token,
            remote_id=int(attrs.get("MPTCP_ATTR_REM_ID", 0)),
            daddr=_addr(attrs, "DADDR"),
            dport=int(attrs.get("MPTCP_ATTR_DPORT", 0)),
        )
    if kind is MptcpEventType.REMOVED:
        return AddressRemoved(token, int(attrs.get("MPTCP_ATTR_REM_ID", 0)))
    if kind in _SUBFLOW_TYPES:
        return SubflowEvent(
            type=kind,
            token=token,
            local_id=int(attrs.get("MPTCP_ATTR_LOC_ID", 0)),
            remote_id=int(attrs.get("MPTCP_ATTR_REM_ID", 0)),
            saddr=_addr(attrs, "SADDR"),
            daddr=_addr(attrs, "DADDR"),
            sport=int(attrs.get("MPTCP_ATTR_SPORT", 0)),
            dport=int(attrs.get("MPTCP_ATTR_DPORT", 0)),
            backup=bool(attrs.get("MPTCP_ATTR_BACKUP", 0)),
            ifindex=int(attrs.get("MPTCP_ATTR_IF_IDX", 0)),
            error=int(attrs.get("MPTCP_ATTR_ERROR", 0)),
            reset_reason=attrs.get("MPTCP_ATTR_RESET_REASON"),
            reset_flags=attrs.get("MPTCP_ATTR_RESET_FLAGS"),
        )
    assert kind in _LISTENER_TYPES
    return ListenerEvent(
        type=kind, saddr=_addr(attrs, "SADDR"), sport=int(attrs.get("MPTCP_ATTR_SPORT", 0))
    )


class MptcpEvents(EventStream[MptcpEvent]):
    """The ``mptcp_pm_events`` multicast group as an async iterator.

    Joining fails with EPERM without CAP_NET_ADMIN. Undecodable messages are
    counted in ``malformed`` and skipped.
    """

    def __init__(self, sock: NetlinkSocket, max_queued: int) -> None:
        super().__init__("mptcp_pm_events", max_queued)
        self.sock = sock
        self.malformed = 0
        sock.on_multicast = self._on_message
        sock.on_overflow = self.overflow

    @classmethod
    async def open(
        cls,
        netns: str | None = None,
        rcvbuf: int = 16 * 1024 * 1024,
        max_queued: int = 100_000,
    ) -> MptcpEvents:
        sock = NetlinkSocket(NETLINK_GENERIC, rcvbuf=rcvbuf, netns=netns)
        try:
            family_id, groups = await resolve_family(sock, "mptcp_pm")
            if m.GROUP_EVENTS not in groups:
                raise FamilyMissing("the mptcp_pm family has no mptcp_pm_events group")
            stream = cls(sock, max_queued)
            stream.family_id = family_id
            try:
                sock.add_membership(groups[m.GROUP_EVENTS])
            except PermissionError as exc:
                raise PermissionDenied(
                    exc.errno or errno.EPERM, "", "join mptcp_pm_events"
                ) from None
        except BaseException:
            sock.close()
            raise
        sock.start()
        return stream

    family_id = 0

    def _on_message(self, raw: RawMessage) -> None:
        if raw.type != self.family_id:
            return
        try:
            event = decode_event(raw.data)
        except Exception:
            self.malformed += 1
            return
        self.push(event)

    def close(self) -> None:
        super().close()
        self.sock.close()
