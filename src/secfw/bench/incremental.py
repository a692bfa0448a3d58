"""Incremental changes: store write, then store-to-kernel through an in-process agent.

:class:`AgentSession` is the real :class:`~secfw.agent.Reconciler` with the real
nftables backend, running in a namespace that already holds the full table, on
its own store connection (as the agent process has). A change is timed in two
parts: the API call (the *store write*, which returns once committed) and the
agent pass that follows at once (*store to kernel*: change feed read, compile,
render, plan, one atomic transaction committed). :class:`TimedBackend` splits
the pass into phases; what is left of the pass is loading the change feed and
``compile_host``. After a full pass the session freezes its state out of the
cyclic collector (agent.gcsettle.settle), as the daemon does: otherwise a
full collection over ~700k objects at 10k ports lands in some later pass.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from secfw.agent import Plan, Reconciler
from secfw.agent.gcsettle import settle
from secfw.backends.nftables import NftablesBackend
from secfw.bench import profiles
from secfw.bench.common import Row, median, rounded, timed
from secfw.bench.workload import HOT_GROUP, PROJECT, BenchCloud
from secfw.cloud import CloudState
from secfw.compiler.ir import HostFilter
from secfw.config import Config
from secfw.store import open_store

MS = 1000.0


class TimedBackend:
    """The nftables backend, timing each call of the current pass by phase."""

    def __init__(self, inner: NftablesBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.phases: dict[str, float] = {}
        #: perf_counter() when the last transaction's commit returned (None: none yet).
        self.committed_at: float | None = None

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def read(self) -> Any:
        with self._phase("read_back"):
            return self.inner.read()

    def plan(self, current: Any, desired: HostFilter) -> Plan:
        with self._phase("render_plan"):
            return self.inner.plan(current, desired)

    def apply(self, plan: Plan) -> None:
        with self._phase("apply"):
            self.inner.apply(plan)
        self.committed_at = time.perf_counter()  # the kernel has committed the transaction

    def committed(self, desired: HostFilter) -> Any:
        with self._phase("committed"):
            return self.inner.committed(desired)

    def cleanup(self) -> None:
        self.inner.cleanup()

    def reader(self) -> Callable[[], Any]:
        """The backend's reader for the agent's background kernel check (untimed:
        it runs on its own thread, beside the passes)."""
        return self.inner.reader()

    def generation(self) -> Callable[[], int | None]:
        """The backend's generation reader (the resync's shortcut)."""
        return self.inner.generation()

    @property
    def last_commit(self) -> tuple[int, int] | None:
        return self.inner.last_commit


class AgentSession:
    """An in-process agent in namespace ``ns`` (see the module doc)."""

    def __init__(self, store_url: str, host: str, ns: str) -> None:
        self.store = open_store(store_url)
        self.backend = TimedBackend(NftablesBackend(netns=ns))
        self.reconciler = Reconciler(self.store, host, Config(), self.backend)
        self._whole: CloudState | None = None

    def close(self) -> None:
        self.store.close()

    @property
    def cloud(self) -> CloudState:
        """The whole cloud at the store's revision, to pick changes from (the
        agent itself holds only its host's view: agent.hostview); read again
        only when the store moved, and never inside a timed change."""
        revision = self.store.revision()
        if self._whole is None or self._whole.revision != revision:
            self._whole = CloudState.from_snapshot(self.store.load())
        return self._whole

    def sync(self, full: bool = False) -> Row:
        """One agent pass: its time, command count and phases (milliseconds)."""
        self.backend.phases = {}
        result = self.reconciler.reconcile(full=full)
        if result.full:  # as the daemon's GcSettler does, after the pass (untimed)
            settle()
        phases = dict(self.backend.phases)
        phases["changes_compile"] = result.seconds - sum(phases.values())
        return {
            "full": result.full,
            "store_to_kernel_ms": round(result.seconds * MS, 2),
            "commands": result.commands,
            "ports": result.ports,
            "phases_ms": {k: round(v * MS, 2) for k, v in sorted(phases.items())},
        }

    def change(self, label: str, write: Callable[[], object]) -> Row:
        """Time ``write()`` (the API call), then the agent pass right after it."""
        _, write_s = timed(write)
        return {"change": label, "store_write_ms": round(write_s * MS, 2)} | self.sync()


# ---------------------------------------------------------------------- the changes


def referenced_sources(state: CloudState, host: str) -> list[str]:
    """Ids of the source groups referenced by a rule of a group used on ``host``."""
    used = {g for i in state.instances.values() if i.host == host for g in i.security_groups}
    return sorted({
        rule.remote_group_id
        for group in used
        for rule in state.rules_by_group.get(group, {}).values()
        if rule.remote_group_id
    })


def member_added(cloud: BenchCloud, state: CloudState, rng: random.Random) -> Callable[[], object]:
    """An instance on another host joins a source group referenced on the host."""
    sources = referenced_sources(state, cloud.host)
    while True:
        group = rng.choice(sources)
        instance = rng.choice(cloud.member_instances)
        if group not in state.instances[instance].security_groups:
            return lambda: cloud.api.add_secgroup(PROJECT, instance, group)


def port_added(cloud: BenchCloud) -> Callable[[], object]:
    """One more instance (one port, 20 groups) boots on the host."""
    def boot() -> object:
        cloud.extra += 1
        return cloud.boot_host_port()
    return boot


def port_removed(cloud: BenchCloud) -> Callable[[], object]:
    """The host's most recently booted benchmark instance is deleted."""
    instance = cloud.host_instances.pop()
    return lambda: cloud.api.delete(PROJECT, instance)


