"""Changes during a resync: does a change wait behind the periodic full resync?

The in-process agent of :mod:`.incremental` (real reconciler, real nftables
backend, the table loaded) gets the real :class:`~secfw.agent.AgentLoop` on a
clock the bench moves by hand. The resync timer is made due and the loop
turns once: the resync's kernel check starts reading the table back on its own
thread (:mod:`secfw.agent.resync`). While it still runs, source-group members
are added through the API, each followed by one loop turn — the pass that
takes the change to the kernel. Store → kernel is measured from the API call's
return to the end of that turn, as in :mod:`.incremental` (the store poll or
watch that tells a real agent is not included). A change counts only if the
check was still running when its pass ended; the check's own duration is
reported beside it (what a change used to wait for), and so is the same change
made just before, with no check running (``idle_store_to_kernel_ms``: what the
read-back beside the pass costs it).

The agent reads back only when the namespace's nftables generation moved since
the kernel last held what it committed (docs/agent.md, "Resync"): the bench
first commits elsewhere in the namespace (a table of its own, added and deleted
in one transaction), so that read-back runs. ``without_readback`` is the same
measure with nothing committed meanwhile: the check's outcome (``unchanged``:
no listing) and the changes made right after the resync started.
"""

from __future__ import annotations

import random
import time

from secfw.agent import AgentLoop, LoopSettings
from secfw.agent.resync import CheckResult
from secfw.backends.nftables.executor import NftablesExecutor
from secfw.bench.common import Row, median, rounded
from secfw.bench.incremental import MS, AgentSession, member_added
from secfw.bench.workload import BenchCloud

#: Changes made while one resync's read-back runs.
CHANGES = 5
#: The same change made with no check running, for comparison.
IDLE_CHANGES = 3
#: Longest wait for the read-back to finish after the changes (seconds).
CHECK_TIMEOUT = 300.0


class _Clock:
    """The loop's monotonic clock, moved by hand (only the resync timer reads it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def changes_during_resync(session: AgentSession, cloud: BenchCloud, ports: int,
                          seed: int) -> Row:
    """See the module docstring. The session must have made its first full pass."""
    clock = _Clock()
    loop = AgentLoop(session.reconciler, LoopSettings(resync_interval=60.0), clock=clock)
    loop._pending.clear()  # the session's own first pass was this agent's start
    try:
        idle = [_one_change(loop, session, cloud, random.Random(seed - 1 - i))
                for i in range(IDLE_CHANGES)]
        shortcut = _without_readback(loop, clock, session, cloud, seed)
        _commit_elsewhere(session)
        clock.now += 61.0
        started = time.perf_counter()
        loop.step()
        if not loop.kernel_check.started:
            return {"error": "the resync ran no background check (a full pass instead)"}
        runs = [_one_change(loop, session, cloud, random.Random(seed + i))
                for i in range(CHANGES)]
        loop.kernel_check.join(CHECK_TIMEOUT)
        check_s = time.perf_counter() - started
        during = [r for r in runs if r["during_check"]]
        return {
            "ports": ports,
            "changes": len(runs),
            "changes_during_check": len(during),
            "store_to_kernel_ms": rounded(median([r["store_to_kernel_ms"] for r in during]), 2),
            "max_store_to_kernel_ms": max((r["store_to_kernel_ms"] for r in during),
                                          default=None),
            "resync_check_s": rounded(check_s),
            "idle_store_to_kernel_ms": rounded(
                median([r["store_to_kernel_ms"] for r in idle]), 2),
            "runs": runs,
            "without_readback": shortcut,
        }
    finally:
        loop.kernel_check.join(CHECK_TIMEOUT)
        loop.wakeup.close()


def _commit_elsewhere(session: AgentSession) -> None:
    """One transaction in the agent's namespace that leaves secfw's tables alone:
    the generation moves, so the next kernel check reads back."""
    executor = NftablesExecutor(session.backend.inner.executor.netns)
    executor.apply_text("add table ip bench_elsewhere\ndelete table ip bench_elsewhere\n")


def _without_readback(loop: AgentLoop, clock: _Clock, session: AgentSession,
                      cloud: BenchCloud, seed: int) -> Row:
    """A resync with nothing committed since the agent's last pass: the check's
    outcome and time, and changes made right after it started."""
    outcomes: list[tuple[str, float]] = []
    checked = loop._checked

    def record(result: CheckResult) -> None:
        outcomes.append((result.outcome, result.seconds))
        checked(result)

    loop._checked = record  # type: ignore[method-assign]
    try:
        clock.now += 61.0
        loop.step()
        runs = [_one_change(loop, session, cloud, random.Random(seed + 100 + i))
                for i in range(CHANGES)]
        loop.kernel_check.join(CHECK_TIMEOUT)
        loop.step()  # takes the check's result
    finally:
        loop._checked = checked  # type: ignore[method-assign]
    return {
        "check_outcome": outcomes[0][0] if outcomes else None,
        "kernel_checks_skipped": loop.status.kernel_checks_skipped,
        "check_ms": round(outcomes[0][1] * MS, 3) if outcomes else None,
        "store_to_kernel_ms": rounded(median([r["store_to_kernel_ms"] for r in runs]), 2),
        "max_store_to_kernel_ms": max(r["store_to_kernel_ms"] for r in runs),
    }


def _one_change(loop: AgentLoop, session: AgentSession, cloud: BenchCloud,
                rng: random.Random) -> Row:
    """One source-group member added, then one loop turn (its pass)."""
    write = member_added(cloud, session.cloud, rng)
    write()
    written = time.perf_counter()
    loop.step()
    seconds = time.perf_counter() - written
    return {"store_to_kernel_ms": round(seconds * MS, 2),
            "commands": loop.status.last_result.get("commands"),
            "during_check": loop.kernel_check.running}
