"""The reliability scenarios' laboratory: a namespace with several veth
links, an admin's own endpoints, and address churn generated with
``ip -batch`` (thousands of rtnetlink events a second).

What the kernel should hold at the end is known exactly: the anchor
addresses, the survivors of the last round and the admin's endpoints,
untouched. :meth:`ChurnBox.expected` and :meth:`ChurnBox.observed` give
both in the same shape so a test compares them with one ``==``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from mptcpd_py.lab import Lab, Netns, wait_for
from mptcpd_py.state import StateStore

LINKS = ("eth0", "eth1", "eth2", "eth3")
# One address per link that stays through the churn (IPv6 on eth3).
ANCHORS = {"eth0": "192.0.2.1/24", "eth1": "198.51.100.1/24", "eth2": "203.0.113.1/24",
           "eth3": "2001:db8:3::1/64"}
GATEWAY = ("eth0", "192.0.2.254")  # a default route: source routing is exercised too
# The admin's endpoints: one for an address nobody has, one for an anchor
# the daemon would want (it must neither touch nor adopt either).
FOREIGN = ({"address": "203.0.113.99", "id": 99, "flags": {"signal"}},
           {"address": "198.51.100.1", "id": 98, "flags": {"subflow", "backup"}})
# eth2's endpoints are backups: the daemon's per-interface flags are checked
# too. wan0 (the link to a server namespace, see ChurnBox.add_server) is
# excluded, so its address never becomes an endpoint.
CONFIG_EXTRA = ('[network]\nexclude = ["lo", "wan*"]\n'
                '[plugins.addr_adv]\nflags = ["subflow"]\n'
                '[[plugins.addr_adv.interface]]\nmatch = "eth2"\nflags = ["subflow", "backup"]\n')
SERVER_ADDRESS = "2001:db8:ff::2"
PROBE = "192.0.2.250"  # outside the churn pool

View = dict[str, tuple[Any, ...]]


def _pool() -> list[str]:
    """Churn addresses, added as host prefixes (/32, /128) so deleting one
    never takes a secondary address with it."""
    out = []
    for net in ("192.0.2", "198.51.100", "203.0.113"):
        out += [f"{net}.{i}" for i in range(10, 90)]
    out += [f"2001:db8:10::{i:x}" for i in range(1, 241)]
    return out


@dataclass
class Round:
    commands: list[str]
    events: int  # address events: one per add, one per removal (ours or the kernel's)
    flapped: str = ""


def _prefix(addr: str) -> str:
    return f"{addr}/128" if ":" in addr else f"{addr}/32"


@dataclass
class ChurnBox:
    """A namespace ``box`` with :data:`LINKS`, anchors, a gateway on eth0
    and the admin's endpoints (:data:`FOREIGN`)."""

    lab: Lab
    seed: int = 0
    box: Netns = field(init=False)
    survivors: dict[str, str] = field(default_factory=dict)  # address -> link
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.box = self.lab.netns("churn")
        commands = []
        for name in LINKS:
            commands += [f"link add {name} type veth peer name {name}p",
                         f"link set {name}p up", f"link set {name} up",
                         f"addr add {ANCHORS[name]} dev {name} nodad"]
        commands.append(f"route replace default via {GATEWAY[1]} dev {GATEWAY[0]}")
        for ep in FOREIGN:
            commands.append(f"mptcp endpoint add {ep['address']} id {ep['id']} "
                            + " ".join(sorted(ep["flags"])))
        self.box.batch(commands, force=False)

    def add_server(self) -> Netns:
        """A server namespace behind ``wan0`` (IPv6 only, not an endpoint):
        connections from the box have their client side, and only that,
        in the daemon's namespace. (Server-side connections may report
        CLOSED only when the kernel's ADD_ADDR timer expires, minutes later.)"""
        server = self.lab.netns("server")
        self.lab.veth(self.box, "wan0", server, "wan0p")
        self.box.ip("addr", "add", "2001:db8:ff::1/64", "dev", "wan0", "nodad")
        server.ip("addr", "add", f"{SERVER_ADDRESS}/64", "dev", "wan0p", "nodad")
        return server

    # ------------------------------------------------------------ churn

    def round(self, addresses: int, *, flap: bool = True, keep: int = 0) -> Round:
        """``addresses`` adds spread over the links, a flap of one link in
        the middle (IPv6 addresses on it vanish, as the kernel does on
        down; its default route is re-added, as DHCP would), then the
        removals of all but ``keep`` of them."""
        placed = [(addr, self.rng.choice(LINKS)) for addr in
                  self.rng.sample(_pool(), addresses) if addr not in self.survivors]
        commands = [f"addr add {_prefix(a)} dev {link}" + (" nodad" if ":" in a else "")
                    for a, link in placed]
        flapped = ""
        gone: set[str] = set()
        if flap:
            flapped = self.rng.choice(LINKS)
            commands += [f"link set {flapped} down", f"link set {flapped} up"]
            if flapped == GATEWAY[0]:
                commands.append(f"route replace default via {GATEWAY[1]} dev {GATEWAY[0]}")
            if ":" in ANCHORS[flapped]:
                commands.append(f"addr replace {ANCHORS[flapped]} dev {flapped} nodad")
            gone = {a for a, link in placed if ":" in a and link == flapped}
        self.rng.shuffle(placed)
        kept = [(a, link) for a, link in placed if a not in gone][:keep]
        self.survivors.update(kept)
        removed = [(a, link) for a, link in placed if a not in gone and (a, link) not in kept]
        commands += [f"addr del {_prefix(a)} dev {link}" for a, link in removed]
        return Round(commands, 2 * len(placed) - len(kept), flapped)

    def run_batches(self, commands: list[str]) -> int:
        """Random slices: a big one arrives as a burst the daemon coalesces,
        small ones make it act on every intermediate state. Returns how
        many ``ip -batch`` runs it took."""
        runs = 0
        while commands:
            size = self.rng.choice((1, 2, 5, 10, 20, 50, 200))
            failed = self.box.batch(commands[:size])
            assert not failed, f"churn round failed (seed {self.seed}): {failed[:500]}"
            commands = commands[size:]
            runs += 1
        return runs

    def run_rounds(self, events: int, per_round: int = 100, keep_last: int = 2) -> int:
        """Churn until at least ``events`` address events happened; the
        last round leaves ``keep_last`` survivors and flaps nothing.
        Returns the number of events."""
        done = 0
        while True:
            last = done + per_round >= events
            adds = (events - done + keep_last + 1) // 2 if last else per_round // 2
            batch = self.round(adds, flap=not last, keep=keep_last if last else 0)
            self.run_batches(batch.commands)
            done += batch.events
            if last:
                return done

    # ------------------------------------------------------------ settling

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until neither the kernel nor the daemon has anything left to
        do, so that "the endpoints are as expected" is not a glimpse of a
        state the daemon is about to leave.

        The kernel reports a link's carrier (RUNNING) up to a second after
        ``link set up`` (linkwatch); then a probe address on eth0 makes a
        round trip through the daemon, which reads events in order: once it
        has added and removed the probe's endpoint, everything before is
        handled. Needs a free endpoint slot (at most 7 expected)."""
        assert len(self.expected()) < 8, "no slot left for the probe"
        wait_for(lambda: all(link.get("operstate") == "UP"
                             for link in self.box.ip_json("link", "show")
                             if link["ifname"] in LINKS), timeout, what="links running")
        self.box.ip("addr", "add", f"{PROBE}/32", "dev", "eth0")
        wait_for(lambda: PROBE in self.endpoint_ids(), timeout, what="the probe's endpoint")
        self.box.ip("addr", "del", f"{PROBE}/32", "dev", "eth0")
        wait_for(lambda: PROBE not in self.endpoint_ids(), timeout, what="probe gone")

    # ------------------------------------------------------------ views

    def expected(self) -> View:
        """address -> (dev, flags) the kernel must hold: ours and the admin's."""
        view: View = {}
        foreign = {ep["address"] for ep in FOREIGN}
        wanted = {ANCHORS[link].split("/")[0]: link for link in LINKS}
        wanted.update(self.survivors)
        for addr, link in wanted.items():
            if addr in foreign:
                continue
            flags = {"subflow", "backup"} if link == "eth2" else {"subflow"}
            view[addr] = ("ours", link, frozenset(flags))
        for ep in FOREIGN:
            view[ep["address"]] = ("admin", ep["id"], frozenset(ep["flags"]))
        return view

    def observed(self) -> View:
        """The kernel's endpoints in the shape of :meth:`expected`; raises
        on a duplicate address (the kernel should make that impossible)."""
        view: View = {}
        foreign_ids = {ep["id"] for ep in FOREIGN}
        for row in self.box.endpoints():
            addr = str(ipaddress.ip_address(row["address"]))
            assert addr not in view, f"duplicate endpoint for {addr}"
            if row["id"] in foreign_ids:
                view[addr] = ("admin", row["id"], frozenset(row["flags"]))
            else:
                view[addr] = ("ours", row.get("dev", ""), frozenset(row["flags"]))
        return view

    def endpoint_ids(self) -> dict[str, int]:
        return {str(ipaddress.ip_address(r["address"])): r["id"] for r in self.box.endpoints()}

    def source_rules(self) -> list[str]:
        """Source addresses of the daemon's ``from ADDR lookup T`` rules."""
        rules = self.box.ip_json("rule", "show") + self.box.ip_json("-6", "rule", "show")
        return sorted(r["src"] for r in rules if r.get("table") not in (None, "local", "main",
                                                                        "default")
                      and "src" in r)

    def expected_source_rules(self) -> list[str]:
        """Our endpoints on the gateway's link (IPv4 only: no IPv6 gateway)."""
        return sorted(a for a, v in self.expected().items()
                      if v[0] == "ours" and v[1] == GATEWAY[0] and ":" not in a)


