"""SourceRouting.ensure, what a pass runs before adding an endpoint: it adds
or corrects the routes it is given and gives a stale conflict another try."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
from pathlib import Path
from typing import Any

from recording_log import RecordingLog as Log

from mptcpd_py.errors import EndpointExists
from mptcpd_py.netlink.types import Route, Rule
from mptcpd_py.routing import SourceRouting
from mptcpd_py.state import OwnedRoute, StateStore

A = ipaddress.ip_address


class FakeRtnl:
    """Rules and routes in sets; a route in ``taken`` exists already (someone else's)."""

    def __init__(self) -> None:
        self.routes_made: set[Route] = set()
        self.rules_made: set[Rule] = set()
        self.taken: set[Route] = set()

    async def add_route(self, route: Route) -> None:
        if route in self.taken or route in self.routes_made:
            raise EndpointExists(errno.EEXIST, "File exists", "add route")
        self.routes_made.add(route)

    async def delete_route(self, route: Route) -> None:
        self.routes_made.discard(route)

    async def add_rule(self, rule: Rule) -> None:
        self.rules_made.add(rule)

    async def delete_rule(self, rule: Rule) -> None:
        self.rules_made.discard(rule)

    async def rules(self) -> list[Rule]:
        return list(self.rules_made)

    async def routes(self, wanted: Any = None) -> list[Route]:
        return list(self.routes_made | self.taken)


def route_via(gateway: str) -> OwnedRoute:
    return OwnedRoute(A("198.51.100.1"), 3, 10003, 10000, A(gateway), "")


async def test_ensure_adds_corrects_and_retries_a_conflict_about_another_route(
        tmp_path: Path) -> None:
    rtnl = FakeRtnl()
    routing = SourceRouting(rtnl, StateStore(str(tmp_path)), Log())
    first = route_via("198.51.100.254")
    await routing.ensure({first.address: first})
    assert routing.owned == {first.address: first} and len(rtnl.rules_made) == 1
    # Another gateway: the old route goes, the new one comes.
    second = route_via("198.51.100.253")
    await routing.ensure({second.address: second})
    assert routing.owned == {second.address: second}
    assert {r.gateway for r in rtnl.routes_made} == {A("198.51.100.253")}
    await routing.ensure({})  # touches nothing it is not given
    assert routing.owned == {second.address: second}
    # Someone else's route is in the way: left to its owner ...
    await routing.reconcile({})
    assert rtnl.routes_made == set() and rtnl.rules_made == set()
    rtnl.taken = {Route(family=2, dst=ipaddress.ip_network("0.0.0.0/0"), table=10003,
                        gateway=A("198.51.100.253"), oif=3)}
    await routing.ensure({second.address: second})
    assert second.address in routing.foreign and second.address not in routing.owned
    # ... until the route wanted is another one: tried again at once.
    third = route_via("198.51.100.252")
    await routing.ensure({third.address: third})
    assert routing.owned == {third.address: third} and third.address not in routing.foreign


class KernelLikeRtnl(FakeRtnl):
    """Refuses a route by the kernel's identity (family, destination, table,
    metric: not gateway, device or preferred source) and deletes one only if
    the gateway and preferred source given match, as the kernel does."""

    @staticmethod
    def _identity(route: Route) -> tuple[Any, ...]:
        return (route.family, route.dst, route.table, route.priority)

    def _find(self, route: Route) -> Route | None:
        return next((made for made in self.routes_made | self.taken
                     if self._identity(made) == self._identity(route)), None)

    async def add_route(self, route: Route) -> None:
        if self._find(route) is not None:
            raise EndpointExists(errno.EEXIST, "File exists", "add route")
        self.routes_made.add(route)

    async def delete_route(self, route: Route) -> None:
        made = self._find(route)
        if made is not None and route.gateway in (None, made.gateway) and \
                route.prefsrc in (None, made.prefsrc):
            self.routes_made.discard(made)

    async def add_rule(self, rule: Rule) -> None:
        if rule in self.rules_made:
            raise EndpointExists(errno.EEXIST, "File exists", "add rule")
        self.rules_made.add(rule)


def on_eth(address: str, gateway: str) -> OwnedRoute:
    """An address of interface 3 (table 10003) with its subnet."""
    return OwnedRoute(A(address), 3, 10003, 10000, A(gateway), "198.51.100.0/24")


async def test_a_new_address_gets_its_rule_when_the_gateway_changes_in_the_same_pass(
        tmp_path: Path) -> None:
    # One event-driven pass sees the interface's gateway change and adds the
    # endpoint of a new address C while its sibling B still holds the old
    # default route: the pass routes C first (ensure gets C alone), then
    # reconciles every address.
    rtnl = KernelLikeRtnl()
    routing = SourceRouting(rtnl, StateStore(str(tmp_path)), Log())
    old_b = on_eth("198.51.100.2", "198.51.100.254")
    await routing.reconcile({old_b.address: old_b})
    new_b, new_c = on_eth("198.51.100.2", "198.51.100.253"), on_eth("198.51.100.3",
                                                                    "198.51.100.253")
    await routing.ensure({new_c.address: new_c})
    assert routing.owned[new_c.address] == new_c and new_c.address not in routing.foreign
    wanted = {new_b.address: new_b, new_c.address: new_c}
    await routing.reconcile(wanted)
    await routing.reconcile(wanted, verify=True)  # the next full pass changes nothing
    assert routing.owned == wanted and routing.foreign == {}
    assert {rule.src for rule in rtnl.rules_made} == {
        ipaddress.ip_network("198.51.100.2/32"), ipaddress.ip_network("198.51.100.3/32")}
    assert {(r.dst, r.gateway) for r in rtnl.routes_made} == {
        (ipaddress.ip_network("198.51.100.0/24"), None),
        (ipaddress.ip_network("0.0.0.0/0"), A("198.51.100.253"))}


async def test_a_conflict_with_a_route_of_our_own_is_tried_again(tmp_path: Path) -> None:
    # However an address came to be left to the owner of a route that an
    # owned sibling holds, the next pass gives it its rule: it has no
    # other owner. A route truly someone else's still keeps it out.
    rtnl = KernelLikeRtnl()
    routing = SourceRouting(rtnl, StateStore(str(tmp_path)), Log())
    b, c = on_eth("198.51.100.2", "198.51.100.253"), on_eth("198.51.100.3", "198.51.100.253")
    await routing.reconcile({b.address: b})
    ours = next(r for r in rtnl.routes_made if r.gateway is not None)
    routing.foreign[c.address] = (c, ours)
    await routing.reconcile({b.address: b, c.address: c}, verify=True)
    assert set(routing.owned) == {b.address, c.address} and routing.foreign == {}
    assert len(rtnl.rules_made) == 2
    # Someone else's default route in another interface's table: left alone.
    d = OwnedRoute(A("203.0.113.2"), 4, 10004, 10000, A("203.0.113.254"), "")
    theirs = Route(family=2, dst=ipaddress.ip_network("0.0.0.0/0"), table=10004,
                   gateway=A("203.0.113.1"), oif=4)
    rtnl.taken = {theirs}
    wanted = {b.address: b, c.address: c, d.address: d}
    await routing.reconcile(wanted, verify=True)
    await routing.reconcile(wanted, verify=True)
    assert routing.foreign == {d.address: (d, dataclasses.replace(theirs, gateway=d.gateway))}
    assert d.address not in routing.owned and len(rtnl.rules_made) == 2
