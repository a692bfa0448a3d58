"""The allocation records' arithmetic (secfw.store.indexes): runs of used
addresses moved by removals and additions equal the runs of the moved set."""

from __future__ import annotations

import random

from secfw.store.indexes import move_runs, past_runs, runs_contain, runs_of


def test_runs_follow_random_moves_as_the_sets_do() -> None:
    rng = random.Random(13)
    used: set[int] = set()
    runs = runs_of(used)
    for _ in range(400):
        removed = set(rng.sample(sorted(used), min(len(used), rng.randrange(4))))
        added = {rng.randrange(64) for _ in range(rng.randrange(4))} - removed
        runs = move_runs(runs, removed, added)
        used = (used - removed) | added
        assert runs == runs_of(used)
        for number in range(66):
            assert runs_contain(runs, number) == (number in used)
            assert past_runs(runs, number) == min(n for n in range(number, 70) if n not in used)


def test_runs_stay_few_for_addresses_handed_out_in_order() -> None:
    assert runs_of(range(2, 50_002)) == [[2, 50_001]]
    assert move_runs([[2, 9]], {5}, {10}) == [[2, 4], [6, 10]]
