"""The agent's loop: what triggers a reconcile pass, and what watches it.

:class:`AgentLoop` runs :class:`~secfw.agent.reconciler.Reconciler` passes on
triggers — store writes (a watch's ``store`` or ``poll`` trigger, else a
revision poll), taps appearing or disappearing
(:mod:`secfw.agent.linkwatch`), the periodic resync timer, SIGHUP, and retries
after failures. Whatever is queued when the loop wakes is coalesced into ONE
pass, full when any trigger asks for it. Failures back off exponentially up to
a cap, and no exception ends the daemon. :class:`LoopObserver` subclasses (the
status file, Prometheus metrics, systemd notification) watch every pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

from secfw.agent.daemon import log_event, sd_notify, watchdog_interval
from secfw.agent.reconciler import Reconciler, SyncResult
from secfw.agent.resync import ATTEMPTS, CheckResult, KernelCheck
from secfw.errors import BackendError, SecfwError, StoreError

log = logging.getLogger("secfw.agent")


@dataclass(frozen=True)
class Trigger:
    """A reason to run a pass. ``kind``: start, store, link, resync, hup, retry,
    materialize (the pass after one that found the kernel in sync from the
    restart record alone: it loads the store and builds the agent's state) or
    stop; for ``link``, ``name`` is the tap, ``present`` whether it appeared and
    ``moved`` whether it joined or left a bridge instead."""

    kind: str
    name: str = ""
    present: bool = True
    moved: bool = False
    checked: CheckResult | None = None


#: Triggers whose pass must be full: it reopens the store and reads the kernel back.
#: ``drift``: a background kernel check (secfw.agent.resync) found the kernel
#: different from what the loop committed, or could not tell.
FULL_TRIGGERS = frozenset({"start", "resync", "hup", "retry", "drift"})


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
    #: How often kernel switches the filter depends on are checked (br_netfilter).
    kernel_check_interval: float = 0.2
    #: Longest pass the watchdog tolerates: past it, pings stop and systemd's
    #: WatchdogSec kills the stuck agent (a 50k-port first pass takes ~1 min).
    max_pass_seconds: float = 600.0
    #: The revision poll while a store watch is in place (:attr:`AgentLoop.store_watched`):
    #: only a safety net then, every write wakes the loop. (Last: callers pass the
    #: first fields by position.)
    watched_poll_interval: float = 5.0

    @property
    def heartbeat(self) -> float:
        """How often the status is reported when nothing happens."""
        return min(self.heartbeat_interval, self.resync_interval)


@dataclass
class AgentStatus:
    """What ``secfw agent status`` reports (times are Unix seconds).

    ``unknown_taps`` (present, claimed by no port: dropped) and ``missing_taps``
    (ports whose tap is absent) are None when link watching is off.
    ``enforcing`` is what the kernel holds: ``none`` (nothing yet: taps
    unfiltered), ``previous`` (a ruleset an earlier agent left), ``closed`` (the
    closed filter: every tap dropped) or ``ruleset`` (this agent's last
    successful pass). ``isolated_ports`` are ports left closed because the
    backend cannot express them (tap, port id, reason).
    """

    healthy: bool = False
    backend: str = ""
    started_at: float = field(default_factory=time.time)
    last_sync: float | None = None
    last_full_sync: float | None = None
    #: The last background kernel check that found the kernel as committed.
    last_kernel_check: float | None = None
    #: Background kernel checks finished, and how many of them needed no
    #: read-back (the nftables generation had not moved: secfw.agent.resync).
    kernel_checks: int = 0
    kernel_checks_skipped: int = 0
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
    enforcing: str = "none"
    topology: str | None = None
    isolated_ports: list[dict[str, str]] = field(default_factory=list)

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

    def on_pass(self, running: bool) -> None:
        """A pass (or the first closing step) starts (True) or ends (False)."""

    def on_link(self, present: bool) -> None:
        """A tap appeared (True) or disappeared."""

    def on_status(self, status: AgentStatus) -> None:
        """After every pass attempt, and every heartbeat while idle."""

    def on_stop(self, status: AgentStatus) -> None:
        """The loop stopped cleanly; the process is about to exit."""


class SystemdNotifier(LoopObserver):
    """sd_notify(3): READY=1 once the kernel holds a ruleset or the closed filter
    (whatever failed: never while taps could still run unfiltered), STATUS=
    lines, WATCHDOG=1 pings when ``WatchdogSec`` is set, STOPPING=1 at the end.
    No-op outside systemd.

    Between passes the loop's heartbeat pings the watchdog. During a pass a
    thread keeps pinging — a 50k-port full pass takes longer than any sane
    ``WatchdogSec`` — but only for ``max_pass_seconds``: a pass stuck longer
    stops the pings, and systemd kills and restarts the agent (the kernel keeps
    the last ruleset meanwhile).
    """

    def __init__(self, max_pass_seconds: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ready = False
        self._interval = watchdog_interval()
        self._max_pass = max_pass_seconds
        self._clock = clock
        self._pass_started: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_pass(self, running: bool) -> None:
        self._pass_started = self._clock() if running else None
        if running and self._interval is not None and self._thread is None:
            self._thread = threading.Thread(target=self._ping_during_passes,
                                            name="secfw-watchdog", daemon=True)
            self._thread.start()

    def _ping_during_passes(self) -> None:
        assert self._interval is not None
        while not self._stop.wait(self._interval / 2):
            started = self._pass_started
            if started is not None and self._clock() - started < self._max_pass:
                sd_notify("WATCHDOG=1")

    def on_status(self, status: AgentStatus) -> None:
        health = ("healthy" if status.healthy else
                  f"UNHEALTHY: {status.last_error}" if status.last_error else "starting")
        lines = [f"STATUS={health}; kernel holds {status.enforcing}; "
                 f"revision {status.revision}; {status.ports} ports"]
        if not self._ready and status.enforcing != "none":
            lines.insert(0, "READY=1")
            self._ready = True
        if self._interval is not None:
            lines.append("WATCHDOG=1")
        sd_notify("\n".join(lines))

    def on_stop(self, status: AgentStatus) -> None:
        self._stop.set()
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
    ``taps`` returns the taps present now (from a :class:`~secfw.agent.linkwatch.LinkWatcher`).
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
        self._next_poll = clock()
        #: Whether a store watch (etcd, inotify) is in place: the poll slows down.
        self.store_watched: Callable[[], bool] = lambda: False
        self._next_heartbeat = clock()
        self._next_kernel_check = clock()
        self.status.topology = getattr(reconciler.backend, "topology", None)
        self.kernel_check = KernelCheck(
            lambda result: self.wakeup.notify(Trigger("checked", checked=result)), clock)
        self._void_checks = 0

    # ---- control

    def request_full_sync(self) -> None:
        """Ask for a full pass (what SIGHUP does)."""
        self.wakeup.notify(Trigger("hup"))

    def stop(self) -> None:
        """Stop after the current pass (what SIGTERM does)."""
        self.wakeup.notify(Trigger("stop"))

    def store_changed(self) -> None:
        """The store may have changed (a file watch): read its revision now."""
        self.wakeup.notify(Trigger("poll"))

    def link_changed(self, name: str, present: bool) -> None:
        """A tap appeared or disappeared (called from the link watcher's thread)."""
        self.wakeup.notify(Trigger("link", name, present))

    def link_moved(self, name: str) -> None:
        """A tap joined or left a bridge (called from the link watcher's thread)."""
        self.wakeup.notify(Trigger("link", name, True, moved=True))

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
        """Close the taps if nothing filters them yet, then reconcile on every
        trigger until stopped; then report the stop."""
        self.close_first()
        while True:
            try:
                delay = self.step()
            except Exception:  # a bug in the loop itself must not end the daemon
                log.exception("loop_error")
                delay = self._backoff.next()
            if self.stopping:
                break
            self.wakeup.wait(delay)
        self._remember()
        log_event(log, logging.INFO, "stopped", revision=self.status.revision,
                  reason="the last ruleset stays in force")
        self._notify("on_stop", self.status)

    def close_first(self) -> None:
        """Before the store is read: the closed filter when secfw has no table in
        the kernel (:meth:`Reconciler.close_if_absent`). A failure is handled as a
        failed pass (logged, retried; the first pass follows at once anyway)."""
        self._notify("on_pass", True)
        try:
            result = self.reconciler.close_if_absent()
        except Exception as exc:
            self._failed(exc)
            return
        finally:
            self._notify("on_pass", False)
        self.status.topology = getattr(self.reconciler.backend, "topology", None)
        if result is None:
            self.status.enforcing = "previous"
            return
        self.status.enforcing = "closed"
        self._note(result)
        log_event(log, logging.WARNING, "closed", reason="no table of secfw's in the kernel",
                  action="every tap dropped until the first pass", **result.as_fields())
        # No report yet: the first pass follows at once, and READY=1 comes with it.

    def step(self) -> float:
        """One turn: take the queued triggers, run at most ONE pass for all of them,
        report; return the seconds until the next turn is due. Never raises for a
        failed pass (it is logged, counted and retried with backoff)."""
        self._collect()
        if self.stopping:
            return 0.0
        self._guard_kernel()
        now = self.clock()
        if self._retry_at is not None:
            if now < self._retry_at and "hup" not in self._pending:
                return self._idle(now)
            self._pending.add("retry")
        if now >= self._next_resync:
            self._resync(now)
        self._attempt()
        return self._idle(self.clock())

    def _guard_kernel(self) -> None:
        """Every :attr:`LoopSettings.kernel_check_interval`: restore kernel switches
        the filter depends on at once (a drift repair), and ask for a full pass."""
        now = self.clock()
        if now < self._next_kernel_check:
            return
        self._next_kernel_check = now + self.settings.kernel_check_interval
        try:
            restored = self.reconciler.guard_kernel()
        except Exception as exc:
            log_event(log, logging.ERROR, "kernel_guard_failed", error=error_text(exc))
            return
        if restored is not None:
            self.status.drift_repairs += 1
            self.status.last_drift = {"at": self.wall(), "restored": restored}
            log_event(log, logging.WARNING, "drift_repaired", restored=restored)
            self._pending.add("resync")

    def _collect(self) -> None:
        for trigger in self.wakeup.take():
            if trigger.kind == "stop":
                if not self.stopping:
                    log_event(log, logging.INFO, "stopping", signal=trigger.name or None,
                              action="finishing the current pass")
                self.stopping = True
            elif trigger.kind == "link":
                self._link_event(trigger)
            elif trigger.checked is not None:
                self._checked(trigger.checked)
            elif trigger.kind == "poll":
                self._next_poll = self.clock()
            else:
                self._pending.add(trigger.kind)

    def _resync(self, now: float) -> None:
        """The resync timer fired. With a backend that can read the kernel from
        another thread: start a background kernel check (secfw.agent.resync) and
        run an incremental pass that checks the store — no pass waits for the
        read-back. Otherwise (or while a check is still running after a whole
        period): a full pass, as before."""
        self._next_resync = now + self.settings.resync_interval
        reader = None if self.kernel_check.running else self._reader()
        if reader is None or not self.kernel_check.start(self.reconciler, reader):
            self._pending.add("resync")
            return
        self._pending.add("store-check")

    def _reader(self) -> Callable[[], Any] | None:
        try:
            return self.reconciler.kernel_reader()
        except Exception as exc:  # the full pass will say what is wrong
            log_event(log, logging.WARNING, "kernel_check_failed", error=error_text(exc))
            return None

    def _checked(self, result: CheckResult) -> None:
        """A background kernel check finished: nothing to do when the kernel held
        what was committed; a full pass (it repairs) when it differs or the check
        failed; another check when the loop's own commits spoilt it (a full pass
        after :data:`ATTEMPTS` of them)."""
        self.status.kernel_checks += 1
        if result.outcome in ("same", "unchanged"):
            self.status.kernel_checks_skipped += result.outcome == "unchanged"
            self._void_checks = 0
            self._remember()
            self.status.last_kernel_check = self.wall()
            return
        if result.outcome == "void":
            self._void_checks += 1
            reader = self._reader() if self._void_checks < ATTEMPTS else None
            if reader is not None and self.kernel_check.start(self.reconciler, reader):
                return
        self._void_checks = 0
        fields: dict[str, Any] = {"outcome": result.outcome, "ms": round(result.seconds * 1e3)}
        if result.error:
            fields["error"] = result.error
        log_event(log, logging.INFO, "kernel_check", action="full pass", **fields)
        self._pending.add("drift")

    def _remember(self) -> None:
        """Keep what the kernel holds for the next agent (never fails a pass)."""
        try:
            self.reconciler.remember_kernel()
        except Exception:
            log.exception("kernel_record_failed")

    def _link_event(self, trigger: Trigger) -> None:
        self.reconciler.links_changed()  # the next pass checks the topology
        known = trigger.name in self._known_taps
        event = "moved" if trigger.moved else "appeared" if trigger.present else "gone"
        fields: dict[str, Any] = {"tap": trigger.name, "event": event, "known": known}
        if trigger.present and not known:
            fields["action"] = "dropped until its port is known"
        log_event(log, logging.INFO, "link", **fields)
        if not trigger.moved:
            self._notify("on_link", trigger.present)
        self._pending.add("link")

    def _attempt(self) -> None:
        """Run one pass if anything triggers it (or the store moved); failures are
        handled here, never raised."""
        triggers = self._pending
        try:
            if not triggers and self._poll_due() and self._store_moved():
                triggers = {"store"}
            if not triggers:
                return
            self._pending = set()
            self._notify("on_pass", True)
            full = bool(triggers & FULL_TRIGGERS)
            if "store-check" in triggers and not full:  # the resync's store check
                self.reconciler.check_store()
            result = self.reconciler.reconcile(full=full)
        except Exception as exc:
            self._pending = set()
            self._failed(exc)
        else:
            self._succeeded(result, triggers)
        finally:
            self._notify("on_pass", False)

    def _poll_due(self) -> bool:
        """Whether the store's revision is due to be read (and schedule the next read)."""
        now = self.clock()
        if now < self._next_poll:
            return False
        watched = self.store_watched()
        self._next_poll = now + (self.settings.watched_poll_interval if watched
                                 else self.settings.poll_interval)
        return True

    def _store_moved(self) -> bool:
        revision = self.reconciler.store_revision()
        self.status.store_revision = revision
        return revision != self.reconciler.applied_revision

    def _idle(self, now: float) -> float:
        """Report if a heartbeat is due; the seconds until the next turn."""
        if now >= self._next_heartbeat:
            self._report()
        deadlines = [self._next_heartbeat, self._next_kernel_check]
        if self._retry_at is not None:
            deadlines.append(self._retry_at)
        else:
            deadlines += [self._next_poll, self._next_resync]
        return max(0.0, min(deadlines) - now)

    # ---- outcomes

    def _succeeded(self, result: SyncResult, triggers: set[str]) -> None:
        now = self.clock()
        if result.full:
            self._next_resync = now + self.settings.resync_interval
            self.status.last_full_sync = self.wall()
            self._remember()
        self._retry_at = None
        self._backoff.reset()
        status = self.status
        status.healthy, status.last_sync, status.revision = True, self.wall(), result.revision
        status.store_revision = result.revision  # what the pass read; the next poll updates it
        status.syncs += 1
        status.transactions += 1 if result.commands else 0
        status.consecutive_errors, status.retry_in = 0, None
        status.last_result = result.as_fields()
        status.enforcing = "ruleset"
        status.topology = getattr(self.reconciler.backend, "topology", None)
        self._note(result)
        if result.commands or result.full:
            log_event(log, logging.INFO, "sync", trigger=sorted(triggers), **result.as_fields(),
                      **(result.changes or {}))
        self._notify("on_sync", result)
        self._report()
        if result.deferred:  # in sync from the restart record: build the state now
            self.wakeup.notify(Trigger("materialize"))

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
        self._hold(reason)
        self._report()

    def _hold(self, reason: str) -> None:
        """A pass failed: keep the kernel's last ruleset, or close it when there is
        none (:meth:`Reconciler.hold`)."""
        try:
            result = self.reconciler.hold(reason)
        except Exception as exc:
            log_event(log, logging.ERROR, "hold_failed", error=error_text(exc))
            return
        if result is None:
            if self.status.enforcing == "none":  # a table is there: an earlier ruleset
                self.status.enforcing = "previous"
            return
        self._note(result)
        if result.closed:
            self.status.enforcing = "closed"
        if result.commands:
            action = "closed filter installed" if result.closed else "last ruleset kept"
            log_event(log, logging.WARNING, "hold", action=action, **result.as_fields(),
                      **(result.changes or {}))

    def _note(self, result: SyncResult) -> None:
        """Record what a pass left in the kernel: ports, elements, taps, drift."""
        status = self.status
        status.ports, status.set_elements = result.ports, result.elements
        status.isolated_ports = [port.as_dict() for port in result.isolated]
        self._known_taps = result.taps
        if result.drift is not None:
            status.drift_repairs += 1
            status.last_drift = {"at": self.wall(), **result.drift}
            log_event(log, logging.WARNING, "drift_repaired", **result.drift)

    def _report(self) -> None:
        """Refresh the tap view and give every observer the status."""
        self._next_heartbeat = self.clock() + self.settings.heartbeat
        if self.taps is not None and not self.reconciler.deferred:  # taps known: compare
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