def rule_added(cloud: BenchCloud, port: int) -> Callable[[], object]:
    """A TCP rule is added to the hot group (used by a tenth of the ports)."""
    return lambda: cloud.api.secgroup_add_rule(
        PROJECT, HOT_GROUP, "tcp", str(port), str(port), "0.0.0.0/0")


def group_removed(cloud: BenchCloud, state: CloudState) -> Callable[[], object]:
    """A host instance that has the hot group loses it."""
    hot = state.group_by_name[(PROJECT, HOT_GROUP)]
    instance = next(i for i in cloud.host_instances
                    if hot in state.instances[i].security_groups)
    return lambda: cloud.api.remove_secgroup(PROJECT, instance, HOT_GROUP)


def membership_runs(session: AgentSession, cloud: BenchCloud, reps: int, seed: int) -> Row:
    """``reps`` source-group member additions; medians of the store write and pass."""
    rng = random.Random(seed)
    runs = [session.change("source-group member added",
                           member_added(cloud, session.cloud, rng)) for _ in range(reps)]
    return {
        "store_write_ms": rounded(median([r["store_write_ms"] for r in runs]), 2),
        "store_to_kernel_ms": rounded(median([r["store_to_kernel_ms"] for r in runs]), 2),
        "commands": max(r["commands"] for r in runs),
        "runs": runs,
    }


def all_changes(session: AgentSession, cloud: BenchCloud, seed: int) -> list[Row]:
    """The five changes of the issue, each followed by one agent pass."""
    rng = random.Random(seed)
    hot = session.cloud.group_by_name[(PROJECT, HOT_GROUP)]
    users = len(session.cloud.instances_by_group.get(hot, ()))
    changes: list[tuple[str, Callable[[], Callable[[], object]]]] = [
        ("source-group member added", lambda: member_added(cloud, session.cloud, rng)),
        ("port added", lambda: port_added(cloud)),
        ("port removed", lambda: port_removed(cloud)),
        (f"rule added to a group used by {users:,} ports", lambda: rule_added(cloud, 40_000)),
        ("group removed from a port", lambda: group_removed(cloud, session.cloud)),
    ]
    return [session.change(label, make()) for label, make in changes]


def profile_port_changes(session: AgentSession, cloud: BenchCloud) -> profiles.Taken:
    """The three port changes of the issue once more, each API call unprofiled
    and the agent pass after it under the profiler (the store→kernel figure is
    the pass's)."""
    profiler = profiles.Session()
    makes: list[Callable[[], Callable[[], object]]] = [
        lambda: port_added(cloud), lambda: port_removed(cloud),
        lambda: group_removed(cloud, session.cloud)]
    for make in makes:
        write = make()
        write()
        profiler.call(session.sync)
    return profiler.taken()
