"""Crash and restart: SIGKILL at random moments while addresses churn,
then start again. Every restart converges to exactly the endpoints it
should, never duplicates one, and never takes the admin's endpoints for
its own (not in the kernel, not in the state file)."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
from reliability_lab import (
    CONFIG_EXTRA,
    FOREIGN,
    BackgroundChurn,
    ChurnBox,
    figures,
    owned_in_state,
    state_files,
)

from mptcpd_py.lab import Lab, daemon_config, wait_for


def assert_state_file_sane(state_dir: str, churn: ChurnBox) -> dict[str, int]:
    """Owned records: no foreign endpoint, no address or id twice."""
    owned = owned_in_state(state_dir)
    for ep in FOREIGN:
        assert owned.get(ep["address"]) is None, \
            f"admin endpoint {ep['address']} owned: {state_files(state_dir)}"
        assert ep["id"] not in owned.values(), f"admin id {ep['id']} owned: {owned}"
    assert len(set(owned.values())) == len(owned), f"an id owned twice: {owned}"
    snapshot = os.path.join(state_dir, "state.json")
    if os.path.exists(snapshot):
        with open(snapshot) as f:
            records = json.load(f)["endpoints"]
        addresses = [r["address"] for r in records]
        assert len(set(addresses)) == len(addresses), f"an address twice: {records}"
    return owned


def crash_scenario(lab: Lab, daemons, tmp_path: Path, cycles: int) -> None:  # type: ignore[no-untyped-def]
    seed = int(time.time())
    rng = random.Random(seed)
    churn = ChurnBox(lab, seed=seed)
    state_dir = str(tmp_path / "state")
    d = daemons(churn.box, daemon_config(state_dir, extra=CONFIG_EXTRA))
    expected = churn.expected()
    convergence: list[float] = []
    ready: list[float] = []
    kills_mid_operation = 0
    background = BackgroundChurn(churn).start()
    try:
        for cycle in range(cycles):
            d.start()
            # A random moment: after 0-60 more churn batches.
            target = background.batches + rng.randint(0, 60)
            wait_for(lambda t=target, b=background: b.batches >= t or b.error, 30,
                     what="churn progress")
            d.kill()
            owned = assert_state_file_sane(state_dir, churn)
            in_kernel = {a: i for a, i in churn.endpoint_ids().items()
                         if a not in {ep["address"] for ep in FOREIGN}}
            # Journaled before the add: nothing in the kernel goes unrecorded.
            assert {a: owned.get(a) for a in in_kernel} == in_kernel, (owned, in_kernel)
            kills_mid_operation += owned != in_kernel

            # Restart while the churn goes on, then let the network settle.
            d.start()
            ready.append(d.wait_notify("READY=1"))
            background.stop()
            settled = time.monotonic()
            churn.settle()
            wait_for(lambda: churn.observed() == expected, 5, interval=0.05,
                     what=f"cycle {cycle} (seed {seed}): endpoints == expected")
            convergence.append(time.monotonic() - settled)
            ids = churn.endpoint_ids()
            for ep in FOREIGN:
                assert ids[ep["address"]] == ep["id"]

            # Killed when there is nothing to do: the next one adopts it all.
            d.kill()
            assert_state_file_sane(state_dir, churn)
            d.start()
            churn.settle()
            assert churn.endpoint_ids() == ids, "re-created instead of adopted"
            assert churn.source_rules() == churn.expected_source_rules()
            d.kill()
            background = BackgroundChurn(churn).start()
    finally:
        background.stop()
    d.start()
    churn.settle()
    assert churn.observed() == expected
    assert d.stop() == 0
    assert churn.observed() == {k: v for k, v in expected.items() if v[0] == "admin"}
    assert owned_in_state(state_dir) == {}
    errors = d.errors()
    assert errors == [], errors[:5]
    figures("crash_restart", seed=seed, cycles=cycles, restarts=3 * cycles + 1,
            kills_with_an_endpoint_in_flight=kills_mid_operation,
            restart_to_ready_s_max=round(max(ready), 3),
            restart_to_ready_s_median=round(sorted(ready)[len(ready) // 2], 3),
            settled_after_churn_stops_s_max=round(max(convergence), 3),
            settled_after_churn_stops_s_median=round(sorted(convergence)[len(convergence) // 2],
                                                     3))


def test_sigkill_during_churn_3_times_always_converges_without_adopting_foreign(
        lab: Lab, daemons, tmp_path: Path) -> None:
    crash_scenario(lab, daemons, tmp_path, 3)


@pytest.mark.long
@pytest.mark.timeout(600)
def test_sigkill_during_churn_20_times_always_converges_without_adopting_foreign(
        lab: Lab, daemons, tmp_path: Path) -> None:
    crash_scenario(lab, daemons, tmp_path, 20)
