"""An asyncio netlink socket: requests matched by sequence number, multicast
delivered to a callback, ENOBUFS reported instead of raised.

Messages are packed by the struct codecs (checked against pyroute2's
message classes in the tests); the I/O is ours so that the daemon controls
buffer sizes, batching and what an overflow means (pyroute2 queues
everything in an unbounded userspace queue and raises ENOBUFS out of its
reader).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import queue
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mptcpd_py.errors import NetlinkError, kernel_error
from mptcpd_py.netns import in_netns

NETLINK_ROUTE = 0
NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
_SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # on NLMSG_ERROR: the request's payload is not echoed
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR: extended-ack attributes follow

NLMSGERR_ATTR_MSG = 1

_HEADER = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")

DEFAULT_RCVBUF = 8 * 1024 * 1024
_RECV_SIZE = 1 << 17
_MAX_DATAGRAMS_PER_WAKEUP = 512


class _SlowSender:
    """One thread that sends a socket's slow requests (DEL_ADDR blocks in
    sendmsg(2) for an RCU grace period, 5-15 ms) so the event loop keeps
    serving meanwhile. It only sends: the kernel's answer lands on the
    socket like any other and completes the request there, so the loop is
    woken once, by that answer, and a failed send is the one thing passed
    back (a thread pool woke it twice, and passed the GIL back and forth
    between its future's callbacks)."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_error: Callable[[int, OSError], None]) -> None:
        self._queue: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self._sock = sock
        self._loop = loop
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="netlink-slow", daemon=True)
        self._thread.start()

    def send(self, seq: int, data: bytes) -> None:
        self._queue.put((seq, data))

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            seq, data = item
            try:
                self._sock.send(data)
            except OSError as exc:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    self._loop.call_soon_threadsafe(self._on_error, seq, exc)


@dataclass(frozen=True, slots=True)
class RawMessage:
    type: int
    flags: int
    seq: int
    pid: int
    data: bytes  # the whole message, header included


def _send_error(command: str, exc: OSError) -> NetlinkError:
    return NetlinkError(f"{command or 'netlink'}: send failed: {exc.strerror}")


class DumpInterrupted(NetlinkError):
    """The kernel's state changed during a dump (NLM_F_DUMP_INTR): dump again."""


def split_messages(buf: bytes) -> list[RawMessage]:
    """Cut one datagram into netlink messages (malformed tails are dropped)."""
    out: list[RawMessage] = []
    offset = 0
    end = len(buf)
    while offset + _HEADER.size <= end:
        length, mtype, flags, seq, pid = _HEADER.unpack_from(buf, offset)
        if length < _HEADER.size or offset + length > end:
            break
        out.append(RawMessage(mtype, flags, seq, pid, buf[offset : offset + length]))
        offset += (length + 3) & ~3
    return out


def parse_error(msg: RawMessage) -> tuple[int, str]:
    """(negative errno or 0, extended-ack text) of an NLMSG_ERROR message."""
    data = msg.data
    if len(data) < _HEADER.size + 4:
        return (-errno.EBADMSG, "truncated error message")
    (code,) = struct.unpack_from("=i", data, _HEADER.size)
    detail = ""
    if msg.flags & NLM_F_ACK_TLVS:
        # Capped (NETLINK_CAP_ACK) or a success: only the request's header is
        # echoed; otherwise the whole request precedes the attributes.
        offset = _HEADER.size + 4 + _HEADER.size
        if code != 0 and not msg.flags & NLM_F_CAPPED:
            (orig_len,) = struct.unpack_from("=I", data, _HEADER.size + 4)
            offset = _HEADER.size + 4 + ((orig_len + 3) & ~3)
        while offset + _NLA.size <= len(data):
            nla_len, nla_type = _NLA.unpack_from(data, offset)
            if nla_len < _NLA.size:
                break
            if nla_type & 0x3FFF == NLMSGERR_ATTR_MSG:
                raw = data[offset + _NLA.size : offset + nla_len]
                detail = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            offset += (nla_len + 3) & ~3
    return (code, detail)


