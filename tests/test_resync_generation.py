"""The resync's kernel check without a read-back (secfw.agent.resync, the
nftables generation): skipped while the generation has not moved since the
kernel held what the loop committed, never when someone else committed — even
when the loop's own commit followed (the chain must be unbroken).

A fake kernel with a generation counter: every commit bumps it, ours (with the
generations read around it, as the nftables executor reports them) and someone
else's (``foreign``). Its background reads are counted, so "skipped" is a fact
of the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from test_agent import HOST, Clock, CountingReconciler
from test_resync import GatedBackend

from secfw.agent import AgentLoop, LoopSettings
from secfw.agent.storewatch import ReopeningStore
from secfw.api import Api
from secfw.config import Config


@dataclass
class GenerationBackend(GatedBackend):
    """A fake kernel whose every commit bumps ``gen``."""

    gen: int = 1
    last_commit: tuple[int, int] | None = None

    def generation(self) -> Callable[[], int | None]:
        return lambda: self.gen

    def apply(self, plan: Any) -> None:
        """Apply the plan's difference only (as nft does): what someone else
        added and the plan does not name stays."""
        before, kernel = self.gen, self.kernel
        super().apply(plan)
        if kernel is not None and "replace" not in plan.commands:
            added = {c[1:] for c in plan.commands if c.startswith("+")}
            removed = {c[1:] for c in plan.commands if c.startswith("-")}
            self.kernel = (kernel - removed) | added
        self.gen += 1
        self.last_commit = (before, self.gen)

    def foreign(self, fact: str | None = None) -> None:
        """Someone else commits: adds ``fact`` to secfw's table, or touches
        only a table of their own (None)."""
        if fact is not None and self.kernel is not None:
            self.kernel = self.kernel | {fact}
        self.gen += 1


@dataclass
class Setup:
    api: Api
    backend: GenerationBackend
    loop: AgentLoop
    clock: Clock

    def check(self) -> str:
        """Run one periodic kernel check to its end; its outcome."""
        self.clock.now += 61
        self.loop.step()
        self.loop.kernel_check.join(10)
        assert not self.loop.kernel_check.running
        outcomes: list[str] = []
        real = self.loop._checked
        self.loop._checked = lambda result: (outcomes.append(result.outcome),  # type: ignore
                                             real(result))[1]
        self.loop.step()
        self.loop._checked = real  # type: ignore[method-assign]
        return outcomes[0]


@pytest.fixture
def setup(api: Api, store_url: str) -> Iterator[Setup]:
    api.net_create("p", "net", "10.0.0.0/24")
    api.image_create("admin", "cirros", "qcow2", "public")
    api.boot("p", "vm1", "m1.tiny", "cirros", HOST, None, ["net"])
    store = ReopeningStore(store_url)
    backend = GenerationBackend()
    backend.gate.set()
    reconciler = CountingReconciler(store, HOST, Config(), backend)
    clock = Clock()
    loop = AgentLoop(reconciler, LoopSettings(resync_interval=60), clock=clock)
    loop.step()  # the first (full) pass
    yield Setup(api, backend, loop, clock)
    loop.kernel_check.join(10)
    loop.wakeup.close()
    store.close()


def test_nothing_committed_since_the_check_reads_nothing_back(setup: Setup) -> None:
    reads = setup.backend.background_reads
    assert setup.check() == "unchanged"
    assert setup.check() == "unchanged"
    assert setup.backend.background_reads == reads
    assert (setup.loop.status.kernel_checks, setup.loop.status.kernel_checks_skipped) == (2, 2)


def test_a_commit_of_the_loop_keeps_the_chain(setup: Setup) -> None:
    setup.api.boot("p", "vm2", "m1.tiny", "cirros", HOST, None, ["net"])
    setup.loop.step()  # an incremental pass commits: the generation moves by one, ours
    assert setup.check() == "unchanged"
    assert setup.backend.background_reads == 0


def test_tampering_is_read_back_and_repaired(setup: Setup) -> None:
    setup.backend.foreign("tampered")
    assert setup.check() == "differs"
    setup.loop.step()  # the full pass it asked for
    assert "tampered" not in (setup.backend.kernel or ())
    assert setup.loop.status.drift_repairs == 1
    reads = setup.backend.background_reads
    assert setup.check() == "unchanged"  # the repair's commit continues the chain
    assert setup.backend.background_reads == reads


def test_tampering_followed_by_a_commit_of_the_loop_is_still_found(setup: Setup) -> None:
    """Someone commits, then the loop commits (exactly one generation during
    its own transaction): the loop's commit must not be taken to vouch for the
    kernel — what came before it was never seen."""
    setup.backend.foreign("tampered")
    setup.api.boot("p", "vm2", "m1.tiny", "cirros", HOST, None, ["net"])
    setup.loop.step()
    assert setup.backend.last_commit is not None  # a clean bracket around our commit
    assert setup.check() == "differs"
    setup.loop.step()
    assert "tampered" not in (setup.backend.kernel or ())


def test_a_foreign_commit_elsewhere_costs_one_read_back(setup: Setup) -> None:
    setup.backend.foreign()  # someone else's table: the generation moves
    assert setup.check() == "same"
    assert setup.backend.background_reads == 1
    assert setup.check() == "unchanged"  # the read-back taught the generation
    assert setup.backend.background_reads == 1


def test_a_commit_racing_ours_leaves_the_generation_unknown(setup: Setup) -> None:
    original = setup.backend.apply

    def racing(plan: Any) -> None:
        setup.backend.foreign()  # during our transaction: two bumps
        original(plan)
        setup.backend.last_commit = None  # what the executor reports then

    setup.backend.apply = racing  # type: ignore[method-assign]
    setup.api.boot("p", "vm2", "m1.tiny", "cirros", HOST, None, ["net"])
    setup.loop.step()
    assert setup.check() == "same"
    assert setup.backend.background_reads == 1


def test_skipped_checks_are_counted_in_the_metrics(setup: Setup) -> None:
    from secfw.agent.metrics import AgentMetrics

    metrics = AgentMetrics()
    setup.check()
    setup.backend.foreign()
    setup.check()
    metrics.on_status(setup.loop.status)
    metrics.on_status(setup.loop.status)  # counted once
    sample = metrics.registry.get_sample_value
    name = "secfw_agent_kernel_checks_total"
    assert sample(name, {"readback": "skipped"}) == 1
    assert sample(name, {"readback": "read"}) == 1
