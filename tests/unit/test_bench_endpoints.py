"""bench/endpoints.py: the rounds in which the subjects take turns add up
to what one long run would have measured."""

from __future__ import annotations

from bench.endpoints import Timings


def test_rounds_merge_into_one_set_of_cycles_with_cpu_weighted_by_cycles() -> None:
    total = Timings()
    total.merge(Timings(add=[1.0, 2.0, 3.0], delete=[4.0, 5.0, 6.0], cpu_per_cycle=1.0,
                        cpu_add=1.5, cpu_delete=1.5, failures=1))
    total.merge(Timings(add=[7.0], delete=[8.0], cpu_per_cycle=2.0, cpu_add=0.5, cpu_delete=1.5))
    assert total.add == [1.0, 2.0, 3.0, 7.0] and total.delete == [4.0, 5.0, 6.0, 8.0]
    assert total.cpu_per_cycle == (3 * 1.0 + 1 * 2.0) / 4
    assert (total.cpu_add, total.cpu_delete, total.failures) == (2.0, 3.0, 1)
    floor = Timings()  # no daemon: no CPU figure, in any round
    floor.merge(Timings(add=[1.0], delete=[2.0]))
    floor.merge(Timings(add=[3.0], delete=[4.0]))
    assert floor.cpu_per_cycle is None and floor.add == [1.0, 3.0]
