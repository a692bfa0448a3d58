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
  appearing or disappearing (:mod:`secfw.linkwatch`), the periodic resync
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

import contextlib
import logging
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any, Protocol, runtime_checkable

from secfw.cloud import CloudState, Replaced
from secfw.compiler.build import compile_host
from secfw.compiler.incremental import HostCompiler
from secfw.compiler.ir import HostFilter
from secfw.config import Config
from secfw.daemon import log_event, sd_notify, watchdog_interval
from secfw.errors import BackendError, SecfwError, StoreError
from secfw.gcpause import collector_paused
from secfw.store.base import Store
from secfw.storewatch import Reopenable

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


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Trigger:
    """A reason to run a pass. ``kind``: start, store, link, resync, hup, retry or
    stop; for ``link``, ``name`` is the tap and ``present`` whether it appeared."""

    kind: str
    name: str = ""
    present: bool = True


#: Triggers whose pass must be full: it reopens the store and reads the kernel back.
FULL_TRIGGERS = frozenset({"start", "resync", "hup", "retry"})


class Wakeup:
    """Where triggers queue up, and what the loop sleeps on: a self-pipe.

    :meth:`notify` is safe from other threads and from signal handlers (a deque
    append and one non-blocking pipe write: no lock that the interrupted main
    thread could hold).
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._queue: deque[Trigger] = deque()

    def notify(self, trigger: Trigger) -> None:
        """Queue ``trigger`` and wake the loop."""
        self._queue.append(trigger)
        with contextlib.suppress(OSError):  # pipe full: the loop is due to wake anyway
            os.write(self._write_fd, b"\0")

    def wait(self, timeout: float) -> None:
        """Sleep until a trigger is queued or ``timeout`` seconds passed."""
        if not self._queue:
            select.select([self._read_fd], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 4096):
                pass

    def take(self) -> list[Trigger]:
        """Every trigger queued so far, oldest first."""
        taken = []
        while self._queue:
            taken.append(self._queue.popleft())
        return taken

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


class Backoff:
    """Exponential delays: ``initial``, twice that, … never more than ``maximum``."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self._next = initial

    def next(self) -> float:
        """The delay before the next retry (and double the one after, up to the cap)."""
        delay = min(self._next, self.maximum)
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.initial


@dataclass
class LoopSettings:
    """Timing of :class:`AgentLoop` (seconds)."""

    poll_interval: float = 0.1
    resync_interval: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 10.0
    heartbeat_interval: float = 5.0

    @property
    def heartbeat(self) -> float:
        """How often the status is reported when nothing happens."""
        return min(self.heartbeat_interval, self.resync_interval)


@dataclass
class AgentStatus:
    """What ``secfw agent status`` reports (times are Unix seconds).

    ``unknown_taps`` (present, claimed by no port: dropped) and ``missing_taps``
    (ports whose tap is absent) are None when link watching is off.
    """

    healthy: bool = False
    backend: str = ""
    started_at: float = field(default_factory=time.time)
    last_sync: float | None = None
    last_full_sync: float | None = None
    revision: int | None = None
    store_revision: int | None = None
    ports: int = 0
    set_elements: int | None = None
    syncs: int = 0
    transactions: int = 0
    errors: int = 0
    consecutive_errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    retry_in: float | None = None
    drift_repairs: int = 0
    last_drift: dict[str, Any] | None = None
    unknown_taps: list[str] | None = None
    missing_taps: list[str] | None = None
    resync_interval: float = 0.0
    heartbeat_interval: float = 0.0
    last_result: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoopObserver:
    """Watches an :class:`AgentLoop`; every method is optional (no-op here).

    Called from the loop's thread; an exception raised by an observer is logged
    and otherwise ignored.
    """

    def on_sync(self, result: SyncResult) -> None:
        """A pass succeeded."""

    def on_failure(self, reason: str) -> None:
        """A pass failed; ``reason`` is store, backend or internal."""

    def on_link(self, present: bool) -> None:
        """A tap appeared (True) or disappeared."""

    def on_status(self, status: AgentStatus) -> None:
        """After every pass attempt, and every heartbeat while idle."""

    def on_stop(self, status: AgentStatus) -> None:
        """The loop stopped cleanly; the process is about to exit."""


class SystemdNotifier(LoopObserver):
    """sd_notify(3): READY=1 after the first pass attempt (success or not: the
    daemon is up and retries by itself), STATUS= lines, WATCHDOG=1 pings when
    ``WatchdogSec`` is set, STOPPING=1 at the end. No-op outside systemd."""

    def __init__(self) -> None:
        self._ready = False
        self._watchdog = watchdog_interval() is not None

    def on_status(self, status: AgentStatus) -> None:
        health = "healthy" if status.healthy else f"UNHEALTHY: {status.last_error}"
        lines = [f"STATUS={health}; revision {status.revision}; {status.ports} ports"]
        if not self._ready:
            lines.insert(0, "READY=1")
            self._ready = True
        if self._watchdog:
            lines.append("WATCHDOG=1")
        sd_notify("\n".join(lines))

    def on_stop(self, status: AgentStatus) -> None:
        sd_notify("STOPPING=1")


