"""Source routing for endpoint addresses.

MPTCP setup guides ask users to add, per extra interface, a policy rule
``from ADDR lookup T`` and a table T with the interface's subnet and a
default route via its gateway, so a subflow bound to ADDR leaves through
its own interface. This does it for every endpoint address whose interface
has a default gateway, and undoes it when the endpoint goes.

Only rules and routes recorded in the state file are ever removed; tables
are ``table_base + ifindex``: the addresses of one interface share its
table and routes (each has its own rule), and a table route goes with the
last owned address that needs it. A rule or table route that already
exists and that no other owned address explains belongs to someone else
(an admin, a network manager): the address is then left to its owner,
nothing of it is recorded, and a full pass looks again once that object
has gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import socket
from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol

from mptcpd_py.config import RoutingConfig
from mptcpd_py.errors import EndpointExists, KernelError, NetlinkError, NoSuchObject
from mptcpd_py.model import NetworkSnapshot
from mptcpd_py.netlink.rtnl import in_tables
from mptcpd_py.netlink.types import Address, Route, Rule
from mptcpd_py.state import OwnedEndpoint, OwnedRoute, StateStore

RT_SCOPE_LINK = 253


class RoutingAPI(Protocol):
    async def add_route(self, route: Route) -> None: ...
    async def delete_route(self, route: Route) -> None: ...
    async def add_rule(self, rule: Rule) -> None: ...
    async def delete_rule(self, rule: Rule) -> None: ...
    async def rules(self) -> list[Rule]: ...
    async def routes(self, wanted: Callable[[bytes], bool] | None = None) -> list[Route]: ...


def _family(address: Address) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def _host(address: Address) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(f"{address}/{address.max_prefixlen}")


def gateway_of(ep: OwnedEndpoint, net: NetworkSnapshot) -> tuple[int, Address] | None:
    """The endpoint's interface and that interface's gateway for the
    endpoint's family (None: no default route through it)."""
    index = ep.ifindex
    if not index:
        cand = net.candidate(ep.address)
        if cand is None:
            return None
        index = cand.interface.index
    gateway = net.gateway(index, _family(ep.address))
    return None if gateway is None else (index, gateway)


def desired_routes(
    endpoints: Iterable[OwnedEndpoint], net: NetworkSnapshot, cfg: RoutingConfig
) -> dict[Address, OwnedRoute]:
    """One rule + table per endpoint address whose interface has a gateway."""
    out: dict[Address, OwnedRoute] = {}
    if not cfg.source_routes:
        return out
    for ep in endpoints:
        found = gateway_of(ep, net)
        if found is None:
            continue
        index, gateway = found
        addr = net.address_on.get((index, ep.address))
        subnet = ""
        if addr is not None and addr.prefixlen < ep.address.max_prefixlen:
            subnet = str(addr.network)
        out[ep.address] = OwnedRoute(ep.address, index, cfg.table_base + index,
                                     cfg.rule_priority, gateway, subnet)
    return out


def _rule(r: OwnedRoute) -> Rule:
    return Rule(family=_family(r.address), table=r.table, priority=r.priority,
                src=_host(r.address))


def _route_key(route: Route) -> tuple[Any, ...]:
    """What identifies a route in a table (a dump adds protocol, metrics...)."""
    return (route.family, route.dst, route.table, route.gateway, route.oif)


def _table_routes(r: OwnedRoute) -> list[Route]:
    family = _family(r.address)
    routes = []
    if r.subnet:
        routes.append(Route(family=family, dst=ipaddress.ip_network(r.subnet), table=r.table,
                            oif=r.ifindex, scope=RT_SCOPE_LINK if family == socket.AF_INET else 0,
                            prefsrc=r.address if family == socket.AF_INET else None))
    default = ipaddress.ip_network("0.0.0.0/0" if family == socket.AF_INET else "::/0")
    routes.append(Route(family=family, dst=default, table=r.table, gateway=r.gateway,
                        oif=r.ifindex))
    return routes


