"""The control server on real unix sockets (no namespace needed): replies,
errors, fragmentation, credentials, monitor subscriptions, and clients that
misbehave without ever stalling the event loop."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py import control
from mptcpd_py.control import (
    SUBSCRIBER_QUEUE,
    Command,
    CommandFailed,
    ControlServer,
    Peer,
    Request,
    encode_request,
)
from mptcpd_py.core import Monitor
from mptcpd_py.ctl import CtlFailure, call
from mptcpd_py.errors import ControlError
from mptcpd_py.logging import get_logger

BIG_ROWS = 40000


async def echo(request: Request, peer: Peer) -> Any:
    return {"args": dict(request.args), "uid": peer.uid}


async def big(_request: Request, _peer: Peer) -> Any:
    return {"rows": [{"n": i, "text": "row \"quoted\" \\ text"} for i in range(BIG_ROWS)]}


async def boom(_request: Request, _peer: Peer) -> Any:
    raise RuntimeError("plugin table on fire")


async def refuse(_request: Request, _peer: Peer) -> Any:
    raise CommandFailed("config_error", "reload refused", {"problems": ["a.toml:1: x: bad"]})


class Changes:
    count = 0


async def change(_request: Request, _peer: Peer) -> Any:
    Changes.count += 1
    return {"changed": Changes.count}


COMMANDS = {c.name: c for c in (
    Command("echo", echo, arguments=("x", "n")), Command("big", big), Command("boom", boom),
    Command("refuse", refuse), Command("change", change, mutating=True),
)}


@pytest.fixture
def sockdir() -> Any:
    """sockdir: a directory every uid may traverse (a test switches uid);
    function scope; removed afterwards."""
    path = tempfile.mkdtemp(prefix="mptcpd-py-ctl-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def server(sockdir: str) -> AsyncIterator[ControlServer]:
    """server: a ControlServer with test commands and a real Monitor on
    SOCKDIR/control; closed at teardown."""
    srv = ControlServer(os.path.join(sockdir, "control"), commands=COMMANDS, monitor=Monitor(),
                        log=get_logger())
    await srv.start()
    yield srv
    await srv.close()


def raw_client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("")
    sock.connect(path)
    sock.setblocking(False)
    return sock


async def receive(sock: socket.socket, timeout: float = 5.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 17), timeout)
    return json.loads(data)


async def test_commands_answer_and_failures_come_back_as_one_line_errors(
        server: ControlServer) -> None:
    assert await call(server.path, "echo", 5, {"x": 1}) == {"args": {"x": 1}, "uid": 0}
    with pytest.raises(CtlFailure, match="unknown command 'nope'") as info:
        await call(server.path, "nope", 5)
    assert info.value.code == 1
    with pytest.raises(CtlFailure, match="boom failed: RuntimeError: plugin table on fire"):
        await call(server.path, "boom", 5)
    with pytest.raises(CtlFailure, match="reload refused") as info:
        await call(server.path, "refuse", 5)
    assert info.value.code == 78 and info.value.details == {"problems": ["a.toml:1: x: bad"]}
    assert await call(server.path, "echo", 5) == {"args": {}, "uid": 0}
    assert server.counters.errors == {"unknown_command": 1, "internal": 1, "config_error": 1}


async def test_the_socket_is_0660_and_owned_by_the_control_group(sockdir: str) -> None:
    group = grp.getgrnam("users")
    srv = ControlServer(os.path.join(sockdir, "control"), commands=COMMANDS,
                        monitor=Monitor(), log=get_logger(), group="users")
    await srv.start()
    try:
        st = os.stat(srv.path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == group.gr_gid
    finally:
        await srv.close()
    assert not os.path.exists(srv.path)


async def test_a_stale_socket_is_replaced_and_anything_else_is_left_alone(sockdir: str) -> None:
    path = os.path.join(sockdir, "control")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(path)
    stale.close()
    srv = ControlServer(path, commands=COMMANDS, monitor=Monitor(), log=get_logger())
    await srv.start()
    assert await call(path, "echo", 5) == {"args": {}, "uid": 0}
    await srv.close()
    with open(path, "w") as f:
        f.write("not a socket")
    srv = ControlServer(path, commands=COMMANDS, monitor=Monitor(), log=get_logger())
    with pytest.raises(ControlError, match="exists and is not a socket"):
        await srv.start()
    assert Path(path).read_text() == "not a socket"


async def test_a_reply_larger_than_a_datagram_arrives_whole(server: ControlServer) -> None:
    result = await call(server.path, "big", 10)
    assert len(result["rows"]) == BIG_ROWS
    assert result["rows"][-1] == {"n": BIG_ROWS - 1, "text": "row \"quoted\" \\ text"}


FLOODER = """
import json, socket, sys, time
path, count, seconds, connected = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("")
if connected == "connected":
    sock.connect(path)
