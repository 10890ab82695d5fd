"""Event streams under a burst: every event decoded, or the loss reported as
ResyncNeeded, and the stream keeps going (the C mptcpd goes deaf here)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from mptcpd_py.lab import Lab, Netns, TwoPaths, mptcp_listen
from mptcpd_py.netlink.mptcp import MptcpEvents
from mptcpd_py.netlink.rtnl import RtnlEvents
from mptcpd_py.netlink.types import (
    AddressEvent,
    ConnectionEvent,
    MptcpEventType,
    ResyncNeeded,
)


def open_and_close_connections(client: Netns, listener: socket.socket, count: int) -> None:
    """``count`` MPTCP connections, each connected, accepted and closed."""
    host, port = listener.getsockname()[:2]
    listener.settimeout(10)
    socks = []
    for _ in range(count):
        s = client.socket(listener.family)
        s.settimeout(10)
        s.connect((host, port))
        conn, _ = listener.accept()
        socks.extend((s, conn))
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


async def test_burst_of_1000_connections_is_fully_decoded(two_paths: TwoPaths) -> None:
    tp = two_paths
    events = await MptcpEvents.open(netns=tp.client.name)
    listener = mptcp_listen(tp.server, tp.server_addr(0))
    try:
        created = closed = resyncs = 0

        async def read() -> None:
            nonlocal created, closed, resyncs
            async for event in events:
                if isinstance(event, ResyncNeeded):
                    resyncs += 1
                elif event.type == MptcpEventType.CREATED:
                    created += 1
                elif event.type == MptcpEventType.CLOSED:
                    closed += 1
                if closed >= 1000:
                    return

        reader = asyncio.create_task(read())
        await asyncio.to_thread(open_and_close_connections, tp.client, listener, 1000)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), 20)
        reader.cancel()
        assert events.malformed == 0
        if resyncs == 0:
            assert (created, closed) == (1000, 1000)
        else:  # a loss is allowed only if it was reported
            assert created + closed < 2000
    finally:
        listener.close()
        events.close()


async def test_mptcp_overflow_becomes_resync_and_stream_goes_on(two_paths: TwoPaths) -> None:
    tp = two_paths
    events = await MptcpEvents.open(netns=tp.client.name)
    listener = mptcp_listen(tp.server, tp.server_addr(0))
    try:
        events.sock.set_rcvbuf(4096)
        events.sock.pause_reading()
        await asyncio.to_thread(open_and_close_connections, tp.client, listener, 300)
        events.sock.resume_reading()

        seen_resync = False
        async def until_resync() -> None:
            nonlocal seen_resync
            async for event in events:
                if isinstance(event, ResyncNeeded):
                    seen_resync = True
                    return
        await asyncio.wait_for(until_resync(), 10)
        assert seen_resync and events.sock.overflows >= 1

        # Drain what is left, then prove the stream still delivers.
        while events.get_nowait() is not None:
            pass
        await asyncio.to_thread(open_and_close_connections, tp.client, listener, 1)
        async def next_created() -> ConnectionEvent:
            async for event in events:
                if isinstance(event, ConnectionEvent) and event.type == MptcpEventType.CREATED:
                    return event
            raise AssertionError("stream ended")
        created = await asyncio.wait_for(next_created(), 5)
        assert created.token != 0
    finally:
        listener.close()
        events.close()


def overflowed_rtnl_events(lab: Lab) -> tuple[Netns, RtnlEvents]:
    """A namespace with eth0, and its rtnetlink stream after 200 address
    events hit a 4 KiB buffer nobody was reading."""
    ns = lab.netns("rt")
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    ns.ip("link", "set", "eth0", "up")
    events = RtnlEvents.open(netns=ns.name)
    events.sock.set_rcvbuf(4096)
    events.sock.pause_reading()
    ns.batch([f"address add 203.0.113.{i}/32 dev eth0" for i in range(1, 201)], force=False)
    events.sock.resume_reading()
    return ns, events


async def test_rtnl_overflow_becomes_resync_and_stream_goes_on(lab: Lab) -> None:
    ns, events = overflowed_rtnl_events(lab)
    try:

        async def until_resync() -> None:
            async for event in events:
                if isinstance(event, ResyncNeeded):
                    return
        await asyncio.wait_for(until_resync(), 10)
        while events.get_nowait() is not None:
            pass
        ns.ip("address", "add", "192.0.2.77/32", "dev", "eth0")

        async def next_address() -> AddressEvent:
            async for event in events:
                if isinstance(event, AddressEvent) and str(event.address.address) == "192.0.2.77":
                    return event
            raise AssertionError("stream ended")
        event = await asyncio.wait_for(next_address(), 5)
        assert not event.removed
    finally:
        events.close()


async def test_events_queued_before_a_resync_are_taken_off_the_stream(lab: Lab) -> None:
    """The kernel reports ENOBUFS before the messages it had queued: those
    reach the reader after the ResyncNeeded and predate the dump that
    follows. take_superseded() reads the socket dry and hands them over,
    so only events from then on come through the stream."""
    ns, events = overflowed_rtnl_events(lab)
    try:
        first = await asyncio.wait_for(events.__anext__(), 5)
        assert isinstance(first, ResyncNeeded)
        superseded = events.take_superseded()
        assert superseded and all(isinstance(e, AddressEvent) for e in superseded)
        assert events.get_nowait() is None
        ns.ip("address", "add", "192.0.2.77/32", "dev", "eth0")
        after = await asyncio.wait_for(events.__anext__(), 5)
        assert isinstance(after, AddressEvent)
        assert str(after.address.address) == "192.0.2.77"
    finally:
        events.close()
