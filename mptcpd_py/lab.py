"""Network namespaces joined by veth pairs: the demo's, the benchmarks' and
the tests' laboratory.

Only documentation addresses are used; every namespace made here has a
unique name and is deleted by :meth:`Lab.close`, also after a failure.
Nothing here touches the namespace the program runs in.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

from mptcpd_py.netlink.types import EndpointFlags
from mptcpd_py.netns import NETNS_RUN_DIR, in_netns

IPPROTO_MPTCP = 262
PREFIX = "mptcpdpy-"
_counter = itertools.count(1)


class LabError(RuntimeError):
    pass


def _run(args: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _die_with_parent() -> None:
    import ctypes  # noqa: PLC0415

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


class Netns:
    """One network namespace of a lab."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def path(self) -> str:
        return os.path.join(NETNS_RUN_DIR, self.name)

    def ip(self, *args: str, check: bool = True) -> str:
        return _run(["ip", "-n", self.name, *args], check=check)

    def stub_link(self, name: str) -> None:
        """An interface that is up, with a carrier, and leads nowhere: a veth
        whose peer (``name`` + "p") stays here too (this kernel has no dummy)."""
        self.ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        self.ip("link", "set", f"{name}p", "up")
        self.ip("link", "set", name, "up")

    def ip_json(self, *args: str) -> Any:
        out = _run(["ip", "-n", self.name, "-j", *args])
        return json.loads(out) if out.strip() else []

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        return _run(["ip", "netns", "exec", self.name, *args], check=check, timeout=timeout)

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in the namespace; it dies with us (PR_SET_PDEATHSIG)."""
        kwargs.setdefault("preexec_fn", _die_with_parent)
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kwargs)
        self.processes.append(proc)
        return proc

    def batch(self, commands: Sequence[str], *, force: bool = True,
              timeout: float = 60) -> str:
        """Many ``ip`` commands in one process (``ip -batch``): thousands of
        netlink events a second. ``force`` goes on past a failing line;
        returns what ip printed on stderr (one message per failed line)."""
        args = ["ip", "-n", self.name, *(["-force"] if force else []), "-batch", "-"]
        proc = subprocess.run(args, input="".join(f"{c}\n" for c in commands),
                              capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0 and not force:
            raise LabError(f"ip -batch: {proc.stderr.strip()}")
        return proc.stderr

    def sysctl(self, key: str, value: str | int) -> None:
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def read_sysctl(self, key: str) -> str:
        return self.run("sysctl", "-n", key).strip()

    def endpoints(self) -> list[dict[str, Any]]:
        """``ip mptcp endpoint show`` as iproute2 prints it, one dict a line."""
        out = self.ip("mptcp", "endpoint", "show")
        rows = []
        for line in out.splitlines():
            words = line.split()
            if not words:
                continue
            row: dict[str, Any] = {"address": words[0], "flags": set()}
            it = iter(words[1:])
            for word in it:
                if word in ("id", "dev", "port"):
                    row[word] = next(it, "")
                elif word == "rawflags":  # flags this iproute2 has no name for
                    raw = int(next(it, "0"), 16)
                    row["flags"].update(name.lower() for name, bit in
                                        EndpointFlags.__members__.items() if bit and raw & bit)
                else:
                    row["flags"].add(word)
            if "id" in row:
                row["id"] = int(row["id"])
            rows.append(row)
        return rows

    def link_bytes(self, ifname: str) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of an interface."""
        (info,) = self.ip_json("-s", "link", "show", "dev", ifname)
        stats = info["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def mptcp_mib(self) -> dict[str, int]:
        """The namespace's MPTCP counters (``nstat``'s MPTcpExt*, without the
        prefix): e.g. ``MPJoinSynTx``, subflows this host tried to open."""
        lines = [line.split() for line in self.run("cat", "/proc/net/netstat").splitlines()
                 if line.startswith("MPTcpExt:")]
        if len(lines) != 2:
            return {}
        names, values = lines
        return {n: int(v) for n, v in zip(names[1:], values[1:], strict=True)}

    def socket(self, family: int = socket.AF_INET, proto: int = IPPROTO_MPTCP) -> socket.socket:
        """A socket created inside this namespace (it stays there)."""
        with in_netns(self.name):
            return socket.socket(family, socket.SOCK_STREAM, proto)

    def kill_processes(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self.processes.clear()


class Lab:
    """A set of namespaces and links, deleted together on close()."""

    def __init__(self, tag: str = "lab") -> None:
        if os.geteuid() != 0:
            raise LabError("network namespaces need root")
        self.tag = tag
        self.namespaces: list[Netns] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def netns(self, role: str) -> Netns:
        name = f"{PREFIX}{os.getpid()}-{next(_counter)}-{role}"
        _run(["ip", "netns", "add", name])
        ns = Netns(name)
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        # No duplicate address detection: tentative link-local addresses
        # would delay IPv6 neighbour discovery by about two seconds.
        for scope in ("all", "default"):
            ns.sysctl(f"net.ipv6.conf.{scope}.accept_dad", 0)
        return ns

    def veth(self, a: Netns, name_a: str, b: Netns, name_b: str, *, up: bool = True) -> None:
        """A veth pair with one end in each namespace (created inside ``a``)."""
        a.ip("link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", b.name)
        if up:
            a.ip("link", "set", name_a, "up")
            b.ip("link", "set", name_b, "up")

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            ns.kill_processes()
            _run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()


def cleanup_stale_namespaces() -> list[str]:
    """Delete lab namespaces whose creating process is gone (a crashed run)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(NETNS_RUN_DIR):
            if not name.startswith(PREFIX):
                continue
            pid = name[len(PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _run(["ip", "netns", "del", name], check=False)
                removed.append(name)
    return removed


def shape(ns: Netns, ifname: str, rate_mbit: float, *, latency_ms: int = 20) -> None:
    """Limit egress of an interface with tbf (this kernel has no netem)."""
    burst = max(int(rate_mbit * 1_000_000 / 8 / 250), 4 * 1514)
    ns.ip("link", "set", ifname, "txqueuelen", "1000")
    _run(
        [
            "tc", "-n", ns.name, "qdisc", "replace", "dev", ifname, "root", "tbf",
            "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", f"{latency_ms}ms",
        ]
    )


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LabError(f"no VmRSS for pid {pid}")


def read_log(path: str) -> str:
    """A log file's text; "" before the process has written one."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.01,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, or raise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def lab(tag: str = "lab") -> Iterator[Lab]:
    with Lab(tag) as made:
        yield made


class TwoPaths:
    """A client and a server namespace joined by two links (two paths).

    path 0: client ``ifnames[0]`` 192.0.2.1/24, 2001:db8:1::1/64
            <-> server 192.0.2.2, 2001:db8:1::2
    path 1: client ``ifnames[1]`` 198.51.100.1/24, 2001:db8:2::1/64
            <-> server 198.51.100.2, 2001:db8:2::2
    The client has a default route per path (path 0 preferred), as DHCP would give.
    """

    V4 = (("192.0.2.1", "192.0.2.2"), ("198.51.100.1", "198.51.100.2"))
    V6 = (("2001:db8:1::1", "2001:db8:1::2"), ("2001:db8:2::1", "2001:db8:2::2"))

    def __init__(
        self,
        lab: Lab,
        ifnames: tuple[str, str] = ("eth0", "eth1"),
        *,
        server_ifnames: tuple[str, str] = ("srv0", "srv1"),
        addresses: bool = True,
        default_routes: bool = True,
    ) -> None:
        self.lab = lab
        self.client = lab.netns("client")
        self.server = lab.netns("server")
        self.ifnames = ifnames
        self.server_ifnames = server_ifnames
        for c_if, s_if in zip(ifnames, server_ifnames, strict=True):
            lab.veth(self.client, c_if, self.server, s_if)
        if addresses:
            for i in range(2):
                self.add_client_addresses(i)
                (_, s4), (_, s6) = self.V4[i], self.V6[i]
                self.server.ip("addr", "add", f"{s4}/24", "dev", server_ifnames[i])
                self.server.ip("addr", "add", f"{s6}/64", "dev", server_ifnames[i], "nodad")
        if default_routes and addresses:
            for i in range(2):
                self.add_default_routes(i)

    def add_client_addresses(self, path: int) -> None:
        (c4, _), (c6, _) = self.V4[path], self.V6[path]
        self.client.ip("addr", "add", f"{c4}/24", "dev", self.ifnames[path])
        self.client.ip("addr", "add", f"{c6}/64", "dev", self.ifnames[path], "nodad")

    def add_default_routes(self, path: int, *, v6: bool = True) -> None:
        """The path's default routes (a link that went down lost its IPv4 one)."""
        (_, s4), (_, s6) = self.V4[path], self.V6[path]
        metric = str(100 * (path + 1))
        self.client.ip("route", "replace", "default", "via", s4, "dev", self.ifnames[path],
                       "metric", metric)
        if v6:
            self.client.ip("-6", "route", "replace", "default", "via", s6, "dev",
                           self.ifnames[path], "metric", metric)

    def server_addr(self, path: int, version: int = 4) -> str:
        return (self.V4 if version == 4 else self.V6)[path][1]

    def client_addr(self, path: int, version: int = 4) -> str:
        return (self.V4 if version == 4 else self.V6)[path][0]


class MptcpPair:
    """One established MPTCP connection between two namespaces (blocking sockets)."""

    def __init__(self, client: socket.socket, server: socket.socket, listener: socket.socket):
        self.client = client
        self.server = server
        self.listener = listener

    def close(self) -> None:
        for s in (self.client, self.server, self.listener):
            with contextlib.suppress(OSError):
                s.close()


def mptcp_listen(ns: Netns, addr: str, port: int = 0, backlog: int = 4096) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = ns.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(backlog)
    return sock


def mptcp_connect(
    client_ns: Netns,
    listener: socket.socket,
    *,
    address: str | None = None,
    source: str | None = None,
    timeout: float = 5.0,
    congestion: str | None = None,
    dual_stack: bool = False,
) -> MptcpPair:
    """Connect to ``listener`` (at ``address`` when it listens on a wildcard)
    from ``client_ns`` and accept: both ends, established. ``congestion``
    names the client's TCP congestion control (set before connect, so every
    subflow uses it). ``dual_stack``: the client is an AF_INET6 socket
    (IPV6_V6ONLY off) reaching an IPv4 address as ::ffff:a.b.c.d, as a
    program written for IPv6 only does."""
    host, port = listener.getsockname()[:2]
    host = address or host
    family = listener.family
    if dual_stack:
        family = socket.AF_INET6
        host = host if ":" in host else f"::ffff:{host}"
        source = source if source is None or ":" in source else f"::ffff:{source}"
    sock = client_ns.socket(family)
    sock.settimeout(timeout)
    if dual_stack:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if congestion:
        # An MPTCP socket takes any name before connect (its subflows then
        # quietly fall back to the default), so check the kernel has it.
        available = client_ns.read_sysctl("net.ipv4.tcp_available_congestion_control")
        if congestion not in available.split():
            sock.close()
            raise LabError(f"TCP congestion control {congestion!r} not usable: the kernel "
                           f"has {available}")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
    if source:
        sock.bind((source, 0))
    sock.connect((host, port))
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    conn.settimeout(timeout)
    return MptcpPair(sock, conn, listener)


class DaemonProcess:
    """``mptcpd-py run`` as a child process inside a namespace, with a
    NOTIFY_SOCKET this object owns (as systemd would), JSON logs in a file."""

    def __init__(self, ns: Netns, workdir: str, config_text: str = "", *,
                 config_path: str | None = None, env: dict[str, str] | None = None,
                 args: Sequence[str] = (), prefix: Sequence[str] = ()) -> None:
        import sys  # noqa: PLC0415

        self.ns = ns
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.config_path = config_path or os.path.join(workdir, "mptcpd.toml")
        if config_text or config_path is None:
            with open(self.config_path, "w") as f:
                f.write(config_text)
        self.log_path = os.path.join(workdir, "daemon.log")
        self.notify_path = os.path.join(workdir, "notify.sock")
        self.env = env or {}
        self.args = list(args)
        # A command the daemon runs under, e.g. setpriv dropping a capability.
        self.prefix = list(prefix)
        self.python = sys.executable
        self.proc: subprocess.Popen[Any] | None = None
        self.messages: list[str] = []
        self._notify: socket.socket | None = None
        self._log_file: Any = None
        self.started_at = 0.0

    def write_config(self, text: str) -> None:
        with open(self.config_path, "w") as f:
            f.write(text)

    def start(self, *, wait_ready: bool = True, timeout: float = 20.0) -> DaemonProcess:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.notify_path)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(self.notify_path)
        self.messages = []
        self._log_file = open(self.log_path, "a")  # noqa: SIM115
        env = {**os.environ, "NOTIFY_SOCKET": self.notify_path, **self.env}
        env.pop("JOURNAL_STREAM", None)
        cmd = [*self.prefix, self.python, "-m", "mptcpd_py", "run", "-c", self.config_path,
               "--log-format", "json", *self.args]
        self.started_at = time.monotonic()
        self.proc = self.ns.popen(cmd, stdout=self._log_file, stderr=self._log_file, env=env,
                                  stdin=subprocess.DEVNULL)
        if wait_ready:
            self.wait_notify("READY=1", timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll_notify(self) -> None:
        assert self._notify is not None
        self._notify.setblocking(False)
        while True:
            try:
                data = self._notify.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            self.messages.extend(data.decode().splitlines())

    def wait_notify(self, wanted: str, timeout: float = 20.0, *, after: int = 0) -> float:
        """Wait for a notify line (e.g. READY=1); returns seconds since start."""
        assert self._notify is not None
        deadline = time.monotonic() + timeout
        while True:
            self.poll_notify()
            if any(m == wanted or m.startswith(wanted) for m in self.messages[after:]):
                return time.monotonic() - self.started_at
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"daemon exited with {self.proc.returncode} before {wanted}:\n"
                               + self.log_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {wanted} within {timeout}s:\n" + self.log_text()[-3000:])
            # settimeout() alone: setblocking(True) would reset it to "forever".
            self._notify.settimeout(max(0.001, min(0.1, deadline - time.monotonic())))
            try:
                data = self._notify.recv(65536)
                self.messages.extend(data.decode().splitlines())
            except (TimeoutError, BlockingIOError):
                pass

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        if self._notify is not None:
            self.poll_notify()  # keep what it said on the way out (STOPPING=1)
        self.close()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.close()

    def close(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        return read_log(self.log_path)

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
        return out

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("level") in ("error", "critical")]

    def wait_log(self, event: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for item in self.logs():
                if item.get("event") == event and all(
                        str(item.get(k)) == str(v) for k, v in fields.items()):
                    return item
            return None
        found: dict[str, Any] = wait_for(find, timeout, 0.02, what=f"log event {event!r}")
        return found


def run_ctl(ns: Netns, socket_path: str, *args: str, setpriv: Sequence[str] = (),
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``mptcpd-py ctl --socket PATH ARGS...`` inside ``ns`` (where the
    daemon's abstract reply addresses live), as another user when
    ``setpriv`` options are given; returns whatever it exited with."""
    import sys  # noqa: PLC0415

    command = ["ip", "netns", "exec", ns.name]
    if setpriv:
        command += ["setpriv", *setpriv]
    command += [sys.executable, "-m", "mptcpd_py", "ctl", "--socket", socket_path, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          check=False)


def daemon_config(state_dir: str, *, plugins: Sequence[str] = ("addr_adv", "backup_cellular"),
                  plugin_dirs: Sequence[str] = (), extra: str = "", **daemon: Any) -> str:
    """A config for tests and the demo: state in ``state_dir``, no system paths."""
    lines = ["[daemon]", f'state_dir = "{state_dir}"',
             "plugin_dirs = [" + ", ".join(f'"{d}"' for d in plugin_dirs) + "]",
             "plugins = [" + ", ".join(f'"{p}"' for p in plugins) + "]"]
    for key, value in daemon.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n" + extra


class BulkTransfer:
    """One MPTCP upload from ``client`` to ``server``: a sender thread writes
    as fast as the paths take it, a receiver thread counts bytes.

    The sender uses cubic, not the host's default: a namespace inherits
    that default and may not change it, and BBR (some hosts' default) loses
    about a sixth of its segments on a shallow tbf queue; the retransmission
    stalls then hold up the whole MPTCP connection for 0.2-0.4 s at random,
    which says nothing about path management."""

    CHUNK = 64 * 1024
    CONGESTION = "cubic"

    def __init__(self, client: Netns, server: Netns, server_addr: str, *,
                 max_seconds: float = 120.0) -> None:
        import threading  # noqa: PLC0415

        self.client = client
        self.server = server
        self.listener = mptcp_listen(server, "::" if ":" in server_addr else "0.0.0.0")
        self.port = self.listener.getsockname()[1]
        self.server_addr = server_addr
        self.received = 0
        self.sent = 0
        self.error: BaseException | None = None
        self.max_seconds = max_seconds
        self._stop = threading.Event()
        self._threads: list[Any] = []
        self._threading = threading
        self.client_sock: socket.socket | None = None
        self.server_sock: socket.socket | None = None
        self.closed_at: float | None = None
        self.last_progress = 0.0
        self.max_gap = 0.0

    def reset_gap(self) -> None:
        """Start measuring the longest pause in received data from now."""
        self.max_gap = 0.0

    def start(self) -> BulkTransfer:
        pair = mptcp_connect(self.client, self.listener, address=self.server_addr,
                             congestion=self.CONGESTION)
        self.client_sock, self.server_sock = pair.client, pair.server
        self.server_sock.settimeout(1.0)
        self.client_sock.settimeout(1.0)
        for target in (self._send, self._receive):
            thread = self._threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _send(self) -> None:
        assert self.client_sock is not None
        data = b"\0" * self.CHUNK
        deadline = time.monotonic() + self.max_seconds
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    self.sent += self.client_sock.send(data)
                except TimeoutError:
                    continue
        except OSError as exc:
            self.error = exc

    def _receive(self) -> None:
        assert self.server_sock is not None
        deadline = time.monotonic() + self.max_seconds + 5
        try:
            while time.monotonic() < deadline:
                try:
                    chunk = self.server_sock.recv(1 << 20)
                except TimeoutError:
                    if self._stop.is_set():
                        return
                    continue
                if not chunk:
                    self.closed_at = time.monotonic()
                    return
                now = time.monotonic()
                if self.last_progress:
                    self.max_gap = max(self.max_gap, now - self.last_progress)
                self.last_progress = now
                self.received += len(chunk)
        except OSError as exc:
            self.error = exc

    def alive(self) -> bool:
        return self.error is None and self.closed_at is None

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in (self.client_sock, self.server_sock, self.listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


def sample_rates(transfer: BulkTransfer, client: Netns, ifnames: Sequence[str],
                 seconds: float, *, interval: float = 0.1,
                 on_sample: Any = None) -> list[dict[str, float]]:
    """Every ``interval``: Mbit/s received in total and sent per client interface."""
    samples: list[dict[str, float]] = []
    last_t = time.monotonic()
    last_rx = transfer.received
    last_tx = {name: client.link_bytes(name)[1] for name in ifnames}
    end = last_t + seconds
    while time.monotonic() < end:
        time.sleep(interval)
        now = time.monotonic()
        rx = transfer.received
        tx = {name: client.link_bytes(name)[1] for name in ifnames}
        dt = now - last_t
        sample = {"t": now, "total": (rx - last_rx) * 8 / dt / 1e6}
        for name in ifnames:
            sample[name] = (tx[name] - last_tx[name]) * 8 / dt / 1e6
        samples.append(sample)
        if on_sample is not None:
            on_sample(sample)
        last_t, last_rx, last_tx = now, rx, tx
    return samples


def diag_subflows(ns: Netns) -> list[Any]:
    """Every MPTCP subflow in ``ns`` (sock_diag, as ``ss -M`` sees them)."""
    import asyncio  # noqa: PLC0415

    from mptcpd_py.netlink.diag import SockDiag  # noqa: PLC0415

    async def dump() -> list[Any]:
        diag = SockDiag(ns.name)
        try:
            return await diag.subflows()
        finally:
            diag.close()
    return asyncio.run(dump())


def subflows_by_token(ns: Netns) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for sub in diag_subflows(ns):
        out.setdefault(sub.token, []).append(sub)
    return out


def open_connections(client: Netns, listener: socket.socket, address: str, count: int,
                     *, timeout: float = 30.0) -> list[MptcpPair]:
    """``count`` established MPTCP connections (connect all, then accept all),
    each with one byte from the server so the client side sees ESTABLISHED."""
    port = listener.getsockname()[1]
    clients = []
    deadline = time.monotonic() + timeout
    for _ in range(count):
        sock = client.socket(listener.family)
        sock.settimeout(timeout)
        sock.connect((address, port))
        clients.append(sock)
    listener.settimeout(max(0.1, deadline - time.monotonic()))
    pairs = []
    for sock in clients:
        conn, _ = listener.accept()
        conn.settimeout(timeout)
        conn.sendall(b"!")
        pairs.append(MptcpPair(sock, conn, listener))
    return pairs


def close_connections(pairs: Sequence[MptcpPair]) -> None:
    for pair in pairs:
        for sock in (pair.client, pair.server):
            with contextlib.suppress(OSError):
                sock.close()