sock.setblocking(False)
sent, deadline = 0, time.monotonic() + seconds
while sent < count and time.monotonic() < deadline:
    data = json.dumps({"version": 1, "id": sent, "command": "big" if sent < 5 else "echo"})
    try:
        sock.sendto(data.encode(), path)
        sent += 1
    except BlockingIOError:
        time.sleep(0.0002)
print(sent, flush=True)
if len(sys.argv) > 5:
    time.sleep(float(sys.argv[5]))  # keep the socket (and what it did not read) a while
"""


class LoopWatch:
    """The longest the event loop went without running a 10 ms ticker."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    def stop(self) -> float:
        self.task.cancel()
        return self.longest


async def flood(path: str, count: int, seconds: float, mode: str, linger: float = 0.0
                ) -> asyncio.subprocess.Process:
    args = [str(count), str(seconds), mode] + ([str(linger)] if linger else [])
    return await asyncio.create_subprocess_exec(sys.executable, "-c", FLOODER, path, *args,
                                                stdout=asyncio.subprocess.PIPE)


async def test_flooders_that_never_read_do_not_stall_the_loop_and_others_are_answered(
        server: ControlServer) -> None:
    """Two flooders (other processes, sending to the socket's address) send
    requests as fast as they can and read nothing; a polite client is still
    answered promptly, the flooders are told to wait their turn."""
    watch = LoopWatch()
    flooders = [await flood(server.path, 20000, 8, "unconnected") for _ in range(2)]
    try:
        await asyncio.sleep(0.3)
        answered_in = []
        for n in range(5):
            started = time.monotonic()
            assert await call(server.path, "echo", 5, {"n": n}) == {"args": {"n": n}, "uid": 0}
            answered_in.append(time.monotonic() - started)
        sent = [int((await asyncio.wait_for(f.communicate(), 30))[0]) for f in flooders]
    finally:
        longest = watch.stop()
        for f in flooders:
            if f.returncode is None:
                f.kill()
                await f.wait()
    assert min(sent) > 1000
    assert max(answered_in) < 2.0, answered_in
    assert longest < 1.0, longest
    assert server.counters.errors["busy"] > 0
    assert server.counters.replies_dropped > 0  # theirs: they did not read
    assert len(server._deliveries) <= control.MAX_DELIVERIES


async def test_a_connected_client_that_never_reads_holds_up_replies_not_the_loop(
        server: ControlServer) -> None:
    """Connected to the socket, a client escapes the kernel's per-receiver
    queue limit: replies pile up in the server's send buffer until it reads
    or goes. The loop keeps running and service resumes once it is gone."""
    watch = LoopWatch()
    flooder = await flood(server.path, 20000, 8, "connected", linger=1.0)
    try:
        out, _ = await asyncio.wait_for(flooder.communicate(), 30)
        assert int(out) > 1000
        started = time.monotonic()
        assert await call(server.path, "echo", 5, {"n": 1}) == {"args": {"n": 1}, "uid": 0}
        assert time.monotonic() - started < 3.0
    finally:
        longest = watch.stop()
        if flooder.returncode is None:
            flooder.kill()
            await flooder.wait()
    assert longest < 1.0, longest
    assert server.counters.send_buffer_full > 0