class BackgroundChurn:
    """Rounds of churn in a thread until :meth:`stop`, which waits for the
    round under way to finish (so the address set is known again)."""

    def __init__(self, churn: ChurnBox, per_round: int = 40) -> None:
        self.churn = churn
        self.per_round = per_round
        self.events = 0
        self.batches = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> BackgroundChurn:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.churn.round(self.per_round // 2)
                self.batches += self.churn.run_batches(batch.commands)
                self.events += batch.events
        except BaseException as exc:
            self.error = exc

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "churn thread did not stop"
        if self.error is not None:
            raise self.error
        return self.events


def owned_in_state(state_dir: str) -> dict[str, int]:
    """What the state file (snapshot + journal) says the daemon owns:
    address -> id. Read with the daemon stopped or dead."""
    store = StateStore(state_dir)
    store.load()
    assert not store.problem, store.problem
    store.close()
    return {str(rec.address): rec.id for rec in store.state.endpoints.values()}


def state_files(state_dir: str) -> dict[str, str]:
    """The raw state files, for a failure message."""
    out = {}
    for name in ("state.json", "state.journal"):
        path = os.path.join(state_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                out[name] = f.read()[-2000:]
    return out


def figures(name: str, **values: Any) -> None:
    """One line a run's figures can be collected from (``pytest -rP``)."""
    print(f"FIGURES {name} " + json.dumps(values, sort_keys=True))
