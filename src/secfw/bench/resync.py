"""Changes during a resync: does a change wait behind the periodic full resync?

The in-process agent of :mod:`.incremental` (real reconciler, real nftables
backend, the table loaded) gets the real :class:`~secfw.agent.AgentLoop` on a
clock the bench moves by hand. The resync timer is made due and the loop
turns once: the resync's kernel check starts reading the table back on its own
thread (:mod:`secfw.agent.resync`). While it runs, :data:`CHANGES` source-group
members are added through the API, spread evenly over the read-back's expected
duration (one listing timed beforehand); after each, the loop is told the store
changed — what its store watch does on a commit (inotify, etcd watch) — and
turns until the change is in the kernel.

Store → kernel is measured from the API call's return (the store committed) to
the return of the kernel's commit of that change (the backend's transaction:
``TimedBackend.committed_at``), and a change counts only when the agent's
applied revision passed the write's and the namespace's nftables generation
moved. The watch's own delivery is not included (bench.multihost measures it).
A change counts as *during the check* when the check was still running after
its commit. The check's duration is reported beside it (what a change used to
wait for), and so is the same change made with no check running
(``idle_store_to_kernel_ms``: what the read-back beside the pass costs it).

The agent reads back only when the namespace's nftables generation moved since
the kernel last held what it committed (docs/agent.md, "Resync"): the bench
first commits elsewhere in the namespace (a table of its own, added and deleted
in one transaction), so that read-back runs. ``without_readback`` is the same
measure with nothing committed meanwhile: the check's outcome (``unchanged``:
no listing) and the changes made right after the resync started.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from secfw.agent import AgentLoop, LoopSettings
from secfw.agent.loop import Trigger
from secfw.agent.resync import ATTEMPTS, CheckResult, KernelCheck
from secfw.api import Api
from secfw.backends.nftables.executor import NftablesExecutor
from secfw.bench.common import Row, median, rounded
from secfw.bench.incremental import MS, AgentSession, referenced_sources
from secfw.bench.namespaces import scratch_netns
from secfw.bench.workload import PROJECT, BenchCloud
from secfw.store import open_store

#: Changes made while one resync's read-back runs (spread over it).
CHANGES = 10
#: Loop turns one change may take to reach the kernel before it counts as lost.
MAX_TURNS = 5
#: The same change made with no check running, for comparison.
IDLE_CHANGES = 3
#: One change: an API call.
Write = Callable[[], object]
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
    # The check's own duration on the real clock (the loop's is the bench's hand).
    loop.kernel_check = KernelCheck(
        lambda result: loop.wakeup.notify(Trigger("checked", checked=result)),
        time.perf_counter)
    # Every change picked before any is timed: picking reads the whole cloud.
    writes = _member_writes(cloud, session, random.Random(seed), IDLE_CHANGES + 2 * CHANGES)
    try:
        idle = [_one_change(loop, session, writes.pop()) for _ in range(IDLE_CHANGES)]
        shortcut = _without_readback(loop, clock, session, writes[-CHANGES:])
        del writes[-CHANGES:]
        listing_s = _timed_listing(session)
        _commit_elsewhere(session)
        clock.now += 61.0
        started = time.perf_counter()
        with _checks_recorded(loop) as checks:
            loop.step()
            if not loop.kernel_check.running:
                return {"error": "the resync ran no background check (a full pass instead)"}
            runs = _spread_changes(loop, session, writes, started, listing_s)
            for _ in range(ATTEMPTS):  # a spoilt check starts another, ATTEMPTS at most
                loop.kernel_check.join(CHECK_TIMEOUT)
                loop.step()  # takes the check's result
                if not loop.kernel_check.running:
                    break
        check_s = time.perf_counter() - started
        return (_summary(ports, runs, idle, check_s, listing_s)
                | {"checks": checks, "without_readback": shortcut})
    finally:
        loop.kernel_check.join(CHECK_TIMEOUT)
        loop.wakeup.close()


def _summary(ports: int, runs: list[Row], idle: list[Row], check_s: float,
             listing_s: float) -> Row:
    """The figures of the changes that reached the kernel while the check ran."""
    during = [r["store_to_kernel_ms"] for r in runs
              if r["during_check"] and r["store_to_kernel_ms"] is not None]
    return {
        "ports": ports,
        "changes": len(runs),
        "changes_during_check": len(during),
        "changes_lost": sum(r["store_to_kernel_ms"] is None for r in runs),
        "store_to_kernel_ms": rounded(median(during), 2),
        "max_store_to_kernel_ms": max(during, default=None),
        "resync_check_s": rounded(check_s),
        "listing_alone_s": rounded(listing_s),
        "idle_store_to_kernel_ms": rounded(
            median([r["store_to_kernel_ms"] for r in idle
                    if r["store_to_kernel_ms"] is not None]), 2),
        "runs": runs,
    }


def _timed_listing(session: AgentSession) -> float:
    """Seconds one read-back of the table takes alone (how to spread the changes)."""
    read = session.backend.reader()
    started = time.perf_counter()
    read()
    return time.perf_counter() - started


def _spread_changes(loop: AgentLoop, session: AgentSession, writes: list[Write],
                    started: float, listing_s: float) -> list[Row]:
    """Each of ``writes``, the i-th made ``i / (len + 1)`` of the way through
    the expected read-back (bounded: the listing's time in all)."""
    runs = []
    for i, write in enumerate(writes):
        due = started + listing_s * (i + 1) / (len(writes) + 1)
        time.sleep(max(0.0, due - time.perf_counter()))
        runs.append(_one_change(loop, session, write))
    return runs


def _member_writes(cloud: BenchCloud, session: AgentSession, rng: random.Random,
                   count: int) -> list[Write]:
    """``count`` different source-group member additions (an instance on another
    host joins a group referenced on the host), picked from one read of the cloud."""
    state = session.cloud
    sources = referenced_sources(state, cloud.host)
    picked: set[tuple[str, str]] = set()
    for _ in range(count * 100):  # bounded: members are few next to the pairs
        if len(picked) == count:
            break
        group, instance = rng.choice(sources), rng.choice(cloud.member_instances)
        if group not in state.instances[instance].security_groups:
            picked.add((group, instance))
    return [functools.partial(cloud.api.add_secgroup, PROJECT, instance, group)
            for group, instance in sorted(picked)]


def _commit_elsewhere(session: AgentSession) -> None:
    """One transaction in the agent's namespace that leaves secfw's tables alone:
    the generation moves, so the next kernel check reads back."""
    executor = NftablesExecutor(session.backend.inner.executor.netns)
    executor.apply_text("add table ip bench_elsewhere\ndelete table ip bench_elsewhere\n")


def _without_readback(loop: AgentLoop, clock: _Clock, session: AgentSession,
                      writes: list[Write]) -> Row:
    """A resync with nothing committed since the agent's last pass: the check's
    outcome and time, and ``writes`` made right after it started."""
    with _checks_recorded(loop) as outcomes:
        clock.now += 61.0
        loop.step()
        runs = [_one_change(loop, session, write) for write in writes]
        loop.kernel_check.join(CHECK_TIMEOUT)
        loop.step()  # takes the check's result
    reached = [r["store_to_kernel_ms"] for r in runs if r["store_to_kernel_ms"] is not None]
    return {
        "check_outcome": outcomes[0]["outcome"] if outcomes else None,
        "kernel_checks_skipped": loop.status.kernel_checks_skipped,
        "check_ms": round(outcomes[0]["seconds"] * MS, 3) if outcomes else None,
        "store_to_kernel_ms": rounded(median(reached), 2),
        "max_store_to_kernel_ms": max(reached, default=None),
        "changes_lost": len(runs) - len(reached),
    }


@contextmanager
def _checks_recorded(loop: AgentLoop) -> Iterator[list[Row]]:
    """The results of the kernel checks the loop takes meanwhile (outcome, the
    check's seconds), in order."""
    outcomes: list[Row] = []
    checked = loop._checked

    def record(result: CheckResult) -> None:
        outcomes.append({"outcome": result.outcome, "seconds": rounded(result.seconds)})
        checked(result)

    loop._checked = record  # type: ignore[method-assign]
    try:
        yield outcomes
    finally:
        loop._checked = checked  # type: ignore[method-assign]


def _one_change(loop: AgentLoop, session: AgentSession, write: Write) -> Row:
    """``write`` (an API call); the loop told the store changed, and turned
    until the change's transaction committed (at most :data:`MAX_TURNS`
    turns). ``store_to_kernel_ms`` None: it never did."""
    backend, executor = session.backend, session.backend.inner.executor
    revision, generation = session.store.revision(), executor.generation()
    backend.committed_at = None
    write()
    written = time.perf_counter()
    loop.store_changed()  # what the store watch does on a commit
    turns = 0
    while turns < MAX_TURNS and not _applied(loop, backend.committed_at, revision):
        loop.step()
        turns += 1
    committed = backend.committed_at
    applied = _applied(loop, committed, revision) and executor.generation() != generation
    return {"store_to_kernel_ms": round((committed - written) * MS, 2)
            if applied and committed is not None else None,
            "commands": loop.status.last_result.get("commands"),
            "turns": turns,
            "during_check": loop.kernel_check.running}


def _applied(loop: AgentLoop, committed_at: Any, revision: int) -> bool:
    """Whether a transaction committed and the loop's applied revision passed
    ``revision`` (the store's before the write)."""
    return committed_at is not None and (loop.status.revision or 0) > revision


def main(argv: list[str] | None = None) -> None:
    """``python -m secfw.bench.resync [--ports N] [--seed S]``: this measure alone,
    on a benchmark cloud of N host ports in a scratch namespace; JSON on stdout
    (root; minutes at 10k ports)."""
    parser = argparse.ArgumentParser(prog="python -m secfw.bench.resync")
    parser.add_argument("--ports", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args(argv)
    if options.ports < 1:
        parser.error("--ports must be positive")
    with tempfile.TemporaryDirectory(prefix="secfw-resync-") as work:
        store_url = f"sqlite:///{Path(work) / 'bench.db'}"
        api = Api(open_store(store_url))
        cloud = BenchCloud(api, f"bench-{uuid.uuid4().hex[:6]}", seed=options.seed)
        try:
            cloud.build_base()
            cloud.grow_to(options.ports)
            with scratch_netns() as ns:
                session = AgentSession(store_url, cloud.host, ns)
                try:
                    session.sync(full=True)
                    row = changes_during_resync(session, cloud, options.ports, options.seed)
                finally:
                    session.close()
        finally:
            api.store.close()
    json.dump(row, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
