"""The latency log behind `ctl status` and the Prometheus histogram: a
window for percentiles, cumulative buckets that never lose a sample."""

from __future__ import annotations

from mptcpd_py.core import LATENCY_BUCKETS, LatencyLog


def test_buckets_count_every_sample_even_past_the_window() -> None:
    log = LatencyLog(maxlen=4)
    for seconds in (0.00005, 0.0001, 0.0003, 5.0, 0.0003, 0.0003):
        log.append(seconds)
    assert len(log) == 4 and log.observed == 6
    assert round(log.total_seconds, 6) == 5.00105
    assert len(log.buckets) == len(LATENCY_BUCKETS) + 1
    # upper bounds are inclusive (Prometheus "le"), the last bucket is +Inf
    assert log.buckets[0] == 2 and log.buckets[2] == 3 and log.buckets[-1] == 1
    assert sum(log.buckets) == 6
