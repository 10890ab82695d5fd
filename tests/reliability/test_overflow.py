"""Overflow: both event sockets shrunk to 4 KiB (the test-only knob
MPTCPD_PY_TEST_EVENT_RCVBUF) and flooded, so the kernel drops events
(ENOBUFS). The daemon re-reads the kernel, converges to exactly what it
should, and keeps handling the events that come afterwards."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from reliability_lab import CONFIG_EXTRA, SERVER_ADDRESS, ChurnBox, figures

from mptcpd_py.lab import (
    Lab,
    close_connections,
    daemon_config,
    mptcp_listen,
    open_connections,
    wait_for,
)

RTNL_LOST = "rtnetlink events lost; re-reading the network"
MPTCP_LOST = "MPTCP events lost; resyncing"


def connections_in_status(d) -> int | None:  # type: ignore[no-untyped-def]
    """The connection count of the daemon's latest STATUS= line."""
    d.poll_notify()
    for message in reversed(d.messages):
        if message.startswith("STATUS=") and " connections" in message:
            return int(message.split(", ")[-1].split()[0])
    return None


def test_overflow_of_both_event_sockets_resyncs_converges_and_keeps_listening(
        lab: Lab, daemons, tmp_path: Path) -> None:
    seed = int(time.time())
    churn = ChurnBox(lab, seed=seed)
    box = churn.box
    # No periodic resync to hide behind: only the overflow handling can converge.
    cfg = daemon_config(str(tmp_path / "state"), reconcile_interval=3600, extra=CONFIG_EXTRA)
    d = daemons(box, cfg, env={"MPTCPD_PY_TEST_EVENT_RCVBUF": "4096",
                               "WATCHDOG_USEC": "100000"}).start()
    listener = mptcp_listen(churn.add_server(), SERVER_ADDRESS)

    def connection_burst() -> None:
        for _ in range(3):
            close_connections(open_connections(box, listener, SERVER_ADDRESS, 200))

    burst = threading.Thread(target=connection_burst)
    started = time.monotonic()
    burst.start()
    for _ in range(10):  # address bursts, each one ip -batch
        box.batch(churn.round(100).commands)
    last = churn.round(10, flap=False, keep=2)
    box.batch(last.commands)
    burst.join(timeout=60)
    assert not burst.is_alive()

    expected = churn.expected()
    wait_for(lambda: churn.observed() == expected, 10, interval=0.05,
             what=f"endpoints converged after the overflow (seed {seed})")
    converged = time.monotonic() - started
    churn.settle()  # and it was not a glimpse: nothing left to do
    assert churn.observed() == expected
    wait_for(lambda: connections_in_status(d) == 0, 10, interval=0.05,
             what="no connection left in the table")
    logs = d.logs()
    rtnl_lost = sum(1 for e in logs if e["event"] == RTNL_LOST)
    mptcp_lost = sum(1 for e in logs if e["event"] == MPTCP_LOST)
    assert rtnl_lost and mptcp_lost, "a 4 KiB buffer never overflowed: the test proves nothing"

    # Events after the overflow are still handled, without any resync.
    box.ip("addr", "add", "192.0.2.200/32", "dev", "eth0")
    added = time.monotonic()
    wait_for(lambda: "192.0.2.200" in churn.observed(), 2, what="endpoint for a new address")
    reaction = time.monotonic() - added
    pairs = open_connections(box, listener, SERVER_ADDRESS, 5)
    wait_for(lambda: connections_in_status(d) == 5, 5, what="5 connections in STATUS")
    close_connections(pairs)
    wait_for(lambda: connections_in_status(d) == 0, 5, what="0 connections in STATUS")
    listener.close()
    assert d.proc.poll() is None
    assert d.errors() == []
    assert d.stop() == 0
    figures("overflow", seed=seed, rtnl_overflows=rtnl_lost, mptcp_overflows=mptcp_lost,
            seconds_to_converge=round(converged, 3),
            new_address_to_endpoint_ms=round(reaction * 1000, 1))
