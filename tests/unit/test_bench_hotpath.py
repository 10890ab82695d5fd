"""bench/hotpath.py measures the real event path: each replayed connection
gets its one subflow from the second interface and leaves the table when
it closes (otherwise the figure it prints would be of something else)."""

from __future__ import annotations

import asyncio

import structlog

from bench.hotpath import measure


def test_every_replayed_connection_asks_for_one_subflow_and_is_gone_after() -> None:
    try:
        assert asyncio.run(measure(50, rounds=2)) == (100, 0)
    finally:
        structlog.reset_defaults()
