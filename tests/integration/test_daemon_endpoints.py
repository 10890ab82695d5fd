"""The daemon in a namespace: addresses become endpoints and go away again,
an admin's endpoints are never touched, and the kernel converges after
crashes, deletions and reloads."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py.lab import (
    Lab,
    MptcpPair,
    Netns,
    TwoPaths,
    daemon_config,
    diag_subflows,
    mptcp_connect,
    mptcp_listen,
    subflows_by_token,
    wait_for,
)
from mptcpd_py.netlink.mptcp import MptcpPM

A = ipaddress.ip_address


def _children(pid: int) -> list[int]:
    """The process and its descendants (ip netns exec may fork); a process
    that exits while it is being read is skipped."""
    out = [pid]
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for child in children:
            out.extend(_children(int(child)))
    return out


def _comms(pid: int) -> set[str]:
    """The command names of a process and its descendants."""
    names = set()
    for each in _children(pid):
        try:
            names.add(Path(f"/proc/{each}/comm").read_text().strip())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return names


def endpoints(ns: Netns) -> dict[str, dict]:
    return {row["address"]: row for row in ns.endpoints()}


@pytest.fixture
def box(lab: Lab) -> Netns:
    ns = lab.netns("box")
    ns.stub_link("eth0")
    ns.stub_link("eth1")
    ns.ip("addr", "add", "192.0.2.1/24", "dev", "eth0")
    # An admin's own endpoint, made before the daemon: it must survive everything.
    ns.ip("mptcp", "endpoint", "add", "203.0.113.99", "id", "99", "signal")
    return ns


def test_address_lifecycle_follows_the_network_and_spares_admin_endpoints(
        box: Netns, daemons, tmp_path: Path) -> None:
    cfg = daemon_config(str(tmp_path / "state"),
                        extra='[plugins.addr_adv]\nflags = ["signal"]\n'
                              '[[plugins.addr_adv.interface]]\nmatch = "eth1"\n'
                              'flags = ["subflow", "backup"]\n')
    d = daemons(box, cfg).start()
    wait_for(lambda: "192.0.2.1" in endpoints(box), what="existing address endpoint")
    assert endpoints(box)["192.0.2.1"]["flags"] == {"signal"}
    assert endpoints(box)["192.0.2.1"]["dev"] == "eth0"

    box.ip("addr", "add", "198.51.100.1/24", "dev", "eth1")
    box.ip("addr", "add", "2001:db8::1/64", "dev", "eth1", "nodad")
    wait_for(lambda: {"198.51.100.1", "2001:db8::1"} <= set(endpoints(box)), what="new")
    assert endpoints(box)["198.51.100.1"]["flags"] == {"subflow", "backup"}

    box.ip("addr", "del", "198.51.100.1/24", "dev", "eth1")
    wait_for(lambda: "198.51.100.1" not in endpoints(box), what="deleted address")

    box.ip("link", "set", "eth0", "down")
    wait_for(lambda: "192.0.2.1" not in endpoints(box), what="link down")
    box.ip("link", "set", "eth0", "up")
    wait_for(lambda: "192.0.2.1" in endpoints(box), what="link up")

    assert endpoints(box)["203.0.113.99"] == {"address": "203.0.113.99", "id": 99,
                                              "flags": {"signal"}}
    assert d.stop() == 0
    assert set(endpoints(box)) == {"203.0.113.99"}
    assert d.errors() == []


def test_sigterm_removes_owned_endpoints_and_restores_limits(
        box: Netns, daemons, tmp_path: Path) -> None:
    box.ip("mptcp", "limits", "set", "subflows", "1", "add_addr_accepted", "0")
    cfg = daemon_config(str(tmp_path / "state"),
                        extra="[kernel.limits]\nsubflows = 4\nadd_addr_accepted = 3\n")
    d = daemons(box, cfg).start()
    assert "subflows 4" in box.ip("mptcp", "limits", "show")
    wait_for(lambda: "192.0.2.1" in endpoints(box))
    d.send(signal.SIGTERM)
    assert d.proc.wait(timeout=20) == 0
    assert set(endpoints(box)) == {"203.0.113.99"}
    limits = box.ip("mptcp", "limits", "show").split()
    assert limits == ["add_addr_accepted", "0", "subflows", "1"]
    assert d.wait_notify("STOPPING=1", 1)


def test_sigkill_then_restart_adopts_without_duplicates_or_errors(
        box: Netns, daemons, tmp_path: Path) -> None:
    cfg = daemon_config(str(tmp_path / "state"))
    box.ip("addr", "add", "198.51.100.1/24", "dev", "eth1")
    first = daemons(box, cfg, name="first").start()
    wait_for(lambda: {"192.0.2.1", "198.51.100.1"} <= set(endpoints(box)))
    ids = {a: r["id"] for a, r in endpoints(box).items()}
    first.kill()
    box.ip("addr", "add", "198.51.100.2/24", "dev", "eth1")  # changed while it was dead
    second = daemons(box, cfg, name="second").start()
    wait_for(lambda: "198.51.100.2" in endpoints(box))
    after = endpoints(box)
    assert sorted(after) == ["192.0.2.1", "198.51.100.1", "198.51.100.2", "203.0.113.99"]
    assert {a: after[a]["id"] for a in ids} == ids  # adopted, not re-created
    assert second.errors() == []
    assert second.stop() == 0
    assert set(endpoints(box)) == {"203.0.113.99"}


def test_endpoint_deleted_by_admin_is_restored_by_the_periodic_resync(
        box: Netns, daemons, tmp_path: Path) -> None:
    cfg = daemon_config(str(tmp_path / "state"), reconcile_interval=0.5)
    daemons(box, cfg).start()
    wait_for(lambda: "192.0.2.1" in endpoints(box))
    owned_id = endpoints(box)["192.0.2.1"]["id"]
    box.ip("mptcp", "endpoint", "delete", "id", str(owned_id))
    deleted_at = time.monotonic()
    wait_for(lambda: "192.0.2.1" in endpoints(box), timeout=5, what="restored endpoint")
    assert time.monotonic() - deleted_at < 2.0


def test_sighup_reloads_and_keeps_the_old_config_when_the_new_one_is_broken(
        box: Netns, daemons, tmp_path: Path) -> None:
    cfg = daemon_config(str(tmp_path / "state"))
    d = daemons(box, cfg).start()
    wait_for(lambda: "192.0.2.1" in endpoints(box))
    d.write_config(cfg + "[plugins.addr_adv]\nflags = ['signal', 'turbo']\n")
    mark = len(d.messages)
    d.send(signal.SIGHUP)
    d.wait_notify("RELOADING=1", 10, after=mark)
    d.wait_notify("READY=1", 10, after=mark)
    d.wait_log("reload refused: configuration error; the old one stays")
    assert d.proc.poll() is None
    assert endpoints(box)["192.0.2.1"]["flags"] == {"subflow"}

    d.write_config(cfg + "[plugins.addr_adv]\nflags = ['subflow', 'backup']\n")
    for _ in range(5):  # a burst of SIGHUPs collapses
        d.send(signal.SIGHUP)
    wait_for(lambda: endpoints(box)["192.0.2.1"]["flags"] == {"subflow", "backup"},
             what="reloaded flags")
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_more_than_eight_candidates_wait_and_are_promoted(
        box: Netns, daemons, tmp_path: Path) -> None:
    for i in range(2, 12):
        box.ip("addr", "add", f"192.0.2.{i}/24", "dev", "eth0")
    d = daemons(box, daemon_config(str(tmp_path / "state"))).start()
    # 8 slots, one taken by the admin's endpoint: 7 of ours.
    wait_for(lambda: len(endpoints(box)) == 8)
    ours = sorted(a for a in endpoints(box) if a != "203.0.113.99")
    assert ours == sorted(f"192.0.2.{i}" for i in range(1, 8))
    d.wait_log("endpoint waiting for a slot", addr="192.0.2.11")
    for _ in range(3):  # more passes: the line is not repeated on each one
        mark = len(d.messages)
        d.send(signal.SIGHUP)
        d.wait_notify("READY=1", 10, after=mark)
    waiting = [e for e in d.logs() if e["event"] == "endpoint waiting for a slot"]
    assert sorted(e["addr"] for e in waiting) == sorted(f"192.0.2.{i}" for i in range(8, 12))
    box.ip("mptcp", "endpoint", "delete", "id", "99")  # the admin frees a slot
    box.ip("addr", "del", "192.0.2.3/24", "dev", "eth0")
    d.send(signal.SIGHUP)  # a reload resyncs (the kernel sends no endpoint events)
    wait_for(lambda: {"192.0.2.8", "192.0.2.9"} <= set(endpoints(box)), what="promoted")
    assert "192.0.2.3" not in endpoints(box)
    assert len(endpoints(box)) == 8


def test_default_route_added_later_makes_the_address_eligible_at_once(
        box: Netns, daemons, tmp_path: Path) -> None:
    cfg = daemon_config(str(tmp_path / "state"),
                        extra="[network]\nrequire_default_route = true\n")
    d = daemons(box, cfg).start()  # READY follows the first full reconcile
    assert "192.0.2.1" not in endpoints(box)
    box.ip("route", "add", "default", "via", "192.0.2.254", "dev", "eth0")
    wait_for(lambda: "192.0.2.1" in endpoints(box), timeout=2, what="eligible on route")
    # The same pass adds the source rule right after the endpoint.
    wait_for(lambda: "from 192.0.2.1 lookup 1" in box.ip("rule", "show"), timeout=2,
             what="source rule")
    table = box.ip("route", "show", "table", "all")
    assert "default via 192.0.2.254 dev eth0 table 100" in table
    box.ip("route", "del", "default", "via", "192.0.2.254", "dev", "eth0")
    wait_for(lambda: "192.0.2.1" not in endpoints(box), timeout=2, what="ineligible again")
    assert "from 192.0.2.1" not in box.ip("rule", "show")
    assert d.stop() == 0


def test_a_link_set_down_loses_its_ipv4_default_route_for_the_daemon_too(
        box: Netns, daemons, tmp_path: Path) -> None:
    """The kernel deletes a link's IPv4 routes when it is set down and sends
    no message for them: the daemon forgets them too, so after the link is
    up again its address waits for a default route, as configured."""
    cfg = daemon_config(str(tmp_path / "state"),
                        extra="[network]\nrequire_default_route = true\n")
    box.ip("route", "add", "default", "via", "192.0.2.254", "dev", "eth0")
    d = daemons(box, cfg).start()
    assert "192.0.2.1" in endpoints(box)
    box.ip("link", "set", "eth0", "down")
    wait_for(lambda: "192.0.2.1" not in endpoints(box), what="endpoint gone with the link")
    box.ip("link", "set", "eth0", "up")
    # Events come in order: once an address added after this has its
    # endpoint, and a reload's full pass is over, eth0's return was seen.
    box.ip("addr", "add", "198.51.100.1/24", "dev", "eth1")
    box.ip("route", "add", "default", "via", "198.51.100.254", "dev", "eth1", "metric", "200")
    wait_for(lambda: "198.51.100.1" in endpoints(box), what="eth1's endpoint")
    d.send(signal.SIGHUP)
    d.wait_log("reloaded")
    assert "192.0.2.1" not in endpoints(box)
    assert "from 192.0.2.1 " not in box.ip("rule", "show")
    box.ip("route", "add", "default", "via", "192.0.2.254", "dev", "eth0")  # as DHCP would
    wait_for(lambda: "192.0.2.1" in endpoints(box), what="eligible again with a route")
    wait_for(lambda: "from 192.0.2.1 lookup" in box.ip("rule", "show"), what="source route")
    assert d.errors() == []
    assert d.stop() == 0


def test_each_path_of_a_multipath_default_route_routes_its_own_interface(
        box: Netns, daemons, tmp_path: Path) -> None:
    """One default route with a nexthop per link: each link's address is
    eligible and gets a source route through its own nexthop. A link set
    down kills its path without a message and revives it when up again."""
    cfg = daemon_config(str(tmp_path / "state"),
                        extra="[network]\nrequire_default_route = true\n")
    box.ip("addr", "add", "198.51.100.1/24", "dev", "eth1")
    box.ip("route", "add", "default", "nexthop", "via", "192.0.2.254", "dev", "eth0",
           "nexthop", "via", "198.51.100.254", "dev", "eth1")
    d = daemons(box, cfg).start()
    assert {"192.0.2.1", "198.51.100.1"} <= set(endpoints(box))

    def via(address: str) -> str:
        rules = box.ip("rule", "show")
        if f"from {address} lookup " not in rules:
            return ""
        table = rules.split(f"from {address} lookup ")[1].split()[0]
        routes = box.ip("route", "show", "table", table).splitlines()
        return next((r.split(" proto")[0] for r in routes if r.startswith("default")), "")

    wait_for(lambda: via("198.51.100.1") and via("192.0.2.1"), what="both source routes")
    assert via("192.0.2.1") == "default via 192.0.2.254 dev eth0"
    assert via("198.51.100.1") == "default via 198.51.100.254 dev eth1"
    box.ip("link", "set", "eth0", "down")
    wait_for(lambda: "192.0.2.1" not in endpoints(box), what="eth0's path dead")
    assert "198.51.100.1" in endpoints(box)
    box.ip("link", "set", "eth0", "up")  # the kernel revives the path; no route message
    wait_for(lambda: "192.0.2.1" in endpoints(box), what="eth0's path alive again")
    wait_for(lambda: via("192.0.2.1") == "default via 192.0.2.254 dev eth0",
             what="its source route back")
    assert d.errors() == []
    assert d.stop() == 0


def test_another_path_manager_in_the_namespace_refuses_start(
        box: Netns, daemons, tmp_path: Path) -> None:
    fake = box.popen(["python3", "-c", "open('/proc/self/comm','w').write('mptcpd');"
                      "import time; time.sleep(30)"])
    try:
        wait_for(lambda: "mptcpd" in _comms(fake.pid), timeout=5)
        d = daemons(box, daemon_config(str(tmp_path / "state")))
        d.start(wait_ready=False)
        assert d.proc.wait(timeout=20) == 1
        assert "another path manager is running in this network namespace: mptcpd" in \
            d.log_text()
    finally:
        fake.kill()
        fake.wait()


def test_watchdog_pings_and_status_lines_under_a_notify_socket(
        box: Netns, daemons, tmp_path: Path) -> None:
    d = daemons(box, daemon_config(str(tmp_path / "state")),
                env={"WATCHDOG_USEC": "200000"}).start()
    wait_for(lambda: (d.poll_notify(), d.messages.count("WATCHDOG=1") >= 3)[1], 5,
             what="three watchdog pings")
    assert any(m.startswith("STATUS=") and "endpoints owned" in m for m in d.messages)
    assert d.stop() == 0
    assert "STOPPING=1" in d.messages


def test_network_manager_in_the_namespace_is_warned_about_not_fought(
        box: Netns, daemons, tmp_path: Path) -> None:
    fake = box.popen(["python3", "-c", "open('/proc/self/comm','w').write('NetworkManager');"
                      "import time; time.sleep(30)"])
    try:
        wait_for(lambda: "NetworkManager" in _comms(fake.pid), timeout=5)
        d = daemons(box, daemon_config(str(tmp_path / "state"))).start()
        line = d.wait_log("NetworkManager is running here and may manage MPTCP endpoints "
                          "(connection.mptcp-flags); mptcpd-py never touches endpoints it did "
                          "not create and stops restoring one that keeps being deleted")
        assert line["level"] == "warning"
        wait_for(lambda: "192.0.2.1" in endpoints(box))
        assert d.stop() == 0
    finally:
        fake.kill()
        fake.wait()


def test_source_routes_spare_rules_and_tables_the_admin_made(
        box: Netns, daemons, tmp_path: Path) -> None:
    """An admin's rule and table routes survive the daemon's whole life, even
    when they are exactly what the daemon would have added itself."""
    box.stub_link("eth2")
    box.ip("addr", "add", "198.51.100.1/24", "dev", "eth2")
    box.ip("route", "add", "default", "via", "192.0.2.254", "dev", "eth0")
    box.ip("route", "add", "default", "via", "198.51.100.254", "dev", "eth2", "metric", "10")
    eth2 = box.ip_json("link", "show", "eth2")[0]["ifindex"]
    table = 10000 + eth2  # what the daemon would pick for eth2 (table_base + ifindex)
    admin = [
        ("rule", "add", "from", "198.51.100.1", "lookup", str(table), "pref", "10000"),
        ("route", "add", "default", "via", "198.51.100.254", "dev", "eth2", "table", str(table)),
        ("rule", "add", "from", "203.0.113.0/24", "lookup", "200", "pref", "10000"),
        ("route", "add", "default", "via", "192.0.2.254", "dev", "eth0", "table", "200"),
    ]
    for command in admin:
        box.ip(*command)

    def admin_routing_intact(eth2_route: bool = True) -> bool:
        rules = box.ip("rule", "show")
        routes = box.ip("route", "show", "table", "all")
        return (f"from 198.51.100.1 lookup {table}" in rules
                and "from 203.0.113.0/24 lookup 200" in rules
                and (f"default via 198.51.100.254 dev eth2 table {table}" in routes
                     or not eth2_route)
                and "default via 192.0.2.254 dev eth0 table 200" in routes)

    d = daemons(box, daemon_config(str(tmp_path / "state"))).start()
    wait_for(lambda: {"192.0.2.1", "198.51.100.1"} <= set(endpoints(box)), what="endpoints")
    wait_for(lambda: "from 192.0.2.1 lookup" in box.ip("rule", "show"), what="own rule")
    d.wait_log("source route left to its owner", addr="198.51.100.1")
    assert admin_routing_intact()
    assert d.stop() == 0
    assert "from 192.0.2.1 lookup" not in box.ip("rule", "show")
    assert admin_routing_intact()
    # Once more with the address going away while the daemon runs (the kernel
    # itself drops the eth2 table route then: its gateway is unreachable).
    d = daemons(box, daemon_config(str(tmp_path / "state")), name="d2").start()
    d.wait_log("source route left to its owner", addr="198.51.100.1")
    box.ip("addr", "del", "198.51.100.1/24", "dev", "eth2")
    wait_for(lambda: "198.51.100.1" not in endpoints(box), what="endpoint removed")
    assert d.stop() == 0
    assert admin_routing_intact(eth2_route=False)


def test_an_id_reused_by_the_admin_after_a_flush_is_never_deleted(
        box: Netns, daemons, tmp_path: Path) -> None:
    """The kernel deletes by id alone and a flush restarts its ids at 1: the
    daemon reads an id back before deleting it."""
    box.ip("addr", "add", "198.51.100.1/24", "dev", "eth1")
    d = daemons(box, daemon_config(str(tmp_path / "state"))).start()
    wait_for(lambda: {"192.0.2.1", "198.51.100.1"} <= set(endpoints(box)), what="endpoints")
    ours = endpoints(box)["192.0.2.1"]["id"]
    box.ip("mptcp", "endpoint", "flush")
    box.ip("mptcp", "endpoint", "add", "203.0.113.7", "id", str(ours), "signal")
    box.ip("addr", "del", "192.0.2.1/24", "dev", "eth0")  # the daemon's delete of `ours`
    d.send(signal.SIGHUP)  # a full pass: the flushed 198.51.100.1 comes back
    wait_for(lambda: "198.51.100.1" in endpoints(box), what="re-added after the flush")
    assert endpoints(box)["203.0.113.7"] == {"address": "203.0.113.7", "id": ours,
                                             "flags": {"signal"}}
    assert d.stop() == 0
    assert set(endpoints(box)) == {"203.0.113.7"}
    assert d.errors() == []


def test_an_implicit_endpoint_is_taken_over_with_its_id(lab: Lab, daemons,
                                                       tmp_path: Path) -> None:
    """A subflow to an address without an endpoint makes the kernel add an
    implicit one; the daemon replaces it (the kernel only allows that
    without an explicit id) instead of failing on every pass."""
    tp = TwoPaths(lab)
    tp.client.sysctl("net.mptcp.path_manager", "userspace")
    listener = mptcp_listen(tp.server, "0.0.0.0")
    port = listener.getsockname()[1]
    pair = mptcp_connect(tp.client, listener, address=tp.server_addr(0))
    try:
        pair.server.sendall(b"x")  # the client's ESTABLISHED waits for peer data
        pair.client.recv(1)
        (token,) = subflows_by_token(tp.client)

        async def join_second_server_address() -> None:
            pm = await MptcpPM.open(netns=tp.client.name)
            try:
                await pm.subflow_create(token, A(tp.client_addr(1)), 5,
                                        A(tp.server_addr(1)), port)
            finally:
                pm.close()

        asyncio.run(join_second_server_address())
        implicit = wait_for(lambda: next((row for row in tp.server.endpoints()
                                          if "implicit" in row.get("flags", set())), None),
                            what="implicit endpoint")
        assert implicit["address"] == tp.server_addr(1)
        d = daemons(tp.server, daemon_config(str(tmp_path / "state"))).start()
        wait_for(lambda: endpoints(tp.server).get(tp.server_addr(1), {}).get("flags")
                 == {"subflow"}, what="implicit endpoint replaced")
        assert endpoints(tp.server)[tp.server_addr(1)]["id"] == implicit["id"]
        assert d.errors() == []
        assert d.stop() == 0
    finally:
        pair.close()


def test_own_source_route_deleted_by_someone_else_is_restored_whole(
        box: Netns, daemons, tmp_path: Path) -> None:
    """A rule or table route of ours that vanished is re-made by the next full
    pass (not mistaken for someone else's), and nothing of it outlives us."""
    box.ip("route", "add", "default", "via", "192.0.2.254", "dev", "eth0")
    box.ip("addr", "add", "2001:db8:7::1/64", "dev", "eth0", "nodad")
    box.ip("-6", "route", "add", "default", "via", "2001:db8:7::fe", "dev", "eth0")
    d = daemons(box, daemon_config(str(tmp_path / "state"))).start()
    wait_for(lambda: "from 192.0.2.1 lookup" in box.ip("rule", "show"), what="own rule")
    wait_for(lambda: "from 2001:db8:7::1 lookup" in box.ip("-6", "rule", "show"), what="v6")
    table = box.ip("rule", "show").split("from 192.0.2.1 lookup ")[1].split()[0]
    d.send(signal.SIGHUP)  # a full pass over intact routes changes nothing
    d.wait_log("reloaded")
    box.ip("rule", "del", "from", "192.0.2.1", "lookup", table)
    d.send(signal.SIGHUP)  # a full pass (the kernel sends no rule events)
    wait_for(lambda: f"from 192.0.2.1 lookup {table}" in box.ip("rule", "show"),
             what="rule restored")
    box.ip("route", "del", "default", "via", "192.0.2.254", "dev", "eth0", "table", table)
    d.send(signal.SIGHUP)
    wait_for(lambda: "default via 192.0.2.254" in box.ip("route", "show", "table", table),
             what="table route restored")
    assert d.stop() == 0
    assert "from 192.0.2.1" not in box.ip("rule", "show")
    assert "from 2001:db8:7::1" not in box.ip("-6", "rule", "show")
    assert box.ip("route", "show", "table", table).strip() == ""
    assert box.ip("-6", "route", "show", "table", table).strip() == ""
    assert d.errors() == []
    changed = [line for line in d.logs()
               if line["event"] == "source route changed by someone else; re-adding it"]
    assert [line["addr"] for line in changed] == ["192.0.2.1", "192.0.2.1"]


def test_two_addresses_of_one_subnet_share_their_table_and_each_keep_a_rule(
        box: Netns, daemons, tmp_path: Path) -> None:
    """Two addresses of one subnet on one interface share its table: the
    IPv4 subnet route carries the first one's prefsrc, which the kernel's
    route identity ignores (the second add gets EEXIST). Each address still
    gets its own rule; the one whose prefsrc the route carries going first
    leaves the other its rule and routes; on stop all goes."""
    box.sysctl("net.ipv4.conf.eth0.promote_secondaries", 1)  # .11 outlives .1
    box.ip("addr", "add", "192.0.2.11/24", "dev", "eth0")
    box.ip("route", "add", "default", "via", "192.0.2.254", "dev", "eth0")
    box.ip("addr", "add", "2001:db8:7::1/64", "dev", "eth0", "nodad")
    box.ip("addr", "add", "2001:db8:7::2/64", "dev", "eth0", "nodad")
    box.ip("-6", "route", "add", "default", "via", "2001:db8:7::fe", "dev", "eth0")
    d = daemons(box, daemon_config(str(tmp_path / "state"))).start()

    def table_of(address: str) -> str:
        rules = box.ip("-6" if ":" in address else "-4", "rule", "show")
        return rules.split(f"from {address} lookup ")[1].split()[0] \
            if f"from {address} lookup " in rules else ""

    wait_for(lambda: all(table_of(a) for a in ("192.0.2.1", "192.0.2.11",
                                               "2001:db8:7::1", "2001:db8:7::2")),
             what="a rule for each of the four addresses")
    table = table_of("192.0.2.1")
    assert {table_of(a) for a in ("192.0.2.11", "2001:db8:7::1", "2001:db8:7::2")} == {table}
    v4 = box.ip("route", "show", "table", table)
    assert "default via 192.0.2.254 dev eth0" in v4 and "192.0.2.0/24 dev eth0" in v4
    v6 = box.ip("-6", "route", "show", "table", table)
    assert "default via 2001:db8:7::fe dev eth0" in v6 and "2001:db8:7::/64 dev eth0" in v6
    # The address the subnet route names as its source goes first.
    first = v4.split("192.0.2.0/24 dev eth0")[1].split(" src ")[1].split()[0]
    other = "192.0.2.11" if first == "192.0.2.1" else "192.0.2.1"
    box.ip("addr", "del", f"{first}/24", "dev", "eth0")
    box.ip("addr", "del", "2001:db8:7::1/64", "dev", "eth0")
    d.wait_log("source route removed", addr=first)
    d.wait_log("source route removed", addr="2001:db8:7::1")
    assert table_of(first) == "" and table_of("2001:db8:7::1") == ""
    assert table_of(other) == table == table_of("2001:db8:7::2")
    v4 = box.ip("route", "show", "table", table)
    assert "default via 192.0.2.254 dev eth0" in v4 and "192.0.2.0/24 dev eth0" in v4
    v6 = box.ip("-6", "route", "show", "table", table)
    assert "default via 2001:db8:7::fe dev eth0" in v6 and "2001:db8:7::/64 dev eth0" in v6
    _stops_leaving_no_rule_or_route(d, box, table)


def test_a_new_gateway_moves_the_shared_table_and_keeps_every_rule(
        box: Netns, daemons, tmp_path: Path) -> None:
    """Two addresses share their interface's table: when its gateway
    changes, the new default route must not be taken for someone else's
    because the other address still held the old one (the kernel's route
    identity ignores the gateway)."""
    box.ip("addr", "add", "192.0.2.11/24", "dev", "eth0")
    box.ip("route", "add", "default", "via", "192.0.2.254", "dev", "eth0")
    box.ip("addr", "add", "2001:db8:7::1/64", "dev", "eth0", "nodad")
    box.ip("addr", "add", "2001:db8:7::2/64", "dev", "eth0", "nodad")
    box.ip("-6", "route", "add", "default", "via", "2001:db8:7::fe", "dev", "eth0")
    d = daemons(box, daemon_config(str(tmp_path / "state"))).start()
    addresses = ("192.0.2.1", "192.0.2.11", "2001:db8:7::1", "2001:db8:7::2")

    def ruled() -> bool:
        rules = box.ip("-4", "rule", "show") + box.ip("-6", "rule", "show")
        return all(f"from {a} lookup " in rules for a in addresses)

    wait_for(ruled, what="a rule for each of the four addresses")
    table = box.ip("rule", "show").split("from 192.0.2.1 lookup ")[1].split()[0]
    box.ip("route", "replace", "default", "via", "192.0.2.253", "dev", "eth0")
    box.ip("-6", "route", "replace", "default", "via", "2001:db8:7::fd", "dev", "eth0")

    def moved() -> bool:
        v4 = box.ip("route", "show", "table", table)
        v6 = box.ip("-6", "route", "show", "table", table)
        return ("default via 192.0.2.253 dev eth0" in v4 and "192.0.2.254" not in v4
                and "default via 2001:db8:7::fd dev eth0" in v6 and "2001:db8:7::fe" not in v6)

    wait_for(lambda: moved() and ruled(), what="the table on the new gateways, every rule")
    _stops_leaving_no_rule_or_route(d, box, table)


def test_an_address_added_with_a_new_gateway_gets_its_rule_beside_its_sibling(
        box: Netns, daemons, tmp_path: Path) -> None:
    """A gateway change and a new address of the same interface in one
    pass: the new address is routed before the pass moves its sibling to
    the new gateway, and its default route must not be taken for someone
    else's because the sibling still held the old one. Sent as one batch so
    the daemon sees both at once (it may still see them apart)."""
    box.ip("route", "add", "default", "via", "192.0.2.254", "dev", "eth0")
    box.ip("addr", "add", "2001:db8:7::1/64", "dev", "eth0", "nodad")
    box.ip("-6", "route", "add", "default", "via", "2001:db8:7::fe", "dev", "eth0")
    d = daemons(box, daemon_config(str(tmp_path / "state"))).start()

    def ruled(*addresses: str) -> bool:
        rules = box.ip("-4", "rule", "show") + box.ip("-6", "rule", "show")
        return all(f"from {a} lookup " in rules for a in addresses)

    wait_for(lambda: ruled("192.0.2.1", "2001:db8:7::1"), what="a rule for each address")
    table = box.ip("rule", "show").split("from 192.0.2.1 lookup ")[1].split()[0]
    batch = tmp_path / "batch"
    batch.write_text("route replace default via 192.0.2.253 dev eth0\n"
                     "addr add 192.0.2.11/24 dev eth0\n"
                     "route replace default via 2001:db8:7::fd dev eth0\n"
                     "addr add 2001:db8:7::2/64 dev eth0 nodad\n")
    box.ip("-batch", str(batch))

    def moved() -> bool:
        v4 = box.ip("route", "show", "table", table)
        v6 = box.ip("-6", "route", "show", "table", table)
        return ("default via 192.0.2.253 dev eth0" in v4 and "192.0.2.254" not in v4
                and "default via 2001:db8:7::fd dev eth0" in v6 and "2001:db8:7::fe" not in v6)

    wait_for(lambda: moved() and ruled("192.0.2.1", "192.0.2.11", "2001:db8:7::1",
                                       "2001:db8:7::2"),
             what="the table on the new gateways, a rule for every address")
    _stops_leaving_no_rule_or_route(d, box, table)


def _stops_leaving_no_rule_or_route(d: Any, box: Netns, table: str) -> None:
    """The shared-table tests' end: a clean stop takes every rule and the
    table's routes, with nothing taken for someone else's on the way."""
    assert d.stop() == 0
    assert "from 192.0.2." not in box.ip("-4", "rule", "show")
    assert "from 2001:db8:7::" not in box.ip("-6", "rule", "show")
    assert box.ip("route", "show", "table", table).strip() == ""
    assert box.ip("-6", "route", "show", "table", table).strip() == ""
    assert d.errors() == []
    assert not [line for line in d.logs() if line["event"] == "source route left to its owner"]


def _joined_from(ns: Netns, address: str) -> bool:
    return any(str(s.local) == address for s in diag_subflows(ns))


def _peer_data_exchanged(pair: MptcpPair) -> None:
    pair.server.sendall(b"x")  # the client's ESTABLISHED waits for peer data
    pair.client.recv(1)


@pytest.mark.parametrize("source_routes", [True, False])
def test_an_endpoint_older_than_its_gateway_is_added_again_once_routed(
        lab: Lab, daemons, tmp_path: Path, source_routes: bool) -> None:
    """eth1 has its address before its default route (as with DHCP): the
    join the kernel opens from it goes on-link and fails. When the default
    route comes, the daemon adds the source route (if configured to), then
    the endpoint again, and the kernel opens the join anew, through the
    gateway."""
    tp = TwoPaths(lab, default_routes=False)
    tp.add_default_routes(0)
    tp.server.sysctl("net.ipv4.conf.all.arp_ignore", 1)
    extra = "" if source_routes else "[routing]\nsource_routes = false\n"
    d = daemons(tp.client, daemon_config(str(tmp_path / "state"), extra=extra)).start()
    before = endpoints(tp.client)[tp.client_addr(1)]
    pair = mptcp_connect(tp.client, mptcp_listen(tp.server, "0.0.0.0"),
                         address=tp.server_addr(0))
    try:
        _peer_data_exchanged(pair)
        wait_for(lambda: "192.0.2.2 dev eth1 FAILED" in tp.client.ip("neigh", "show"),
                 what="the on-link join from eth1 to fail")
        assert not _joined_from(tp.client, tp.client_addr(1))
        tp.add_default_routes(1, v6=False)
        wait_for(lambda: _joined_from(tp.client, tp.client_addr(1)),
                 what="a join from eth1 through its gateway")
        readded = d.wait_log("endpoint re-added", addr=tp.client_addr(1))
        assert readded["reason"] == "its interface got a gateway after it"
        assert endpoints(tp.client)[tp.client_addr(1)] == before  # same id and flags
        events = [line["event"] for line in d.logs() if line.get("addr") == tp.client_addr(1)]
        assert events == ["endpoint added", *(["source route added"] if source_routes else []),
                          "endpoint re-added"], events
        assert d.errors() == []
        assert d.stop() == 0
    finally:
        pair.close()


def test_a_returning_link_gets_its_source_route_before_its_endpoint(
        lab: Lab, daemons, tmp_path: Path) -> None:
    """The kernel opens an endpoint's subflows inside the add, and a subflow
    routed by the source route alone (an endpoint without a device, a main
    table without a route through it) needs that route by then. Carrier
    loss keeps the link's routes, so the gateway is known when the endpoint
    comes back: source route, then endpoint, then the join, no re-add."""
    tp = TwoPaths(lab)
    d = daemons(tp.client, daemon_config(str(tmp_path / "state"))).start()
    wait_for(lambda: tp.client_addr(1) in endpoints(tp.client), what="eth1 endpoint")
    pair = mptcp_connect(tp.client, mptcp_listen(tp.server, "0.0.0.0"),
                         address=tp.server_addr(0))
    try:
        _peer_data_exchanged(pair)

        def joined_from_eth1() -> bool:
            return _joined_from(tp.client, tp.client_addr(1))

        wait_for(joined_from_eth1, what="the first join from eth1")
        tp.server.ip("link", "set", tp.server_ifnames[1], "down")  # eth1 loses its carrier
        wait_for(lambda: tp.client_addr(1) not in endpoints(tp.client), what="endpoint gone")
        wait_for(lambda: not joined_from_eth1(), what="the eth1 subflow closed")
        tp.server.ip("link", "set", tp.server_ifnames[1], "up")
        wait_for(joined_from_eth1, what="a new join from eth1 after the carrier came back")
        events = [line["event"] for line in d.logs()
                  if line.get("addr") == tp.client_addr(1)]
        assert events[-2:] == ["source route added", "endpoint added"], events
        assert "endpoint re-added" not in events
        assert d.errors() == []
        assert d.stop() == 0
    finally:
        pair.close()
