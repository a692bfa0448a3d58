"""GcSettler (agent/gcsettle.py): the agent's state is frozen out of the cyclic
collector's walks, and cyclic garbage among frozen objects is still freed by a
later settle — after a full pass, or after ``every`` other passes — so frozen
garbage stays bounded (counted in objects, not timed)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from secfw.agent.gcsettle import GcSettler
from secfw.agent.reconciler import SyncResult


class Node:
    """A cyclic object: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def _result(full: bool) -> SyncResult:
    return SyncResult(revision=1, full=full, commands=0, ports=0, seconds=0.0)


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def _frozen_cycle(settler: GcSettler) -> weakref.ref[Node]:
    """A cycle alive at a full pass's settle (so frozen), then dropped."""
    node = Node()
    settler.on_sync(_result(full=True))
    ref = weakref.ref(node)
    del node
    gc.collect()
    return ref


def test_a_full_pass_freezes_and_the_next_full_pass_frees_frozen_cycles() -> None:
    settler = GcSettler(every=1000)
    ref = _frozen_cycle(settler)
    assert gc.get_freeze_count() > 0
    assert ref() is not None  # frozen: an ordinary collection does not walk it
    settler.on_sync(_result(full=True))
    assert ref() is None


def test_every_nth_incremental_pass_settles() -> None:
    settler = GcSettler(every=3)
    ref = _frozen_cycle(settler)
    settler.on_sync(_result(full=False))
    settler.on_sync(_result(full=False))
    assert ref() is not None
    settler.on_sync(_result(full=False))
    assert ref() is None


def test_frozen_garbage_stays_bounded_over_many_passes() -> None:
    settler = GcSettler(every=5)
    settler.on_sync(_result(full=True))
    baseline = gc.get_freeze_count()
    per_pass = 500
    highest = 0
    kept: list[Node] = []
    for _ in range(60):
        kept = [Node() for _ in range(per_pass)]  # the previous pass's become garbage
        settler.on_sync(_result(full=False))
        highest = max(highest, gc.get_freeze_count() - baseline)
    del kept
    # One settle interval's objects at most (plus slack for the interpreter's own).
    assert highest <= 2 * per_pass + 200, highest


def test_on_stop_unfreezes() -> None:
    settler = GcSettler()
    settler.on_sync(_result(full=True))
    assert gc.get_freeze_count() > 0
    settler.on_stop(None)  # type: ignore[arg-type]
    assert gc.get_freeze_count() == 0
