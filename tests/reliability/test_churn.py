"""Churn: thousands of address adds and removals over several links, with
link flaps in between. Afterwards the kernel holds exactly the endpoints
it should (none leaked, none missing, the admin's untouched), the daemon
grew little, logged no error and is alive."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from reliability_lab import CONFIG_EXTRA, ChurnBox, figures, owned_in_state

from mptcpd_py.lab import Lab, daemon_config, rss_kib, wait_for

RSS_GROWTH_LIMIT_KIB = 5 * 1024
CHURN_TIME_LIMIT = 120.0


def churn_scenario(lab: Lab, daemons, tmp_path: Path, events: int,  # type: ignore[no-untyped-def]
                   time_limit: float = CHURN_TIME_LIMIT) -> None:
    seed = int(time.time())
    churn = ChurnBox(lab, seed=seed)
    state_dir = str(tmp_path / "state")
    d = daemons(churn.box, daemon_config(state_dir, extra=CONFIG_EXTRA)).start()
    rss_before = rss_kib(d.pid)

    started = time.monotonic()
    done = churn.run_rounds(events)
    generated = time.monotonic() - started
    expected = churn.expected()
    churn.settle(timeout=max(time_limit - generated, 5.0))
    wait_for(lambda: churn.observed() == expected, 5, interval=0.05,
             what=f"endpoints == expected (seed {seed})")
    total = time.monotonic() - started
    converged = total - generated

    assert total <= time_limit
    assert churn.source_rules() == churn.expected_source_rules()
    rss_after = rss_kib(d.pid)
    assert d.proc.poll() is None
    assert d.errors() == []
    logs = d.logs()
    ops = sum(1 for e in logs if e["event"] in ("endpoint added", "endpoint removed",
                                                "endpoint flags changed"))
    resyncs = sum(1 for e in logs if e["event"] == "rtnetlink events lost; re-reading the network")
    assert rss_after - rss_before <= RSS_GROWTH_LIMIT_KIB, (rss_before, rss_after)
    assert d.stop() == 0  # on_exit = remove: ours go, the admin's stay
    assert churn.observed() == {k: v for k, v in expected.items() if v[0] == "admin"}
    assert owned_in_state(state_dir) == {}
    figures("churn", seed=seed, events=done, seconds_generating=round(generated, 2),
            seconds_to_converge=round(converged, 3), seconds_total=round(total, 2),
            events_per_second=round(done / total), endpoint_operations=ops,
            rtnl_overflows=resyncs, rss_before_kib=rss_before, rss_after_kib=rss_after,
            rss_growth_kib=rss_after - rss_before)


def test_churn_of_1000_address_events_with_flaps_converges_exactly(
        lab: Lab, daemons, tmp_path: Path) -> None:
    churn_scenario(lab, daemons, tmp_path, 1000)


@pytest.mark.long
@pytest.mark.timeout(300)
def test_churn_of_10000_address_events_with_flaps_converges_exactly_within_2_minutes(
        lab: Lab, daemons, tmp_path: Path) -> None:
    churn_scenario(lab, daemons, tmp_path, 10_000)


@pytest.mark.long
@pytest.mark.timeout(600)
def test_churn_of_100000_address_events_still_grows_rss_by_at_most_5_mib(
        lab: Lab, daemons, tmp_path: Path) -> None:
    """Ten times the 10,000: the growth levels off (caches fill, then stop),
    it is not a leak proportional to the events."""
    churn_scenario(lab, daemons, tmp_path, 100_000, time_limit=10 * CHURN_TIME_LIMIT)