class _Pending:
    __slots__ = ("command", "dump", "future", "messages")

    def __init__(self, future: asyncio.Future[list[RawMessage]], dump: bool, command: str):
        self.future = future
        self.dump = dump
        self.command = command
        self.messages: list[RawMessage] = []


class NetlinkSocket:
    """One netlink socket on the running event loop.

    ``on_multicast`` receives every unsolicited message (seq 0);
    ``on_overflow`` is called when the kernel dropped messages (ENOBUFS).
    The socket keeps working after an overflow.
    """

    def __init__(
        self,
        protocol: int,
        *,
        rcvbuf: int = DEFAULT_RCVBUF,
        netns: str | None = None,
        on_multicast: Callable[[RawMessage], None] | None = None,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        with in_netns(netns):
            sock = socket.socket(
                socket.AF_NETLINK,
                socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                protocol,
            )
        try:
            self._set_rcvbuf(sock, rcvbuf)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                with contextlib.suppress(OSError):  # old kernels: plain acks
                    sock.setsockopt(SOL_NETLINK, opt, 1)
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        self.protocol = protocol
        self.sock = sock
        self.port: int = sock.getsockname()[0]
        self.on_multicast = on_multicast
        self.on_overflow = on_overflow
        self.overflows = 0
        self._seq = 0
        self._pending: dict[int, _Pending] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._dump_lock = asyncio.Lock()  # the kernel runs one dump per socket (EBUSY)
        self._slow: _SlowSender | None = None

    @staticmethod
    def _set_rcvbuf(sock: socket.socket, size: int) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    @property
    def rcvbuf(self) -> int:
        return int(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def set_rcvbuf(self, size: int) -> None:
        """Resize the receive buffer (tests shrink it to force an overflow)."""
        self._set_rcvbuf(self.sock, size)

    def add_membership(self, group: int) -> None:
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def drop_membership(self, group: int) -> None:
        self.sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, group)

    def attach_filter(self, program: Sequence[tuple[int, int, int, int]]) -> None:
        """A classic BPF socket filter, (code, jt, jf, k) per instruction: the
        kernel drops what it rejects before it is queued, woken for or read."""
        code = b"".join(_SOCK_FILTER.pack(*insn) for insn in program)
        buf = ctypes.create_string_buffer(code, len(code))
        fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # copied by the kernel

    def start(self) -> None:
        """Start reading on the running loop (idempotent)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def pause_reading(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())

    def resume_reading(self) -> None:
        if self._loop is not None and not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        if self._slow is not None:
            self._slow.stop()
        self.sock.close()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(NetlinkError("netlink socket closed"))
        self._pending.clear()

    def next_seq(self) -> int:
        self._seq = self._seq + 1 if self._seq < 0x7FFFFFFF else 1
        return self._seq

    async def request(
        self, msg: Any, msg_type: int, flags: int, command: str = "", *, slow: bool = False
    ) -> list[RawMessage]:
        """Send a pyroute2 message; return its replies (without the final ack).

        The kernel runs a command inside sendmsg(2). ``slow`` commands
        (DEL_ADDR waits for an RCU grace period, 5-15 ms) are sent from a
        worker thread so the event loop keeps serving meanwhile.
        Raises the matching :class:`~mptcpd_py.errors.KernelError` on a refusal.
        """
        if flags & NLM_F_DUMP == NLM_F_DUMP:
            async with self._dump_lock:
                return await self._request(msg, msg_type, flags, command, slow)
        return await self._request(msg, msg_type, flags, command, slow)

    async def request_bytes(
        self, payload: bytes, msg_type: int, flags: int, command: str = "", *,
        slow: bool = False, immediate: bool = False,
    ) -> list[RawMessage]:
        """Like :meth:`request` for a payload already encoded (everything
        after the netlink header). ``immediate``: read the answer right after
        sending (see :meth:`_request`)."""
        if flags & NLM_F_DUMP == NLM_F_DUMP:
            async with self._dump_lock:
                return await self._request(payload, msg_type, flags, command, slow)
        return await self._request(payload, msg_type, flags, command, slow, immediate=immediate)

    async def _request(self, msg: Any, msg_type: int, flags: int, command: str,
                       slow: bool = False, *, immediate: bool = False) -> list[RawMessage]:
        if self._closed:
            raise NetlinkError("netlink socket closed")
        self.start()
        assert self._loop is not None
        seq = self.next_seq()
        if isinstance(msg, bytes):
            data = _HEADER.pack(_HEADER.size + len(msg), msg_type, flags, seq, self.port) + msg
        else:
            header = msg["header"]
            header["type"] = msg_type
            header["flags"] = flags
            header["sequence_number"] = seq
            header["pid"] = self.port
            msg.encode()
            data = msg.data
        future: asyncio.Future[list[RawMessage]] = self._loop.create_future()
        self._pending[seq] = _Pending(future, bool(flags & NLM_F_DUMP == NLM_F_DUMP), command)
        if slow:
            if self._slow is None:
                self._slow = _SlowSender(self.sock, self._loop, self._send_failed)
            self._slow.send(seq, data)
        else:
            try:
                self.sock.send(data)
            except OSError as exc:
                del self._pending[seq]
                raise _send_error(command, exc) from exc
        if immediate and not slow:
            # The kernel runs a request inside sendmsg(2): its answer is
            # queued by now. Reading it here saves a trip through the event
            # loop per request (a wake-up's worth of CPU on an idle daemon),
            # and the await below does not suspend: a caller that sends many
            # yields to the loop itself now and then.
            self._on_readable()
        try:
            return await future
        finally:
            self._pending.pop(seq, None)

    def _send_failed(self, seq: int, exc: OSError) -> None:
        pending = self._pending.get(seq)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(_send_error(pending.command, exc))

    def _on_readable(self) -> None:
        self._read_some()

    def drain(self, max_datagrams: int = 64 * _MAX_DATAGRAMS_PER_WAKEUP) -> None:
        """Read, now, everything the kernel holds for this socket (callbacks
        run as usual). Bounded, in case the kernel keeps sending."""
        rounds = max(1, max_datagrams // _MAX_DATAGRAMS_PER_WAKEUP)
        for _ in range(rounds):
            if self._closed or not self._read_some():
                return

    def _read_some(self) -> bool:
        """Up to ``_MAX_DATAGRAMS_PER_WAKEUP`` datagrams; False once empty."""
        for _ in range(_MAX_DATAGRAMS_PER_WAKEUP):
            try:
                data, (_, groups) = self.sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    if self.on_overflow is not None:
                        self.on_overflow()
                    continue
                raise
            if not data:
                return False
            if groups:
                # Multicast. A notification caused by someone's request carries
                # that request's seq and port, so seq says nothing here.
                if self.on_multicast is not None:
                    for message in split_messages(data):
                        self.on_multicast(message)
                continue
            for message in split_messages(data):
                self._dispatch(message)
        return True

    def _dispatch(self, message: RawMessage) -> None:
        pending = self._pending.get(message.seq)
        if pending is None:
            return
        if pending.future.done():
            return
        if message.type == NLMSG_ERROR:
            code, detail = parse_error(message)
            if code:
                pending.future.set_exception(kernel_error(-code, detail, pending.command))
            else:
                pending.future.set_result(pending.messages)
            return
        if message.type == NLMSG_DONE:
            if message.flags & NLM_F_DUMP_INTR:
                pending.future.set_exception(
                    DumpInterrupted(f"{pending.command}: dump interrupted")
                )
                return
            if len(message.data) >= _HEADER.size + 4:
                (code,) = struct.unpack_from("=i", message.data, _HEADER.size)
                if code < 0:
                    pending.future.set_exception(kernel_error(-code, "", pending.command))
                    return
            pending.future.set_result(pending.messages)
            return
        if message.type in (NLMSG_NOOP, NLMSG_OVERRUN):
            return
        if message.flags & NLM_F_DUMP_INTR and pending.dump:
            pending.future.set_exception(DumpInterrupted(f"{pending.command}: dump interrupted"))
            return
        # Every "do" request carries NLM_F_ACK, so its ack completes it.
        pending.messages.append(message)
