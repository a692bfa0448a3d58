"""A restart that loads nothing (agent.reconciler, agent.kernelrecord): the
restart record names the store revision and the inputs its ruleset was made
from; a new agent that finds them all unchanged, and the generation too, is in
sync at once, and its next pass builds its state without a read-back. Every
condition of that trust is checked here: any one of them changed falls back to
the earlier path (the digest compared after a full compile, else a read-back).

The kernel is a fake with a generation (one per commit, as nftables' counter);
real packets: tests/netns/test_agent_restart_record.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from secfw.agent import AgentLoop, LoopSettings, kernelrecord
from secfw.agent.kernelrecord import KernelRecord, record_path
from secfw.agent.reconciler import Reconciler, SyncResult
from secfw.api import Api
from secfw.compiler.build import compile_host
from secfw.compiler.ir import HostFilter
from secfw.compiler.metadata import with_metadata
from secfw.config import Config
from secfw.store import open_store
from secfw.store.base import Change, KindReader, Snapshot, Store, WriteTxn

HOST = "compute1"


@dataclass(frozen=True)
class State:
    """What the fake kernel holds: made of sets, chains and tables, as
    nftables' KernelState (so the record's digest applies)."""

    sets: dict[tuple[str, str], tuple[str, ...]]
    chains: dict[tuple[str, str], tuple[str, ...]]
    tables: frozenset[str]


@dataclass(frozen=True)
class Plan:
    target: State
    size: int

    @property
    def empty(self) -> bool:
        return self.size == 0


class Kernel:
    """One namespace's table and its generation (moved by every commit)."""

    def __init__(self) -> None:
        self.state: State | None = None
        self.generation = 1

    def commit(self, state: State) -> None:
        self.state, self.generation = state, self.generation + 1


def rendered(desired: HostFilter) -> State:
    """The fake rendering: a chain per port, per group chain, and the metadata
    redirect."""
    chains = {("inet", p.tap): (repr(p),) for p in desired.ports}
    chains.update({("inet", c.name): (repr(c),) for c in desired.chains})
    chains[("inet", "metadata")] = (repr(desired.metadata),)
    return State({}, chains, frozenset({"inet"}))


class FakeBackend:
    """Renders, plans and applies against a :class:`Kernel`, counting renders
    and read-backs; ``revoke_ok`` False makes the conntrack revocation fail."""

    name = "fake"

    def __init__(self, kernel: Kernel, topology: str = "routed") -> None:
        self.kernel, self.topology = kernel, topology
        self.renders = self.reads = 0
        self.revoke_ok = True
        self.last_commit: tuple[int, int] | None = None

    def read(self) -> State | None:
        self.reads += 1
        return self.kernel.state

    def plan(self, current: State | None, desired: HostFilter) -> Plan:
        want = self.committed(desired)
        if current == want:
            return Plan(want, 0)
        if current is None:
            return Plan(want, 1 + len(want.chains))
        return Plan(want, len(set(want.chains.items()) ^ set(current.chains.items())) or 1)

    def apply(self, plan: Plan) -> None:
        before = self.kernel.generation
        self.kernel.commit(plan.target)
        self.last_commit = (before, self.kernel.generation)

    def committed(self, desired: HostFilter) -> State:
        self.renders += 1
        return rendered(desired)

    def generation(self) -> Callable[[], int | None]:
        return lambda: self.kernel.generation

    def namespace_id(self) -> str:
        return "boot-1:cookie-1"

    def revoke(self, previous: Any, desired: Any, pools: Any = None) -> object | None:
        return object() if self.revoke_ok else None

    def cleanup(self) -> None:
        self.kernel.state = None


class CountingStore(Store):
    """The agent's view of a real store, counting whole loads."""

    def __init__(self, inner: Store, url: str | None = None) -> None:
        self.inner, self.url, self.scans = inner, url or inner.url, 0

    def revision(self) -> int:
        return self.inner.revision()

    def load(self) -> Snapshot:
        return self.inner.load()

    def scan(self) -> AbstractContextManager[KindReader]:
        self.scans += 1
        return self.inner.scan()

    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        return self.inner.changes_since(revision)

    def write_digest(self, revision: int) -> str | None:
        return self.inner.write_digest(revision)

    def write(self) -> AbstractContextManager[WriteTxn]:
        return self.inner.write()

    def close(self) -> None:
        self.inner.close()


@dataclass
class Start:
    reconciler: Reconciler
    backend: FakeBackend
    store: CountingStore
    result: SyncResult


