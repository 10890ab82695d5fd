"""``mptcpd-py mptcpize run``: unmodified programs (curl, python3 -m
http.server) use MPTCP sockets, seen by ``ss -M`` and the kernel's MIB
counters, in namespaces made here; and fall back to TCP where MPTCP is off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mptcpd_py.lab import Lab, Netns, TwoPaths, shape, wait_for
from mptcpd_py.mptcpize import shim_path

MPTCPIZE = [sys.executable, "-m", "mptcpd_py", "mptcpize", "run"]
PORT = 8080
BLOB_SIZE = 768 * 1024  # about 3 s at the 2 Mbit/s the server's link is shaped to

# Which protocol each kind of socket gets (SO_PROTOCOL), as JSON.
PROBE = """
import json, socket
cases = {
    "inet stream": (socket.AF_INET, socket.SOCK_STREAM, 0),
    "inet6 stream": (socket.AF_INET6, socket.SOCK_STREAM, 0),
    "inet stream tcp nonblock cloexec": (
        socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 6),
    "inet stream mptcp": (socket.AF_INET, socket.SOCK_STREAM, 262),
    "inet dgram": (socket.AF_INET, socket.SOCK_DGRAM, 0),
    "unix stream": (socket.AF_UNIX, socket.SOCK_STREAM, 0),
}
out = {}
for name, args in cases.items():
    try:
        with socket.socket(*args) as s:
            out[name] = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    except OSError as exc:
        out[name] = exc.strerror
# A TCP-as-asked connection still works over loopback.
with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0)); listener.listen()
    with socket.create_connection(listener.getsockname(), timeout=5) as c:
        conn, _ = listener.accept(); conn.sendall(b"ok"); out["loopback"] = c.recv(2).decode()
        conn.close()
print(json.dumps(out))
"""


@pytest.fixture(autouse=True)
def _shim_built() -> None:
    if not shim_path().is_file():
        pytest.skip(f"{shim_path()} not built (scripts/bootstrap.sh builds it)")


def probe(ns: Netns) -> tuple[dict[str, object], str]:
    proc = subprocess.run(["ip", "netns", "exec", ns.name, *MPTCPIZE, sys.executable, "-c",
                           PROBE], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(proc.stdout), proc.stderr


def test_tcp_stream_sockets_become_mptcp_and_other_sockets_stay_as_they_are(lab: Lab) -> None:
    protocols, stderr = probe(lab.netns("box"))
    assert protocols == {
        "inet stream": 262, "inet6 stream": 262, "inet stream tcp nonblock cloexec": 262,
        "inet stream mptcp": 262, "inet dgram": 17, "unix stream": 0, "loopback": "ok",
    }
    assert stderr == ""


def test_sockets_fall_back_to_tcp_where_mptcp_is_disabled(lab: Lab) -> None:
    box = lab.netns("box")
    box.sysctl("net.mptcp.enabled", 0)
    protocols, stderr = probe(box)
    assert protocols["inet stream"] == 6
    assert protocols["inet6 stream"] == 6
    assert protocols["loopback"] == "ok"
    assert "net.mptcp.enabled is 0" in stderr


def mptcp_sockets(ns: Netns, *filters: str) -> list[str]:
    out = ns.run("ss", "-HMn", *filters)
    return [line for line in out.splitlines() if line.strip()]


def mib(ns: Netns, name: str) -> int:
    return int(ns.run("nstat", "-saz", name).split()[-2])


@pytest.mark.parametrize("version", [4, 6])
def test_curl_downloads_from_http_server_over_mptcp_when_both_are_mptcpized(
        two_paths: TwoPaths, tmp_path: Path, version: int) -> None:
    client, server = two_paths.client, two_paths.server
    www = tmp_path / "www"
    www.mkdir()
    (www / "blob").write_bytes(b"\0" * BLOB_SIZE)
    (www / "small").write_bytes(b"\0" * 1000)
    # Paced by the link (tbf), so the connection lives long enough for ss -M.
    shape(server, two_paths.server_ifnames[0], 2)
    addr = two_paths.server_addr(0, version)
    server.popen([*MPTCPIZE, sys.executable, "-m", "http.server", "--bind", addr, str(PORT),
                  "--directory", str(www)], stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    wait_for(lambda: mptcp_sockets(server, "-l", "sport", f"= :{PORT}"), 10,
             what="http.server listening on an MPTCP socket")
    base = f"http://[{addr}]:{PORT}" if version == 6 else f"http://{addr}:{PORT}"

    # Control: a plain curl still works against it (MPTCP falls back to TCP) and
    # the server sees no MP_CAPABLE SYN.
    syn_rx = mib(server, "MPTcpExtMPCapableSYNRX")
    plain = client.run("curl", "-sS", "--max-time", "20", "-o", "/dev/null",
                       "-w", "%{size_download}", f"{base}/small")
    assert int(plain) == 1000
    assert mib(server, "MPTcpExtMPCapableSYNRX") == syn_rx

    curl = client.popen([*MPTCPIZE, "curl", "-sS", "--max-time", "30",
                         "-o", "/dev/null", "-w", "%{size_download}", f"{base}/blob"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: mptcp_sockets(client, "state", "established", "dport", f"= :{PORT}"), 10,
             what="curl's MPTCP connection in ss -M")
    wait_for(lambda: mptcp_sockets(server, "state", "established", "sport", f"= :{PORT}"), 10,
             what="the server's MPTCP connection in ss -M")
    out, err = curl.communicate(timeout=40)
    assert curl.returncode == 0, err
    assert int(out) == BLOB_SIZE
    assert mib(server, "MPTcpExtMPCapableSYNRX") == syn_rx + 1
