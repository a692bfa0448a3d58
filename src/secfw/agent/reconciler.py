"""The reconciler: one pass that makes the kernel's filter equal to the store.

Level-based, as in controller-runtime: each pass reads the *whole* desired state
(the cloud, followed incrementally through the store's change feed) and the
actual state (what it last committed, or the kernel's table read back on a full
sync), and applies the difference as **one** atomic transaction. No per-event
logic: a pass does not care *why* it runs (the triggers are
:mod:`secfw.agent.loop`'s). A full pass also tells whether the kernel still held
what this process last committed; if not, someone changed secfw's table (drift)
and the pass repaired it.

Never open, whatever fails (docs/agent.md, "Fail-closed guarantees"):

* before the store is read, a kernel without secfw's table gets the *closed*
  filter (:meth:`Reconciler.close_if_absent`); after any failed pass the last
  ruleset stays, or the closed filter when there is none (:meth:`Reconciler.hold`);
* a port the backend cannot express is left closed and the others are applied
  (:mod:`secfw.agent.isolation`);
* the host's taps are checked against the topology before every pass
  (:mod:`secfw.agent.topology`).

The kernel table outlives the agent: stopping or killing it leaves the last
ruleset in force, and a new agent's first (full) pass sends only the difference.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from secfw.agent.daemon import log_event
from secfw.agent.hostview import HostView
from secfw.agent.isolation import IsolatedPort, Isolation
from secfw.agent.kernelrecord import KernelRecord, Record, inputs_digest
from secfw.agent.storewatch import Reopenable
from secfw.agent.topology import TapLayout, decide
from secfw.cloud import CloudState, Replaced
from secfw.compiler.build import compile_host, floating_pools
from secfw.compiler.incremental import HostCompiler
from secfw.compiler.ir import HostFilter, MetadataRedirect, PortPolicy
from secfw.compiler.metadata import with_metadata
from secfw.config import Config
from secfw.errors import HistoryCompactedError, SecfwError, TopologyError
from secfw.gcpause import collector_paused
from secfw.store.base import Change, Store

log = logging.getLogger("secfw.agent")
_TAP = operator.attrgetter("tap")



class Plan(Protocol):
    """A backend transaction: empty when the kernel already matches."""

    @property
    def empty(self) -> bool: ...

    @property
    def size(self) -> int: ...


class FilterBackend(Protocol):
    """What the agent needs from a packet-filter backend."""

    name: str

    def read(self) -> Any:
        """The actual state of secfw's own table(s), read back from the kernel."""

    def plan(self, current: Any, desired: HostFilter) -> Plan:
        """The minimal transaction that turns ``current`` into ``desired``."""

    def apply(self, plan: Plan) -> None:
        """Commit ``plan`` atomically; raise BackendError and change nothing on failure."""

    def committed(self, desired: HostFilter) -> Any:
        """The actual state after ``desired`` was applied (no kernel round trip)."""

    def cleanup(self) -> None:
        """Remove secfw's table(s) and nothing else."""


@runtime_checkable
class DescribingBackend(Protocol):
    """Optional extras of a backend, for logs and metrics."""

    def describe(self, plan: Any) -> dict[str, Any]:
        """What ``plan`` changes, in a few words (names of chains, sets, counts)."""

    def element_count(self, state: Any) -> int:
        """How many set/map elements ``state`` holds."""


@dataclass(frozen=True)
class TopologyGuard:
    """How the reconciler checks the host's topology before every pass.

    ``configured``: ``auto``, ``routed`` or ``bridged``; ``probe`` reads the tap
    layout (raises SecfwError when it cannot); ``make_backend`` opens a backend
    of the same kind for another topology (to switch in ``auto`` mode, or to
    close the taps with the layout that really closes them).
    """

    configured: str
    probe: Callable[[], TapLayout]
    make_backend: Callable[[str], Any]


def closed_filter(host: str) -> HostFilter:
    """The *closed* filter of ``host``: secfw's tables with no port in them, so
    the fail-closed rules drop every tap's traffic and nothing else is touched."""
    return HostFilter(host, (), (), ())


# --------------------------------------------------------------------------- the logic


