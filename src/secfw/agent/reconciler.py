"""The host agent: keeps the kernel's filter equal to the store, for one host.

Two parts, kept apart as in controller-runtime:

* :class:`Reconciler` — the logic. Level-based: each pass reads the *whole*
  desired state (the cloud, followed incrementally through the store's change
  feed) and the actual state (what it last committed, or the kernel's table read
  back on a full sync), and applies the difference as **one** atomic transaction.
  No per-event logic: a pass does not care *why* it runs. A full pass also
  tells whether the kernel still held what this process last committed; if
  not, someone changed secfw's table (drift) and the pass repaired it.
* :class:`AgentLoop` — the triggers. Store revision moves (polled), taps
  appearing or disappearing (:mod:`secfw.agent.linkwatch`), the periodic resync
  timer, SIGHUP, and retries after failures all queue a :class:`Trigger`;
  whatever is queued when the loop wakes is coalesced into ONE pass, full when
  any trigger asks for it (start, resync, SIGHUP, retry). Failures back off
  exponentially up to a cap, and no exception ends the daemon. While the store
  cannot be read the last ruleset stays in force (and drift from it is still
  repaired). SIGTERM/SIGINT stop the loop between passes: a transaction in
  flight always finishes. :class:`LoopObserver` subclasses (the status file,
  Prometheus metrics, systemd notification) watch every pass.

The kernel table outlives the agent: stopping or killing it leaves the last
ruleset in force, and a new agent's first (full) pass sends only the difference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from secfw.agent.storewatch import Reopenable
from secfw.cloud import CloudState, Replaced
from secfw.compiler.build import compile_host
from secfw.compiler.incremental import HostCompiler
from secfw.compiler.ir import HostFilter
from secfw.config import Config
from secfw.gcpause import collector_paused
from secfw.store.base import Store

log = logging.getLogger("secfw.agent")



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


# --------------------------------------------------------------------------- the logic


@dataclass
class SyncResult:
    """What one reconcile pass did.

    ``changes`` describes a non-empty transaction (backend's words); ``drift`` is
    set when a full pass found the kernel different from what this process had
    committed — what differed, i.e. what the pass rewrote; ``taps`` are the taps
    of the ports the filter now covers.
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

    def as_fields(self) -> dict[str, Any]:
        """The fields of the ``sync`` log line (``--once`` prints exactly these)."""
        return {
            "revision": self.revision,
            "full": self.full,
            "commands": self.commands,
            "ports": self.ports,
            "ms": round(self.seconds * 1000, 2),
        }


class Reconciler:
    """Makes one host's filter equal to the store (see the module docstring)."""

    def __init__(self, store: Store, host: str, config: Config, backend: FilterBackend) -> None:
        self.store = store
        self.host = host
        self.config = config
        self.backend = backend
        self.cloud: CloudState | None = None
        self._committed: Any = None
        self._committed_valid = False
        # What this process last committed, kept across failures (a failed
        # transaction changes nothing): the reference that tells drift apart.
        self._last_applied: Any = None
        self._has_applied = False
        # The filter of the last successful pass: what revocation diffs against.
        self._previous: HostFilter | None = None
        self._compiler = HostCompiler(host, config.allow_same_net_traffic)
        self._taps: tuple[object, frozenset[str]] = ((), frozenset())

    @property
    def applied_revision(self) -> int | None:
        """The store revision the kernel reflects, or None before the first pass."""
        return self.cloud.revision if self._committed_valid and self.cloud else None

    def invalidate(self) -> None:
        """Forget what was committed: the next pass reads the kernel back (full sync)."""
        self._committed_valid = False

    def store_revision(self) -> int:
        """The store's revision (cheap, polled). A store file that was replaced
        invalidates what was committed, so the next pass is a full one."""
        if isinstance(self.store, Reopenable) and self.store.replaced():
            self.invalidate()
            self.store.reopen()
        return self.store.revision()

    def reconcile(self, full: bool = False) -> SyncResult:
        """One pass. ``full`` reopens and reloads the store and reads the kernel table back.

        On success the kernel holds the filter of ``self.cloud``. On an exception
        the kernel holds what it held before (transactions are atomic) and the
        next pass is full.
        """
        started = time.perf_counter()
        full = full or not self._committed_valid or self.cloud is None
        try:
            cloud, replaced = self._load_cloud(full)
            with collector_paused():
                if replaced is None:
                    desired = self._compiler.full(cloud)
                else:  # the cost of the change, not of the cloud (compiler.incremental)
                    desired = self._compiler.update(cloud, replaced)
        except BaseException:
            self.invalidate()  # the change feed was consumed: only a full pass is sure
            raise
        result = self._converge(desired, cloud.revision, full, started)
        revoke = getattr(self.backend, "revoke", None)
        if revoke is not None:  # cut established connections the change revoked
            revoke(self._previous, desired)
        self._previous = desired
        return result

    def hold(self) -> SyncResult | None:
        """Keep the kernel at the last desired state known, without the store.

        For when the store cannot be read. With a cloud loaded earlier the kernel
        is read back and any drift from that cloud's filter repaired. With none
        (the store has been down since start) a table already in the kernel is
        left alone — the last agent's ruleset — and a missing one is replaced by
        the *closed* filter (no ports: every tap dropped), so taps never run
        unfiltered. Returns what was done (None: nothing). The next
        :meth:`reconcile` is full either way. Raises like :meth:`reconcile`.
        """
        started = time.perf_counter()
        try:
            if self.cloud is not None:
                desired = compile_host(self.cloud, self.host, self.config.allow_same_net_traffic)
                return self._converge(desired, self.cloud.revision, True, started)
            if self.backend.read() is not None:
                return None
            closed = compile_host(CloudState(0), self.host, self.config.allow_same_net_traffic)
            return self._converge(closed, 0, True, started, current=None)
        finally:
            self.invalidate()

    def _converge(
        self, desired: HostFilter, revision: int, full: bool, started: float, **known: Any
    ) -> SyncResult:
        """Make the kernel hold ``desired``; ``known["current"]`` skips the read-back."""
        if "current" in known:
            current = known["current"]
        else:
            current = self.backend.read() if full else self._committed
        plan = self.backend.plan(current, desired)
        drift = self._drift(current, plan) if full else None
        self._committed_valid = False
        if not plan.empty:
            self.backend.apply(plan)
        self._committed = self.backend.committed(desired)
        self._committed_valid = True
        self._last_applied, self._has_applied = self._committed, True
        return SyncResult(
            revision, full, plan.size, len(desired.ports), time.perf_counter() - started,
            elements=self._element_count(),
            changes=None if plan.empty else self._describe(plan),
            drift=drift,
            taps=self._taps_of(desired),
        )

    def _taps_of(self, desired: HostFilter) -> frozenset[str]:
        """The taps of ``desired``'s ports, recomputed only when the ports tuple is a
        new one (the incremental compiler keeps it while no port changes)."""
        if self._taps[0] is not desired.ports:
            self._taps = (desired.ports, frozenset(p.tap for p in desired.ports))
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
        """The cloud at the store's revision, and the records replaced since the
        last pass (None when it was loaded whole: the compile must be full)."""
        if full or self.cloud is None:
            if isinstance(self.store, Reopenable):
                self.store.reopen()  # a fresh look: notices a file unreadable or corrupt
            self.cloud = CloudState.from_snapshot(self.store.load())
            return self.cloud, None
        revision, changes = self.store.changes_since(self.cloud.revision)
        if revision < self.cloud.revision:  # the store went back (a restore): start over
            return self._load_cloud(True)
        if revision == self.cloud.revision:
            return self.cloud, []
        return self.cloud, self.cloud.apply_changes(revision, changes)
