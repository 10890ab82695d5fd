"""The network model and the [network] eligibility rules (pure logic)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import replace

from mptcpd_py.config import NetworkConfig
from mptcpd_py.model import NetworkModel, ineligibility
from mptcpd_py.netlink.types import (
    IFF_LOOPBACK,
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    AddressEvent,
    AddressFlags,
    IfAddress,
    Link,
    LinkEvent,
    Nexthop,
    Route,
    RouteEvent,
)

A = ipaddress.ip_address
UP = IFF_UP | IFF_RUNNING | IFF_LOWER_UP


def link(index: int, name: str, flags: int = UP) -> Link:
    return Link(index=index, name=name, flags=flags)


def addr(index: int, text: str, flags: AddressFlags = AddressFlags.PERMANENT) -> IfAddress:
    ip = A(text)
    return IfAddress(index=index, address=ip, prefixlen=24 if ip.version == 4 else 64,
                     flags=flags)


def default_route(index: int, gw: str) -> Route:
    ip = A(gw)
    fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    dst = ipaddress.ip_network("0.0.0.0/0" if ip.version == 4 else "::/0")
    return Route(family=fam, dst=dst, gateway=ip, oif=index)


def model(cfg: NetworkConfig | None = None) -> NetworkModel:
    m = NetworkModel(cfg or NetworkConfig(), devtype_reader=lambda name: "")
    m.load([link(1, "lo", UP | IFF_LOOPBACK), link(2, "eth0"), link(3, "wlan0"),
            link(4, "docker0"), link(5, "wwan0", IFF_UP)],
           [addr(1, "127.0.0.1"), addr(2, "192.0.2.1"), addr(2, "fe80::1"),
            addr(2, "2001:db8::1"), addr(2, "fd00::1"), addr(3, "198.51.100.1"),
            addr(4, "203.0.113.1"), addr(5, "203.0.113.9")],
           [default_route(2, "192.0.2.254")])
    return m


def eligible(m: NetworkModel) -> list[str]:
    return [str(c.address.address) for c in m.snapshot().eligible]


def reasons(m: NetworkModel) -> dict[str, str]:
    return {str(k[1]): v for k, v in m.snapshot().ineligible.items()}


def test_default_filter_keeps_global_addresses_of_running_included_links() -> None:
    m = model()
    assert eligible(m) == ["192.0.2.1", "2001:db8::1", "198.51.100.1"]
    why = reasons(m)
    assert why["127.0.0.1"] == "loopback"
    assert why["fe80::1"] == "link-local"
    assert why["fd00::1"] == "IPv6 unique local address"
    assert why["203.0.113.1"] == "interface in [network] exclude"
    assert why["203.0.113.9"] == "link down"


def test_tentative_and_deprecated_addresses_wait() -> None:
    cfg = NetworkConfig()
    iface_model = model()
    iface = iface_model.snapshot().interfaces[2]
    tentative = addr(2, "2001:db8::7", AddressFlags.TENTATIVE)
    deprecated = addr(2, "2001:db8::8", AddressFlags.DEPRECATED)
    assert "tentative" in (ineligibility(tentative, iface, True, cfg) or "")
    assert ineligibility(deprecated, iface, True, cfg) == "deprecated"
    assert ineligibility(deprecated, iface, True, replace(cfg, skip_deprecated=False)) is None


def test_link_down_and_up_change_eligibility() -> None:
    m = model()
    assert m.apply(LinkEvent(link(3, "wlan0", IFF_UP)))
    assert "198.51.100.1" not in eligible(m)
    assert m.apply(LinkEvent(link(3, "wlan0")))
    assert "198.51.100.1" in eligible(m)
    assert not m.apply(LinkEvent(link(3, "wlan0")))  # no change, no reconcile


def test_address_events_add_and_remove_candidates() -> None:
    m = model()
    assert m.apply(AddressEvent(addr(3, "198.51.100.2")))
    assert "198.51.100.2" in eligible(m)
    assert m.apply(AddressEvent(addr(3, "198.51.100.2"), removed=True))
    assert "198.51.100.2" not in eligible(m)
    assert not m.apply(AddressEvent(addr(3, "198.51.100.2"), removed=True))


def test_default_route_event_makes_an_address_eligible_when_required() -> None:
    m = model(NetworkConfig(require_default_route=True))
    assert eligible(m) == ["192.0.2.1"]
    assert reasons(m)["198.51.100.1"] == "no default route on this interface"
    assert m.apply(RouteEvent(default_route(3, "198.51.100.254")))
    assert "198.51.100.1" in eligible(m)
    assert m.snapshot().gateway(3, socket.AF_INET) == A("198.51.100.254")
    assert m.apply(RouteEvent(default_route(3, "198.51.100.254"), removed=True))
    assert "198.51.100.1" not in eligible(m)


def test_link_removal_forgets_its_addresses_and_routes() -> None:
    m = model()
    assert m.apply(LinkEvent(link(2, "eth0"), removed=True))
    assert eligible(m) == ["198.51.100.1"]
    assert m.snapshot().gateway(2, socket.AF_INET) is None


def test_ipv4_routes_the_kernel_flushes_without_a_message_are_forgotten() -> None:
    m = model()
    m.apply(RouteEvent(default_route(2, "2001:db8::fe")))
    # Carrier loss: the kernel keeps the routes (flagged linkdown).
    m.apply(LinkEvent(link(2, "eth0", IFF_UP)))
    assert m.snapshot().gateway(2, socket.AF_INET) == A("192.0.2.254")
    # Set down: its routes are gone. IPv4 sends no RTM_DELROUTE; IPv6 sends
    # one unless net.ipv6.route.skip_notify_on_dev_down: not needed here.
    assert m.apply(LinkEvent(link(2, "eth0", 0)))
    assert m.snapshot().gateway(2, socket.AF_INET) is None
    assert m.snapshot().gateway(2, socket.AF_INET6) is None
    assert not m.apply(RouteEvent(default_route(2, "2001:db8::fe"), removed=True))
    # Up again: nothing comes back by itself.
    m.apply(LinkEvent(link(2, "eth0")))
    assert m.snapshot().gateway(2, socket.AF_INET) is None


def multipath(*paths: tuple[int, str, bool]) -> Route:
    fam = socket.AF_INET if A(paths[0][1]).version == 4 else socket.AF_INET6
    dst = ipaddress.ip_network("0.0.0.0/0" if fam == socket.AF_INET else "::/0")
    hops = tuple(Nexthop(index, A(gw), dead) for index, gw, dead in paths)
    return Route(family=fam, dst=dst, gateway=hops[0].gateway, oif=hops[0].oif, nexthops=hops)


def gateways(m: NetworkModel, family: int = socket.AF_INET) -> dict[int, str]:
    return {index: str(gw) for (index, fam), gw in m.snapshot().gateways.items()
            if fam == family}


def test_every_path_of_a_multipath_default_route_is_a_gateway() -> None:
    """What the kernel does without a message (checked against it in
    tests/integration/test_netlink_rtnl.py): a path through a link set down
    or left without IPv4 addresses is dead until the link comes back; the
    route goes when its last path dies, or with any link it uses (IPv4)."""
    m = model(NetworkConfig(require_default_route=True))
    m.apply(RouteEvent(default_route(2, "192.0.2.254"), removed=True))
    route = multipath((2, "192.0.2.254", False), (3, "198.51.100.254", False))
    assert m.apply(RouteEvent(route))
    assert gateways(m) == {2: "192.0.2.254", 3: "198.51.100.254"}
    assert "198.51.100.1" in eligible(m)  # wlan0 has a default route: the second path
    assert m.apply(LinkEvent(link(2, "eth0", 0)))  # the first path dies, the route stays
    assert gateways(m) == {3: "198.51.100.254"}
    assert m.apply(LinkEvent(link(2, "eth0")))
    assert gateways(m) == {2: "192.0.2.254", 3: "198.51.100.254"}
    assert m.apply(AddressEvent(addr(3, "198.51.100.1"), removed=True))  # last IPv4 one
    assert gateways(m) == {2: "192.0.2.254"}
    assert m.apply(AddressEvent(addr(3, "198.51.100.1")))
    assert gateways(m) == {2: "192.0.2.254", 3: "198.51.100.254"}
    m.apply(LinkEvent(link(2, "eth0", 0)))
    m.apply(LinkEvent(link(3, "wlan0", 0)))  # the last path: the kernel deletes the route
    m.apply(LinkEvent(link(2, "eth0")))
    m.apply(LinkEvent(link(3, "wlan0")))
    assert gateways(m) == {}
    # A dump shows dead paths as such; a deleted link takes the IPv4 route.
    assert m.apply(RouteEvent(multipath((2, "192.0.2.254", True), (3, "198.51.100.254", False))))
    assert gateways(m) == {3: "198.51.100.254"}
    assert m.apply(LinkEvent(link(2, "eth0"), removed=True))
    m.apply(LinkEvent(link(2, "eth0")))
    assert gateways(m) == {}
    # IPv6 deletes only the deleted link's path (and says so).
    m.apply(LinkEvent(link(2, "eth0")))
    six = multipath((2, "2001:db8::fe", False), (3, "2001:db8:3::fe", False))
    assert m.apply(RouteEvent(six))
    assert m.apply(LinkEvent(link(2, "eth0"), removed=True))
    assert gateways(m, socket.AF_INET6) == {3: "2001:db8:3::fe"}
    # The message that deletes a multipath route deletes every path.
    assert m.apply(RouteEvent(six, removed=True))
    assert gateways(m, socket.AF_INET6) == {}


def test_a_replaced_default_route_leaves_none_of_its_old_paths_behind() -> None:
    """NLM_F_REPLACE: the kernel sends the new route only; a multipath
    message lists every path, so one it no longer lists is gone too."""
    m = model()
    m.apply(RouteEvent(default_route(2, "192.0.2.254"), removed=True))
    m.apply(LinkEvent(link(6, "eth1")))
    m.apply(RouteEvent(multipath((2, "192.0.2.254", False), (3, "198.51.100.254", False))))
    m.apply(LinkEvent(link(3, "wlan0", 0)))  # wlan0's path dead, kept by the kernel
    assert m.apply(RouteEvent(multipath((2, "192.0.2.254", False), (6, "203.0.113.254", False)),
                              replaced=True))
    m.apply(LinkEvent(link(3, "wlan0")))  # not in the route any more: nothing revives
    assert gateways(m) == {2: "192.0.2.254", 6: "203.0.113.254"}
    assert m.apply(RouteEvent(default_route(3, "198.51.100.254"), replaced=True))
    assert gateways(m) == {3: "198.51.100.254"}
    # Without the flag, an IPv4 route is one more route (ip route append).
    assert m.apply(RouteEvent(default_route(2, "192.0.2.254")))
    assert gateways(m) == {2: "192.0.2.254", 3: "198.51.100.254"}
    m.apply(RouteEvent(multipath((2, "192.0.2.254", False), (3, "198.51.100.254", False)),
                       replaced=True))
    assert m.apply(RouteEvent(multipath((6, "203.0.113.254", False), (3, "198.51.100.254", False))))
    assert gateways(m) == {2: "192.0.2.254", 3: "198.51.100.254", 6: "203.0.113.254"}
    # An IPv6 multipath route grows and shrinks with messages listing all paths.
    six = [(2, "2001:db8::fe", False), (3, "2001:db8:3::fe", False), (6, "2001:db8:6::fe", False)]
    m.apply(RouteEvent(multipath(*six[:2])))
    m.apply(RouteEvent(multipath(*six)))
    assert gateways(m, socket.AF_INET6) == {2: "2001:db8::fe", 3: "2001:db8:3::fe",
                                             6: "2001:db8:6::fe"}
    assert m.apply(RouteEvent(multipath(six[0], six[2])))
    assert gateways(m, socket.AF_INET6) == {2: "2001:db8::fe", 6: "2001:db8:6::fe"}


def test_dead_paths_revive_only_on_a_link_that_is_up_and_not_after_a_reload() -> None:
    m = model()
    m.apply(RouteEvent(default_route(2, "192.0.2.254"), removed=True))
    route = multipath((2, "192.0.2.254", False), (3, "198.51.100.254", False))
    m.apply(RouteEvent(route))
    m.apply(AddressEvent(addr(3, "198.51.100.1"), removed=True))  # wlan0's path dead
    m.apply(LinkEvent(link(3, "wlan0", 0)))
    m.apply(AddressEvent(addr(3, "198.51.100.1")))  # on a link that is down: still dead
    assert gateways(m) == {2: "192.0.2.254"}
    m.apply(LinkEvent(link(3, "wlan0")))
    assert gateways(m) == {2: "192.0.2.254", 3: "198.51.100.254"}
    # A reload (after an overflow) replaces what the model knew, dead paths too.
    m.apply(LinkEvent(link(3, "wlan0", 0)))
    m.load(list(m.links.values()), list(m.addresses.values()), [default_route(2, "192.0.2.254")])
    m.apply(LinkEvent(link(3, "wlan0")))
    assert gateways(m) == {2: "192.0.2.254"}


def test_the_last_ipv4_address_leaving_takes_the_links_ipv4_routes() -> None:
    m = model()
    m.apply(AddressEvent(addr(2, "192.0.2.7")))
    m.apply(AddressEvent(addr(2, "192.0.2.7"), removed=True))
    assert m.snapshot().gateway(2, socket.AF_INET) == A("192.0.2.254")  # 192.0.2.1 is left
    assert m.apply(AddressEvent(addr(2, "192.0.2.1"), removed=True))
    assert m.snapshot().gateway(2, socket.AF_INET) is None
    assert m.snapshot().gateway(3, socket.AF_INET) is None  # other links untouched
    m.apply(RouteEvent(default_route(3, "198.51.100.254")))
    m.apply(AddressEvent(addr(3, "2001:db8:3::1")))
    m.apply(AddressEvent(addr(3, "2001:db8:3::1"), removed=True))  # not IPv4: no effect
    assert m.snapshot().gateway(3, socket.AF_INET) == A("198.51.100.254")


def test_include_order_is_the_priority_then_interface_order() -> None:
    m = model(NetworkConfig(include=("wlan*", "*")))
    assert eligible(m) == ["198.51.100.1", "192.0.2.1", "2001:db8::1"]


def test_existing_false_ignores_addresses_present_at_start_until_readded() -> None:
    m = NetworkModel(NetworkConfig(existing=False), devtype_reader=lambda name: "")
    m.load([link(2, "eth0")], [addr(2, "192.0.2.1")], [], initial=True)
    assert eligible(m) == []
    m.apply(AddressEvent(addr(2, "192.0.2.1"), removed=True))
    m.apply(AddressEvent(addr(2, "192.0.2.1")))
    assert eligible(m) == ["192.0.2.1"]


def test_existing_switched_on_by_a_reload_takes_the_addresses_present_at_start() -> None:
    m = NetworkModel(NetworkConfig(existing=False), devtype_reader=lambda name: "")
    m.load([link(2, "eth0")], [addr(2, "192.0.2.1")], [], initial=True)
    m.set_config(NetworkConfig(existing=True))
    assert eligible(m) == ["192.0.2.1"]
    # Switched off again: what the daemon already acts on stays (start is past).
    m.set_config(NetworkConfig(existing=False))
    assert eligible(m) == ["192.0.2.1"]


def test_snapshot_is_cached_until_a_change() -> None:
    m = model()
    first = m.snapshot()
    assert m.snapshot() is first
    m.apply(AddressEvent(addr(3, "198.51.100.3")))
    assert m.snapshot() is not first and m.snapshot().generation > first.generation
