"""Loop supervision: a crash is logged and the loop restarts after its state
is recovered; a loop that keeps crashing is fatal (the daemon exits and
systemd restarts it)."""

from __future__ import annotations

import pytest
from recording_log import RecordingLog as Log

from mptcpd_py import supervise as sv


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sv, "FIRST_BACKOFF", 0.0)


async def test_a_crashed_loop_is_logged_recovered_and_restarted() -> None:
    log, steps, fatal = Log(), [], []

    async def run() -> None:
        steps.append("run")
        if steps.count("run") == 1:
            raise TypeError("'<' not supported between instances of 'int' and 'tuple'")

    async def recover() -> None:
        steps.append("recover")

    await sv.supervise("rtnl", run, recover, log, fatal.append)
    assert steps == ["run", "recover", "run"]
    assert fatal == []
    (level, event, fields), = log.lines
    assert (level, event, fields["loop"]) == ("error", "event loop crashed; restarting it",
                                              "rtnl")
    assert "TypeError" in fields["error"]


async def test_a_loop_that_keeps_crashing_is_fatal() -> None:
    log, fatal, crashes = Log(), [], []

    async def run() -> None:
        raise RuntimeError("wedged")

    async def recover() -> None:
        return None

    await sv.supervise("mptcp", run, recover, log, fatal.append, on_crash=crashes.append)
    assert len(crashes) == sv.CRASH_LIMIT
    assert fatal == [f"mptcp loop crashed {sv.CRASH_LIMIT} times within "
                     f"{sv.CRASH_WINDOW:g}s, last: RuntimeError: wedged"]
    assert log.lines[-1][1] == "event loop keeps crashing; stopping the daemon"


async def test_a_failing_recovery_counts_as_a_crash_and_is_retried() -> None:
    log, fatal, attempts = Log(), [], []

    async def run() -> None:
        attempts.append("run")
        if len(attempts) == 1:
            raise OSError("socket gone")

    async def recover() -> None:
        attempts.append("recover")
        if attempts.count("recover") == 1:
            raise OSError("dump interrupted")

    await sv.supervise("rtnl", run, recover, log, fatal.append)
    assert attempts == ["run", "recover", "recover", "run"]
    assert fatal == []
