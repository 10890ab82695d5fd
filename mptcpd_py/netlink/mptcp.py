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
import ipaddress
import socket

from mptcpd_py.errors import (
    FamilyMissing,
    KernelError,
    NoSuchEndpoint,
    NoSuchSubflow,
    PermissionDenied,
)
from mptcpd_py.netlink import codec as c
from mptcpd_py.netlink.socket import (
    NETLINK_GENERIC,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NetlinkSocket,
    RawMessage,
)
from mptcpd_py.netlink.stream import MulticastStream
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
    parse_address,
    unmapped,
)


async def resolve_family(sock: NetlinkSocket, name: str) -> tuple[int, dict[str, int]]:
    """(family id, {multicast group name: id}) of a generic netlink family."""
    try:
        replies = await sock.request_bytes(
            c.get_family_payload(name), c.GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK,
            f"resolve {name}")
    except KernelError as exc:
        if exc.errno == errno.ENOENT:
            raise FamilyMissing(
                f"generic netlink family {name!r} not found: this kernel has no MPTCP "
                "(CONFIG_MPTCP) or the module is not loaded"
            ) from None
        raise
    return c.decode_family(replies[0].data)


def _endpoint_from(raw: bytes) -> Endpoint:
    fields = c.decode_address_attr(raw)
    if fields["address"] is None:
        raise ValueError("endpoint without an address")
    return Endpoint(
        id=fields["id"],
        address=fields["address"],
        flags=EndpointFlags(fields["flags"]),
        ifindex=fields["ifindex"],
        port=fields["port"],
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

    async def _call(self, cmd: int, *attrs: bytes, dump: bool = False, slow: bool = False
                    ) -> list[dict[int, bytes]]:
        payload = c.genl_payload(cmd, c.MPTCP_PM_VERSION, *attrs)
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        replies = await self.sock.request_bytes(payload, self.family_id, flags,
                                                c.COMMAND_NAMES[cmd], slow=slow,
                                                immediate=not dump)
        return [c.genl_attrs(r.data)[1] for r in replies if r.type == self.family_id]

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
        await self._call(c.CMD_ADD_ADDR, c.address_attr(
            c.ATTR_ADDR, address, id=id or None, flags=flags, ifindex=ifindex, port=port))
        if id:
            return Endpoint(id, address, EndpointFlags(flags), ifindex, port)
        for endpoint in await self.endpoints():
            if endpoint.address == address and endpoint.port == port:
                return endpoint
        raise NoSuchEndpoint(errno.ENOENT, "added endpoint not found in dump", "add endpoint")

    async def delete_endpoint(self, id: int, address: Address | None = None) -> None:
        """Delete by id (the kernel ignores the address for a non-zero id;
        id 0 with an address means the initial subflow's address). The
        kernel waits for an RCU grace period here: sent from a thread."""
        await self._call(c.CMD_DEL_ADDR, c.address_attr(c.ATTR_ADDR, address, id=id),
                         slow=True)

    async def get_endpoint(self, id: int, token: int | None = None) -> Endpoint:
        attrs = [c.address_attr(c.ATTR_ADDR, id=id)]
        if token is not None:
            attrs.append(c.u32(c.ATTR_TOKEN, token))
        replies = await self._call(c.CMD_GET_ADDR, *attrs)
        if not replies or c.ATTR_ADDR not in replies[0]:
            raise NoSuchEndpoint(errno.ENOENT, f"id {id}", "get endpoint")
        return _endpoint_from(replies[0][c.ATTR_ADDR])

    async def endpoints(self, token: int | None = None) -> list[Endpoint]:
        """All in-kernel endpoints, or a userspace-PM connection's local addresses."""
        attrs = [] if token is None else [c.u32(c.ATTR_TOKEN, token)]
        replies = await self._call(c.CMD_GET_ADDR, *attrs, dump=True)
        return [_endpoint_from(r[c.ATTR_ADDR]) for r in replies if c.ATTR_ADDR in r]

    async def flush_endpoints(self) -> None:
        """Remove every endpoint. The kernel also resets add_addr_accepted to
        0 here (mptcp_net-next#579): the daemon deletes one by one instead."""
        await self._call(c.CMD_FLUSH_ADDRS, c.address_attr(c.ATTR_ADDR), slow=True)

    async def set_endpoint_flags(
        self,
        flags: EndpointFlags,
        *,
        id: int | None = None,
        address: Address | None = None,
    ) -> None:
        """Change backup / fullmesh of an in-kernel endpoint (by id or address)."""
        await self._call(c.CMD_SET_FLAGS,
                         c.address_attr(c.ATTR_ADDR, address, id=id, flags=flags))

    # ------------------------------------------------------------ limits

    async def get_limits(self) -> Limits:
        (reply,) = await self._call(c.CMD_GET_LIMITS)
        return Limits(
            subflows=c.as_u32(reply.get(c.ATTR_SUBFLOWS)),
            add_addr_accepted=c.as_u32(reply.get(c.ATTR_RCV_ADD_ADDRS)),
        )

    async def set_limits(
        self, subflows: int | None = None, add_addr_accepted: int | None = None
    ) -> None:
        attrs = []
        if add_addr_accepted is not None:
            attrs.append(c.u32(c.ATTR_RCV_ADD_ADDRS, add_addr_accepted))
        if subflows is not None:
            attrs.append(c.u32(c.ATTR_SUBFLOWS, subflows))
        await self._call(c.CMD_SET_LIMITS, *attrs)

    # ------------------------------------------------------------ userspace PM

    async def announce(
        self, token: int, address: Address, id: int, *, port: int = 0, ifindex: int = 0
    ) -> None:
        """ADD_ADDR to the peer of one connection (userspace PM). ``id`` > 0;
        the kernel wants the signal flag on it."""
        await self._call(
            c.CMD_ANNOUNCE,
            c.address_attr(c.ATTR_ADDR, address, id=id, flags=EndpointFlags.SIGNAL,
                           port=port, ifindex=ifindex),
            c.u32(c.ATTR_TOKEN, token),
        )

    async def remove(self, token: int, local_id: int) -> None:
        """RM_ADDR of an announced address id to the peer (userspace PM)."""
        await self._call(c.CMD_REMOVE, c.u32(c.ATTR_TOKEN, token),
                         c.u8(c.ATTR_LOC_ID, local_id))

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
        await self._call(
            c.CMD_SUBFLOW_CREATE,
            c.address_attr(c.ATTR_ADDR, local, id=local_id, flags=flags, ifindex=ifindex),
            c.u32(c.ATTR_TOKEN, token),
            c.address_attr(c.ATTR_ADDR_REMOTE, remote, port=remote_port),
        )

    async def subflow_destroy(
        self, token: int, local: Address, local_port: int, remote: Address, remote_port: int
    ) -> None:
        """Close one subflow, named by its four-tuple (userspace PM).

        Events name a dual-stack socket's IPv4 subflows in plain IPv4, but the
        kernel finds an AF_INET6 subflow (the initial one of such a socket, or
        one accepted on a [::] listener) only by its ::ffff: form: an IPv4 pair
        it does not find is asked for again mapped."""
        try:
            await self._destroy(token, local, local_port, remote, remote_port)
        except NoSuchSubflow as not_found:
            if local.version != 4 or remote.version != 4:
                raise
            try:
                await self._destroy(token, _mapped(local), local_port, _mapped(remote),
                                    remote_port)
            except NoSuchSubflow:
                raise not_found from None

    async def _destroy(
        self, token: int, local: Address, local_port: int, remote: Address, remote_port: int
    ) -> None:
        await self._call(
            c.CMD_SUBFLOW_DESTROY,
            c.address_attr(c.ATTR_ADDR, local, port=local_port),
            c.u32(c.ATTR_TOKEN, token),
            c.address_attr(c.ATTR_ADDR_REMOTE, remote, port=remote_port),
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
        await self._call(
            c.CMD_SET_FLAGS,
            c.address_attr(c.ATTR_ADDR, local, flags=flags, port=local_port),
            c.u32(c.ATTR_TOKEN, token),
            c.address_attr(c.ATTR_ADDR_REMOTE, remote, port=remote_port),
        )


# ----------------------------------------------------------------- events

_CONNECTION_TYPES = (MptcpEventType.CREATED, MptcpEventType.ESTABLISHED)
_SUBFLOW_TYPES = (
    MptcpEventType.SUB_ESTABLISHED,
    MptcpEventType.SUB_CLOSED,
    MptcpEventType.SUB_PRIORITY,
)
_LISTENER_TYPES = (MptcpEventType.LISTENER_CREATED, MptcpEventType.LISTENER_CLOSED)
_UNSPECIFIED: dict[int, Address] = {int(socket.AF_INET): parse_address("0.0.0.0"),
                                     int(socket.AF_INET6): parse_address("::")}
_EVENT_TYPES = {t.value: t for t in MptcpEventType}


def _mapped(address: Address) -> Address:
    """An IPv4 address as a dual-stack socket holds it: ::ffff:a.b.c.d."""
    return ipaddress.IPv6Address(f"::ffff:{address}")


def _addr(attrs: dict[int, bytes], v4: int, v6: int) -> Address:
    raw = attrs.get(v4) or attrs.get(v6)
    if raw is None:
        family = c.as_u16(attrs.get(c.EV_FAMILY), socket.AF_INET)
        return _UNSPECIFIED.get(family, _UNSPECIFIED[socket.AF_INET])
    # A dual-stack socket's IPv4 subflows come as ::ffff:a.b.c.d in the *6
    # attributes (MPTCP_ATTR_FAMILY AF_INET6): plain IPv4, as sock_diag's.
    return unmapped(c.as_address(raw))


def decode_event(data: bytes) -> MptcpEvent:
    """One ``mptcp_pm_events`` message -> its typed event."""
    cmd, attrs = c.genl_attrs(data)
    token = c.as_u32(attrs.get(c.EV_TOKEN))
    kind = _EVENT_TYPES.get(cmd)
    if kind is None:
        return UnknownMptcpEvent(cmd, tuple(sorted((str(k), v) for k, v in attrs.items())))
    if kind in _SUBFLOW_TYPES:
        return SubflowEvent(
            type=kind,
            token=token,
            local_id=c.as_u8(attrs.get(c.EV_LOC_ID)),
            remote_id=c.as_u8(attrs.get(c.EV_REM_ID)),
            saddr=_addr(attrs, c.EV_SADDR4, c.EV_SADDR6),
            daddr=_addr(attrs, c.EV_DADDR4, c.EV_DADDR6),
            sport=c.as_be16(attrs.get(c.EV_SPORT)),
            dport=c.as_be16(attrs.get(c.EV_DPORT)),
            backup=bool(c.as_u8(attrs.get(c.EV_BACKUP))),
            ifindex=c.as_s32(attrs.get(c.EV_IF_IDX)),
            error=c.as_u8(attrs.get(c.EV_ERROR)),
            reset_reason=c.as_u32(attrs[c.EV_RESET_REASON])
            if c.EV_RESET_REASON in attrs else None,
            reset_flags=c.as_u32(attrs[c.EV_RESET_FLAGS]) if c.EV_RESET_FLAGS in attrs else None,
        )
    if kind in _CONNECTION_TYPES:
        flags = MptcpEventFlags(c.as_u16(attrs.get(c.EV_FLAGS)))
        return ConnectionEvent(
            type=kind,
            token=token,
            saddr=_addr(attrs, c.EV_SADDR4, c.EV_SADDR6),
            daddr=_addr(attrs, c.EV_DADDR4, c.EV_DADDR6),
            sport=c.as_be16(attrs.get(c.EV_SPORT)),
            dport=c.as_be16(attrs.get(c.EV_DPORT)),
            server_side=bool(c.as_u8(attrs.get(c.EV_SERVER_SIDE)))
            or MptcpEventFlags.SERVER_SIDE in flags,
            flags=flags,
            timeout=c.as_u32(attrs[c.EV_TIMEOUT]) if c.EV_TIMEOUT in attrs else None,
        )
    if kind is MptcpEventType.CLOSED:
        return ConnectionClosed(token)
    if kind is MptcpEventType.ANNOUNCED:
        return AddressAnnounced(
            token=token,
            remote_id=c.as_u8(attrs.get(c.EV_REM_ID)),
            daddr=_addr(attrs, c.EV_DADDR4, c.EV_DADDR6),
            dport=c.as_be16(attrs.get(c.EV_DPORT)),
        )
    if kind is MptcpEventType.REMOVED:
        return AddressRemoved(token, c.as_u8(attrs.get(c.EV_REM_ID)))
    assert kind in _LISTENER_TYPES
    return ListenerEvent(
        type=kind, saddr=_addr(attrs, c.EV_SADDR4, c.EV_SADDR6),
        sport=c.as_be16(attrs.get(c.EV_SPORT)),
    )


class MptcpEvents(MulticastStream[MptcpEvent]):
    """The ``mptcp_pm_events`` multicast group as an async iterator.

    Joining fails with EPERM without CAP_NET_ADMIN. Undecodable messages are
    counted in ``malformed`` and skipped.
    """

    def __init__(self, sock: NetlinkSocket, max_queued: int) -> None:
        super().__init__("mptcp_pm_events", sock, max_queued)

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
            if c.GROUP_EVENTS not in groups:
                raise FamilyMissing("the mptcp_pm family has no mptcp_pm_events group")
            stream = cls(sock, max_queued)
            stream.family_id = family_id
            try:
                sock.add_membership(groups[c.GROUP_EVENTS])
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