def error_text(exc: BaseException) -> str:
    """One line for people: a SecfwError's own message, else the type and message."""
    return str(exc) if isinstance(exc, SecfwError) else f"{type(exc).__name__}: {exc}"


def failure_reason(exc: BaseException) -> str:
    """store, backend or internal (a bug, or something unforeseen)."""
    if isinstance(exc, StoreError):
        return "store"
    if isinstance(exc, BackendError):
        return "backend"
    return "internal"


class AgentLoop:
    """Runs the reconciler on every trigger until stopped (see the module docstring).

    ``clock`` (monotonic) and ``wall`` (Unix time) are injectable for tests;
    ``taps`` returns the taps present now (from a :class:`~secfw.linkwatch.LinkWatcher`).
    """

    def __init__(
        self,
        reconciler: Reconciler,
        settings: LoopSettings | None = None,
        *,
        observers: Iterable[LoopObserver] = (),
        taps: Callable[[], frozenset[str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.reconciler = reconciler
        self.settings = settings or LoopSettings()
        self.observers = list(observers)
        self.taps = taps
        self.clock, self.wall = clock, wall
        self.wakeup = Wakeup()
        self.stopping = False
        self.status = AgentStatus(
            backend=getattr(reconciler.backend, "name", ""), started_at=wall(),
            resync_interval=self.settings.resync_interval,
            heartbeat_interval=self.settings.heartbeat,
        )
        self._pending: set[str] = {"start"}
        self._known_taps: frozenset[str] = frozenset()
        self._backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        self._retry_at: float | None = None
        self._next_resync = clock() + self.settings.resync_interval
        self._next_heartbeat = clock()

    # ---- control

    def request_full_sync(self) -> None:
        """Ask for a full pass (what SIGHUP does)."""
        self.wakeup.notify(Trigger("hup"))

    def stop(self) -> None:
        """Stop after the current pass (what SIGTERM does)."""
        self.wakeup.notify(Trigger("stop"))

    def link_changed(self, name: str, present: bool) -> None:
        """A tap appeared or disappeared (called from the link watcher's thread)."""
        self.wakeup.notify(Trigger("link", name, present))

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop after the current pass; SIGHUP: a full pass now.

        Handlers only queue a trigger. System calls these signals interrupt are
        restarted (``siginterrupt(False)``, i.e. SA_RESTART), so a netlink
        exchange of a transaction in flight is never cut short.
        """
        for signum, kind in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"),
                             (signal.SIGHUP, "hup")):
            signal.signal(signum, self._handler(kind, signal.Signals(signum).name))
            signal.siginterrupt(signum, False)

    def _handler(self, kind: str, name: str) -> Callable[[int, FrameType | None], None]:
        def handle(_signum: int, _frame: FrameType | None) -> None:
            self.wakeup.notify(Trigger(kind, name))

        return handle

    # ---- running

    def run(self) -> None:
        """Reconcile on every trigger until stopped; then report the stop."""
        while True:
            try:
                delay = self.step()
            except Exception:  # a bug in the loop itself must not end the daemon
                log.exception("loop_error")
                delay = self._backoff.next()
            if self.stopping:
                break
            self.wakeup.wait(delay)
        log_event(log, logging.INFO, "stopped", revision=self.status.revision,
                  reason="the last ruleset stays in force")
        self._notify("on_stop", self.status)

    def step(self) -> float:
        """One turn: take the queued triggers, run at most ONE pass for all of them,
        report; return the seconds until the next turn is due. Never raises for a
        failed pass (it is logged, counted and retried with backoff)."""
        self._collect()
        if self.stopping:
            return 0.0
        now = self.clock()
        if self._retry_at is not None:
            if now < self._retry_at and "hup" not in self._pending:
                return self._idle(now)
            self._pending.add("retry")
        if now >= self._next_resync:
            self._pending.add("resync")
        self._attempt()
        return self._idle(self.clock())

    def _collect(self) -> None:
        for trigger in self.wakeup.take():
            if trigger.kind == "stop":
                if not self.stopping:
                    log_event(log, logging.INFO, "stopping", signal=trigger.name or None,
                              action="finishing the current pass")
                self.stopping = True
            elif trigger.kind == "link":
                self._link_event(trigger)
            else:
                self._pending.add(trigger.kind)

    def _link_event(self, trigger: Trigger) -> None:
        known = trigger.name in self._known_taps
        fields: dict[str, Any] = {"tap": trigger.name,
                                  "event": "appeared" if trigger.present else "gone",
                                  "known": known}
        if trigger.present and not known:
            fields["action"] = "dropped until its port is known"
        log_event(log, logging.INFO, "link", **fields)
        self._notify("on_link", trigger.present)
        self._pending.add("link")

    def _attempt(self) -> None:
        """Run one pass if anything triggers it (or the store moved); failures are
        handled here, never raised."""
        triggers = self._pending
        try:
            if not triggers and self._store_moved():
                triggers = {"store"}
            if not triggers:
                return
            self._pending = set()
            result = self.reconciler.reconcile(full=bool(triggers & FULL_TRIGGERS))
        except Exception as exc:
            self._pending = set()
            self._failed(exc)
        else:
            self._succeeded(result, triggers)

    def _store_moved(self) -> bool:
        revision = self.reconciler.store_revision()
        self.status.store_revision = revision
        return revision != self.reconciler.applied_revision

    def _idle(self, now: float) -> float:
        """Report if a heartbeat is due; the seconds until the next turn."""
        if now >= self._next_heartbeat:
            self._report()
        deadlines = [self._next_heartbeat]
        if self._retry_at is not None:
            deadlines.append(self._retry_at)
        else:
            deadlines += [now + self.settings.poll_interval, self._next_resync]
        return max(0.0, min(deadlines) - now)

    # ---- outcomes

    def _succeeded(self, result: SyncResult, triggers: set[str]) -> None:
        now = self.clock()
        if result.full:
            self._next_resync = now + self.settings.resync_interval
            self.status.last_full_sync = self.wall()
        self._retry_at = None
        self._backoff.reset()
        status = self.status
        status.healthy, status.last_sync, status.revision = True, self.wall(), result.revision
        status.store_revision = result.revision  # what the pass read; the next poll updates it
        status.syncs += 1
        status.transactions += 1 if result.commands else 0
        status.consecutive_errors, status.retry_in = 0, None
        status.last_result = result.as_fields()
        self._note(result)
        if result.commands or result.full:
            log_event(log, logging.INFO, "sync", trigger=sorted(triggers), **result.as_fields(),
                      **(result.changes or {}))
        self._notify("on_sync", result)
        self._report()

    def _failed(self, exc: Exception) -> None:
        self.reconciler.invalidate()
        reason = failure_reason(exc)
        delay = self._backoff.next()
        self._retry_at = self.clock() + delay
        status = self.status
        status.healthy, status.retry_in = False, delay
        status.errors += 1
        status.consecutive_errors += 1
        status.last_error = error_text(exc)
        status.last_error_at = self.wall()
        log.error("sync_failed", exc_info=reason == "internal", extra={"fields": {
            "reason": reason, "error": status.last_error, "retry_in": delay,
            "consecutive_errors": status.consecutive_errors}})
        self._notify("on_failure", reason)
        if reason == "store":
            self._hold()
        self._report()

    def _hold(self) -> None:
        """The store is down: keep (or, at worst, close) the kernel's ruleset."""
        try:
            result = self.reconciler.hold()
        except Exception as exc:
            log_event(log, logging.ERROR, "hold_failed", error=str(exc))
            return
        if result is None:
            return
        self._note(result)
        if result.commands:
            action = "closed filter installed" if result.revision == 0 and not result.ports \
                else "last ruleset kept"
            log_event(log, logging.WARNING, "hold", action=action, **result.as_fields(),
                      **(result.changes or {}))

    def _note(self, result: SyncResult) -> None:
        """Record what a pass left in the kernel: ports, elements, taps, drift."""
        status = self.status
        status.ports, status.set_elements = result.ports, result.elements
        self._known_taps = result.taps
        if result.drift is not None:
            status.drift_repairs += 1
            status.last_drift = {"at": self.wall(), **result.drift}
            log_event(log, logging.WARNING, "drift_repaired", **result.drift)

    def _report(self) -> None:
        """Refresh the tap view and give every observer the status."""
        self._next_heartbeat = self.clock() + self.settings.heartbeat
        if self.taps is not None:
            try:
                present = self.taps()
            except Exception:  # the watcher is optional: never fail a report on it
                log.exception("taps_unavailable")
            else:
                self.status.unknown_taps = sorted(present - self._known_taps)
                self.status.missing_taps = sorted(self._known_taps - present)
        self._notify("on_status", self.status)

    def _notify(self, method: str, argument: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(argument)
            except Exception:
                log.exception("observer_failed", extra={"fields": {
                    "observer": type(observer).__name__, "method": method}})
