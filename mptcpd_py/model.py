"""The network as the daemon sees it: interfaces, addresses and default
routes, kept current from rtnetlink, and which addresses are eligible
under ``[network]``.

The model is mutable and owned by the core; plugins get an immutable
:class:`NetworkSnapshot`.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from mptcpd_py.config import NetworkConfig
from mptcpd_py.netlink.types import (
    RT_TABLE_MAIN,
    Address,
    AddressEvent,
    IfAddress,
    Link,
    LinkEvent,
    Route,
    RouteEvent,
    RtnlEvent,
)

_ULA = ipaddress.ip_network("fc00::/7")
RTN_UNICAST = 1


@dataclass(frozen=True, slots=True)
class Interface:
    """A link plus what the policies want to know about it."""

    index: int
    name: str
    up: bool
    running: bool
    kind: str = ""
    link_type: int = 1
    devtype: str = ""  # DEVTYPE= of /sys/class/net/NAME/uevent (wwan, wlan, ...)
    loopback: bool = False


@dataclass(frozen=True, slots=True)
class Candidate:
    """An eligible address: what a policy may turn into an endpoint."""

    address: IfAddress
    interface: Interface
    rank: int  # index of the first matching [network] include glob (config order)

    @property
    def priority(self) -> tuple[int, int, int, int]:
        """Lower wins when slots are scarce: config order, then interface order."""
        return (self.rank, self.interface.index, self.address.address.version,
                int(self.address.address))


_T = TypeVar("_T")


class _computed_once(Generic[_T]):
    """functools.cached_property without its lock (Python < 3.12 takes an
    RLock per first access): snapshots are built and read on the event
    loop's thread, one per network change."""

    def __init__(self, fn: Callable[[Any], _T]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> _T:
        if obj is None:
            return self  # type: ignore[return-value]
        value = self.fn(obj)
        obj.__dict__[self.name] = value  # found there first from now on
        return value


@dataclass(frozen=True)
class NetworkSnapshot:
    """An immutable view of the network, handed to plugins."""

    interfaces: Mapping[int, Interface] = field(default_factory=dict)
    addresses: tuple[IfAddress, ...] = ()
    eligible: tuple[Candidate, ...] = ()
    ineligible: Mapping[tuple[int, Address], str] = field(default_factory=dict)
    gateways: Mapping[tuple[int, int], Address] = field(default_factory=dict)
    generation: int = 0

    @_computed_once
    def local_addresses(self) -> frozenset[Address]:
        """Every address of this host (what an intent may name)."""
        return frozenset(a.address for a in self.addresses)

    @_computed_once
    def address_interfaces(self) -> frozenset[tuple[Address, int]]:
        return frozenset((a.address, a.index) for a in self.addresses)

    @_computed_once
    def address_on(self) -> Mapping[tuple[int, Address], IfAddress]:
        """(interface index, address) -> the address (its prefix length)."""
        return {(a.index, a.address): a for a in self.addresses}

    def interface(self, name: str) -> Interface | None:
        for iface in self.interfaces.values():
            if iface.name == name:
                return iface
        return None

    def has_default_route(self, index: int, family: int) -> bool:
        return (index, family) in self.gateways or (index, -family) in self.gateways

    def gateway(self, index: int, family: int) -> Address | None:
        return self.gateways.get((index, family))

    def candidate(self, address: Address) -> Candidate | None:
        for c in self.eligible:
            if c.address.address == address:
                return c
        return None


def matches_any(name: str, globs: Iterable[str]) -> int | None:
    """Index of the first glob matching ``name``, or None."""
    found = _globs_regex(tuple(globs)).match(name)
    return found.lastindex - 1 if found is not None and found.lastindex else None


@functools.lru_cache(maxsize=256)
def _globs_regex(globs: tuple[str, ...]) -> re.Pattern[str]:
    """All the globs in one regex, one group each: the engine tries them in
    order, so the group that matched is the first matching glob (one match
    call instead of an fnmatch call per glob; fnmatch.translate makes no
    groups of its own)."""
    if not globs:
        return re.compile(r"(?!)")
    return re.compile("|".join(f"({fnmatch.translate(glob)})" for glob in globs))


def ineligibility(
    addr: IfAddress,
    iface: Interface | None,
    has_default_route: bool,
    cfg: NetworkConfig,
) -> str | None:
    """Why an address may not become an endpoint, or None when it may."""
    ip = addr.address
    if iface is None:
        return "interface unknown"
    if ip.version == 4:
        # The same tests as ipaddress's properties, on the int: each property
        # builds a network comparison, and this runs for every new address.
        value = int(ip)
        unspecified, multicast = value == 0, value >> 28 == 0xE
        loopback, link_local = value >> 24 == 127, value >> 16 == 0xA9FE
    else:
        unspecified, multicast = ip.is_unspecified, ip.is_multicast
        loopback, link_local = ip.is_loopback, ip.is_link_local
    if unspecified or multicast:
        return "not a unicast address"
    if cfg.skip_loopback and (iface.loopback or loopback):
        return "loopback"
    if cfg.skip_link_local and link_local:
        return "link-local"
    if cfg.skip_ula and ip.version == 6 and ip in _ULA:
        return "IPv6 unique local address"
    if addr.tentative:
        return "tentative (duplicate address detection not finished)"
    if cfg.skip_deprecated and addr.deprecated:
        return "deprecated"
    if matches_any(iface.name, cfg.include) is None:
        return "interface not in [network] include"
    if matches_any(iface.name, cfg.exclude) is not None:
        return "interface in [network] exclude"
    if not iface.running:
        return "link down"
    if cfg.require_default_route and not has_default_route:
        return "no default route on this interface"
    return None


def read_devtype(name: str, sysfs: str = "/sys/class/net") -> str:
    """DEVTYPE from the interface's uevent file ("" when absent)."""
    try:
        with open(os.path.join(sysfs, name, "uevent")) as f:
            for line in f:
                if line.startswith("DEVTYPE="):
                    return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return ""


RouteKey = tuple[int, int, str, int]  # family, oif, gateway, priority


class NetworkModel:
    """Links, addresses and main-table default routes, updated event by event."""

    def __init__(self, cfg: NetworkConfig, devtype_reader: object = read_devtype) -> None:
        self.cfg = cfg
        self.links: dict[int, Link] = {}
        self.addresses: dict[tuple[int, Address], IfAddress] = {}
        # Main-table default routes, one entry per path (a multipath route
        # has one per nexthop, each with that nexthop's oif and gateway).
        self.defaults: dict[RouteKey, Route] = {}
        # Paths of multipath routes that the kernel keeps but does not use.
        self._dead: dict[RouteKey, Route] = {}
        self.generation = 0
        self._devtypes: dict[tuple[int, str], str] = {}
        self._read_devtype = devtype_reader
        self._ignored_at_start: set[tuple[int, Address]] = set()
        self._snapshot: NetworkSnapshot | None = None
        self._iface_cache: dict[Link, Interface] = {}
        # Interfaces and gateways of the last snapshot, reused while only
        # addresses change (the usual event); None once links or routes did.
        self._views: tuple[Mapping[int, Interface],
                           Mapping[tuple[int, int], Address]] | None = None
        self._judged: dict[tuple[IfAddress, Interface | None, bool], tuple[str | None, int]] = {}

    def load(self, links: Iterable[Link], addresses: Iterable[IfAddress],
             routes: Iterable[Route], *, initial: bool = False) -> None:
        """Replace everything with a fresh dump (start, or after an overflow)."""
        self.links = {link.index: link for link in links}
        self.addresses = {(a.index, a.address): a for a in addresses}
        self.defaults = {}
        self._dead = {}
        for route in routes:
            self._apply_route(route, removed=False)
        if initial and not self.cfg.existing:
            self._ignored_at_start = set(self.addresses)
        self._ignored_at_start &= set(self.addresses)
        self._changed(links_or_routes=True)

    def set_config(self, cfg: NetworkConfig) -> None:
        self.cfg = cfg
        if cfg.existing:
            # Reloaded with existing = true: the addresses present at start
            # count now. (Switched off, it cannot reach back past the start.)
            self._ignored_at_start.clear()
        self._judged.clear()
        self._changed()

    def _changed(self, *, links_or_routes: bool = False) -> None:
        """A new snapshot is due; the interfaces and gateways it shares with
        the last one are only rebuilt when ``links_or_routes`` changed."""
        self.generation += 1
        self._snapshot = None
        if links_or_routes:
            self._views = None

    def apply(self, event: RtnlEvent) -> bool:
        """Apply one event; True when something the policies see changed."""
        if isinstance(event, LinkEvent):
            link = event.link
            if event.removed:
                if self.links.pop(link.index, None) is None:
                    return False
                for addr_key in [k for k in self.addresses if k[0] == link.index]:
                    del self.addresses[addr_key]
                self._forget_link_routes(link.index)
            else:
                old = self.links.get(link.index)
                if old == link:
                    return False
                self.links[link.index] = link
                if old is not None and old.name != link.name:
                    self._devtypes.pop((link.index, old.name), None)
                if old is not None and old.up and not link.up:
                    self._paths_down(link.index, (socket.AF_INET, socket.AF_INET6))
                elif old is not None and link.up and not old.up:
                    self._revive(link.index, (socket.AF_INET, socket.AF_INET6))
            self._changed(links_or_routes=True)
            return True
        if isinstance(event, AddressEvent):
            addr = event.address
            key = (addr.index, addr.address)
            if event.removed:
                if self.addresses.pop(key, None) is None:
                    return False
                self._ignored_at_start.discard(key)
                if addr.address.version == 4 and self._last_ipv4_gone(addr.index):
                    self._paths_down(addr.index, (socket.AF_INET,))
                    self._changed(links_or_routes=True)
                    return True
            else:
                if self.addresses.get(key) == addr:
                    return False
                self.addresses[key] = addr
                if addr.address.version == 4 and self._dead and self._revive(
                        addr.index, (socket.AF_INET,)):
                    self._changed(links_or_routes=True)
                    return True
            self._changed()
            return True
        if isinstance(event, RouteEvent):
            if self._apply_route(event.route, event.removed, replaced=event.replaced):
                self._changed(links_or_routes=True)
                return True
            return False
        return False

    def _last_ipv4_gone(self, index: int) -> bool:
        """The link has IPv4 default routes but no IPv4 address left (the
        cheap test first: it spares a scan of every address per removal)."""
        return any(r.oif == index and r.family == socket.AF_INET
                   for r in self.defaults.values()) and \
            not any(i == index and a.version == 4 for i, a in self.addresses)

    # The kernel changes default routes without a message in these cases
    # (seen on 6.18 with `ip monitor route`), so the model follows by itself:
    # - a link set down, or left without IPv4 addresses: its IPv4 routes are
    #   deleted (IPv6 ones are deleted with a message, unless
    #   net.ipv6.route.skip_notify_on_dev_down); a multipath route's path
    #   through it is kept but marked dead, in both families, and the route
    #   goes when its last path dies;
    # - the link up again, or given an IPv4 address: its dead paths revive;
    # - a link deleted: every IPv4 multipath route with a path through it goes.

    def _paths_down(self, index: int, families: tuple[int, ...]) -> None:
        groups = set()
        for key, route in list(self.defaults.items()):
            if route.oif != index or route.family not in families:
                continue
            del self.defaults[key]
            if route.nexthops:
                self._dead[key] = route
                groups.add(_group(route))
            # One path: IPv4 is flushed silently; IPv6 would send a message,
            # but the route is gone either way.
        for group in groups:
            if not any(_group(r) == group for r in self.defaults.values()):
                self._forget_group(group)

    def _revive(self, index: int, families: tuple[int, ...]) -> bool:
        link = self.links.get(index)
        if link is None or not link.up:
            return False
        back = [k for k, r in self._dead.items() if r.oif == index and r.family in families]
        for key in back:
            self.defaults[key] = self._dead.pop(key)
        return bool(back)

    def _forget_link_routes(self, index: int) -> None:
        for table in (self.defaults, self._dead):
            for key, route in list(table.items()):
                if route.oif != index:
                    continue
                if route.nexthops and route.family == socket.AF_INET:
                    self._forget_group(_group(route))
                table.pop(key, None)

    def _forget_group(self, group: tuple[Any, ...]) -> None:
        for table in (self.defaults, self._dead):
            for key in [k for k, r in table.items() if r.nexthops and _group(r) == group]:
                del table[key]

    def _apply_route(self, route: Route, removed: bool, *, replaced: bool = False) -> bool:
        if not route.is_default or route.table != RT_TABLE_MAIN or route.type != RTN_UNICAST:
            return False
        changed = False
        if not removed and (replaced or (route.nexthops and route.family == socket.AF_INET6)):
            # A replaced route's paths get no message. IPv6 merges the routes
            # of one metric into one multipath route, and each message lists
            # all its paths: one it no longer lists is gone. (An IPv4 route
            # without NLM_F_REPLACE is one more route: `ip route append`.)
            changed = self._drop_superseded(route, everything=replaced)
        if not route.nexthops:
            if route.oif:
                changed |= self._apply_path(route, removed, dead=False)
            return changed
        for nexthop in route.nexthops:
            if nexthop.oif:
                path = replace(route, oif=nexthop.oif, gateway=nexthop.gateway)
                changed |= self._apply_path(path, removed, dead=nexthop.dead)
        return changed

    def _drop_superseded(self, route: Route, *, everything: bool) -> bool:
        group = _group(route)
        paths = {(n.oif, n.gateway) for n in route.nexthops} or {(route.oif, route.gateway)}
        dropped = False
        for table in (self.defaults, self._dead):
            for key, old in list(table.items()):
                if old.family != route.family or old.priority != route.priority or \
                        (old.oif, old.gateway) in paths:
                    continue
                if everything or (old.nexthops and _group(old) != group):
                    del table[key]
                    dropped |= table is self.defaults
        return dropped

    def _apply_path(self, route: Route, removed: bool, *, dead: bool) -> bool:
        key = (route.family, route.oif, str(route.gateway or ""), route.priority)
        self._dead.pop(key, None)
        if removed or dead:
            if not removed:
                self._dead[key] = route
            return self.defaults.pop(key, None) is not None
        if self.defaults.get(key) == route:
            return False
        self.defaults[key] = route
        return True

    def _interface(self, link: Link) -> Interface:
        cached = self._iface_cache.get(link)
        if cached is not None:
            return cached
        key = (link.index, link.name)
        devtype = self._devtypes.get(key)
        if devtype is None:
            reader = self._read_devtype
            devtype = reader(link.name) if callable(reader) else ""
            self._devtypes[key] = devtype
        iface = Interface(
            index=link.index,
            name=link.name,
            up=link.up,
            running=link.running,
            kind=link.kind,
            link_type=link.link_type,
            devtype=devtype,
            loopback=link.loopback,
        )
        if len(self._iface_cache) > 4096:
            self._iface_cache.clear()
        self._iface_cache[link] = iface
        return iface

    def _judge(self, addr: IfAddress, iface: Interface | None, has_default: bool
               ) -> tuple[str | None, int]:
        """(why not eligible, include rank), memoised: under churn most
        addresses have not changed since the last snapshot."""
        memo_key = (addr, iface, has_default)
        found = self._judged.get(memo_key)
        if found is None:
            reason = ineligibility(addr, iface, has_default, self.cfg)
            rank = 0
            if reason is None and iface is not None:
                rank = matches_any(iface.name, self.cfg.include) or 0
            found = (reason, rank)
            if len(self._judged) > 16384:
                self._judged.clear()
            self._judged[memo_key] = found
        return found

    def snapshot(self) -> NetworkSnapshot:
        if self._snapshot is not None:
            return self._snapshot
        interfaces, gateways = self._interfaces_and_gateways()
        eligible: list[Candidate] = []
        ineligible: dict[tuple[int, Address], str] = {}
        for key, addr in self.addresses.items():
            iface = interfaces.get(addr.index)
            family = socket.AF_INET if addr.address.version == 4 else socket.AF_INET6
            has_default = (addr.index, family) in gateways or (addr.index, -family) in gateways
            reason, rank = self._judge(addr, iface, has_default)
            if reason is None and key in self._ignored_at_start:
                reason = "present at start and [network] existing = false"
            if reason is not None or iface is None:
                ineligible[key] = reason or "interface unknown"
                continue
            eligible.append(Candidate(addr, iface, rank))
        eligible.sort(key=lambda c: c.priority)
        self._snapshot = NetworkSnapshot(
            interfaces=interfaces,
            addresses=tuple(self.addresses.values()),
            eligible=tuple(eligible),
            ineligible=MappingProxyType(ineligible),
            gateways=gateways,
            generation=self.generation,
        )
        return self._snapshot

    def _interfaces_and_gateways(self) -> tuple[Mapping[int, Interface],
                                                Mapping[tuple[int, int], Address]]:
        if self._views is not None:
            return self._views
        interfaces = {index: self._interface(link) for index, link in self.links.items()}
        gateways: dict[tuple[int, int], Address] = {}
        for route in sorted(self.defaults.values(), key=lambda r: r.priority):
            if route.gateway is not None:
                gateways.setdefault((route.oif, route.family), route.gateway)
            else:  # a device route (point-to-point): default route, no gateway
                gateways.setdefault((route.oif, -route.family), _ANY[route.family])
        self._views = (MappingProxyType(interfaces), MappingProxyType(gateways))
        return self._views


def _group(route: Route) -> tuple[Any, ...]:
    """What identifies a multipath route among the paths the model keeps."""
    return (route.family, route.priority, frozenset((n.oif, n.gateway) for n in route.nexthops))


_ANY: dict[int, Address] = {
    socket.AF_INET: ipaddress.IPv4Address("0.0.0.0"),
    socket.AF_INET6: ipaddress.IPv6Address("::"),
}
