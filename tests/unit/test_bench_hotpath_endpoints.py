"""bench/hotpath_endpoints.py measures the real address path: every replayed
add makes an endpoint and every delete removes it again (otherwise the
figure it prints would be of something else)."""

from __future__ import annotations

import asyncio
import ipaddress

import structlog

from bench import hotpath_endpoints
from bench.hotpath_endpoints import AnsweringPM, measure


def test_every_replayed_address_gets_an_endpoint_that_its_delete_removes(monkeypatch) -> None:
    adds: list[ipaddress.IPv4Address] = []
    real_add = AnsweringPM.add_endpoint

    async def counting_add(self, address, *args, **kwargs):  # type: ignore[no-untyped-def]
        adds.append(address)
        return await real_add(self, address, *args, **kwargs)

    monkeypatch.setattr(hotpath_endpoints.AnsweringPM, "add_endpoint", counting_add)
    try:
        assert asyncio.run(measure(40, rounds=2)) == 0
    finally:
        structlog.reset_defaults()
    assert len(adds) == 80
    assert adds[:2] == [ipaddress.IPv4Address("203.0.113.10"),
                        ipaddress.IPv4Address("203.0.113.11")]
