"""The host agent: keeps the kernel's filter equal to the store, for one host.

Two parts, kept apart as in controller-runtime:

* :class:`Reconciler` — the logic. Level-based: each pass reads the *whole*
  desired state (the cloud, followed incrementally through the store's change
  feed) and the actual state (what it last committed, or the kernel's table read
  back on a full sync), and applies the difference as **one** atomic transaction.
  No per-event logic: a pass does not care *why* it runs.
* :class:`AgentLoop` — the triggers. It polls the store's revision, runs a pass
  when it moved, a full pass at start, after any failure and every resync
  interval, backs off exponentially (capped) on errors, and never lets an
  exception end the daemon. SIGTERM/SIGINT stop it between passes (the current
  transaction always finishes); SIGHUP asks for a full pass.

The kernel table outlives the agent: stopping or killing it leaves the last
ruleset in force.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from secfw.cloud import CloudState
from secfw.compiler.build import compile_host
from secfw.compiler.ir import HostFilter
from secfw.config import Config
from secfw.errors import SecfwError
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


@dataclass
class SyncResult:
    """What one reconcile pass did."""

    revision: int
    full: bool
    commands: int
    ports: int
    seconds: float

    def as_fields(self) -> dict[str, Any]:
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

    @property
    def applied_revision(self) -> int | None:
        """The store revision the kernel reflects, or None before the first pass."""
        return self.cloud.revision if self._committed_valid and self.cloud else None

    def invalidate(self) -> None:
        """Forget what was committed: the next pass reads the kernel back (full sync)."""
        self._committed_valid = False

    def reconcile(self, full: bool = False) -> SyncResult:
        """One pass. ``full`` reloads the cloud and reads the kernel table back."""
        started = time.perf_counter()
        full = full or not self._committed_valid or self.cloud is None
        cloud = self._load_cloud(full)
        desired = compile_host(cloud, self.host, self.config.allow_same_net_traffic)
        current = self.backend.read() if full else self._committed
        plan = self.backend.plan(current, desired)
        self._committed_valid = False
        if not plan.empty:
            self.backend.apply(plan)
        self._committed = self.backend.committed(desired)
        self._committed_valid = True
        return SyncResult(
            cloud.revision, full, plan.size, len(desired.ports), time.perf_counter() - started
        )

    def _load_cloud(self, full: bool) -> CloudState:
        if full or self.cloud is None:
            self.cloud = CloudState.from_snapshot(self.store.load())
        else:
            revision, changes = self.store.changes_since(self.cloud.revision)
            if revision != self.cloud.revision:
                self.cloud.apply_changes(revision, changes)
        return self.cloud


@dataclass
class LoopSettings:
    poll_interval: float = 0.1
    resync_interval: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


@dataclass
class AgentStatus:
    """What ``secfw agent status`` reports."""

    healthy: bool = False
    last_sync: float | None = None
    revision: int | None = None
    ports: int = 0
    syncs: int = 0
    errors: int = 0
    last_error: str | None = None
    last_result: dict[str, Any] = field(default_factory=dict)


class AgentLoop:
    """Runs the reconciler on every trigger until stopped (see the module docstring)."""

    def __init__(self, reconciler: Reconciler, settings: LoopSettings | None = None) -> None:
        self.reconciler = reconciler
        self.settings = settings or LoopSettings()
        self.status = AgentStatus()
        self.stop_event = threading.Event()
        self._full_requested = True
        self._backoff = self.settings.backoff_initial
        self._next_resync = 0.0

    def request_full_sync(self) -> None:
        self._full_requested = True

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: stopping after the current pass", signal.Signals(signum).name)
            self.stop_event.set()

        def resync(_signum: int, _frame: FrameType | None) -> None:
            self.request_full_sync()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, resync)

    def run(self) -> None:
        """Reconcile on every trigger until :attr:`stop_event` is set."""
        while not self.stop_event.is_set():
            delay = self._step()
            self.stop_event.wait(delay)

    def _step(self) -> float:
        """One turn of the loop; returns how long to wait before the next."""
        try:
            if not self._due():
                return self.settings.poll_interval
            full = self._full_requested or time.monotonic() >= self._next_resync
            result = self.reconciler.reconcile(full=full)
        except Exception as exc:
            return self._failed(exc)
        self._succeeded(result)
        return self.settings.poll_interval

    def _due(self) -> bool:
        if self._full_requested or time.monotonic() >= self._next_resync:
            return True
        return self.reconciler.store.revision() != self.reconciler.applied_revision

    def _succeeded(self, result: SyncResult) -> None:
        if result.full:
            self._next_resync = time.monotonic() + self.settings.resync_interval
        self._full_requested = False
        self._backoff = self.settings.backoff_initial
        status = self.status
        status.healthy, status.last_sync, status.revision = True, time.time(), result.revision
        status.ports, status.syncs, status.last_error = result.ports, status.syncs + 1, None
        status.last_result = result.as_fields()
        if result.commands or result.full:
            log.info("sync %s", _logfmt(result.as_fields()))

    def _failed(self, exc: Exception) -> float:
        self.reconciler.invalidate()
        self._full_requested = True
        self.status.healthy = False
        self.status.errors += 1
        self.status.last_error = str(exc) if isinstance(exc, SecfwError) else repr(exc)
        delay, self._backoff = self._backoff, min(self._backoff * 2, self.settings.backoff_max)
        log.error("sync failed, retrying in %.1fs: %s", delay, self.status.last_error)
        return delay


def _logfmt(fields: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in fields.items())
