"""bench/stage_probe.py counts a stage's own CPU time: a coroutine's steps,
not what the loop ran while it waited; a step that raises counts too."""

from __future__ import annotations

import asyncio
import inspect
import signal
import time

import pytest

from bench import stage_probe

MS = 1_000_000


def burn(ms: float) -> None:
    end = time.thread_time_ns() + int(ms * MS)
    while time.thread_time_ns() < end:
        pass


class Work:
    def plain(self, ms: float) -> str:
        burn(ms)
        return "plain done"

    async def waits(self, gate: asyncio.Event) -> int:
        burn(3)
        await gate.wait()  # meanwhile another task burns 30 ms
        burn(3)
        return 42

    async def fails(self) -> None:
        burn(5)
        raise ValueError("refused")


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stage_probe, "_time", {})
    monkeypatch.setattr(stage_probe, "_calls", {})
    monkeypatch.setattr(stage_probe, "_started", [0])
    for method in ("plain", "waits", "fails"):
        monkeypatch.setattr(Work, method, getattr(Work, method))  # put back afterwards
        stage_probe.wrap(Work, method, method)
    Work().plain(20)
    stage_probe._on_signal(signal.SIGUSR2, None)  # counting starts: the 20 ms are forgotten


@pytest.mark.usefixtures("probe")
def test_each_stage_counts_its_own_cpu_time_only() -> None:
    work = Work()
    assert inspect.iscoroutinefunction(Work.waits)
    assert work.plain(5) == "plain done"

    async def scenario() -> int:
        gate = asyncio.Event()
        waiting = asyncio.create_task(work.waits(gate))
        await asyncio.sleep(0)
        burn(30)
        gate.set()
        with pytest.raises(ValueError, match="refused"):
            await work.fails()
        return await waiting

    assert asyncio.run(scenario()) == 42
    spent = {k: v / MS for k, v in stage_probe._time.items()}
    assert 5 <= spent["plain"] < 15
    assert 6 <= spent["waits"] < 20  # not the 30 ms burnt while it waited
    assert 5 <= spent["fails"] < 15
    assert stage_probe._calls == {"plain": 1, "waits": 1, "fails": 1}