@dataclass
class SyncResult:
    """What one reconcile pass did.

    ``changes`` describes a non-empty transaction (backend's words); ``drift`` is
    set when a full pass found the kernel different from what this process had
    committed — what differed, i.e. what the pass rewrote; ``taps`` are the taps
    of the ports the filter now covers; ``closed`` says the pass committed the
    closed filter (no store data: every tap dropped); ``isolated`` are ports left
    closed because the backend cannot express them; ``programmed`` is the filter
    the kernel now holds (the desired one less the isolated ports); ``deferred``:
    see the field.
    """

    revision: int
    full: bool
    commands: int
    ports: int
    seconds: float
    elements: int | None = None
    changes: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None
    taps: frozenset[str] = frozenset()
    closed: bool = False
    isolated: tuple[IsolatedPort, ...] = ()
    programmed: HostFilter | None = None
    #: In sync as the restart record says, nothing loaded: ``taps``,
    #: ``elements`` and ``programmed`` are unknown until the next pass builds
    #: the agent's own state (:attr:`Reconciler.deferred`).
    deferred: bool = False

    def as_fields(self) -> dict[str, Any]:
        """The fields of the ``sync`` log line (``--once`` prints exactly these)."""
        return {
            "revision": self.revision,
            "full": self.full,
            "commands": self.commands,
            "ports": self.ports,
            "ms": round(self.seconds * 1000, 2),
        }


def _ours(base: int | None, commit: tuple[int, int] | None) -> int | None:
    """The generation the kernel holds our commit at, or None when that cannot
    be told. ``base``: the generation at which the kernel held exactly what the
    plan was made from; ``commit``: the generations read just before and just
    after our transaction, given by the backend only when exactly one commit
    (ours) happened in between. Only an unbroken chain counts — nothing
    committed between ``base`` and our transaction either (``before == base``) —
    so a change someone made earlier is never taken for part of ours
    (docs/agent.md, "Resync")."""
    if base is None or commit is None:
        return None
    before, after = commit
    return after if before == base else None


def _accept_all(desired: HostFilter) -> None:
    """A check that refuses nothing (a backend without ``check``)."""


