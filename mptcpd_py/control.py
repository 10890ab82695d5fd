"""The control socket: protocol and server.

A unix datagram socket, ``state_dir/control``, mode 0660, group
``[daemon] control_group`` (the model is wpa_supplicant's control
interface). A client binds an address of its own (``bind("")`` autobinds
an abstract one), connects to the socket and sends one JSON object per
datagram; the daemon answers to the sender's address. The socket file's
mode decides who may ask at all; each datagram's credentials
(SO_PASSCRED / SCM_CREDENTIALS: SO_PEERCRED means nothing on a datagram
server) decide who may *change* something: root and members of
``control_group`` only.

Protocol version 1::

    request  {"version": 1, "id": 7, "command": "status"}          (+ "args": {})
    reply    {"version": 1, "id": 7, "ok": true, "result": {...}}
    error    {"version": 1, "id": 7, "ok": false,
              "error": {"code": "unknown_command", "message": "..."}}
    fragment {"version": 1, "id": 7, "fragment": 0, "fragments": 3, "data": "..."}
    event    {"version": 1, "id": 7, "event": {"kind": "address", ...}}

A reply larger than one datagram (:data:`MAX_DATAGRAM`) is cut into
fragments whose ``data`` strings, joined in order, are the reply's JSON
text. ``monitor`` subscribes the sender to live events; the subscription
lasts :data:`SUBSCRIPTION_TTL` seconds unless renewed (the client repeats
``monitor`` every :data:`KEEPALIVE` seconds) and ends at once on
``unsubscribe`` or when the client's socket is gone.

Why the server does not run on asyncio-dgram's transport: asyncio reads
datagrams with recvfrom(2), so their credentials never arrive; it queues
every datagram in an unbounded queue (a flood becomes memory); and it sends
through one shared buffer that a single client with a full queue blocks
for everyone (and, on an unconnected datagram socket, spins on). Here the
socket is read with recvmsg(2) and drained quickly (the kernel queues only
``net.unix.max_dgram_qlen`` datagrams, 10 by default, so a slow reader
would let one flooding client crowd everyone else out); requests wait in
small per-client queues served in turn, :data:`MAX_RUNNING` at a time, and
a client with :data:`PER_CLIENT_PENDING` requests waiting gets ``busy``.
Only when :data:`MAX_PENDING` requests wait does reading pause (the
kernel's queue then pushes back on the senders). Each reply goes to its own
client without blocking: a client that does not read is given
:data:`DELIVERY_PATIENCE` seconds, then dropped. One limit the kernel
sets: a client *connected* to this socket is exempt from the per-receiver
queue limit, so if it never reads, replies it was sent stay charged to
this socket's send buffer and, once that is full, every client waits until
it reads or closes (logged; the event loop and the path manager carry
on). The client side (``ctl``) uses asyncio-dgram.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import json
import os
import pwd
import socket
import stat
import struct
import termios
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mptcpd_py.errors import ControlError, KernelError

if TYPE_CHECKING:
    from mptcpd_py.core import Monitor

PROTOCOL_VERSION = 1
SOCKET_NAME = "control"
DEFAULT_SOCKET = "/run/mptcpd-py/control"
MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108, with the terminating NUL
MAX_REQUEST = 64 * 1024  # bytes; a larger request is refused as oversized
MAX_DATAGRAM = 60 * 1024  # bytes per reply datagram before it is fragmented
MAX_FRAGMENTS = 16384  # a client refuses a reply announcing more
MAX_REPLY = 512 * 1024 * 1024  # bytes; a client refuses a larger reassembled reply
KEEPALIVE = 10.0  # seconds between a monitor client's renewals
SUBSCRIPTION_TTL = 3 * KEEPALIVE  # a subscription not renewed for this long ends
MAX_SUBSCRIBERS = 32
SUBSCRIBER_QUEUE = 4096  # events buffered for one slow monitor client, then dropped
MAX_RUNNING = 8  # requests handled at once
PER_CLIENT_PENDING = 8  # requests one client may have waiting; more get "busy"
MAX_PENDING = 256  # requests waiting in all; reading pauses beyond this
MAX_DELIVERIES = 64  # replies waiting for slow clients to make room
MAX_DELIVERY_BYTES = 64 * 1024 * 1024
DELIVERY_PATIENCE = 5.0  # seconds a client may leave its queue full before its reply is dropped
MAX_ID = 2**53  # request ids: non-negative integers a JSON number holds exactly
MAX_EVENT_STRING = 2000
READ_BATCH = 64  # datagrams read per wakeup: the loop serves others in between

_CREDS = struct.Struct("=iII")  # struct ucred: pid, uid, gid
_ANCILLARY_SPACE = socket.CMSG_SPACE(_CREDS.size)
_FIELDS = frozenset({"version", "id", "command", "args"})

# Error codes (the "code" of an error reply).
MALFORMED = "malformed"
OVERSIZED = "oversized"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_COMMAND = "unknown_command"
BAD_ARGUMENTS = "bad_arguments"
PERMISSION_DENIED = "permission_denied"
BUSY = "busy"
CONFIG_ERROR = "config_error"
KERNEL_ERROR = "kernel_error"
FAILED = "failed"
TIMEOUT = "timeout"
INTERNAL = "internal"
STOPPING = "stopping"  # the daemon stopped before it could answer


# ---------------------------------------------------------------- protocol


class ProtocolError(ControlError):
    """A request or reply that breaks the protocol; ``code`` is its error code."""

    def __init__(self, code: str, message: str, request_id: int | None = None,
                 details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details = details


@dataclass(frozen=True)
class Request:
    id: int | None
    command: str
    args: Mapping[str, Any] = field(default_factory=dict)


def _dumps(obj: Any) -> str:
    # ASCII only: a reply's text can be cut anywhere without splitting a character.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, default=str)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_request(command: str, request_id: int, args: Mapping[str, Any] | None = None
                   ) -> bytes:
    message: dict[str, Any] = {"version": PROTOCOL_VERSION, "id": request_id,
                               "command": command}
    if args:
        message["args"] = dict(args)
    return _dumps(message).encode()


def _valid_id(value: Any) -> bool:
    return type(value) is int and 0 <= value < MAX_ID


def parse_request(data: bytes) -> Request:
    """One datagram -> a Request, or ProtocolError with a one-line reason
    (carrying the request's id when it could be read)."""
    if len(data) > MAX_REQUEST:
        raise ProtocolError(OVERSIZED, f"request larger than {MAX_REQUEST} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(MALFORMED, f"request is not UTF-8 (byte {exc.start})") from None
    try:
        message = json.loads(text)
    except RecursionError:
        raise ProtocolError(MALFORMED, "request is not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise ProtocolError(MALFORMED, f"request is not JSON: {_shorten(str(exc), 80)}"
                            ) from None
    if not isinstance(message, dict):
        raise ProtocolError(MALFORMED, f"request must be a JSON object, not "
                                       f"{type(message).__name__}")
    raw_id = message.get("id")
    request_id = raw_id if _valid_id(raw_id) else None
    if "id" in message and raw_id is not None and request_id is None:
        raise ProtocolError(MALFORMED, f"id must be an integer from 0 to {MAX_ID - 1}")
    if "version" not in message:
        raise ProtocolError(MALFORMED, "version missing (this daemon speaks version "
                                       f"{PROTOCOL_VERSION})", request_id)
    version = message["version"]
    if type(version) is not int:
        raise ProtocolError(MALFORMED, "version must be an integer", request_id)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION,
                            f"protocol version {_shorten(str(version), 20)} is not supported "
                            f"(this daemon speaks version {PROTOCOL_VERSION})", request_id,
                            {"supported": [PROTOCOL_VERSION]})
    unknown = sorted(set(message) - _FIELDS)
    if unknown:
        raise ProtocolError(MALFORMED, f"unknown field {_shorten(unknown[0])!r} (fields: "
                                       f"{', '.join(sorted(_FIELDS))})", request_id)
    command = message.get("command")
    if not isinstance(command, str) or not command:
        raise ProtocolError(MALFORMED, "command missing or not a string", request_id)
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(MALFORMED, "args must be a JSON object", request_id)
    return Request(request_id, command, args)


def encode_reply(request_id: int | None, result: Any = None, *,
                 error: ProtocolError | None = None) -> list[bytes]:
    """A reply as one datagram, or as fragments when it is larger than
    :data:`MAX_DATAGRAM`."""
    message: dict[str, Any] = {"version": PROTOCOL_VERSION, "id": request_id}
    if error is None:
        message["ok"] = True
        message["result"] = result
    else:
        message["ok"] = False
        message["error"] = {"code": error.code, "message": error.message}
        if error.details is not None:
            message["error"]["details"] = error.details
    text = _dumps(message)
    if len(text) <= MAX_DATAGRAM:
        return [text.encode()]
    return fragment(text, request_id)


def fragment(text: str, request_id: int | None) -> list[bytes]:
    """Cut a reply's JSON text into datagrams of at most MAX_DATAGRAM bytes."""
    envelope = len(_dumps({"version": PROTOCOL_VERSION, "id": request_id,
                           "fragment": MAX_FRAGMENTS, "fragments": MAX_FRAGMENTS,
                           "data": ""}))
    budget = MAX_DATAGRAM - envelope
    chunks: list[str] = []
    start = 0
    while start < len(text):
        size = budget
        while True:
            piece = text[start : start + size]
            escaped = len(json.dumps(piece)) - 2
            if escaped <= budget:
                break
            size = max(1, size * budget // escaped - 8)
        chunks.append(piece)
        start += len(piece)
    total = len(chunks)
    return [_dumps({"version": PROTOCOL_VERSION, "id": request_id, "fragment": i,
                    "fragments": total, "data": chunk}).encode()
            for i, chunk in enumerate(chunks)]


def encode_event(subscription_id: int | None, event: Mapping[str, Any]) -> bytes:
    """One monitor event, always one datagram: long strings (a plugin's
    exception text) are shortened."""
    text = _dumps({"version": PROTOCOL_VERSION, "id": subscription_id, "event": event})
    if len(text) > MAX_DATAGRAM:
        trimmed = {k: (v[:MAX_EVENT_STRING] + "..." if isinstance(v, str)
                       and len(v) > MAX_EVENT_STRING else v) for k, v in event.items()}
        text = _dumps({"version": PROTOCOL_VERSION, "id": subscription_id, "event": trimmed})
    if len(text) > MAX_DATAGRAM:
        text = _dumps({"version": PROTOCOL_VERSION, "id": subscription_id,
                       "event": {"time": event.get("time"), "kind": event.get("kind"),
                                 "error": "event too large to show"}})
    return text.encode()


def parse_message(data: bytes) -> dict[str, Any]:
    """A datagram from the daemon -> its JSON object (client side)."""
    try:
        message = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(MALFORMED, "unreadable message from the daemon") from None
    if not isinstance(message, dict):
        raise ProtocolError(MALFORMED, "unreadable message from the daemon")
    version = message.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION,
                            f"the daemon speaks protocol version {version!r}, this client "
                            f"{PROTOCOL_VERSION}")
    return message


class Reassembler:
    """Puts fragmented replies back together (client side), within limits."""

    def __init__(self) -> None:
        self._parts: dict[Any, dict[int, str]] = {}
        self._totals: dict[Any, int] = {}
        self._sizes: dict[Any, int] = {}

    def feed(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """A complete reply, or None while fragments are missing."""
        if "fragment" not in message:
            return message
        key = message.get("id")
        index, total, data = message.get("fragment"), message.get("fragments"), \
            message.get("data")
        if type(index) is not int or type(total) is not int or not isinstance(data, str) \
                or not 0 <= index < total or total > MAX_FRAGMENTS:
            raise ProtocolError(MALFORMED, "bad reply fragment from the daemon")
        if self._totals.setdefault(key, total) != total:
            raise ProtocolError(MALFORMED, "inconsistent reply fragments from the daemon")
        parts = self._parts.setdefault(key, {})
        if index not in parts:
            parts[index] = data
            self._sizes[key] = self._sizes.get(key, 0) + len(data)
        if self._sizes[key] > MAX_REPLY:
            raise ProtocolError(MALFORMED, f"reply larger than {MAX_REPLY} bytes")
        if len(parts) < total:
            return None
        del self._parts[key], self._totals[key], self._sizes[key]
        return parse_message("".join(parts[i] for i in range(total)).encode())


# ---------------------------------------------------------------- peers


@dataclass(frozen=True, slots=True)
class Peer:
    """Who sent a datagram: its address (for the reply) and its credentials
    (pid, uid, gid as the kernel vouches for them; -1 when absent)."""

    address: str | bytes
    pid: int = -1
    uid: int = -1
    gid: int = -1

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


def _supplementary_groups(pid: int, uid: int) -> set[int] | None:
    """The groups of a live process, when it is still the sender (its uid matches)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return None
    uids: list[str] = []
    groups: set[int] = set()
    for line in status.splitlines():
        if line.startswith("Uid:"):
            uids = line.split()[1:]
        elif line.startswith("Groups:"):
            groups = {int(g) for g in line.split()[1:] if g.isdigit()}
    return groups if str(uid) in uids[:2] else None


def may_change(peer: Peer, group_id: int | None) -> bool:
    """Root, or a member of the control group (primary, or supplementary as
    /proc or the group database says)."""
    if peer.uid == 0:
        return True
    if group_id is None or peer.uid < 0:
        return False
    if peer.gid == group_id:
        return True
    groups = _supplementary_groups(peer.pid, peer.uid) if peer.pid > 0 else None
    if groups is not None:
        return group_id in groups
    try:
        return pwd.getpwuid(peer.uid).pw_name in grp.getgrgid(group_id).gr_mem
    except KeyError:
        return False


def _credentials(ancillary: list[tuple[int, int, bytes]]) -> tuple[int, int, int]:
    creds = (-1, -1, -1)
    for level, kind, data in ancillary:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(data) >= _CREDS.size:
            creds = _CREDS.unpack_from(data)
        elif kind == socket.SCM_RIGHTS:
            # Never keep a descriptor someone pushed at us.
            count = len(data) // 4
            for fd in struct.unpack_from(f"={count}i", data):
                with contextlib.suppress(OSError):
                    os.close(fd)
    return creds


# ---------------------------------------------------------------- server


Handler = Callable[[Request, Peer], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    """A control command: its handler, whether it changes anything (then
    only root and ``control_group`` may run it), and its time limit."""

    name: str
    handler: Handler
    mutating: bool = False
    timeout: float | None = 30.0
    arguments: tuple[str, ...] = ()  # the keys "args" may have


class CommandFailed(ControlError):
    """A handler's clean refusal: becomes an error reply with this code."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class _EventQueue(asyncio.Queue[dict[str, Any]]):
    """A subscriber's queue that counts what it had to drop when full."""

    dropped = 0

    def put_nowait(self, item: dict[str, Any]) -> None:
        try:
            super().put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1
            raise


@dataclass
class Subscription:
    peer: Peer
    request_id: int | None
    queue: _EventQueue
    renewed: float
    task: asyncio.Task[None] | None = None
    sent: int = 0
    lost: int = 0


@dataclass
class ControlCounters:
    """What the control socket did; read by `ctl status` and the metrics."""

    datagrams: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    replies_dropped: int = 0
    events_sent: int = 0
    events_dropped: int = 0
    unanswerable: int = 0  # datagrams from an unbound socket: nowhere to reply
    send_buffer_full: int = 0  # times a client that does not read held up every reply


class _LogLimiter:
    """At most ``burst`` lines per ``window`` seconds for one kind of noise
    (a flood of bad requests must not flood the journal)."""

    def __init__(self, burst: int = 10, window: float = 10.0,
                 on_suppress: Callable[[], object] | None = None) -> None:
        self.burst = burst
        self.window = window
        self.started = 0.0
        self.count = 0
        self.suppressed = 0
        self.on_suppress = on_suppress

    def allow(self, now: float) -> bool:
        if now - self.started > self.window:
            self.started, self.count = now, 0
        self.count += 1
        if self.count <= self.burst:
            return True
        self.suppressed += 1
        if self.on_suppress is not None:
            self.on_suppress()
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


class ControlServer:
    """Serves :class:`Command` s and ``monitor`` on a unix datagram socket."""

    def __init__(self, path: str, *, commands: Mapping[str, Command], monitor: Monitor,
                 log: Any, group: str = "") -> None:
        self.path = path
        self.commands = dict(commands)
        self.monitor = monitor
        self.log = log
        self.group = group
        self.group_id: int | None = None
        self.counters = ControlCounters()
        self.subscriptions: dict[str | bytes, Subscription] = {}
        self.sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inode: tuple[int, int] | None = None
        # Requests being handled, with what is needed to answer them at close.
        self._running: dict[asyncio.Task[None], tuple[Command, Request, Peer]] = {}
        self._waiting: dict[str | bytes, deque[tuple[Command, Request, Peer]]] = {}
        self._turns: deque[str | bytes] = deque()  # clients with requests waiting, in turn
        self._pending = 0
        self._deliveries: set[asyncio.Task[None]] = set()
        self._delivery_bytes = 0
        self._reading = False
        self._closing = ""  # why, once close() began: nothing more is read or started
        self._housekeeping: asyncio.Task[None] | None = None
        self._housework = asyncio.Event()  # a subscription to expire or lines to report
        self._noise = _LogLimiter(on_suppress=self._housework.set)
        self._refusals = _LogLimiter(on_suppress=self._housework.set)
        self._buffer_checked = 0.0
        self._buffer_warned = -3600.0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Serve: bind first if :meth:`bind` was not called. Raises
        ControlError with a one-line reason."""
        if self.sock is None:
            self.bind()
        self._loop = asyncio.get_running_loop()
        self._resume()
        self._housekeeping = asyncio.create_task(self._housekeep(), name="control-housekeeping")
        self.log.info("control socket ready", path=self.path, group=self.group or "root only")

    def bind(self) -> None:
        """Create the socket (replacing a stale one) with mode 0660 and the
        control group, without serving yet: the daemon does this before it
        touches the kernel, so that a socket it cannot make stops the start
        with nothing to undo. Raises ControlError with a one-line reason."""
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ControlError(f"control socket path {self.path} is longer than "
                               f"{MAX_SOCKET_PATH} bytes; choose a shorter daemon.state_dir")
        group_id = self._group_id(self.group)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._grow_sndbuf(sock)
            # The umask makes the file 0660 from its first moment.
            old_umask = os.umask(0o117)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_umask)
            if group_id is not None:
                _give_to_group(self.path, group_id, self.group)
            os.chmod(self.path, 0o660)
            st = os.stat(self.path)
        except (OSError, ControlError) as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            if isinstance(exc, ControlError):
                raise
            raise ControlError(f"control socket {self.path}: {exc.strerror or exc}") from None
        self.sock = sock
        self.group_id = group_id
        self._inode = (st.st_dev, st.st_ino)

    @staticmethod
    def _grow_sndbuf(sock: socket.socket) -> None:
        # Room for several clients' fragments in flight at once.
        for option in (32, socket.SO_SNDBUF):  # SO_SNDBUFFORCE (root), then the capped one
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
                return

    @staticmethod
    def _group_id(name: str) -> int | None:
        if not name:
            return None
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            raise ControlError(f"daemon.control_group: no such group {name!r}") from None

    def _remove_stale(self) -> None:
        """A socket file left by a daemon that died (the state_dir lock says
        no other daemon is using it). Anything else is not ours to delete."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlError(f"control socket {self.path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"control socket {self.path}: exists and is not a socket; "
                               "remove it or choose another daemon.state_dir")
        os.unlink(self.path)

    def set_group(self, group: str) -> None:
        """A reload changed ``control_group``: re-own the socket file. Raises
        ControlError when it cannot (the socket keeps its group), so that the
        reload reports it as a start would."""
        if group == self.group:
            return
        group_id = self._group_id(group)
        try:
            _give_to_group(self.path, group_id if group_id is not None else os.getegid(), group)
        except OSError as exc:
            raise ControlError(f"control socket {self.path}: cannot give it to group "
                               f"{group or 'root'!r}: {exc.strerror or exc}") from None
        self.group, self.group_id = group, group_id
        self.log.info("control group changed", path=self.path, group=group or "root only")

    async def close(self, reason: str = "the daemon is stopping") -> None:
        """Tell monitor clients why the stream ends and clients with a request
        not yet answered why it never will be (a datagram client is not told
        when the socket closes: it would wait for its full timeout), stop
        serving, remove the file."""
        # First of all: close() waits below, and a request read meanwhile
        # would start alongside the stop and never be answered.
        self._closing = reason
        self._pause()
        for sub in list(self.subscriptions.values()):
            self._send_now(sub.peer.address, encode_event(
                sub.request_id, {"time": time.time(), "kind": "stopping", "reason": reason}))
            self._drop_subscription(sub, "daemon stopping")
        unanswered = [*self._running.values(),
                      *(item for waiting in self._waiting.values() for item in waiting)]
        self._waiting.clear()  # nothing more is started
        self._turns.clear()
        self._pending = 0
        for command, request, peer in unanswered:
            self._refuse(peer, request.id, ProtocolError(
                STOPPING, f"{reason} ({command.name} not finished)"))
        tasks = [*self._running, *self._deliveries]
        if self._housekeeping is not None:
            tasks.append(self._housekeeping)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Requests that arrived while it waited: told, not left to time out.
        for _ in range(MAX_PENDING):
            if not self._read_one():
                break
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)

    # ------------------------------------------------------------ reading

    def _resume(self) -> None:
        if self._closing:
            return  # close() stopped reading for good
        if not self._reading and self.sock is not None and self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading and self.sock is not None and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = False

    def _on_readable(self) -> None:
        for _ in range(READ_BATCH):
            if self._pending >= MAX_PENDING:
                # The kernel's queue fills and pushes back on the senders.
                self._pause()
                return
            if not self._read_one():
                return

    def _read_one(self) -> bool:
        """Read and handle one datagram; False when none was there to read."""
        sock = self.sock
        if sock is None:
            return False
        try:
            data, ancillary, flags, address = sock.recvmsg(MAX_REQUEST + 1, _ANCILLARY_SPACE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if self._noise.allow(time.monotonic()):
                self.log.warning("control socket read failed", error=exc.strerror)
            return False
        pid, uid, gid = _credentials(ancillary)
        self.counters.datagrams += 1
        if not address:
            self.counters.unanswerable += 1
            return True
        oversized = bool(flags & socket.MSG_TRUNC) or len(data) > MAX_REQUEST
        self._handle(data, Peer(address, pid, uid, gid), oversized)
        return True

    def _handle(self, data: bytes, peer: Peer, oversized: bool) -> None:
        try:
            if oversized:
                raise ProtocolError(OVERSIZED, f"request larger than {MAX_REQUEST} bytes")
            request = parse_request(data)
        except ProtocolError as exc:
            self._refuse(peer, exc.request_id, exc)
            return
        if self._closing:
            self._refuse(peer, request.id, ProtocolError(
                STOPPING, f"{self._closing} ({_shorten(request.command)} not started)"))
            return
        if request.command in ("monitor", "unsubscribe") and request.args:
            self._refuse(peer, request.id, ProtocolError(
                BAD_ARGUMENTS, f"{request.command} takes no arguments"))
            return
        if request.command == "monitor":
            self._subscribe(request, peer)
            return
        if request.command == "unsubscribe":
            sub = self.subscriptions.get(peer.address)
            if sub is not None:
                self._drop_subscription(sub, "unsubscribed")
            self.counters.requests["unsubscribe"] += 1
            self._reply_now(peer, request.id, {"subscribed": False})
            return
        command = self.commands.get(request.command)
        if command is None:
            known = ", ".join(sorted([*self.commands, "monitor", "unsubscribe"]))
            self._refuse(peer, request.id, ProtocolError(
                UNKNOWN_COMMAND, f"unknown command {_shorten(request.command)!r} "
                                 f"(commands: {known})"))
            return
        unknown = sorted(set(request.args) - set(command.arguments))
        if unknown:
            self._refuse(peer, request.id, ProtocolError(
                BAD_ARGUMENTS, f"{command.name} takes no argument {_shorten(unknown[0])!r}"
                + (f" (arguments: {', '.join(command.arguments)})" if command.arguments
                   else "")))
            return
        if command.mutating and not may_change(peer, self.group_id):
            who = "root" + (f" or members of group {self.group}" if self.group else "")
            if self._refusals.allow(time.monotonic()):
                self.log.warning("control request refused", command=command.name,
                                 uid=peer.uid, pid=peer.pid, reason="not authorised")
            self._refuse(peer, request.id, ProtocolError(
                PERMISSION_DENIED, f"permission denied: {command.name} is allowed to {who} "
                                   f"only (you are uid {peer.uid})"))
            return
        self.counters.requests[command.name] += 1
        waiting = self._waiting.get(peer.address)
        if waiting is None:
            waiting = self._waiting[peer.address] = deque()
            self._turns.append(peer.address)
        if len(waiting) >= PER_CLIENT_PENDING:
            self._refuse(peer, request.id, ProtocolError(
                BUSY, f"busy: {PER_CLIENT_PENDING} requests of yours are waiting already"))
            return
        waiting.append((command, request, peer))
        self._pending += 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Start waiting requests, one client after the other (none once
        closing: close() answers them)."""
        assert self._loop is not None
        if self._closing:
            return
        while len(self._running) < MAX_RUNNING and self._turns:
            address = self._turns.popleft()
            waiting = self._waiting[address]
            command, request, peer = waiting.popleft()
            self._pending -= 1
            if waiting:
                self._turns.append(address)
            else:
                del self._waiting[address]
            task = self._loop.create_task(self._run(command, request, peer),
                                          name=f"control-{command.name}")
            self._running[task] = (command, request, peer)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._dispatch()
        if self._pending < MAX_PENDING:
            self._resume()

    async def _run(self, command: Command, request: Request, peer: Peer) -> None:
        error: ProtocolError | None = None
        result: Any = None
        try:
            if command.timeout is None:
                result = await command.handler(request, peer)
            else:
                result = await asyncio.wait_for(command.handler(request, peer),
                                                command.timeout)
        except CommandFailed as exc:
            error = ProtocolError(exc.code, exc.message, details=exc.details)
        except TimeoutError:
            error = ProtocolError(TIMEOUT, f"{command.name} took longer than "
                                           f"{command.timeout:g}s")
        except KernelError as exc:
            error = ProtocolError(KERNEL_ERROR, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.error("control command failed", command=command.name,
                           error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            error = ProtocolError(INTERNAL, f"{command.name} failed: {type(exc).__name__}: "
                                            f"{_shorten(str(exc), 200)}")
        if error is not None:
            self.counters.errors[error.code] += 1
        self._reply(peer, encode_reply(request.id, result, error=error))

    # ------------------------------------------------------------ monitor

    def _subscribe(self, request: Request, peer: Peer) -> None:
        self.counters.requests["monitor"] += 1
        sub = self.subscriptions.get(peer.address)
        now = time.monotonic()
        if sub is None:
            if len(self.subscriptions) >= MAX_SUBSCRIBERS:
                self._refuse(peer, request.id, ProtocolError(
                    BUSY, f"too many monitor clients (at most {MAX_SUBSCRIBERS})"))
                return
            sub = Subscription(peer, request.id, _EventQueue(SUBSCRIBER_QUEUE), now)
            self.subscriptions[peer.address] = sub
            self._housework.set()
            self.monitor.subscribe(sub.queue)  # its put_nowait counts what it misses
            assert self._loop is not None
            sub.task = self._loop.create_task(self._pump(sub), name="control-monitor")
            self.log.info("monitor client subscribed", uid=peer.uid, pid=peer.pid)
        else:
            sub.renewed = now
        self._reply_now(peer, request.id, {"subscribed": True, "keepalive": KEEPALIVE,
                                           "expires": SUBSCRIPTION_TTL})

    async def _pump(self, sub: Subscription) -> None:
        """Send a subscriber its events in order; when it falls behind, its
        queue absorbs a burst, then drops (and says how many)."""
        queue = sub.queue
        while True:
            item = await queue.get()
            if queue.dropped:
                lost, queue.dropped = queue.dropped, 0
                sub.lost += lost
                self.counters.events_dropped += lost
                notice = encode_event(sub.request_id, {"time": time.time(), "kind": "lost",
                                                       "count": lost})
                if not await self._deliver(sub.peer.address, [notice], SUBSCRIPTION_TTL):
                    break
            if not await self._deliver(sub.peer.address, [encode_event(sub.request_id, item)],
                                       SUBSCRIPTION_TTL):
                break
            sub.sent += 1
            self.counters.events_sent += 1
        self._drop_subscription(sub, "client gone or not reading", cancel=False)

    def _drop_subscription(self, sub: Subscription, why: str, *, cancel: bool = True) -> None:
        if self.subscriptions.get(sub.peer.address) is not sub:
            return
        del self.subscriptions[sub.peer.address]
        self.monitor.unsubscribe(sub.queue)
        if cancel and sub.task is not None and sub.task is not asyncio.current_task():
            sub.task.cancel()
        self.log.info("monitor client gone", uid=sub.peer.uid, pid=sub.peer.pid, reason=why,
                      events=sub.sent, lost=sub.lost)

    async def _housekeep(self) -> None:
        """Once a second while there is a subscription to expire or a
        suppressed count to report; asleep otherwise (an idle daemon wakes
        for nothing: each wake-up of a Python process costs ~0.2 ms of CPU)."""
        while True:
            if not self.subscriptions and not self._noise.suppressed and \
                    not self._refusals.suppressed:
                self._housework.clear()
                await self._housework.wait()
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for sub in list(self.subscriptions.values()):
                if now - sub.renewed > SUBSCRIPTION_TTL:
                    self._drop_subscription(sub, f"not renewed for {SUBSCRIPTION_TTL:g}s")
            for limiter, what in ((self._noise, "bad control requests"),
                                  (self._refusals, "refused control requests")):
                suppressed = limiter.take_suppressed()
                if suppressed:
                    self.log.warning(f"{what} not logged", count=suppressed)

    # ------------------------------------------------------------ sending

    def _refuse(self, peer: Peer, request_id: int | None, error: ProtocolError) -> None:
        self.counters.errors[error.code] += 1
        if error.code in (MALFORMED, OVERSIZED, UNSUPPORTED_VERSION, UNKNOWN_COMMAND) and \
                self._noise.allow(time.monotonic()):
            self.log.info("bad control request", uid=peer.uid, pid=peer.pid, code=error.code,
                          error=error.message)
        # Best effort: a peer that floods without reading loses its error replies.
        for datagram in encode_reply(request_id, error=error):
            if self._send_now(peer.address, datagram) != "sent":
                self.counters.replies_dropped += 1
                return

    def _reply_now(self, peer: Peer, request_id: int | None, result: Any) -> None:
        self._reply(peer, encode_reply(request_id, result))

    def _reply(self, peer: Peer, datagrams: list[bytes]) -> None:
        """Send at once what the client has room for; the rest waits in a
        delivery task (bounded in number and bytes) or is dropped."""
        for i, datagram in enumerate(datagrams):
            outcome = self._send_now(peer.address, datagram)
            if outcome == "sent":
                continue
            if outcome == "gone":
                self.counters.replies_dropped += 1
                return
            rest = datagrams[i:]
            size = sum(len(d) for d in rest)
            if len(self._deliveries) >= MAX_DELIVERIES or \
                    self._delivery_bytes + size > MAX_DELIVERY_BYTES:
                self.counters.replies_dropped += 1
                return
            assert self._loop is not None
            self._delivery_bytes += size
            task = self._loop.create_task(self._deliver_rest(peer.address, rest, size),
                                          name="control-delivery")
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
            return

    async def _deliver_rest(self, address: str | bytes, datagrams: list[bytes], size: int
                            ) -> None:
        try:
            if not await self._deliver(address, datagrams, DELIVERY_PATIENCE):
                self.counters.replies_dropped += 1
        finally:
            self._delivery_bytes -= size

    async def _deliver(self, address: str | bytes, datagrams: list[bytes], patience: float
                       ) -> bool:
        """Send in order, waiting (never blocking) while the client's queue is
        full; False when the client is gone or stays full for ``patience`` s."""
        delay = 0.0005
        stalled_since = 0.0
        for datagram in datagrams:
            while True:
                outcome = self._send_now(address, datagram)
                if outcome == "sent":
                    delay, stalled_since = 0.0005, 0.0
                    break
                if outcome == "gone":
                    return False
                now = time.monotonic()
                stalled_since = stalled_since or now
                if now - stalled_since > patience:
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        return True

    def _send_now(self, address: str | bytes, datagram: bytes) -> str:
        """"sent", "again" (the client's queue is full) or "gone"."""
        sock = self.sock
        if sock is None:
            return "gone"
        try:
            sock.sendto(datagram, socket.MSG_DONTWAIT, address)
        except (BlockingIOError, InterruptedError):
            self._check_send_buffer()
            return "again"
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return "again"
            # ECONNREFUSED / ENOENT: the client's socket is gone; EPERM: it
            # connected elsewhere. Either way nobody is listening.
            sub = self.subscriptions.get(address)
            if sub is not None:
                self._drop_subscription(sub, f"client socket gone ({exc.strerror})")
            return "gone"
        return "sent"

    def _check_send_buffer(self) -> None:
        """A client *connected* to this socket is exempt from the kernel's
        per-receiver queue limit: if it never reads, what we sent it stays
        charged to our send buffer, and once that is full nobody gets a
        reply until it reads or closes. Say so (at most once a minute)."""
        now = time.monotonic()
        if self.sock is None or now - self._buffer_checked < 1.0:
            return
        self._buffer_checked = now
        try:
            unread = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ,
                                                    b"\0\0\0\0"))[0]
            size = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        except OSError:
            return
        if unread >= size * 3 // 4:
            self.counters.send_buffer_full += 1
            if now - self._buffer_warned > 60.0:
                self._buffer_warned = now
                self.log.warning("control replies held up: a client connected to the control "
                                 "socket is not reading its replies", unread_bytes=unread,
                                 send_buffer=size)

    @property
    def monitor_clients(self) -> int:
        return len(self.subscriptions)


def _give_to_group(path: str, group_id: int, group: str) -> None:
    """chown the socket to the control group; without CAP_CHOWN (the shipped
    unit grants only CAP_NET_ADMIN) say what is missing instead of EPERM."""
    try:
        os.chown(path, -1, group_id)
    except PermissionError:
        raise ControlError(
            f"control socket {path}: cannot give it to group {group!r}: changing a file's "
            "group needs CAP_CHOWN (under systemd, add it with the drop-in in "
            "docs/service.md, 'control_group')") from None