async def test_a_slow_monitor_client_loses_events_and_is_told_how_many(
        server: ControlServer) -> None:
    sock = raw_client(server.path)
    sock.send(encode_request("monitor", 9))
    assert (await receive(sock))["result"]["subscribed"] is True
    monitor = server.monitor
    started = time.monotonic()
    for i in range(20000):
        monitor.publish("address", action="added", addr=f"192.0.2.{i % 250}", n=i)
    assert time.monotonic() - started < 2.0  # publishing never waits for the client
    (queue,) = monitor.subscribers
    assert queue.qsize() <= SUBSCRIBER_QUEUE
    seen, lost = 0, 0
    deadline = time.monotonic() + 20
    while seen + lost < 20000 and time.monotonic() < deadline:
        event = (await receive(sock))["event"]
        if event["kind"] == "lost":
            lost += event["count"]
        else:
            seen += 1
    assert lost > 0 and seen + lost == 20000
    assert server.counters.events_dropped == lost
    sock.close()


async def test_a_monitor_client_that_goes_away_is_dropped_at_the_next_event(
        server: ControlServer) -> None:
    sock = raw_client(server.path)
    sock.send(encode_request("monitor", 1))
    await receive(sock)
    assert server.monitor_clients == 1
    sock.close()
    server.monitor.publish("address", action="added", addr="192.0.2.1")
    deadline = time.monotonic() + 5
    while server.monitor_clients and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert server.monitor_clients == 0 and not server.monitor.subscribers


