"""The userspace path manager with live connections: fullmesh, sspi,
backup_cellular and server-side announcements, and bursts of connections."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py.lab import (
    BulkTransfer,
    Lab,
    TwoPaths,
    close_connections,
    daemon_config,
    mptcp_connect,
    mptcp_listen,
    open_connections,
    shape,
    subflows_by_token,
    wait_for,
)

USERSPACE = '[kernel]\npath_manager = "userspace"\n'


def client_token(tp: TwoPaths, local_port: int) -> int:
    def find() -> int | None:
        for token, subs in subflows_by_token(tp.client).items():
            if any(s.local_port == local_port for s in subs):
                return token
        return None
    token: int = wait_for(find, 5, what="connection in sock_diag")
    return token


def carried(tp: TwoPaths, seconds: float = 1.5) -> dict[str, int]:
    """Bytes each client interface sent over the next ``seconds``."""
    before = {i: tp.client.link_bytes(i)[1] for i in tp.ifnames}
    time.sleep(seconds)
    return {i: tp.client.link_bytes(i)[1] - before[i] for i in tp.ifnames}


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from a socket with a timeout (mptcp_connect sets 5 s)."""
    received = b""
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        assert chunk, f"connection closed after {received!r}"
        received += chunk
    return received


def test_userspace_fullmesh_opens_every_local_remote_pair(
        lab: Lab, daemons, tmp_path: Path) -> None:
    tp = TwoPaths(lab)
    tp.server.ip("mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "8")
    tp.server.ip("mptcp", "endpoint", "add", "198.51.100.2", "signal")  # announced to clients
    d = daemons(tp.client, daemon_config(str(tmp_path / "state"), plugins=["fullmesh"],
                                         extra=USERSPACE)).start()
    listener = mptcp_listen(tp.server, "0.0.0.0")
    pair = mptcp_connect(tp.client, listener, address="192.0.2.2")
    pair.server.sendall(b"go")
    token = client_token(tp, pair.client.getsockname()[1])

    def pairs() -> set[tuple[str, str]]:
        return {(str(s.local), str(s.remote)) for s in subflows_by_token(tp.client)[token]}
    expected = {(c, s) for c in ("192.0.2.1", "198.51.100.1")
                for s in ("192.0.2.2", "198.51.100.2")}
    wait_for(lambda: pairs() == expected, 10, what=f"4 subflows, have {pairs()}")
    # A path that goes away and comes back gets its subflows again; so does
    # the initial subflow's path (the kernel takes id 0 again).
    for index, local, path in ((1, "198.51.100.1", "path"), (0, "192.0.2.1", "initial path")):
        tp.client.ip("link", "set", tp.ifnames[index], "down")
        wait_for(lambda local=local: all(c != local for c, _ in pairs()), 10,
                 what=f"{path} gone")
        tp.client.ip("link", "set", tp.ifnames[index], "up")
        tp.add_default_routes(index, v6=False)
        wait_for(lambda: pairs() == expected, 10, what=f"{path} back, have {pairs()}")
        assert len(subflows_by_token(tp.client)[token]) == 4
    pair.server.sendall(b" still here")
    assert read_exactly(pair.client, 13) == b"go still here"
    pair.close()
    assert d.stop() == 0
    assert d.errors() == []


@pytest.mark.timeout(300)
def test_bursts_of_1000_connections_all_get_their_subflow(
        lab: Lab, daemons, tmp_path: Path) -> None:
    tp = TwoPaths(lab)
    tp.server.ip("mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "0")
    d = daemons(tp.client, daemon_config(str(tmp_path / "state"), plugins=["fullmesh"],
                                         extra=USERSPACE)).start()
    listener = mptcp_listen(tp.server, "0.0.0.0", backlog=4096)
    for burst in range(5):
        pairs = open_connections(tp.client, listener, "192.0.2.2", 1000)
        ports = {p.client.getsockname()[1] for p in pairs}

        def complete(ports: set[int] = ports) -> bool:
            mine = [subs for subs in subflows_by_token(tp.client).values()
                    if any(s.local_port in ports and str(s.local) == "192.0.2.1"
                           and s.local_id == 0 for s in subs)]
            return len(mine) == 1000 and all(
                any(str(s.local) == "198.51.100.1" for s in subs) for subs in mine)
        wait_for(complete, 60, interval=0.2, what=f"burst {burst}: every connection meshed")
        close_connections(pairs)
        wait_for(lambda: not subflows_by_token(tp.client), 30, interval=0.2,
                 what="connections closed")
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_sspi_opens_one_subflow_per_interface(lab: Lab, daemons, tmp_path: Path) -> None:
    tp = TwoPaths(lab)
    tp.server.ip("mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "8")
    tp.server.ip("mptcp", "endpoint", "add", "198.51.100.2", "signal")
    # Two addresses on the second interface: still one subflow over it.
    tp.client.ip("addr", "add", "198.51.100.11/24", "dev", tp.ifnames[1])
    d = daemons(tp.client, daemon_config(str(tmp_path / "state"), plugins=["sspi"],
                                         extra=USERSPACE)).start()
    listener = mptcp_listen(tp.server, "0.0.0.0")
    pair = mptcp_connect(tp.client, listener, address="192.0.2.2")
    pair.server.sendall(b"go")
    token = client_token(tp, pair.client.getsockname()[1])

    def locals_() -> list[str]:
        return sorted(str(s.local) for s in subflows_by_token(tp.client).get(token, []))
    wait_for(lambda: locals_() == ["192.0.2.1", "198.51.100.1"], 10, what=f"have {locals_()}")
    time.sleep(0.3)  # and no second subflow on the same interface follows
    assert locals_() == ["192.0.2.1", "198.51.100.1"]
    tp.client.ip("link", "set", tp.ifnames[1], "down")
    wait_for(lambda: locals_() == ["192.0.2.1"], 10, what="subflow gone with its link")
    tp.client.ip("link", "set", tp.ifnames[1], "up")
    wait_for(lambda: len(locals_()) == 2, 10, what=f"one subflow back, have {locals_()}")
    assert locals_()[0] == "192.0.2.1" and locals_()[1].startswith("198.51.100.")
    # The initial subflow's interface: its subflow goes with it and comes back.
    second = locals_()[1]
    tp.client.ip("link", "set", tp.ifnames[0], "down")
    wait_for(lambda: locals_() == [second], 10, what=f"initial subflow gone, have {locals_()}")
    tp.client.ip("link", "set", tp.ifnames[0], "up")
    tp.add_default_routes(0, v6=False)
    wait_for(lambda: locals_() == ["192.0.2.1", second], 10,
             what=f"a subflow on the initial interface again, have {locals_()}")
    pair.server.sendall(b"!")
    assert read_exactly(pair.client, 3) == b"go!"
    pair.close()
    assert d.stop() == 0
    assert d.errors() == []


def test_sspi_and_server_announce_serve_a_dual_stack_socket_with_an_ipv4_peer(
        lab: Lab, daemons, tmp_path: Path) -> None:
    """A program written for IPv6 (an AF_INET6 socket, IPV6_V6ONLY off) talking
    to an IPv4 peer: the kernel reports such a connection v4-mapped
    (::ffff:192.0.2.1). The client's sspi still opens the second interface's
    subflow and, when the initial subflow's link goes down, closes that
    subflow (an AF_INET6 one in the kernel); a server listening on [::]
    still announces its other address."""
    tp = TwoPaths(lab)
    d = daemons(tp.client, daemon_config(str(tmp_path / "client"), plugins=["sspi"],
                                         extra=USERSPACE), name="client").start()
    server = daemons(tp.server, daemon_config(str(tmp_path / "server"),
                                              plugins=["server_announce"], extra=USERSPACE),
                     name="server").start()
    listener = mptcp_listen(tp.server, "::")
    pair = mptcp_connect(tp.client, listener, address="192.0.2.2", dual_stack=True)
    pair.client.sendall(b"hello")  # the server side's ESTABLISHED waits for data
    read_exactly(pair.server, 5)
    pair.server.sendall(b"go")
    token = client_token(tp, pair.client.getsockname()[1])

    def subflows() -> list[tuple[str, str]]:
        return sorted((str(s.local), str(s.remote))
                      for s in subflows_by_token(tp.client).get(token, []))
    wait_for(lambda: subflows() == [("192.0.2.1", "192.0.2.2"), ("198.51.100.1", "192.0.2.2")],
             10, what=f"sspi's subflow from the second interface, have {subflows()}")
    wait_for(lambda: tp.client.mptcp_mib().get("AddAddr", 0) >= 1, 10,
             what="the server's ADD_ADDR received by the client")
    tp.client.ip("link", "set", tp.ifnames[0], "down")
    wait_for(lambda: subflows() == [("198.51.100.1", "192.0.2.2")], 10,
             what=f"the initial subflow closed with its link, have {subflows()}")
    pair.server.sendall(b"!")
    assert read_exactly(pair.client, 3) == b"go!"
    pair.close()
    assert d.stop() == 0 and server.stop() == 0
    assert d.errors() == [] and server.errors() == []


def test_server_announces_its_other_addresses_to_each_client(
        lab: Lab, daemons, tmp_path: Path) -> None:
    tp = TwoPaths(lab)
    # The client: plain in-kernel PM that accepts announcements.
    tp.client.ip("mptcp", "limits", "set", "subflows", "4", "add_addr_accepted", "4")
    d = daemons(tp.server, daemon_config(str(tmp_path / "state"), plugins=["server_announce"],
                                         extra=USERSPACE)).start()
    listener = mptcp_listen(tp.server, "0.0.0.0")
    pairs = [mptcp_connect(tp.client, listener, address="192.0.2.2") for _ in range(3)]
    for pair in pairs:
        pair.client.sendall(b"hello")  # server side ESTABLISHED
        pair.server.recv(5)

    def remotes() -> dict[int, set[str]]:
        return {token: {str(s.remote) for s in subs}
                for token, subs in subflows_by_token(tp.client).items()}
    wait_for(lambda: len(remotes()) == 3 and all(
        r == {"192.0.2.2", "198.51.100.2"} for r in remotes().values()), 10,
        what=f"a subflow to the announced address on every connection, have {remotes()}")
    for pair in pairs:
        pair.close()
    assert d.stop() == 0
    assert d.errors() == []


def test_fullmesh_and_sspi_leave_server_side_connections_to_the_client(
        lab: Lab, daemons, tmp_path: Path) -> None:
    """On a server, a subflow is the client's to open: a join toward the
    client's ephemeral port would only be refused and retried. The server
    announces instead (server_announce, after them: when it has acted, so
    have they), on establishment and on a network change."""
    tp = TwoPaths(lab)
    tp.client.ip("mptcp", "limits", "set", "subflows", "4", "add_addr_accepted", "4")
    d = daemons(tp.server, daemon_config(
        str(tmp_path / "state"), plugins=["fullmesh", "sspi", "server_announce"],
        extra=USERSPACE)).start()
    listener = mptcp_listen(tp.server, "0.0.0.0")
    pairs = [mptcp_connect(tp.client, listener, address="192.0.2.2") for _ in range(3)]
    for pair in pairs:
        pair.client.sendall(b"hello")  # server side ESTABLISHED
        read_exactly(pair.server, 5)

    def remotes() -> list[set[str]]:
        return [{str(s.remote) for s in subs} for subs in subflows_by_token(tp.client).values()]
    wait_for(lambda: remotes() and all(r == {"192.0.2.2", "198.51.100.2"} for r in remotes()),
             10, what=f"the client's subflows to the announced address, have {remotes()}")
    tp.server.ip("addr", "add", "203.0.113.2/24", "dev", tp.server_ifnames[1])
    wait_for(lambda: all("203.0.113.2" in r for r in remotes()), 10,
             what=f"the client's subflows to an address added later, have {remotes()}")
    assert tp.server.mptcp_mib().get("MPJoinSynTx") == 0
    assert len(remotes()) == 3
    for pair in pairs:
        pair.close()
    assert d.stop() == 0
    assert d.errors() == []


@pytest.mark.parametrize("mode", ["kernel", "userspace"])
def test_backup_cellular_carries_data_only_when_the_primary_is_down(
        lab: Lab, daemons, tmp_path: Path, mode: str) -> None:
    tp = TwoPaths(lab, ifnames=("eth0", "wwan0"))
    for ifname in tp.ifnames:
        shape(tp.client, ifname, 20)
    tp.server.ip("mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "8")
    plugins = ["addr_adv", "backup_cellular"] if mode == "kernel" else \
        ["fullmesh", "backup_cellular"]
    extra = USERSPACE if mode == "userspace" else ""
    d = daemons(tp.client, daemon_config(str(tmp_path / "state"), plugins=plugins,
                                         extra=extra)).start()
    if mode == "kernel":
        wait_for(lambda: any(r["address"] == "198.51.100.1" and "backup" in r["flags"]
                             for r in tp.client.endpoints()), what="wwan0 backup endpoint")
    transfer = BulkTransfer(tp.client, tp.server, tp.server_addr(0)).start()

    try:
        wait_for(lambda: any(s.backup and str(s.local) == "198.51.100.1"
                             for subs in subflows_by_token(tp.client).values() for s in subs),
                 10, what="backup subflow over wwan0")
        time.sleep(0.5)
        primary = carried(tp)
        assert primary["eth0"] > 2_000_000 and primary["wwan0"] < 100_000, primary
        tp.client.ip("link", "set", "eth0", "down")
        time.sleep(0.5)
        cellular = carried(tp)
        assert cellular["wwan0"] > 1_000_000, cellular
        assert transfer.alive()
        tp.client.ip("link", "set", "eth0", "up")
        tp.add_default_routes(0, v6=False)
        wait_for(lambda: carried(tp, 0.5)["eth0"] > 300_000, 10, what="traffic back on eth0")
        time.sleep(0.5)
        back = carried(tp)
        assert back["eth0"] > 2_000_000 and back["wwan0"] < 100_000, back
        assert transfer.alive(), transfer.error
    finally:
        transfer.stop()
    assert d.stop() == 0


def test_backup_cellular_sets_an_initial_subflow_over_cellular_backup_once_a_better_path_is_up(
        lab: Lab, daemons, tmp_path: Path) -> None:
    """A connection opened while only wwan0 is up starts on cellular; when
    eth0 arrives and gets its subflow, the initial cellular subflow becomes
    backup and the data moves to eth0, to cellular when eth0 goes, and back."""
    tp = TwoPaths(lab, ifnames=("eth0", "wwan0"))
    for ifname in tp.ifnames:
        shape(tp.client, ifname, 20)
    tp.server.ip("mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "8")
    tp.client.ip("link", "set", "eth0", "down")
    d = daemons(tp.client, daemon_config(str(tmp_path / "state"),
                                         plugins=["fullmesh", "backup_cellular"],
                                         extra=USERSPACE)).start()
    transfer = BulkTransfer(tp.client, tp.server, tp.server_addr(1)).start()

    def subflows() -> list[Any]:
        return [s for subs in subflows_by_token(tp.client).values() for s in subs]
    try:
        wait_for(lambda: transfer.received > 500_000, 10, what="data over wwan0")
        (initial,) = subflows()
        assert (str(initial.local), initial.local_id, initial.backup) == \
            ("198.51.100.1", 0, False)  # the only path: not worth an MP_PRIO
        tp.client.ip("link", "set", "eth0", "up")
        tp.add_default_routes(0, v6=False)
        wait_for(lambda: any(str(s.local) == "192.0.2.1" for s in subflows()), 10,
                 what="a subflow over eth0")
        wait_for(lambda: all(s.backup == (str(s.local) == "198.51.100.1")
                             for s in subflows()), 10,
                 what=f"the initial wwan0 subflow backup, have {subflows()}")
        wait_for(lambda: carried(tp, 0.5)["wwan0"] < 30_000, 10, what="wwan0 idle")
        primary = carried(tp)
        assert primary["eth0"] > 2_000_000 and primary["wwan0"] < 100_000, primary
        tp.client.ip("link", "set", "eth0", "down")
        wait_for(lambda: carried(tp, 0.5)["wwan0"] > 300_000, 10, what="traffic on wwan0")
        cellular = carried(tp)  # backup, and the only path left: it carries the data
        assert cellular["wwan0"] > 1_000_000, cellular
        tp.client.ip("link", "set", "eth0", "up")
        tp.add_default_routes(0, v6=False)
        wait_for(lambda: carried(tp, 0.5)["wwan0"] < 30_000, 10, what="wwan0 idle again")
        back = carried(tp)
        assert back["eth0"] > 2_000_000 and back["wwan0"] < 100_000, back
        assert transfer.alive(), transfer.error
    finally:
        transfer.stop()
    assert d.stop() == 0
    assert d.errors() == []


@pytest.mark.timeout(300)
def test_event_overflow_is_survived_and_every_connection_still_gets_its_subflow(
        lab: Lab, daemons, tmp_path: Path) -> None:
    """Event sockets shrunk to 4 KiB (a test-only knob): bursts overflow them;
    the daemon rebuilds its connection table from sock_diag and carries on."""
    tp = TwoPaths(lab)
    tp.server.ip("mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "0")
    d = daemons(tp.client, daemon_config(str(tmp_path / "state"), plugins=["fullmesh"],
                                         extra=USERSPACE),
                env={"MPTCPD_PY_TEST_EVENT_RCVBUF": "4096"}).start()
    listener = mptcp_listen(tp.server, "0.0.0.0", backlog=4096)
    for burst in range(3):
        pairs = open_connections(tp.client, listener, "192.0.2.2", 1000)
        ports = {p.client.getsockname()[1] for p in pairs}

        def meshed(ports: set[int] = ports) -> int:
            return sum(1 for subs in subflows_by_token(tp.client).values()
                       if any(s.local_port in ports and s.local_id == 0 for s in subs)
                       and any(str(s.local) == "198.51.100.1" for s in subs))
        wait_for(lambda: meshed() == 1000, 60, interval=0.2,
                 what=f"burst {burst}: every connection meshed")
        close_connections(pairs)
        wait_for(lambda: not subflows_by_token(tp.client), 30, interval=0.2)
    resyncs = [e for e in d.logs() if e["event"] == "MPTCP events lost; resyncing"]
    assert resyncs, "the 4 KiB buffer never overflowed: the test proves nothing"
    d.wait_log("connection table rebuilt")
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_a_link_flap_never_costs_a_connection_its_last_subflow(
        lab: Lab, daemons, tmp_path: Path) -> None:
    """A dead path's subflows are closed only while the connection keeps
    another one: its only subflow rides out a flap, as plain TCP would
    (a server could never reopen it)."""
    tp = TwoPaths(lab)
    d = daemons(tp.client, daemon_config(str(tmp_path / "state"), plugins=[],
                                         extra=USERSPACE)).start()
    listener = mptcp_listen(tp.server, "192.0.2.2")
    pair = mptcp_connect(tp.client, listener)
    pair.server.sendall(b"go")
    assert read_exactly(pair.client, 2) == b"go"
    token = client_token(tp, pair.client.getsockname()[1])
    (only,) = subflows_by_token(tp.client)[token]
    tp.client.ip("link", "set", tp.ifnames[0], "down")
    d.wait_log("keeping the connection's last subflow on a dead path", token=token)
    tp.client.ip("link", "set", tp.ifnames[0], "up")
    tp.add_default_routes(0, v6=False)
    pair.client.sendall(b"still here")
    assert read_exactly(pair.server, 10) == b"still here"
    (after,) = subflows_by_token(tp.client)[token]
    assert (after.local_port, after.remote_port) == (only.local_port, only.remote_port)
    pair.close()
    assert d.stop() == 0
