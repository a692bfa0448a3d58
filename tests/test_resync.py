"""The periodic resync off the loop's thread (secfw.agent.resync): changes made
while the kernel is being read back are applied at once, tampering is still
repaired, and a check spoilt by the loop's own commits says nothing.

The background read is held on an Event, so "while the check runs" is a fact
of the test, not a matter of timing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_agent import HOST, Clock, CountingReconciler, FakeBackend, _tap

from secfw.agent import AgentLoop, LoopSettings
from secfw.agent.resync import ATTEMPTS, by_object, compare
from secfw.agent.storewatch import ReopeningStore
from secfw.api import Api
from secfw.backends.nftables.executor import loads_in_pieces
from secfw.backends.nftables.state import KernelState, SetState
from secfw.backends.nftables.syntax import Element
from secfw.config import Config
from secfw.store import open_store


@dataclass
class GatedBackend(FakeBackend):
    """A fake kernel whose background reads wait for ``gate`` (then read the
    kernel as it is at that moment), counting them."""

    gate: threading.Event = field(default_factory=threading.Event)
    background_reads: int = 0

    def reader(self) -> Any:
        def read() -> frozenset[str] | None:
            assert self.gate.wait(10), "the test never opened the gate"
            self.background_reads += 1
            return self.kernel
        return read


@dataclass
class Loop:
    api: Api
    backend: GatedBackend
    reconciler: CountingReconciler
    loop: AgentLoop
    clock: Clock

    def boot(self, name: str) -> None:
        """Boot ``name`` on the host; the loop's next step sees it (its store poll
        is due: the fake clock moves by one poll interval, as a real one would)."""
        self.api.boot("p", name, "m1.tiny", "cirros", HOST, None, ["net"])
        self.clock.now += self.loop.settings.poll_interval

    def resync_due(self) -> None:
        self.clock.now += 61

    def finish_check(self) -> None:
        """Wait for the running background check, then let the loop take its result."""
        self.loop.kernel_check.join(10)
        assert not self.loop.kernel_check.running
        self.loop.step()


@pytest.fixture
def gated(api: Api, store_url: str) -> Iterator[Loop]:
    api.net_create("p", "net", "10.0.0.0/24")
    api.image_create("admin", "cirros", "qcow2", "public")
    api.boot("p", "vm1", "m1.tiny", "cirros", HOST, None, ["net"])
    store = ReopeningStore(store_url)
    backend = GatedBackend()
    reconciler = CountingReconciler(store, HOST, Config(), backend)
    clock = Clock()
    loop = AgentLoop(reconciler, LoopSettings(resync_interval=60), clock=clock)
    yield Loop(api, backend, reconciler, loop, clock)
    backend.gate.set()
    loop.kernel_check.join(10)
    loop.wakeup.close()
    store.close()


def test_a_change_during_the_resync_is_applied_before_the_read_back_ends(gated: Loop) -> None:
    gated.loop.step()  # start: full
    gated.resync_due()
    gated.loop.step()
    assert gated.loop.kernel_check.running  # the read-back is held on the gate
    assert gated.reconciler.passes == [True, False]  # the resync's own pass is incremental
    gated.boot("vm2")
    gated.loop.step()
    assert f"port:{_tap(gated, 'vm2')}" in (gated.backend.kernel or ())
    assert gated.reconciler.passes == [True, False, False]
    assert gated.loop.kernel_check.running  # ... and still nothing read back
    gated.backend.gate.set()
    gated.finish_check()  # spoilt by the loop's commit: checked again
    gated.finish_check()
    assert gated.backend.background_reads == 2
    assert gated.reconciler.passes == [True, False, False]  # no full pass needed
    assert gated.loop.status.drift_repairs == 0
    assert gated.loop.status.last_kernel_check is not None


def test_tampering_during_the_resync_is_repaired_by_a_full_pass(gated: Loop) -> None:
    gated.loop.step()
    good = gated.backend.kernel
    assert good is not None
    gated.resync_due()
    gated.loop.step()
    assert gated.loop.kernel_check.running
    tampered = sorted(good)[0]
    gated.backend.kernel = good - {tampered}  # behind the agent's back, mid-check
    gated.backend.gate.set()
    gated.finish_check()
    assert gated.reconciler.passes == [True, False, True]  # the repair: a full pass
    assert gated.backend.kernel == good
    assert gated.loop.status.drift_repairs == 1
    assert gated.loop.status.last_drift is not None
    assert gated.loop.status.last_drift["changed"] == [f"+{tampered}"]


def test_checks_spoilt_again_and_again_end_in_a_full_pass(gated: Loop) -> None:
    gated.loop.step()
    gated.resync_due()
    gated.loop.step()
    for index in range(ATTEMPTS):
        gated.boot(f"busy{index}")  # a commit during every listing
        gated.loop.step()
        gated.backend.gate.set()
        gated.loop.kernel_check.join(10)
        gated.backend.gate.clear()
        gated.loop.step()  # takes the spoilt result: checks again, or gives up
    gated.backend.gate.set()
    assert gated.reconciler.passes[-1] is True
    assert gated.loop.status.drift_repairs == 0


def test_a_store_made_unreadable_is_noticed_by_the_resync(gated: Loop, store_url: str) -> None:
    gated.loop.step()
    path = Path(store_url.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as checkpoint:  # pages left in the WAL would mask the damage
        checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with path.open("r+b") as handle:
        handle.write(b"this is not a database".ljust(100, b"\0"))
    gated.resync_due()
    gated.loop.step()
    assert not gated.loop.status.healthy
    assert "store" in (gated.loop.status.last_error or ""), gated.loop.status.last_error
    assert gated.reconciler.passes == [True]  # the pass failed before it began


def test_compare_needs_the_epoch_to_hold_still(gated: Loop) -> None:
    gated.loop.step()
    assert compare(gated.reconciler, lambda: gated.backend.kernel) == "same"
    assert compare(gated.reconciler, lambda: frozenset()) == "differs"

    def listing_during_a_commit() -> frozenset[str] | None:
        gated.reconciler.invalidate()  # what every apply does first
        return gated.backend.kernel

    assert compare(gated.reconciler, listing_during_a_commit) == "void"


def test_without_a_reader_the_resync_is_a_full_pass(api: Api, store_url: str) -> None:
    api.net_create("p", "net", "10.0.0.0/24")
    store = open_store(store_url)
    reconciler = CountingReconciler(store, HOST, Config(), FakeBackend())
    clock = Clock()
    loop = AgentLoop(reconciler, LoopSettings(resync_interval=60), clock=clock)
    try:
        loop.step()
        clock.now += 61
        loop.step()
        assert reconciler.passes == [True, True]
        assert not loop.kernel_check.running
    finally:
        loop.wakeup.close()
        store.close()


def test_listing_decoded_in_pieces_equals_json_loads() -> None:
    """The background read-back decodes libnftables' listing object by object
    (executor.loads_in_pieces, so the loop's thread is not held for the whole
    document): same value as json.loads on the golden listings, and malformed
    text is refused."""
    listings = sorted((Path(__file__).parent / "golden").glob("*.listing.json"))
    assert listings
    for path in listings:
        text = path.read_text(encoding="utf-8")
        assert loads_in_pieces(text) == json.loads(text), path.name
    assert loads_in_pieces('{"nftables": []}') == {"nftables": []}
    for bad in ('{"nftables": [{"a": 1}', '{"nftables": [{"a": 1},]}',
                '{"nftables": [{"a": 1}]} x', '{"nftables": [,{"a": 1}]}',
                '{"nftables": [{"a": 1} {"b": 1}]}'):
        with pytest.raises(ValueError):
            loads_in_pieces(bad)


def _state(**sets: frozenset[str]) -> KernelState:
    """A KernelState of ifname sets named by the keywords (no chains)."""
    return KernelState(sets={("inet", name): SetState(("ifname",), (), False, frozenset(
        Element((tap,)) for tap in taps)) for name, taps in sets.items()}, chains={})


def test_a_check_spoilt_by_a_commit_compares_what_the_loop_left_alone() -> None:
    """by_object: the loop changed set b during the listing (b is another object
    in the reference after): b is not judged; a, untouched, is — tampered, it is
    drift; so is a set only the kernel has, and a table gone."""
    a, b = frozenset({"tap1"}), frozenset({"tap2"})
    before = _state(a=a, b=b)
    after = KernelState(sets={**before.sets, **_state(b=b | {"tap3"}).sets}, chains={})
    assert by_object(_state(a=a, b=b), before, after) == "same"  # b caught before the commit
    assert by_object(_state(a=a, b=b | {"tap3"}), before, after) == "same"
    assert by_object(_state(a=a | {"tapx"}, b=b), before, after) == "differs"
    assert by_object(_state(a=a, b=b, c=frozenset({"tapx"})), before, after) == "differs"
    assert by_object(None, before, after) == "differs"
    assert by_object(frozenset(), frozenset(), frozenset()) == "void"  # no objects to go by
