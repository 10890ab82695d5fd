"""Typed values crossing the netlink layer's boundary.

Everything here is a frozen dataclass or an enum: the rest of the daemon
never sees a pyroute2 message or a dict of attribute names.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str | bytes | int | Address) -> Address:
    """An IPv4 or IPv6 address from text, packed bytes or an int."""
    if isinstance(text, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return text
    return ipaddress.ip_address(text)


def unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) as the IPv4 address it
    stands for; any other address as it is. The kernel reports a dual-stack
    (AF_INET6) socket's IPv4 subflows mapped: one peer, one key, one family."""
    if isinstance(address, ipaddress.IPv6Address) and (v4 := address.ipv4_mapped) is not None:
        return v4
    return address


def family_of(address: Address) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


class EndpointFlags(enum.IntFlag):
    """``MPTCP_PM_ADDR_FLAG_*``: what the in-kernel path manager does with an endpoint."""

    NONE = 0
    SIGNAL = 1
    SUBFLOW = 2
    BACKUP = 4
    FULLMESH = 8
    IMPLICIT = 16
    LAMINAR = 32

    @classmethod
    def from_names(cls, names: Iterable[str]) -> EndpointFlags:
        flags = cls.NONE
        for name in names:
            try:
                flags |= cls[name.upper()]
            except KeyError:
                raise ValueError(f"unknown endpoint flag {name!r}") from None
        return flags

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(
            f.name.lower() for f in EndpointFlags if f.name and f.value and f in self
        )

    def __str__(self) -> str:
        # Every endpoint log line and monitor event spells its flags: ~50
        # enum operations each time, memoised per value (there are 64).
        text = _FLAG_TEXT.get(self._value_)
        if text is None:
            text = _FLAG_TEXT[self._value_] = ",".join(self.names) or "-"
        return text


_FLAG_TEXT: dict[int, str] = {}


#: Flags SET_FLAGS may change on an existing endpoint; others need delete + add.
CHANGEABLE_FLAGS = EndpointFlags.BACKUP | EndpointFlags.FULLMESH


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One in-kernel path manager endpoint (``ip mptcp endpoint``)."""

    id: int
    address: Address
    flags: EndpointFlags = EndpointFlags.NONE
    ifindex: int = 0
    port: int = 0

    @property
    def key(self) -> tuple[Address, int]:
        """The kernel's identity for duplicates: address and port."""
        return (self.address, self.port)

    def __str__(self) -> str:
        port = f" port {self.port}" if self.port else ""
        dev = f" ifindex {self.ifindex}" if self.ifindex else ""
        return f"{self.address}{port} id {self.id} {self.flags}{dev}"


@dataclass(frozen=True, slots=True)
class Limits:
    """``ip mptcp limits``: per-connection caps of the in-kernel path manager."""

    subflows: int
    add_addr_accepted: int


class MptcpEventType(enum.IntEnum):
    CREATED = 1
    ESTABLISHED = 2
    CLOSED = 3
    ANNOUNCED = 6
    REMOVED = 7
    SUB_ESTABLISHED = 10
    SUB_CLOSED = 11
    SUB_PRIORITY = 13
    LISTENER_CREATED = 15
    LISTENER_CLOSED = 16


class MptcpEventFlags(enum.IntFlag):
    NONE = 0
    DENY_JOIN_ID0 = 1
    SERVER_SIDE = 2


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """CREATED or ESTABLISHED: a connection and its initial subflow."""

    type: MptcpEventType
    token: int
    saddr: Address
    daddr: Address
    sport: int
    dport: int
    server_side: bool = False
    flags: MptcpEventFlags = MptcpEventFlags.NONE
    timeout: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    token: int
    type: MptcpEventType = MptcpEventType.CLOSED


@dataclass(frozen=True, slots=True)
class AddressAnnounced:
    """The peer announced an address (ADD_ADDR) on this connection."""

    token: int
    remote_id: int
    daddr: Address
    dport: int = 0
    type: MptcpEventType = MptcpEventType.ANNOUNCED


@dataclass(frozen=True, slots=True)
class AddressRemoved:
    """The peer withdrew an address (RM_ADDR)."""

    token: int
    remote_id: int
    type: MptcpEventType = MptcpEventType.REMOVED


@dataclass(frozen=True, slots=True)
class SubflowEvent:
    """SUB_ESTABLISHED, SUB_CLOSED or SUB_PRIORITY."""

    type: MptcpEventType
    token: int
    local_id: int
    remote_id: int
    saddr: Address
    daddr: Address
    sport: int
    dport: int
    backup: bool = False
    ifindex: int = 0
    error: int = 0
    reset_reason: int | None = None
    reset_flags: int | None = None


@dataclass(frozen=True, slots=True)
class ListenerEvent:
    """LISTENER_CREATED or LISTENER_CLOSED: an MPTCP listening socket."""

    type: MptcpEventType
    saddr: Address
    sport: int


@dataclass(frozen=True, slots=True)
class UnknownMptcpEvent:
    """An event type this version does not know; kept so nothing is silently lost."""

    type: int
    attrs: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class ResyncNeeded:
    """The event stream lost messages (ENOBUFS or a full queue): state must be re-read."""

    source: str
    reason: str = "overflow"


