"""A bounded async event stream that turns loss into an explicit ResyncNeeded.

The kernel reports a full socket buffer as ENOBUFS; a consumer that falls
behind fills this queue. Both mean the same to the daemon: some events are
gone, so the state must be re-read from dumps. Neither ends the stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Generic, TypeVar

from mptcpd_py.netlink.types import ResyncNeeded

if TYPE_CHECKING:
    from mptcpd_py.netlink.socket import NetlinkSocket, RawMessage

T = TypeVar("T")

DEFAULT_MAX_QUEUED = 100_000


class EventStream(Generic[T]):
    """Async iterator of ``T | ResyncNeeded``; never raises because of loss."""

    def __init__(self, source: str, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        self.source = source
        self.max_queued = max_queued
        self.dropped = 0
        self.resyncs = 0
        self._items: deque[T | ResyncNeeded] = deque()
        self._lost_reason = ""
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: T) -> None:
        if len(self._items) >= self.max_queued:
            self.dropped += 1
            self._lost_reason = self._lost_reason or "event queue full"
            return
        if self._lost_reason:
            self._append_resync(self._lost_reason)
            self._lost_reason = ""
        self._items.append(item)
        self._wake()

    def overflow(self, reason: str = "ENOBUFS") -> None:
        """The kernel dropped messages: tell the consumer at this point in order."""
        self._lost_reason = ""
        self._append_resync(reason)
        self._wake()

    def _append_resync(self, reason: str) -> None:
        if self._items and isinstance(self._items[-1], ResyncNeeded):
            return  # consecutive losses collapse into one resync
        self.resyncs += 1
        self._items.append(ResyncNeeded(self.source, reason))

    def take_superseded(self) -> list[T]:
        """For a consumer about to re-read the kernel after a loss: read what
        the kernel still holds for this stream, and take every event queued
        so far off the stream.

        The kernel reports ENOBUFS *before* the messages it had queued
        before the drop, so those reach the consumer after the
        ResyncNeeded; applied on top of a fresh dump, they would bring
        back state the dump no longer has (an address deleted since, a
        connection closed since). Everything taken here predates the dump
        the consumer is about to take, which supersedes it (the consumer
        may still use what no dump shows); events from then on come
        through the stream as usual."""
        self._drain()
        items = [i for i in self._items if not isinstance(i, ResyncNeeded)]
        self._items.clear()
        self._lost_reason = ""
        return items

    def _drain(self) -> None:
        """Read the source dry (streams backed by a socket override this)."""

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def get_nowait(self) -> T | ResyncNeeded | None:
        if self._items:
            return self._items.popleft()
        if self._lost_reason:
            reason, self._lost_reason = self._lost_reason, ""
            self.resyncs += 1
            return ResyncNeeded(self.source, reason)
        return None

    def __aiter__(self) -> EventStream[T]:
        return self

    async def __anext__(self) -> T | ResyncNeeded:
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class MulticastStream(EventStream[T]):
    """An event stream fed by one netlink socket's multicast messages: the
    subclass decodes each (``_on_message``, ``push``); the socket's
    overflow, draining and closing are the stream's."""

    def __init__(self, source: str, sock: NetlinkSocket, max_queued: int) -> None:
        super().__init__(source, max_queued)
        self.sock = sock
        self.malformed = 0  # messages that did not decode, skipped
        sock.on_multicast = self._on_message
        sock.on_overflow = self.overflow

    def _on_message(self, raw: RawMessage) -> None:
        raise NotImplementedError

    def _drain(self) -> None:
        self.sock.drain()

    def close(self) -> None:
        super().close()
        self.sock.close()
