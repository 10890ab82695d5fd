"""Two tbf-shaped paths, nothing configured by hand but links, addresses and
default routes: one MPTCP transfer through the daemon's endpoints and
source routes uses both."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mptcpd_py.lab import (
    BulkTransfer,
    Lab,
    LabError,
    TwoPaths,
    daemon_config,
    mptcp_connect,
    mptcp_listen,
    shape,
    wait_for,
)

RATE = 50.0  # Mbit/s per path


def test_two_shaped_paths_reach_ninety_percent_of_the_sum(
        lab: Lab, daemons, tmp_path: Path) -> None:
    tp = TwoPaths(lab)
    for ifname in tp.ifnames:
        shape(tp.client, ifname, RATE)
    d = daemons(tp.client, daemon_config(str(tmp_path / "state"))).start()
    wait_for(lambda: len(tp.client.endpoints()) >= 2, what="endpoints")
    transfer = BulkTransfer(tp.client, tp.server, tp.server_addr(0)).start()
    try:
        time.sleep(1.5)  # slow start on both subflows
        before, t0 = transfer.received, time.monotonic()
        tx0 = [tp.client.link_bytes(i)[1] for i in tp.ifnames]
        time.sleep(4.0)
        mbit = (transfer.received - before) * 8 / (time.monotonic() - t0) / 1e6
        per_path = [(tp.client.link_bytes(i)[1] - b) * 8 / 4.0 / 1e6
                    for i, b in zip(tp.ifnames, tx0, strict=True)]
        algorithms = [line.split()[0] for line in tp.client.run("ss", "-tinH").splitlines()
                      if line.startswith(("\t", " "))]
    finally:
        transfer.stop()
    print(f"throughput {mbit:.1f} Mbit/s, per path {per_path}")
    # Every subflow, the joined ones too, uses the transfer's congestion control.
    assert algorithms.count(BulkTransfer.CONGESTION) >= 2, algorithms
    assert set(algorithms) == {BulkTransfer.CONGESTION}, algorithms
    assert transfer.error is None, transfer.error
    assert all(p > 0.6 * RATE for p in per_path), per_path
    assert mbit >= 0.9 * 2 * RATE, f"{mbit:.1f} Mbit/s over two {RATE} Mbit/s paths {per_path}"
    assert d.stop() == 0


def test_an_unknown_congestion_control_is_a_lab_error_naming_it(two_paths: TwoPaths) -> None:
    listener = mptcp_listen(two_paths.server, "0.0.0.0")
    try:
        with pytest.raises(LabError, match="'no-such-cc' not usable"):
            mptcp_connect(two_paths.client, listener, address=two_paths.server_addr(0),
                          congestion="no-such-cc")
    finally:
        listener.close()