MptcpEvent = (
    ConnectionEvent
    | ConnectionClosed
    | AddressAnnounced
    | AddressRemoved
    | SubflowEvent
    | ListenerEvent
    | UnknownMptcpEvent
)


# --------------------------------------------------------------------- rtnetlink


class AddressFlags(enum.IntFlag):
    """``IFA_F_*``."""

    NONE = 0
    SECONDARY = 0x01  # also TEMPORARY for IPv6
    NODAD = 0x02
    OPTIMISTIC = 0x04
    DADFAILED = 0x08
    HOMEADDRESS = 0x10
    DEPRECATED = 0x20
    TENTATIVE = 0x40
    PERMANENT = 0x80
    MANAGETEMPADDR = 0x100
    NOPREFIXROUTE = 0x200
    MCAUTOJOIN = 0x400
    STABLE_PRIVACY = 0x800


class Scope(enum.IntEnum):
    UNIVERSE = 0
    SITE = 200
    LINK = 253
    HOST = 254
    NOWHERE = 255

    @classmethod
    def of(cls, value: int) -> Scope | int:
        try:
            return cls(value)
        except ValueError:
            return value


IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
IFF_LOWER_UP = 0x10000
ARPHRD_LOOPBACK = 772
ARPHRD_NONE = 0xFFFE
ARPHRD_RAWIP = 519


@dataclass(frozen=True, slots=True)
class Link:
    """A network interface as rtnetlink reports it."""

    index: int
    name: str
    flags: int = 0
    link_type: int = 1  # ARPHRD_ETHER
    kind: str = ""  # IFLA_INFO_KIND: veth, bridge, wireguard, ...
    operstate: str = ""  # up, down, dormant, unknown, lowerlayerdown, ...
    mtu: int = 0

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def running(self) -> bool:
        """Administratively up and with carrier: the only state a subflow can use."""
        return bool(self.flags & IFF_UP) and bool(self.flags & (IFF_RUNNING | IFF_LOWER_UP))

    @property
    def loopback(self) -> bool:
        return bool(self.flags & IFF_LOOPBACK) or self.link_type == ARPHRD_LOOPBACK



_TENTATIVE_OR_DADFAILED = int(AddressFlags.TENTATIVE | AddressFlags.DADFAILED)
_DEPRECATED = int(AddressFlags.DEPRECATED)


@dataclass(frozen=True, slots=True)
class IfAddress:
    """An address assigned to an interface."""

    index: int
    address: Address
    prefixlen: int
    scope: int = Scope.UNIVERSE
    flags: AddressFlags = AddressFlags.NONE
    label: str = ""

    @property
    def family(self) -> int:
        return family_of(self.address)

    @property
    def tentative(self) -> bool:
        return bool(int(self.flags) & _TENTATIVE_OR_DADFAILED)

    @property
    def deprecated(self) -> bool:
        return bool(int(self.flags) & _DEPRECATED)

    @property
    def temporary(self) -> bool:
        return self.address.version == 6 and bool(self.flags & AddressFlags.SECONDARY)

    @property
    def network(self) -> Network:
        return ipaddress.ip_interface(f"{self.address}/{self.prefixlen}").network


RT_TABLE_MAIN = 254


@dataclass(frozen=True, slots=True)
class Nexthop:
    """One path of a multipath route. ``dead``: the kernel keeps it but does
    not use it (its link is down or has no address of the family)."""

    oif: int
    gateway: Address | None = None
    dead: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """A route; the daemon cares about default routes and its own tables."""

    family: int
    dst: Network
    table: int = RT_TABLE_MAIN
    gateway: Address | None = None
    oif: int = 0
    priority: int = 0
    protocol: int = 0
    scope: int = 0
    type: int = 1  # RTN_UNICAST
    prefsrc: Address | None = None
    # A multipath route's paths (``gateway`` and ``oif`` are the first's);
    # empty for a route with one path.
    nexthops: tuple[Nexthop, ...] = ()

    @property
    def is_default(self) -> bool:
        return self.dst.prefixlen == 0


@dataclass(frozen=True, slots=True)
class Rule:
    """An ``ip rule`` (policy routing), as the daemon's source routing uses them."""

    family: int
    table: int
    priority: int
    src: Network | None = None


@dataclass(frozen=True, slots=True)
class LinkEvent:
    link: Link
    removed: bool = False


@dataclass(frozen=True, slots=True)
class AddressEvent:
    address: IfAddress
    removed: bool = False


@dataclass(frozen=True, slots=True)
class RouteEvent:
    route: Route
    removed: bool = False
    # NLM_F_REPLACE: this route took the place of the one with its
    # destination and metric, whose paths get no message of their own.
    replaced: bool = False


RtnlEvent = LinkEvent | AddressEvent | RouteEvent


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the running kernel offers, probed once at start."""

    mptcp_enabled: bool
    family_present: bool
    path_manager: str  # "kernel" | "userspace" | "" (unknown)
    available_path_managers: tuple[str, ...] = ()
    kept_flags: EndpointFlags = EndpointFlags.NONE
    max_endpoints: int = 8
    max_limit: int = 8
    can_write: bool = True
    notes: tuple[str, ...] = field(default=())
