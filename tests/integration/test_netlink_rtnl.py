"""rtnetlink dumps and events against the real kernel, IPv4 and IPv6."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import Any

import pytest

from mptcpd_py.config import NetworkConfig
from mptcpd_py.lab import Lab, Netns
from mptcpd_py.model import NetworkModel
from mptcpd_py.netlink.rtnl import Rtnl, RtnlEvents
from mptcpd_py.netlink.types import AddressEvent, LinkEvent, Route, RouteEvent, Rule

A = ipaddress.ip_address
N = ipaddress.ip_network


async def wait_event(events: RtnlEvents, match: Callable[[Any], bool]) -> Any:
    async def scan() -> Any:
        async for event in events:
            if match(event):
                return event
        raise AssertionError("stream ended")
    return await asyncio.wait_for(scan(), 5)


async def test_dumps_show_links_addresses_and_default_routes(lab: Lab) -> None:
    ns = lab.netns("d")
    ns.stub_link("wan0")
    ns.ip("addr", "add", "192.0.2.1/24", "dev", "wan0")
    ns.ip("addr", "add", "2001:db8::1/64", "dev", "wan0", "nodad")
    ns.ip("route", "add", "default", "via", "192.0.2.254", "dev", "wan0")
    ns.ip("-6", "route", "add", "default", "via", "2001:db8::fe", "dev", "wan0")
    rtnl = Rtnl.open(netns=ns.name)
    try:
        links = {link.name: link for link in await rtnl.links()}
        assert links["lo"].loopback and links["wan0"].kind == "veth"
        assert links["wan0"].up and links["wan0"].running
        addrs = {str(a.address): a for a in await rtnl.addresses()}
        assert addrs["192.0.2.1"].prefixlen == 24
        assert addrs["192.0.2.1"].index == links["wan0"].index
        assert addrs["2001:db8::1"].prefixlen == 64 and not addrs["2001:db8::1"].tentative
        defaults = {(r.family, str(r.gateway)) for r in await rtnl.routes()
                    if r.is_default and r.table == 254}
        assert defaults == {(2, "192.0.2.254"), (10, "2001:db8::fe")}
        assert any(r.table == 254 for r in await rtnl.rules())
    finally:
        rtnl.close()


async def test_events_follow_links_addresses_and_routes(lab: Lab) -> None:
    ns = lab.netns("e")
    ns.ip("link", "add", "wan0", "type", "veth", "peer", "name", "wan0p")
    events = RtnlEvents.open(netns=ns.name)
    try:
        ns.ip("link", "set", "wan0p", "up")
        ns.ip("link", "set", "wan0", "up")
        up = await wait_event(events, lambda e: isinstance(e, LinkEvent)
                              and e.link.name == "wan0" and e.link.running)
        assert not up.removed
        for address, plen in (("198.51.100.7", 24), ("2001:db8:5::7", 64)):
            ns.ip("addr", "add", f"{address}/{plen}", "dev", "wan0", "nodad")
            added = await wait_event(events, lambda e, a=address: isinstance(e, AddressEvent)
                                     and str(e.address.address) == a)
            assert not added.removed and added.address.prefixlen == plen
            ns.ip("addr", "del", f"{address}/{plen}", "dev", "wan0")
            await wait_event(events, lambda e, a=address: isinstance(e, AddressEvent)
                             and e.removed and str(e.address.address) == a)
        ns.ip("addr", "add", "198.51.100.7/24", "dev", "wan0")
        ns.ip("route", "add", "default", "via", "198.51.100.1", "dev", "wan0")
        route = await wait_event(events, lambda e: isinstance(e, RouteEvent)
                                 and e.route.is_default and e.route.family == 2)
        assert route.route.gateway == A("198.51.100.1")
        ns.ip("link", "set", "wan0", "down")
        await wait_event(events, lambda e: isinstance(e, LinkEvent)
                         and e.link.name == "wan0" and not e.link.up)
        ns.ip("link", "del", "wan0")
        await wait_event(events, lambda e: isinstance(e, LinkEvent) and e.removed)
    finally:
        events.close()


async def test_route_and_rule_commands_in_a_private_table(lab: Lab) -> None:
    ns = lab.netns("r")
    ns.ip("link", "add", "wan0", "type", "veth", "peer", "name", "wan0p")
    ns.ip("link", "set", "wan0", "up")
    ns.ip("addr", "add", "203.0.113.5/24", "dev", "wan0")
    ns.ip("addr", "add", "2001:db8:9::5/64", "dev", "wan0", "nodad")
    rtnl = Rtnl.open(netns=ns.name)
    try:
        index = next(link.index for link in await rtnl.links() if link.name == "wan0")
        for fam, dst, gw, src in ((2, "0.0.0.0/0", "203.0.113.1", "203.0.113.5/32"),
                                  (10, "::/0", "2001:db8:9::1", "2001:db8:9::5/128")):
            route = Route(family=fam, dst=N(dst), table=10007, gateway=A(gw), oif=index)
            rule = Rule(family=fam, table=10007, priority=10007, src=N(src))
            await rtnl.add_route(route)
            await rtnl.add_rule(rule)
            assert any(r.table == 10007 and r.gateway == A(gw) for r in await rtnl.routes())
            assert rule in await rtnl.rules()
            await rtnl.delete_rule(rule)
            await rtnl.delete_route(route)
            assert rule not in await rtnl.rules()
        assert "10007" not in ns.ip("rule", "show")
    finally:
        rtnl.close()


async def test_the_kernel_drops_route_events_the_model_has_no_use_for(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event socket's BPF filter keeps main-table default routes (both
    families) and everything that is not a route: the local, broadcast and
    prefix routes of an address, other tables and other prefixes never
    reach the daemon."""
    ns = lab.netns("f")
    ns.stub_link("wan0")
    received: list[tuple[int, int, int]] = []  # (type, rtm_dst_len, rtm_table) of each message
    on_message = RtnlEvents._on_message

    def record(self: RtnlEvents, raw: Any) -> None:
        received.append((raw.type, raw.data[17], raw.data[20]))
        on_message(self, raw)

    monkeypatch.setattr(RtnlEvents, "_on_message", record)
    events = RtnlEvents.open(netns=ns.name)
    try:
        ns.ip("addr", "add", "192.0.2.1/24", "dev", "wan0")  # local, broadcast, prefix routes
        ns.ip("addr", "add", "2001:db8::1/64", "dev", "wan0", "nodad")
        ns.ip("route", "add", "203.0.113.0/24", "via", "192.0.2.254")
        ns.ip("route", "add", "default", "via", "192.0.2.253", "table", "10002")
        ns.ip("route", "add", "default", "via", "192.0.2.254", "dev", "wan0")
        ns.ip("-6", "route", "add", "default", "via", "2001:db8::fe", "dev", "wan0")
        await wait_event(events, lambda e: isinstance(e, RouteEvent) and e.route.family == 10)
        routes = [(dst_len, table) for kind, dst_len, table in received if kind in (24, 25)]
        assert routes == [(0, 254), (0, 254)]
        assert 20 in {kind for kind, _, _ in received}  # addresses still come
    finally:
        events.close()