class SourceRouting:
    """Keeps the kernel's rules and tables equal to :func:`desired_routes`."""

    def __init__(self, rtnl: RoutingAPI, store: StateStore, log: Any) -> None:
        self.rtnl = rtnl
        self.store = store
        self.log = log
        self.errors = 0
        self.last_error = ""
        # Addresses whose rule or table route someone else made, with that object.
        self.foreign: dict[Address, tuple[OwnedRoute, Rule | Route]] = {}

    @property
    def owned(self) -> dict[Address, OwnedRoute]:
        return self.store.state.routes

    async def reconcile(self, wanted: dict[Address, OwnedRoute], *, verify: bool = False) -> None:
        if verify and (self.owned or self.foreign):
            await self._verify()
        for address, have in list(self.owned.items()):
            if address not in wanted:
                await self._remove(have)
        for address in list(self.foreign):
            if address not in wanted:
                del self.foreign[address]
        await self.ensure(wanted)  # corrects the rest

    async def ensure(self, wanted: dict[Address, OwnedRoute]) -> None:
        """Add (or correct) these routes and touch no others but the owned
        addresses that share their table's gateway: what a pass does before
        adding an endpoint, whose first subflows the kernel opens inside the
        add itself."""
        # Every outdated record goes before any is added anew: the addresses
        # of one table share its routes, and a new gateway's default route
        # added while another address still holds the old one would get
        # EEXIST from ours (the kernel's identity ignores the gateway). An
        # owned address of such a table that is not in ``wanted`` moves to
        # the new gateway with them, as the pass would move it.
        wanted = {**self._moved_siblings(wanted), **wanted}
        for address, want in wanted.items():
            have = self.owned.get(address)
            if have is not None and have != want:
                await self._remove(have)
        for address, want in wanted.items():
            conflict = self.foreign.get(address)
            if conflict is not None and (conflict[0] != want or self._ours(conflict[1])):
                del self.foreign[address]  # about another route, or one of ours
            if address not in self.owned and address not in self.foreign:
                await self._add(want)

    async def _verify(self) -> None:
        """The kernel sends no event when someone deletes a rule or route: a
        record of ours missing a piece is removed whole (re-added next), and
        a conflict whose object has gone is forgotten (the address is tried
        again)."""
        try:
            rules = set(await self.rtnl.rules())
            tables = {r.table for r in self.owned.values()} | \
                {want.table for want, _ in self.foreign.values()}
            routes = {_route_key(route) for route in await self.rtnl.routes(in_tables(tables))}
        except (KernelError, NetlinkError) as exc:  # a busy kernel: next full pass
            self.log.warning("cannot dump rules and routes", error=str(exc))
            return
        for have in list(self.owned.values()):
            if _rule(have) not in rules or \
                    any(_route_key(route) not in routes for route in _table_routes(have)):
                self.log.info("source route changed by someone else; re-adding it",
                              addr=str(have.address), table=have.table)
                await self._remove(have, quiet=True)
        for address, (_, found) in list(self.foreign.items()):
            present = found in rules if isinstance(found, Rule) else _route_key(found) in routes
            if not present or self._ours(found):
                del self.foreign[address]

    def _moved_siblings(self, wanted: dict[Address, OwnedRoute]) -> dict[Address, OwnedRoute]:
        """Owned addresses not in ``wanted`` whose table (and family) it
        gives another gateway, each with that gateway: one interface has
        one gateway per family."""
        gateways = {(want.table, _family(want.address)): want.gateway
                    for want in wanted.values()}
        moved = {}
        for have in self.owned.values():
            gateway = gateways.get((have.table, _family(have.address)), have.gateway)
            if have.address not in wanted and gateway != have.gateway:
                moved[have.address] = dataclasses.replace(have, gateway=gateway)
        return moved

    def _ours(self, found: Rule | Route) -> bool:
        """Whether a conflict is a table route of an owned address (an
        address left to its owner when a sibling's route was in the way):
        it then has no other owner, and the address is tried again."""
        return isinstance(found, Route) and _route_key(found) in {
            _route_key(route) for have in self.owned.values() for route in _table_routes(have)}

    def _still_used(self, r: OwnedRoute) -> list[Route]:
        """The table routes of ``r`` that another owned address still needs."""
        others = [o for o in self.owned.values()
                  if o.address != r.address and o.table == r.table
                  and _family(o.address) == _family(r.address)]
        # By the kernel's identity: the IPv4 subnet route names each address
        # as its prefsrc, yet the table holds one such route for them all.
        needed = {_route_key(route) for o in others for route in _table_routes(o)}
        return [route for route in _table_routes(r) if _route_key(route) in needed]

    async def _add(self, r: OwnedRoute) -> None:
        self.owned[r.address] = r
        self.store.save()
        shared = self._still_used(r)
        added: list[Route] = []
        conflict: Rule | Route | None = None
        try:
            for route in _table_routes(r):
                try:
                    await self.rtnl.add_route(route)
                    added.append(route)
                except EndpointExists:
                    if route not in shared:
                        conflict = route
                        break
            if conflict is None:
                try:
                    await self.rtnl.add_rule(_rule(r))
                except EndpointExists:
                    conflict = _rule(r)
        except KernelError as exc:
            await self._undo(r, added)
            self.errors += 1
            self.last_error = str(exc)
            self.log.warning("source route not added", addr=str(r.address), table=r.table,
                             error=str(exc))
            return
        if conflict is not None:
            await self._undo(r, added)
            self.foreign[r.address] = (r, conflict)
            what = (f"rule from {conflict.src} lookup {conflict.table}"
                    if isinstance(conflict, Rule)
                    else f"route {conflict.dst} in table {conflict.table}")
            self.log.info("source route left to its owner", addr=str(r.address),
                          table=r.table, existing=what)
            return
        self.log.info("source route added", addr=str(r.address), table=r.table,
                      gateway=str(r.gateway))

    async def _undo(self, r: OwnedRoute, added: list[Route]) -> None:
        """Take back the routes one failed ``_add`` made, and its record."""
        for route in reversed(added):
            with contextlib.suppress(KernelError):
                await self.rtnl.delete_route(route)
        self.owned.pop(r.address, None)
        self.store.save()

    async def _remove(self, r: OwnedRoute, *, quiet: bool = False) -> None:
        keep = self._still_used(r)
        try:
            await self.rtnl.delete_rule(_rule(r))
        except (NoSuchObject, KernelError) as exc:
            if not isinstance(exc, NoSuchObject) and exc.errno not in (2, 3):
                self.log.warning("source rule not removed", addr=str(r.address), error=str(exc))
        for route in _table_routes(r):
            if route in keep:
                continue
            # Without prefsrc: the route may carry that of the address that
            # added it first, and the kernel deletes only on a match.
            with contextlib.suppress(KernelError):  # gone with its link already
                await self.rtnl.delete_route(dataclasses.replace(route, prefsrc=None))
        self.owned.pop(r.address, None)
        self.store.save()
        if not quiet:
            self.log.info("source route removed", addr=str(r.address), table=r.table)

    async def remove_all(self, *, keep: Collection[Address] = ()) -> None:
        """Remove every owned rule and route but those of ``keep``'s addresses."""
        for r in [r for r in self.owned.values() if r.address not in keep]:
            await self._remove(r)
