"""The metrics listener: GET /metrics answered in the format asked for,
anything else refused briefly, a client that sends nothing cut off."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from mptcpd_py import metrics
from mptcpd_py.logging import get_logger
from mptcpd_py.metrics import MetricsListener, exposition


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_get_metrics_and_refusals() -> None:
    accepts: list[str] = []

    async def scrape(accept: str) -> tuple[bytes, str]:
        accepts.append(accept)
        return exposition([], accept)

    port = free_port()
    listener = MetricsListener(f"127.0.0.1:{port}", scrape, get_logger())
    await listener.start()
    try:
        ok = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = ok.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        assert b"process_resident_memory_bytes" in body
        assert f"Content-Length: {len(body)}".encode() in head

        open_metrics = await exchange(
            port, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; "
                  b"version=1.0.0\r\n\r\n")
        assert b"Content-Type: application/openmetrics-text" in open_metrics
        assert open_metrics.rstrip().endswith(b"# EOF")
        assert accepts[-1].startswith("application/openmetrics-text")

        assert (await exchange(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 405 ")
        assert (await exchange(port, b"GET /secrets HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 404 ")
        assert (await exchange(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        # A request head larger than 8 KiB is not read to its end.
        assert await exchange(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n") == b""
        head_only = await exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head_only.endswith(b"\r\n\r\n")
    finally:
        await listener.close()


async def test_a_client_that_sends_nothing_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:


    monkeypatch.setattr(metrics, "HTTP_TIMEOUT", 0.3)

    async def scrape(accept: str) -> tuple[bytes, str]:
        return b"", "text/plain"

    port = free_port()
    listener = MetricsListener(f"127.0.0.1:{port}", scrape, get_logger())
    await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
    finally:
        await listener.close()
