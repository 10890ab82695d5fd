"""SourceRouting.ensure, what a pass runs before adding an endpoint: it adds
or corrects the routes it is given and gives a stale conflict another try."""

from __future__ import annotations

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