class Host:
    """One host's kernel, store and state directory, and agents started on it."""

    def __init__(self, api: Api, store_url: str, tmp_path: Path) -> None:
        self.api, self.store_url, self.kernel = api, store_url, Kernel()
        self.state_dir = tmp_path / "state"
        self.stores: list[Store] = []

    def start(self, config: Config | None = None, *, host: str = HOST, url: str | None = None,
              topology: str = "routed", revoke_ok: bool = True) -> Start:
        """A new agent process: close_if_absent, the first (full) pass, the
        record written — as ``agent --once`` does."""
        inner = open_store(self.store_url)
        self.stores.append(inner)
        store = CountingStore(inner, url)
        backend = FakeBackend(self.kernel, topology)
        backend.revoke_ok = revoke_ok
        reconciler = Reconciler(store, host, config or Config(), backend)
        reconciler.kernel_record = KernelRecord(record_path(self.state_dir, HOST))
        reconciler.close_if_absent()
        result = reconciler.reconcile(full=True)
        reconciler.remember_kernel()
        return Start(reconciler, backend, store, result)

    def record(self) -> bytes:
        return record_path(self.state_dir, HOST).read_bytes()

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture
def host(api: Api, store_url: str, tmp_path: Path) -> Iterator[Host]:
    api.net_create("p", "net", "10.0.0.0/24")
    api.image_create("admin", "cirros", "qcow2", "public")
    api.secgroup_create("p", "web", "web")
    api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    api.boot("p", "vm1", "m1.tiny", "cirros", HOST, ["web"], ["net"])
    made = Host(api, store_url, tmp_path)
    yield made
    made.close()


def desired_state(start: Start) -> State:
    """What the agent would render now, from a whole fresh compile."""
    agent = start.reconciler
    assert agent.cloud is not None
    compiled = compile_host(agent.cloud, agent.host, agent.config.allow_same_net_traffic)
    return rendered(with_metadata(compiled, agent.config.metadata_listen))


# --------------------------------------------------------------------------- the fast path


def test_a_restart_with_everything_the_same_loads_nothing(host: Host) -> None:
    first = host.start()
    assert not first.result.deferred and first.result.commands > 0
    record = host.record()

    second = host.start()
    assert second.result.deferred and second.result.commands == 0
    assert second.result.ports == first.result.ports == 1
    assert (second.store.scans, second.backend.renders, second.backend.reads) == (0, 0, 0)
    assert second.reconciler.deferred
    assert host.record() == record  # left as it was: still true

    # The next pass builds the state: no read-back, nothing sent.
    built = second.reconciler.reconcile()
    assert built.full and built.commands == 0 and not built.deferred
    assert (second.store.scans, second.backend.reads) == (1, 0)
    assert not second.reconciler.deferred

    # A change after it is exact: the kernel holds the new ruleset.
    host.api.boot("p", "vm2", "m1.tiny", "cirros", HOST, ["web"], ["net"])
    changed = second.reconciler.reconcile()
    assert not changed.full and changed.commands > 0 and changed.ports == 2
    assert host.kernel.state == desired_state(second)
    assert second.backend.reads == 0


def test_the_pass_that_builds_the_state_reads_back_after_a_foreign_commit(host: Host) -> None:
    """Tampering between the restart's first pass and the next one moves the
    generation: that pass reads back and repairs."""
    host.start()
    second = host.start()
    assert second.result.deferred
    good = host.kernel.state
    assert good is not None
    host.kernel.commit(replace(good, chains={}))
    repaired = second.reconciler.reconcile()
    assert repaired.full and repaired.commands > 0 and second.backend.reads == 1
    assert host.kernel.state == good


def _unrelated_write(host: Host) -> None:
    host.api.secgroup_create("p", "unused", "on no port")


def _another_store_at_the_same_revision(host: Host) -> None:
    """The store file replaced by another one built by the same calls: the
    same revision, other ids."""
    path = Path(host.store_url.removeprefix("sqlite:///"))
    revision = host.api.store.revision()
    host.api.store.close()
    for stale in path.parent.glob(path.name + "*"):
        os.unlink(stale)
    api = Api(open_store(host.store_url))
    api.net_create("p", "net", "10.0.0.0/24")
    api.image_create("admin", "cirros", "qcow2", "public")
    api.secgroup_create("p", "web", "web")
    api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    api.boot("p", "vm1", "m1.tiny", "cirros", HOST, ["web"], ["net"])
    assert api.store.revision() == revision
    host.api = api
    host.stores.append(api.store)


def _code_changed(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernelrecord, "code_identity", lambda: "other code")