def kernel_gateways(ns: Netns) -> set[tuple[int, str]]:
    """(ifindex, gateway) of every live path of the main table's default routes."""
    index = {link["ifname"]: link["ifindex"] for link in ns.ip_json("link", "show")}
    out = set()
    for family in ("-4", "-6"):
        for route in ns.ip_json(family, "route", "show", "default"):
            for path in route.get("nexthops", [route]):
                if "dead" not in path.get("flags", []):
                    out.add((index[path["dev"]], path["gateway"]))
    return out


def model_gateways(model: NetworkModel) -> set[tuple[int, str]]:
    return {(index, str(gw)) for (index, _family), gw in model.snapshot().gateways.items()}


async def test_the_model_follows_what_the_kernel_does_silently_to_multipath_routes(
        lab: Lab) -> None:
    """Link down and up, last IPv4 address gone and back, link deleted: the
    kernel marks a multipath route's paths dead, revives them or deletes
    the route, mostly without a message. After each step the model, kept
    by events alone, has the gateways the kernel uses, as does a fresh dump."""
    ns = lab.netns("mp")
    for i, (v4, v6) in enumerate((("192.0.2", "2001:db8:1:"), ("198.51.100", "2001:db8:2:"))):
        ns.stub_link(f"wan{i}")
        ns.ip("addr", "add", f"{v4}.2/24", "dev", f"wan{i}")
        ns.ip("addr", "add", f"{v6}:2/64", "dev", f"wan{i}", "nodad")
    ns.ip("route", "add", "default", "nexthop", "via", "192.0.2.1", "dev", "wan0",
          "nexthop", "via", "198.51.100.1", "dev", "wan1")
    ns.ip("-6", "route", "add", "default", "nexthop", "via", "2001:db8:1::1", "dev", "wan0",
          "nexthop", "via", "2001:db8:2::1", "dev", "wan1")
    rtnl = Rtnl.open(netns=ns.name)
    events = RtnlEvents.open(netns=ns.name)
    model = NetworkModel(NetworkConfig(), devtype_reader=lambda name: "")

    async def load(into: NetworkModel) -> None:
        into.load(await rtnl.links(), await rtnl.addresses(), await rtnl.routes(), initial=True)

    async def step(*command: str, until: Callable[[Any], bool]) -> set[tuple[int, str]]:
        ns.ip(*command)
        while True:
            event = await wait_event(events, lambda e: True)
            model.apply(event)
            if until(event):
                break
        events.sock.drain()  # whatever else the command made, in the order sent
        while (event := events.get_nowait()) is not None:
            model.apply(event)
        fresh = NetworkModel(NetworkConfig(), devtype_reader=lambda name: "")
        await load(fresh)
        assert model_gateways(fresh) == kernel_gateways(ns), command
        assert model_gateways(model) == kernel_gateways(ns), command
        return model_gateways(model)

    def link_event(name: str, *, up: bool = True, removed: bool = False) -> Callable[[Any], bool]:
        return lambda e: isinstance(e, LinkEvent) and e.link.name == name and \
            e.removed == removed and (removed or e.link.up == up)

    def address_event(text: str, *, removed: bool) -> Callable[[Any], bool]:
        return lambda e: isinstance(e, AddressEvent) and str(e.address.address) == text \
            and e.removed == removed

    try:
        await load(model)
        wan0, wan1 = (int(ns.ip_json("link", "show", f"wan{i}")[0]["ifindex"]) for i in (0, 1))
        every = {(wan0, "192.0.2.1"), (wan1, "198.51.100.1"),
                 (wan0, "2001:db8:1::1"), (wan1, "2001:db8:2::1")}
        assert model_gateways(model) == kernel_gateways(ns) == every
        assert await step("link", "set", "wan0", "down", until=link_event("wan0", up=False)) \
            == {(wan1, "198.51.100.1"), (wan1, "2001:db8:2::1")}
        assert await step("link", "set", "wan0", "up", until=link_event("wan0")) == every
        assert await step("addr", "del", "198.51.100.2/24", "dev", "wan1",
                          until=address_event("198.51.100.2", removed=True)) \
            == every - {(wan1, "198.51.100.1")}
        assert await step("addr", "add", "198.51.100.2/24", "dev", "wan1",
                          until=address_event("198.51.100.2", removed=False)) == every
        # Replaced: one message, for the new route only.
        assert await step("route", "replace", "default", "via", "198.51.100.1", "dev", "wan1",
                          until=lambda e: isinstance(e, RouteEvent) and e.replaced) \
            == every - {(wan0, "192.0.2.1")}
        assert await step("route", "replace", "default", "nexthop", "via", "192.0.2.1",
                          "dev", "wan0", "nexthop", "via", "198.51.100.1", "dev", "wan1",
                          until=lambda e: isinstance(e, RouteEvent) and e.replaced) == every
        await step("link", "set", "wan0", "down", until=link_event("wan0", up=False))
        assert await step("link", "set", "wan1", "down", until=link_event("wan1", up=False)) \
            == set()
        assert await step("link", "set", "wan1", "up", until=link_event("wan1")) == set()
        ns.ip("link", "set", "wan0", "up")
        ns.ip("route", "add", "default", "nexthop", "via", "192.0.2.1", "dev", "wan0",
              "nexthop", "via", "198.51.100.1", "dev", "wan1")
        # onlink: the links' IPv6 prefix routes come back a moment after "up".
        ns.ip("-6", "route", "add", "default", "nexthop", "via", "2001:db8:1::1", "dev", "wan0",
              "onlink", "nexthop", "via", "2001:db8:2::1", "dev", "wan1", "onlink")
        # IPv4: the whole route goes with the link; IPv6: that link's path.
        assert await step("link", "del", "wan1", until=link_event("wan1", removed=True)) \
            == {(wan0, "2001:db8:1::1")}
    finally:
        events.close()
        rtnl.close()