async def test_unsubscribe_and_expiry_end_a_subscription(server: ControlServer,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    sock = raw_client(server.path)
    sock.send(encode_request("monitor", 1))
    await receive(sock)
    sock.send(encode_request("unsubscribe", 1))
    assert (await receive(sock))["result"] == {"subscribed": False}
    assert server.monitor_clients == 0
    monkeypatch.setattr(control, "SUBSCRIPTION_TTL", 0.5)
    sock.send(encode_request("monitor", 2))
    await receive(sock)
    assert server.monitor_clients == 1
    deadline = time.monotonic() + 5
    while server.monitor_clients and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert server.monitor_clients == 0  # not renewed: dropped
    sock.close()


async def test_closing_tells_monitor_clients_why_the_stream_ends(sockdir: str) -> None:
    srv = ControlServer(os.path.join(sockdir, "control"), commands=COMMANDS,
                        monitor=Monitor(), log=get_logger())
    await srv.start()
    sock = raw_client(srv.path)
    sock.send(encode_request("monitor", 3))
    await receive(sock)
    await srv.close()
    event = (await receive(sock))["event"]
    assert event["kind"] == "stopping" and event["reason"] == "the daemon is stopping"
    assert not os.path.exists(srv.path)
    sock.close()


async def test_closing_answers_requests_still_running_or_waiting_so_clients_do_not_wait(
        sockdir: str) -> None:
    """A datagram client is not told when the server's socket closes: without
    an answer, ``ctl reload`` would wait its full 120 s."""
    started: list[int] = []
    forever = asyncio.Event()

    async def block(request: Request, _peer: Peer) -> Any:
        started.append(request.id or 0)
        await forever.wait()

    srv = ControlServer(os.path.join(sockdir, "control"),
                        commands={"block": Command("block", block)}, monitor=Monitor(),
                        log=get_logger())
    await srv.start()
    # One more than are handled at once: the last one waits its turn.
    calls = [asyncio.create_task(call(srv.path, "block", 60))
             for _ in range(control.MAX_RUNNING + 1)]

    async def all_in() -> None:
        while len(started) < control.MAX_RUNNING or \
                srv.counters.requests["block"] < len(calls):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(all_in(), 5)
    await srv.close()
    done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert len(started) == control.MAX_RUNNING  # the waiting one was never started
    for failure in done:
        assert isinstance(failure, CtlFailure)
        assert (str(failure), failure.code) == \
            ("the daemon is stopping (block not finished)", 69)


async def test_a_request_sent_while_closing_is_answered_stopping_and_never_started(
        sockdir: str) -> None:
    """close() waits for the requests it cancelled: a datagram that arrives
    meanwhile used to be read and started (a reload alongside the stop),
    and its client, never answered, waited its full timeout."""
    started: list[int] = []
    forever = asyncio.Event()

    async def block(request: Request, _peer: Peer) -> Any:
        started.append(request.id or 0)
        try:
            await forever.wait()
        except asyncio.CancelledError:
            # close() has begun: it cancelled this and waits for it to end.
            if request.id == 1:
                late.send(encode_request("block", 2))
            raise

    srv = ControlServer(os.path.join(sockdir, "control"),
                        commands={"block": Command("block", block)}, monitor=Monitor(),
                        log=get_logger())
    await srv.start()
    late = raw_client(srv.path)
    try:
        first = raw_client(srv.path)
        first.send(encode_request("block", 1))

        async def running() -> None:
            while not started:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(running(), 5)
        await srv.close()
        for sock, request_id, what in ((first, 1, "not finished"), (late, 2, "not started")):
            reply = await receive(sock)
            assert (reply["id"], reply["error"]) == (request_id, {
                "code": "stopping", "message": f"the daemon is stopping (block {what})"})
            sock.close()
        assert started == [1]
    finally:
        late.close()
        await srv.close()


CLIENT = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("")
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print(json.dumps({"connect": "EACCES"}))
    sys.exit(0)
sock.settimeout(5)
sock.send(json.dumps({"version": 1, "id": 1, "command": sys.argv[2]}).encode())
print(sock.recv(65536).decode())
"""


async def as_user(path: str, command: str, *ids: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "setpriv", *ids, sys.executable, "-c", CLIENT, path, command,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run a client as another uid")
async def test_only_root_and_control_group_members_may_change_anything(sockdir: str) -> None:
    users = grp.getgrnam("users").gr_gid
    srv = ControlServer(os.path.join(sockdir, "control"), commands=COMMANDS,
                        monitor=Monitor(), log=get_logger(), group="users")
    await srv.start()
    nobody = ("--reuid", "65534", "--regid", "65534", "--clear-groups")
    try:
        # 0660 root:users: someone outside the group cannot even reach it.
        assert await as_user(srv.path, "echo", *nobody) == {"connect": "EACCES"}
        os.chmod(srv.path, 0o666)  # an admin opened it for reading
        reply = await as_user(srv.path, "echo", *nobody)
        assert reply["ok"] is True and reply["result"]["uid"] == 65534
        before = Changes.count
        reply = await as_user(srv.path, "change", *nobody)
        assert reply["ok"] is False and reply["error"]["code"] == "permission_denied"
        assert "uid 65534" in reply["error"]["message"]
        assert Changes.count == before  # nothing changed
        primary = ("--reuid", "65534", "--regid", str(users), "--clear-groups")
        assert (await as_user(srv.path, "change", *primary))["ok"] is True
        supplementary = ("--reuid", "65534", "--regid", "65534", "--groups", str(users))
        assert (await as_user(srv.path, "change", *supplementary))["ok"] is True
        assert Changes.count == before + 2
    finally:
        await srv.close()


async def test_a_descriptor_pushed_at_the_server_is_closed(server: ControlServer) -> None:
    sock = raw_client(server.path)
    r, w = os.pipe()
    before = len(os.listdir("/proc/self/fd"))
    sock.sendmsg([encode_request("echo", 4)],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, sys.byteorder))])
    assert (await receive(sock))["ok"] is True
    assert len(os.listdir("/proc/self/fd")) == before
    for fd in (r, w):
        os.close(fd)
    sock.close()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv")
def test_a_control_group_without_cap_chown_names_the_missing_capability(tmp_path) -> None:
    """The shipped unit grants only CAP_NET_ADMIN: a control_group then needs
    CAP_CHOWN, and the error says so instead of a bare EPERM."""
    code = f"""
import asyncio
from mptcpd_py.control import ControlServer
from mptcpd_py.core import Monitor
from mptcpd_py.errors import ControlError

class Log:
    def __getattr__(self, name):
        return lambda *a, **k: None

async def main():
    server = ControlServer({str(tmp_path / "control")!r}, commands={{}}, monitor=Monitor(),
                           log=Log(), group="users")
    try:
        await server.start()
    except ControlError as exc:
        print(exc)
asyncio.run(main())
"""
    out = subprocess.run(["setpriv", "--inh-caps=-chown", "--bounding-set=-chown",
                          sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    assert out.stdout == (f"control socket {tmp_path / 'control'}: cannot give it to group "
                          "'users': changing a file's group needs CAP_CHOWN (under systemd, "
                          "add it with the drop-in in docs/service.md, 'control_group')\n")
    assert not (tmp_path / "control").exists()  # a failed start leaves no socket behind
