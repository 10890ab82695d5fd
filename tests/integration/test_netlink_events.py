"""MPTCP events and userspace-PM commands with live connections across two
namespaces, IPv4 and IPv6."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

import pytest

from mptcpd_py.errors import InvalidArgument, NoSuchSubflow, NotConnected
from mptcpd_py.lab import TwoPaths, mptcp_connect, mptcp_listen
from mptcpd_py.netlink.mptcp import MptcpEvents, MptcpPM
from mptcpd_py.netlink.types import (
    AddressAnnounced,
    AddressRemoved,
    ConnectionClosed,
    ConnectionEvent,
    EndpointFlags,
    ListenerEvent,
    MptcpEventType,
    ResyncNeeded,
    SubflowEvent,
)

A = ipaddress.ip_address
T = MptcpEventType


async def next_event(stream: MptcpEvents, match: Callable[[Any], bool], timeout: float = 5.0,
                     ) -> Any:
    """Consume events until one matches (ResyncNeeded fails the test)."""
    async def scan() -> Any:
        async for event in stream:
            assert not isinstance(event, ResyncNeeded), event
            if match(event):
                return event
        raise AssertionError("stream ended")
    return await asyncio.wait_for(scan(), timeout)


def is_type(kind: MptcpEventType) -> Callable[[Any], bool]:
    return lambda e: getattr(e, "type", None) == kind


@pytest.mark.parametrize("version", [4, 6])
async def test_in_kernel_pm_emits_connection_subflow_and_listener_events(
    two_paths: TwoPaths, version: int
) -> None:
    tp = two_paths
    client_events = await MptcpEvents.open(netns=tp.client.name)
    server_events = await MptcpEvents.open(netns=tp.server.name)
    pm = await MptcpPM.open(netns=tp.client.name)
    try:
        second = A(tp.client_addr(1, version))
        await pm.add_endpoint(second, EndpointFlags.SUBFLOW, id=9)
        listener = mptcp_listen(tp.server, tp.server_addr(0, version))
        port = listener.getsockname()[1]
        created_listener = await next_event(server_events, is_type(T.LISTENER_CREATED))
        assert isinstance(created_listener, ListenerEvent)
        assert created_listener.sport == port
        assert created_listener.saddr == A(tp.server_addr(0, version))

        pair = mptcp_connect(tp.client, listener)
        created = await next_event(client_events, is_type(T.CREATED))
        assert isinstance(created, ConnectionEvent) and not created.server_side
        assert created.saddr == A(tp.client_addr(0, version))
        assert created.daddr == A(tp.server_addr(0, version))
        assert created.dport == port and created.sport == pair.client.getsockname()[1]
        pair.server.sendall(b"hello")  # the client's ESTABLISHED waits for peer data
        established = await next_event(client_events, is_type(T.ESTABLISHED))
        assert established.token == created.token
        sub = await next_event(client_events, is_type(T.SUB_ESTABLISHED))
        assert isinstance(sub, SubflowEvent)
        assert (sub.token, sub.saddr, sub.local_id) == (created.token, second, 9)
        assert sub.daddr == A(tp.server_addr(0, version)) and sub.dport == port
        assert sub.ifindex == 0 and not sub.backup  # no dev on the endpoint: unbound subflow

        server_created = await next_event(server_events, is_type(T.CREATED))
        assert server_created.server_side

        pair.close()
        closed = await next_event(client_events, is_type(T.CLOSED))
        assert isinstance(closed, ConnectionClosed) and closed.token == created.token
        await next_event(server_events, is_type(T.LISTENER_CLOSED))
    finally:
        pm.close()
        client_events.close()
        server_events.close()


@pytest.mark.parametrize("version", [4, 6])
async def test_userspace_pm_subflows_announce_remove_and_priority(
    two_paths: TwoPaths, version: int
) -> None:
    tp = two_paths
    tp.client.sysctl("net.mptcp.path_manager", "userspace")
    client_events = await MptcpEvents.open(netns=tp.client.name)
    server_events = await MptcpEvents.open(netns=tp.server.name)
    pm = await MptcpPM.open(netns=tp.client.name)
    pair = None
    try:
        server_addr = A(tp.server_addr(0, version))
        extra = A(tp.client_addr(1, version))
        listener = mptcp_listen(tp.server, str(server_addr))
        port = listener.getsockname()[1]
        pair = mptcp_connect(tp.client, listener)
        created = await next_event(client_events, is_type(T.CREATED))
        token = created.token

        with pytest.raises(NotConnected, match="not ready"):  # before ESTABLISHED
            await pm.subflow_create(token, extra, 5, server_addr, port)

        pair.server.sendall(b"x")
        await next_event(client_events, is_type(T.ESTABLISHED))

        await pm.subflow_create(token, extra, 5, server_addr, port)
        sub = await next_event(client_events, is_type(T.SUB_ESTABLISHED))
        assert (sub.saddr, sub.local_id, sub.daddr, sub.dport) == (extra, 5, server_addr, port)
        locals_ = await pm.endpoints(token=token)
        assert any(e.address == extra and e.id == 5 for e in locals_)
        assert (await pm.get_endpoint(5, token=token)).address == extra

        # MP_PRIO: the peer reports SUB_PRIORITY for the subflow it now sees as backup.
        await pm.set_subflow_backup(token, extra, server_addr, True)
        prio = await next_event(server_events, is_type(T.SUB_PRIORITY))
        assert isinstance(prio, SubflowEvent) and prio.backup and prio.daddr == extra

        await pm.subflow_destroy(token, extra, sub.sport, server_addr, port)
        gone = await next_event(client_events, is_type(T.SUB_CLOSED))
        assert (gone.saddr, gone.sport) == (extra, sub.sport)

        await pm.announce(token, extra, 6)
        announced = await next_event(server_events, is_type(T.ANNOUNCED))
        assert isinstance(announced, AddressAnnounced)
        assert (announced.remote_id, announced.daddr) == (6, extra)
        await pm.remove(token, 6)
        removed = await next_event(server_events, is_type(T.REMOVED))
        assert isinstance(removed, AddressRemoved) and removed.remote_id == 6

        with pytest.raises(InvalidArgument):
            await pm.announce(token, extra, 0)  # id 0 is the initial subflow's
        with pytest.raises(InvalidArgument):
            await pm.subflow_create(token ^ 0xFFFF, extra, 5, server_addr, port)
        with pytest.raises(NoSuchSubflow):
            await pm.subflow_destroy(token, extra, 1, server_addr, port)
    finally:
        if pair is not None:
            pair.close()
        pm.close()
        client_events.close()
        server_events.close()


async def test_dual_stack_socket_events_carry_ipv4_and_commands_take_it(
    two_paths: TwoPaths,
) -> None:
    """An AF_INET6 client socket reaching an IPv4 server (::ffff:192.0.2.2):
    the kernel reports the connection and its initial subflow v4-mapped
    (MPTCP_ATTR_FAMILY AF_INET6, the *6 attributes); the events say plain
    IPv4, and every userspace-PM command takes the addresses as the events
    give them, including SUBFLOW_DESTROY of that AF_INET6 initial subflow."""
    tp = two_paths
    tp.client.sysctl("net.mptcp.path_manager", "userspace")
    client_events = await MptcpEvents.open(netns=tp.client.name)
    server_events = await MptcpEvents.open(netns=tp.server.name)
    pm = await MptcpPM.open(netns=tp.client.name)
    pair = None
    try:
        server_addr, client_addr = A(tp.server_addr(0)), A(tp.client_addr(0))
        extra = A(tp.client_addr(1))
        listener = mptcp_listen(tp.server, str(server_addr))
        port = listener.getsockname()[1]
        pair = mptcp_connect(tp.client, listener, dual_stack=True)
        assert pair.client.family == socket.AF_INET6
        created = await next_event(client_events, is_type(T.CREATED))
        assert (created.saddr, created.daddr) == (client_addr, server_addr)
        assert created.saddr.version == created.daddr.version == 4
        pair.server.sendall(b"x")
        established = await next_event(client_events, is_type(T.ESTABLISHED))
        assert (established.saddr, established.daddr) == (client_addr, server_addr)

        await pm.subflow_create(created.token, extra, 5, server_addr, port)
        sub = await next_event(client_events, is_type(T.SUB_ESTABLISHED))
        assert (sub.saddr, sub.daddr, sub.local_id) == (extra, server_addr, 5)
        await pm.set_subflow_backup(created.token, client_addr, server_addr, True)
        prio = await next_event(server_events, lambda e: getattr(e, "type", None)
                                == T.SUB_PRIORITY and e.remote_id == 0)
        assert prio.backup
        await pm.subflow_destroy(created.token, client_addr, created.sport, server_addr, port)
        gone = await next_event(client_events, is_type(T.SUB_CLOSED))
        assert (gone.saddr, gone.sport, gone.daddr) == (client_addr, created.sport, server_addr)
        with pytest.raises(NoSuchSubflow):  # still told, when neither form is there
            await pm.subflow_destroy(created.token, client_addr, 1, server_addr, port)
        await pm.announce(created.token, extra, 5)  # the id its subflow gave it
        announced = await next_event(server_events, is_type(T.ANNOUNCED))
        assert (announced.remote_id, announced.daddr) == (5, extra)
    finally:
        if pair is not None:
            pair.close()
        pm.close()
        client_events.close()
        server_events.close()