class Reconciler:
    """Makes one host's filter equal to the store (see the module docstring)."""

    def __init__(self, store: Store, host: str, config: Config, backend: FilterBackend,
                 topology: TopologyGuard | None = None) -> None:
        self.store = store
        self.host = host
        self.config = config
        self.backend = backend
        self.topology = topology
        self._links_changed = True
        #: Ports left closed because the backend cannot express them.
        self.isolation = Isolation()
        #: The host's part of the cloud (agent.hostview); ``cloud`` is its state.
        self.view = HostView(host)
        self.cloud: CloudState | None = None
        #: Whether ``cloud`` must be loaded whole again (a failed pass, a store replaced).
        self._stale = True
        self._loaded_from: object = None  # the file the view was loaded from (Reopenable)
        #: Where the store's changes come from as they happen (an etcd watch's
        #: documents, :class:`ChangeSource`); None: ``changes_since`` only.
        self.feed: ChangeSource | None = None
        self._committed: Any = None
        self._committed_valid = False
        # What this process last committed, kept across failures (a failed
        # transaction changes nothing): the reference that tells drift apart.
        self._last_applied: Any = None
        self._has_applied = False
        # The filter of the last successful pass: what revocation diffs against.
        self._previous: HostFilter | None = None
        self._compiler = HostCompiler(host, config.allow_same_net_traffic)
        # (ports, listen, redirect): what the last _with_metadata made
        self._metadata: tuple[tuple[PortPolicy, ...], tuple[str, int] | None,
                              MetadataRedirect | None] | None = None
        self._taps: tuple[object, frozenset[str]] = ((), frozenset())
        # Kernel checks off the loop's thread (secfw.agent.resync) need to know
        # whether this process touched the kernel while they listed it: every
        # apply and every invalidation moves ``_epoch``, under ``_epoch_lock``.
        self._epoch_lock = threading.Lock()
        self._epoch = 0
        # (epoch, backend, state, generation): the table close_if_absent read
        # (_kernel_state) and the nftables generation it was read at.
        self._kept_read: tuple[int, Any, Any, int | None] | None = None
        # (epoch, generation): the backend's generation (nftables: the
        # namespace's commit counter, backends/nftables/generation.py) at which
        # the kernel held ``_committed`` — known only along an unbroken chain
        # (see _ours); valid for that epoch only, so every invalidation drops it.
        self._generation: tuple[int, int] | None = None
        self._probe: tuple[Any, Callable[[], int | None] | None] | None = None
        #: Where what the kernel holds is kept across restarts (agent.kernelrecord);
        #: None: nowhere (every start reads the kernel back).
        self.kernel_record: KernelRecord | None = None
        # (epoch, backend, record): the record close_if_absent trusted for the
        # first full pass (_trusted_state).
        self._kept_record: tuple[int, Any, Record] | None = None
        # The store revision ``_committed`` was compiled from.
        self._committed_revision = -1
        # Whether every connection the committed filter forbids was cut: the
        # last full pass's revocation succeeded and no revocation failed since.
        # A record vouches for its inputs only then (a restart that loads
        # nothing revokes nothing).
        self._revocations_sure = False
        # In sync as the kept record says, with nothing loaded yet (deferred).
        self._deferred = False
        # What remember_kernel last wrote (namespace, backend, generation,
        # digest, revision, vouched): a check every resync interval that finds
        # the kernel as committed need not write (nor hash) it again.
        self._recorded: tuple[str, str, int, str, int, bool] | None = None

    @property
    def applied_revision(self) -> int | None:
        """The store revision the kernel reflects, or None before the first pass."""
        return self.cloud.revision if self._committed_valid and self.cloud else None

    def invalidate(self) -> None:
        """Forget what was committed: the next pass reads the kernel back (full sync)."""
        with self._epoch_lock:
            self._epoch += 1
            self._committed_valid = False

    def reference(self) -> tuple[int, Any] | None:
        """For a kernel check on another thread: ``(epoch, state)``, the state the
        kernel holds if nobody else touched it (what this process last committed)
        and the epoch it belongs to; None when unknown (before the first pass,
        after a failure, or while a transaction is being applied). The state is
        never mutated afterwards (a later pass makes a new one), so the checking
        thread may compare with it while the loop runs on."""
        with self._epoch_lock:
            if not self._committed_valid or self._committed is None:
                return None
            return self._epoch, self._committed

    def epoch(self) -> int:
        """Moves whenever this process applies a transaction or forgets what it
        committed: a kernel listing taken between two equal epochs saw only what
        :meth:`reference` returned, plus whatever someone else did."""
        with self._epoch_lock:
            return self._epoch

    def known_generation(self, epoch: int) -> int | None:
        """The generation at which the kernel held what :meth:`reference`
        returned for ``epoch``; None when unknown (or another epoch)."""
        with self._epoch_lock:
            known = self._generation
        return known[1] if known is not None and known[0] == epoch else None

    def confirm_generation(self, epoch: int, generation: int) -> None:
        """A kernel check read the tables back at ``generation`` (the same
        before and after the listing) and found what was committed at
        ``epoch``: remember it, unless the loop has moved on since."""
        with self._epoch_lock:
            if self._epoch == epoch and self._committed_valid:
                self._generation = (epoch, generation)

    def generation_probe(self) -> Callable[[], int | None] | None:
        """A function reading the backend's current generation, callable from
        any thread (None result: unknown); None when the backend has no
        generation covering all it reads back (iptables: ipsets have none)."""
        backend = self.backend
        if self._probe is None or self._probe[0] is not backend:
            make = getattr(backend, "generation", None)
            self._probe = (backend, make() if make is not None else None)
        return self._probe[1]

    def kernel_reader(self) -> Callable[[], Any] | None:
        """A function reading secfw's tables back that is safe to call on
        another thread while the loop applies changes (the backend's
        ``reader()``); None when the backend has none (full passes then do
        the checking, on the loop's thread)."""
        reader = getattr(self.backend, "reader", None)
        return reader() if reader is not None else None

    def store_revision(self) -> int:
        """The store's revision (cheap, polled). A store file that was replaced
        invalidates what was committed, so the next pass is a full one."""
        if isinstance(self.store, Reopenable) and self.store.replaced():
            self.invalidate()
            self._stale = True  # another file: its revisions are not ours to follow
            self.store.reopen()
        return self.store.revision()

    def check_store(self) -> None:
        """The store side of a resync, cheap: the store is reopened
        (``reopened_elsewhere``), so a file made unreadable or corrupt is
        noticed now (StoreError) — what only a full pass's reload noticed
        before — and a file replaced since it was opened makes the next pass
        full (it reloads everything). The change feed is then followed as
        usual. A store that cannot be reopened is left alone."""
        reopen = getattr(self.store, "reopened_elsewhere", None)
        if reopen is not None and reopen():
            self.invalidate()

    def reconcile(self, full: bool = False) -> SyncResult:
        """One pass. ``full`` reopens and reloads the store and reads the kernel table back.

        On success the kernel holds the filter of ``self.cloud``. On an exception
        the kernel holds what it held before (transactions are atomic) and the
        next pass is full.
        """
        started = time.perf_counter()
        full = full or not self._committed_valid or self.cloud is None
        if full or self._links_changed:
            self.check_topology()  # may switch the backend: then the pass is full
            full = full or not self._committed_valid
        recorded = self._in_sync_as_recorded(started) if full else None
        if recorded is not None:
            return recorded
        try:
            cloud, replaced = self._load_cloud(full)
            with collector_paused():
                if replaced is None:
                    desired = self._compiler.full(cloud)
                else:  # the cost of the change, not of the cloud (compiler.incremental)
                    desired = self._compiler.update(cloud, replaced)
                desired = self._with_metadata(desired)
        except BaseException:
            self.invalidate()  # the change feed was consumed: only a full pass is sure
            self._stale = True  # and only a whole load (the view may be half-updated)
            raise
        result = self._converge(desired, cloud.revision, full, started)
        assert result.programmed is not None
        revoke = getattr(self.backend, "revoke", None)
        sure = True
        if revoke is not None:  # cut established connections the change revoked
            # A full pass also checks every NAT binding through a floating pool:
            # mappings removed while no agent ran are in no diff (conntrack.stale_nat).
            pools = floating_pools(cloud) if full else None
            sure = revoke(self._previous, result.programmed, pools) is not None
        self._revocations_sure = sure and (full or self._revocations_sure)
        self._previous = result.programmed
        self._deferred = False
        return result

    @property
    def deferred(self) -> bool:
        """Whether the last pass found the kernel in sync from the restart
        record alone (:meth:`_in_sync_as_recorded`): nothing loaded, compiled
        or rendered yet. The next pass builds it all (full, as a restart's
        first pass: the record still spares it the read-back while the
        generation and the store revision stay the recorded ones)."""
        return self._deferred

    def _in_sync_as_recorded(self, started: float) -> SyncResult | None:
        """The first pass of a restart, when the record :meth:`close_if_absent`
        trusted vouches for its inputs and they are this agent's: the same
        store revision, the same inputs (:meth:`_inputs`: code, configuration,
        backend, host, store), the generation still the recorded one. The
        kernel then holds exactly what this agent would render, so the pass is
        done without loading anything; else None (the usual pass). The kept
        record stays for the next pass, which builds the state (:attr:`deferred`)."""
        kept = self._kept_record
        if (kept is None or self._deferred or self.cloud is not None  # once per start
                or kept[0] != self.epoch() or kept[1] is not self.backend
                or not kept[2].inputs):
            return None
        record, probe = kept[2], self.generation_probe()
        try:
            revision = self.store_revision()
        except SecfwError:
            return None  # the usual pass reports it
        if (kept[0] != self.epoch() or revision != record.revision
                or self._inputs(revision) != record.inputs
                or probe is None or probe() != record.generation):
            return None
        self._deferred = True
        log_event(log, logging.INFO, "kernel_record", action="in sync, nothing loaded",
                  generation=record.generation, revision=revision)
        return SyncResult(revision, True, 0, record.ports, time.perf_counter() - started,
                          deferred=True)

    def _inputs(self, revision: int) -> str | None:
        """A digest of what the ruleset of store revision ``revision`` is made
        from besides the store's documents (kernelrecord.inputs_digest): the
        configuration, backend and topology, host and store URL — and the
        store's last write (:meth:`Store.write_digest`), which tells this
        store from another one at the same revision. None when the store is
        no longer at ``revision`` or cannot say."""
        try:
            last = self.store.write_digest(revision)
        except SecfwError:
            return None
        if last is None:
            return None
        return inputs_digest((repr(self.config), self._backend_key(), self.host,
                              self.store.url, str(revision), last))

    def _with_metadata(self, desired: HostFilter) -> HostFilter:
        """``with_metadata(desired, listen)``. The redirect is made from the
        ports alone and walks every one of them: while the compiler hands on
        the same ports tuple (no port changed), the last redirect is reused."""
        listen = self.config.metadata_listen
        last = self._metadata
        if listen is None or last is None or last[0] is not desired.ports or last[1] != listen:
            result = with_metadata(desired, listen)
            self._metadata = (desired.ports, listen, result.metadata)
            return result
        return replace(desired, metadata=last[2])

    def close_if_absent(self) -> SyncResult | None:
        """The agent's first act, before the store is even read: when the kernel
        holds no table of secfw's (or one it cannot read), commit the closed
        filter in a transaction of its own, so that no tap runs unfiltered
        whatever happens next. A table already there (the last agent's ruleset)
        is left alone — and what was read of it serves the first full pass, when
        nothing was committed in between (a restart reads a big table once,
        not twice). Returns what was done (None: nothing). Raises like
        :meth:`reconcile` (TopologyError after closing the taps for the
        topology they really have)."""
        started = time.perf_counter()
        self.check_topology()
        record = self._matching_record()
        if record is not None:  # the table is there, as the last agent left it
            self.invalidate()
            self._kept_record = (self.epoch(), self.backend, record)
            return None
        state, generation = None, None
        try:
            state, generation = self._readable_state()
            if state is not None:
                return None
            return self._converge(closed_filter(self.host), 0, True, started, current=None)
        finally:
            self.invalidate()
            if state is not None:
                self._kept_read = (self.epoch(), self.backend, state, generation)

    def links_changed(self) -> None:
        """A tap appeared, went or changed its bridge: the next pass checks the
        topology again (otherwise only full passes do: a dump of every link)."""
        self._links_changed = True

    def check_topology(self) -> None:
        """Check the host's taps against the configured topology (a no-op without
        a :class:`TopologyGuard`). ``auto`` switches the backend to what the taps
        show (the pass is then full); a contradiction closes the taps with the
        layout of the topology they really have, then raises TopologyError."""
        guard = self.topology
        if guard is None:
            return
        current = getattr(self.backend, "topology", None)
        try:
            wanted = decide(guard.configured, guard.probe(), current)
        except TopologyError as exc:
            self._close_for(exc.actual)
            raise
        self._links_changed = False
        if wanted != current:
            log_event(log, logging.WARNING, "topology", configured=guard.configured,
                      previous=current, now=wanted)
            self.backend = guard.make_backend(wanted)
            self.invalidate()

    def _close_for(self, topology: str | None) -> None:
        """Commit the closed filter rendered for ``topology`` (the current
        backend's when None: taps of both kinds), replacing what secfw's tables
        hold."""
        assert self.topology is not None
        ours = getattr(self.backend, "topology", None)
        backend = self.backend if topology in (None, ours) else self.topology.make_backend(topology)
        self.invalidate()
        try:
            current = backend.read()
        except SecfwError:
            current = None
        plan = backend.plan(current, closed_filter(self.host))
        if not plan.empty:
            self.invalidate()  # moves the epoch again: a kernel check listing now is void
            backend.apply(plan)
            log_event(log, logging.WARNING, "closed", reason="topology",
                      topology=topology or ours, commands=plan.size)

    def remember_kernel(self) -> None:
        """Keep what the kernel holds for the next agent (agent.kernelrecord),
        when its generation is known; otherwise remove any older record (it
        would still be true, but nothing is lost by reading back)."""
        if self.kernel_record is None or self._deferred:  # deferred: the record is still true
            return
        with self._epoch_lock:
            known, committed = self._generation, self._committed
            valid = self._committed_valid and known is not None and known[0] == self._epoch
            revision = self._committed_revision
        namespace = self._namespace()
        digest = self.kernel_record.digest(committed) if valid and namespace else None
        if known is None or digest is None:
            return
        vouched = self._revocations_sure and not self.isolation.isolated
        key = (namespace, self._backend_key(), known[1], digest, revision, vouched)
        if key == self._recorded:  # written already: the store's last write is not hashed again
            return
        inputs = self._inputs(revision) if vouched and revision >= 0 else None
        ports = len(self._previous.ports) if self._previous is not None else 0
        self.kernel_record.save(Record(namespace, key[1], known[1], digest, revision,
                                       inputs or "", ports))
        self._recorded = key

    def _namespace(self) -> str:
        identify = getattr(self.backend, "namespace_id", None)
        return identify() if identify is not None else ""

    def _backend_key(self) -> str:
        return f"{self.backend.name}/{getattr(self.backend, 'topology', '')}"

    def _matching_record(self) -> Record | None:
        """The kept record, when it describes this namespace and backend and the
        generation has not moved since it was written; else None."""
        if self.kernel_record is None:
            return None
        record = self.kernel_record.load()
        probe = self.generation_probe()
        if record is None or probe is None:
            return None
        if (record.namespace, record.backend) != (self._namespace(), self._backend_key()):
            return None
        return record if probe() == record.generation else None

    def _trusted_state(self, desired: HostFilter, revision: int) -> tuple[Any, int] | None:
        """For the first full pass after :meth:`close_if_absent` trusted the
        record: ``desired``'s state and the record's generation when the kernel
        provably holds it (same epoch and backend; the generation still the
        record's; ``desired``, compiled from store revision ``revision``, made
        from the record's revision and inputs — or rendering to the record's
        digest); else None."""
        kept, self._kept_record = self._kept_record, None
        if kept is None or kept[0] != self.epoch() or kept[1] is not self.backend:
            return None
        assert self.kernel_record is not None
        record, probe = kept[2], self.generation_probe()
        state = self.backend.committed(desired)
        if probe is None or probe() != record.generation:
            trusted = False
        elif (record.inputs and revision == record.revision
              and self._inputs(revision) == record.inputs):
            trusted = True  # made from the same inputs: the recorded ruleset
            self.kernel_record.vouch(state, record.digest)
        else:
            trusted = self.kernel_record.digest(state) == record.digest
        log_event(log, logging.INFO, "kernel_record",
                  action="no read-back" if trusted else "read back",
                  generation=record.generation)
        return (state, record.generation) if trusted else None

    def _readable_state(self) -> tuple[Any, int | None]:
        """secfw's table(s) read back, or None when absent — or unreadable: a table
        the backend cannot parse is replaced, never trusted; with the generation
        it was read at (:meth:`_read_back`)."""
        try:
            return self._read_back()
        except SecfwError as exc:
            log_event(log, logging.WARNING, "unreadable_table", error=str(exc),
                      action="replaced by the closed filter")
            return None, None

    def _read_back(self) -> tuple[Any, int | None]:
        """The kernel read back, and the generation it was read at: the same
        generation before and after the listing means no transaction committed
        meanwhile, so the listing is that generation's content (else None)."""
        probe = self.generation_probe()
        before = probe() if probe is not None else None
        state = self.backend.read()
        after = probe() if probe is not None else None
        return state, before if before is not None and before == after else None

    def _kernel_state(self) -> tuple[Any, int | None]:
        """What a full pass compares with, and its generation: the kernel read
        back now — or the listing :meth:`close_if_absent` made, when no
        transaction and no failure came between (same epoch, same backend)."""
        kept, self._kept_read = self._kept_read, None
        if kept is not None and kept[0] == self.epoch() and kept[1] is self.backend:
            return kept[2], kept[3]
        return self._read_back()

    def hold(self, reason: str = "store") -> SyncResult | None:
        """After a failed pass: keep the kernel safe without what failed.

        ``reason`` ``store`` (the store cannot be read) with a cloud loaded
        earlier: the kernel is read back and any drift from that cloud's filter
        repaired. Otherwise (any other failure, or the store down since start) a
        table already in the kernel is left alone — the last successful pass's
        ruleset — and a missing or unreadable one is replaced by the *closed*
        filter (no ports: every tap dropped), so taps never run unfiltered.
        Returns what was done (None: nothing). The next :meth:`reconcile` is full
        either way. Raises like :meth:`reconcile`.
        """
        started = time.perf_counter()
        try:
            if reason == "store" and self.cloud is not None:
                desired = with_metadata(
                    compile_host(self.cloud, self.host, self.config.allow_same_net_traffic),
                    self.config.metadata_listen)
                return self._converge(desired, self.cloud.revision, True, started)
            if self._readable_state()[0] is not None:
                return None
            return self._converge(closed_filter(self.host), 0, True, started, current=None)
        finally:
            self.invalidate()

    def guard_kernel(self) -> str | None:
        """Restore, at once, kernel switches the filter depends on and someone
        turned off (br_netfilter's on a bridged host); what was restored, or None.
        Cheap (two sysctl reads): the loop calls it on every turn."""
        restore = getattr(self.backend, "restore_switches", None)
        return restore() if restore is not None else None

    def _converge(
        self, desired: HostFilter, revision: int, full: bool, started: float, **known: Any
    ) -> SyncResult:
        """Make the kernel hold ``desired``, planned against: ``known["current"]``
        when given; on a full pass the kernel read back — or, on the first pass
        after a start that trusted the restart record, ``desired``'s own state
        when the kernel provably holds it (:meth:`_trusted_state`); else what
        was last committed. The generation the kernel then holds is kept only
        along an unbroken chain (:func:`_ours`), never guessed."""
        base: int | None = None  # the generation at which the kernel held ``current``
        if "current" in known:
            current = known["current"]
        elif full:
            current, base = self._trusted_state(desired, revision) or self._kernel_state()
        else:
            current, base = self._committed, self.known_generation(self.epoch())
        desired, plan = self._plan(current, desired)
        drift = self._drift(current, plan) if full else None
        generation = base
        if not plan.empty:
            self.invalidate()  # the kernel changes: a concurrent kernel check is void
            self.backend.apply(plan)
            generation = _ours(base, getattr(self.backend, "last_commit", None))
        committed = self.backend.committed(desired)
        with self._epoch_lock:
            # An empty plan left the kernel as it was: the epoch stays (a kernel
            # check running meanwhile remains valid).
            self._epoch += 0 if plan.empty and self._committed_valid else 1
            self._committed, self._committed_valid = committed, True
            self._committed_revision = revision
            self._generation = None if generation is None else (self._epoch, generation)
        self._last_applied, self._has_applied = self._committed, True
        return SyncResult(
            revision, full, plan.size, len(desired.ports), time.perf_counter() - started,
            elements=self._element_count(),
            changes=None if plan.empty else self._describe(plan),
            drift=drift,
            taps=self._taps_of(desired),
            closed=not desired.ports and revision == 0,
            isolated=self.isolation.isolated,
            programmed=desired,
        )

    def _plan(self, current: Any, desired: HostFilter) -> tuple[HostFilter, Plan]:
        """The filter to program and its plan: ``desired``, or — when the backend
        refuses it — ``desired`` without the ports it cannot express
        (:mod:`secfw.agent.isolation`; they stay closed). Raises when the
        backend refuses even that, or cannot check ports one by one."""
        cached = self.isolation.cached(desired)
        if cached is not None:
            return cached, self.backend.plan(current, cached)
        forced = self._refused_up_front(desired)
        if forced:
            return self._isolate(current, desired, forced)
        try:
            plan = self.backend.plan(current, desired)
        except SecfwError:
            if getattr(self.backend, "check", None) is None or not desired.ports:
                raise
            restricted, plan = self._isolate(current, desired, {})
            if not self.isolation.isolated:
                raise
            return restricted, plan
        self.isolation.clear()
        return desired, plan

    def _refused_up_front(self, desired: HostFilter) -> dict[str, str]:
        """Ports to leave closed before the backend is asked (port id → why): on a
        routed host, two ports of overlapping networks with one fixed address
        (:func:`shared_fixed_addresses`; a bridged host keeps them apart by
        bridge, docs/agent.md); and what the backend refuses as a whole
        (``refused_ports``: iptables and metadata on overlapping networks)."""
        found: dict[str, str] = {}
        refused = getattr(self.backend, "refused_ports", None)
        if refused is not None:
            found.update(refused(desired))
        if getattr(self.backend, "topology", "routed") == "routed":
            # from the compiler's index: a pass costs the ports it changed
            found.update(self._compiler.shared_fixed_addresses(desired.ports))
        return found

    def _isolate(self, current: Any, desired: HostFilter,
                 forced: dict[str, str]) -> tuple[HostFilter, Plan]:
        """``desired`` without the ports the backend refuses or ``forced`` names,
        and its plan; every isolated port is logged."""
        self._reset_backend()
        check = getattr(self.backend, "check", None) or _accept_all
        restricted = self.isolation.compute(desired, check, forced)
        for port in self.isolation.isolated:
            log_event(log, logging.ERROR, "port_isolated", tap=port.tap,
                      port=port.port_id, reason=port.reason, action="tap left closed")
        return restricted, self.backend.plan(current, restricted)

    def _reset_backend(self) -> None:
        """Drop the backend's render caches (a refused render may have left them
        half-updated)."""
        reset = getattr(self.backend, "reset", None)
        if reset is not None:
            reset()

    def _taps_of(self, desired: HostFilter) -> frozenset[str]:
        """The taps of ``desired``'s ports, recomputed only when the ports tuple is a
        new one (the incremental compiler keeps it while no port changes)."""
        if self._taps[0] is not desired.ports:  # a C-level walk: no Python per port
            self._taps = (desired.ports, frozenset(map(_TAP, desired.ports)))
        return self._taps[1]

    def _drift(self, current: Any, plan: Plan) -> dict[str, Any] | None:
        """What differed, when the kernel no longer holds what this process committed
        and the plan rewrites it; None otherwise (nothing committed yet, no change)."""
        if not self._has_applied or plan.empty or current == self._last_applied:
            return None
        found = dict(self._describe(plan))
        if current is None:
            found["table"] = "absent"
        return found

    def _describe(self, plan: Plan) -> dict[str, Any]:
        if isinstance(self.backend, DescribingBackend):
            return self.backend.describe(plan)
        return {}

    def _element_count(self) -> int | None:
        if isinstance(self.backend, DescribingBackend):
            return self.backend.element_count(self._committed)
        return None

    def _load_cloud(self, full: bool) -> tuple[CloudState, list[Replaced] | None]:
        """The host's view of the cloud at the store's revision, and the records
        replaced since the last pass (None when it was loaded whole: the compile
        must be full).

        A full pass reopens the store (a file made unreadable or corrupt is
        noticed) but reads only the changes since the view's revision: the
        store is loaded whole only when the view is stale (first pass, failed
        pass, store replaced), when its history is gone (compaction) or went
        back (a restore), or when a change widened what the host needs."""
        if self._stale or self.cloud is None:
            return self._reload()
        if full and isinstance(self.store, Reopenable):
            self.store.reopen()
            if self.store.identity != self._loaded_from:  # another file since the load
                return self._reload()
        try:
            revision, changes = self._changes(self.cloud.revision)
        except HistoryCompactedError:  # the history since our revision is gone (etcd)
            return self._reload()
        if revision < self.cloud.revision:  # the store went back (a restore): start over
            return self._reload()
        if revision == self.cloud.revision:
            return self.cloud, []
        replaced = self.view.apply(revision, changes)
        if replaced is None:  # the host needs records the view dropped
            return self._reload()
        return self.cloud, replaced

    def _changes(self, revision: int) -> tuple[int, list[Change]]:
        """What changed after ``revision``: the watch's documents when they cover
        it (no store round trip), else the store's change feed."""
        if self.feed is not None:
            found = self.feed.after(revision)
            if found is not None:
                return found
        return self.store.changes_since(revision)

    def _reload(self) -> tuple[CloudState, list[Replaced] | None]:
        if isinstance(self.store, Reopenable):
            self.store.reopen()  # a fresh look: notices a file unreadable or corrupt
        self._stale = True
        self._loaded_from = self.store.identity if isinstance(self.store, Reopenable) else None
        with self.store.scan() as reader:
            self.cloud = self.view.load(reader)
        self._stale = False
        return self.cloud, None


class ChangeSource(Protocol):
    """Changes delivered as they happen (:class:`secfw.agent.etcdwatch.ChangeFeed`)."""

    def after(self, revision: int) -> tuple[int, list[Change]] | None:
        """``(latest revision, every change after revision)`` when they are all
        known here, else None (the caller asks the store)."""
