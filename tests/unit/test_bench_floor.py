"""The latency floor the benchmark derives from the kernel's time per
SUBFLOW_CREATE: a single queue in front of calls of measured length."""

from __future__ import annotations

import pytest

from bench.userspace import serial_floor


def test_a_call_that_finds_the_responder_idle_takes_only_its_own_time() -> None:
    assert serial_floor([0, 100, 200], [30, 40, 50]) == [30e-9, 40e-9, 50e-9]


def test_arrivals_faster_than_the_calls_wait_for_the_calls_before_them() -> None:
    # Calls end at 15, 30, 45: each ESTABLISHED waits for the ones before it.
    assert serial_floor([0, 10, 20], [15, 15, 15]) == [15e-9, 20e-9, 25e-9]


def test_arrivals_are_served_in_the_order_they_came() -> None:
    assert serial_floor([20, 0, 10], [15, 15, 15]) == [15e-9, 20e-9, 25e-9]


def test_a_burst_without_one_call_per_connection_has_no_floor() -> None:
    with pytest.raises(ValueError):
        serial_floor([0, 10], [15])