# (what changed between the two starts, how the second agent starts, whether
# the second start still needs no read-back — its ruleset has the recorded
# digest — and whether it must send commands)
CHANGES: dict[str, tuple[Callable[..., None] | None, dict[str, Any], bool]] = {
    "store revision": (_unrelated_write, {}, True),
    "configuration": (None, {"config": Config(metadata_listen=("127.0.0.1", 8775))}, False),
    "code": (_code_changed, {}, True),
    "host": (None, {"host": "compute2"}, False),
    "store URL": (None, {"url": "sqlite:///elsewhere.db"}, True),
    "another store at the same revision": (_another_store_at_the_same_revision, {}, False),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_input_changed_takes_the_earlier_path(
        host: Host, change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    act, options, same_ruleset = CHANGES[change]
    host.start()
    if act is _code_changed:
        act(host, monkeypatch)
    elif act is not None:
        act(host)
    second = host.start(**options)
    assert not second.result.deferred
    assert second.store.scans == 1 and second.backend.renders > 0
    if same_ruleset:  # the digest still spares the read-back; nothing to send
        assert (second.backend.reads, second.result.commands) == (0, 0)
    else:
        assert second.backend.reads == 1 and second.result.commands > 0
    assert host.kernel.state == desired_state(second)


def test_a_foreign_commit_before_the_restart_is_read_back_and_repaired(host: Host) -> None:
    first = host.start()
    good = host.kernel.state
    assert good is not None and first.result.commands > 0
    host.kernel.commit(replace(good, chains={}))
    second = host.start()
    assert not second.result.deferred and second.backend.reads == 1
    assert host.kernel.state == good


def test_another_topology_is_read_back(host: Host) -> None:
    host.start()
    second = host.start(topology="bridged")
    assert not second.result.deferred and second.backend.reads == 1


def test_a_failed_revocation_keeps_the_restart_from_skipping_the_load(host: Host) -> None:
    """The first agent's revocation failed: connections its filter forbids may
    still be open, so the record does not vouch for its inputs — the next
    start loads and revokes (still without a read-back)."""
    host.start(revoke_ok=False)
    second = host.start()
    assert not second.result.deferred and second.store.scans == 1
    assert second.backend.reads == 0 and second.result.commands == 0
    third = host.start()  # that start's revocation succeeded: vouched again
    assert third.result.deferred


def test_a_version_1_record_is_read_back(host: Host) -> None:
    host.start()
    path = record_path(host.state_dir, HOST)
    path.write_text(path.read_text().replace('"version": 2', '"version": 1'))
    second = host.start()
    assert not second.result.deferred and second.backend.reads == 1


# --------------------------------------------------------------------------- the loop


def test_the_loop_builds_the_state_right_after_a_restart_in_sync(host: Host) -> None:
    """The daemon: in sync (healthy, the ruleset enforced) from the record, then
    at once a pass that loads and builds the state; the taps are not reported
    as unknown meanwhile."""
    host.start()
    inner = open_store(host.store_url)
    host.stores.append(inner)
    backend = FakeBackend(host.kernel)
    reconciler = Reconciler(CountingStore(inner), HOST, Config(), backend)
    reconciler.kernel_record = KernelRecord(record_path(host.state_dir, HOST))
    loop = AgentLoop(reconciler, LoopSettings(), taps=lambda: frozenset({"tapunknown"}))
    try:
        loop.close_first()
        loop.step()
        assert reconciler.deferred and loop.status.healthy
        assert loop.status.enforcing == "ruleset" and loop.status.ports == 1
        assert loop.status.unknown_taps is None
        loop.step()  # the materialize trigger queued by the first pass
        assert not reconciler.deferred and backend.reads == 0
        assert loop.status.last_result["commands"] == 0
        assert loop.status.unknown_taps == ["tapunknown"]
    finally:
        loop.wakeup.close()


# --------------------------------------------------------------------------- the store


def test_write_digest_tells_stores_and_revisions_apart(tmp_path: Path) -> None:
    """Store.write_digest: the same for the same write (SQLite's own and the
    change feed's default each agree with themselves), None once the store
    moved on, different for another store at the same revision."""
    digests: dict[str, list[str | None]] = {}
    for name in ("a", "b"):
        api = Api(open_store(f"sqlite:///{tmp_path}/{name}.db"))
        api.net_create("p", "net", "10.0.0.0/24")
        revision = api.store.revision()
        wrapped = CountingStore(api.store)
        default = Store.write_digest(wrapped, revision)  # the change-feed default
        digests[name] = [api.store.write_digest(revision), default,
                         api.store.write_digest(revision)]
        api.net_create("p", "net2", "10.9.0.0/24")
        assert api.store.write_digest(revision) is None
        assert Store.write_digest(wrapped, revision) is None
        api.store.close()
    for found in digests.values():
        assert found[0] is not None and found[1] is not None and found[0] == found[2]
    assert digests["a"][0] != digests["b"][0] and digests["a"][1] != digests["b"][1]
    copy = tmp_path / "copy.db"
    shutil.copy(tmp_path / "a.db", copy)
    assert open_store(f"sqlite:///{copy}").write_digest(2) is not None
