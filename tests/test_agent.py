"""The agent's loop and reconciler with a fake backend (no kernel), and its operations
plumbing: status report, logfmt, sd_notify, metrics, the reopening store.

The fake backend is an in-memory "kernel" holding a set of facts (one per port
and per group chain); the store is a real SQLite file written through the Api,
wrapped where a test needs it to fail. Time is a fake clock the tests move.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import generate_latest

from secfw.agent import (
    AgentLoop,
    AgentStatus,
    Backoff,
    LoopObserver,
    LoopSettings,
    Reconciler,
    SyncResult,
    SystemdNotifier,
    Trigger,
)
from secfw.agent.daemon import LogfmtFormatter, logfmt, sd_notify
from secfw.agent.metrics import AgentMetrics, parse_address
from secfw.agent.status import StatusWriter, classify, read_report, status_path, write_report
from secfw.agent.storewatch import ReopeningStore
from secfw.api import Api
from secfw.backends import get_backend
from secfw.backends.nftables.plan import Transaction
from secfw.backends.nftables.summary import summarize
from secfw.compiler.ir import HostFilter
from secfw.config import Config
from secfw.errors import BackendError, ConfigError, NotFoundError, StoreError
from secfw.store import open_store
from secfw.store.base import Change, Snapshot, Store, WriteTxn

if TYPE_CHECKING:
    from conftest import EtcdServer

HOST = "compute1"

# --------------------------------------------------------------------------- fakes


@dataclass(frozen=True)
class FakePlan:
    """A fake transaction: what it changes, and the state it leads to."""

    commands: tuple[str, ...]
    target: frozenset[str]

    @property
    def empty(self) -> bool:
        return not self.commands

    @property
    def size(self) -> int:
        return len(self.commands)


def facts(desired: HostFilter) -> frozenset[str]:
    """The fake kernel's view of a filter: one fact per port and per group chain."""
    return frozenset({f"port:{p.tap}" for p in desired.ports}
                     | {f"chain:{c.name}" for c in desired.chains})


@dataclass
class FakeBackend:
    """An in-memory kernel table (None: absent). ``fail`` raises on the next applies."""

    name: str = "fake"
    kernel: frozenset[str] | None = None
    applied: list[FakePlan] = field(default_factory=list)
    fail: list[Exception] = field(default_factory=list)

    def read(self) -> frozenset[str] | None:
        return self.kernel

    def plan(self, current: frozenset[str] | None, desired: HostFilter) -> FakePlan:
        want = facts(desired)
        if current == want:
            return FakePlan((), want)
        if current is None:
            return FakePlan(("replace",), want)
        return FakePlan(tuple(sorted({f"+{x}" for x in want - current}
                                     | {f"-{x}" for x in current - want})), want)

    def apply(self, plan: FakePlan) -> None:
        if self.fail:
            raise self.fail.pop(0)
        self.applied.append(plan)
        self.kernel = plan.target

    def committed(self, desired: HostFilter) -> frozenset[str]:
        return facts(desired)

    def cleanup(self) -> None:
        self.kernel = None

    def describe(self, plan: FakePlan) -> dict[str, Any]:
        return {"changed": list(plan.commands)}

    def element_count(self, state: frozenset[str]) -> int:
        return len(state)


class FlakyStore(Store):
    """A store that raises StoreError on every read while ``down``."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.url, self.down = inner, inner.url, False

    def _check(self) -> None:
        if self.down:
            raise StoreError("store unreadable (injected)")

    def revision(self) -> int:
        self._check()
        return self.inner.revision()

    def load(self) -> Snapshot:
        self._check()
        return self.inner.load()

    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        self._check()
        return self.inner.changes_since(revision)

    def write(self) -> AbstractContextManager[WriteTxn]:
        return self.inner.write()

    def close(self) -> None:
        self.inner.close()


class CountingReconciler(Reconciler):
    """The real reconciler, recording the ``full`` flag of every pass."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.passes: list[bool] = []

    def reconcile(self, full: bool = False) -> SyncResult:
        self.passes.append(full)
        return super().reconcile(full)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder(LoopObserver):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_sync(self, result: SyncResult) -> None:
        self.events.append(("sync", result))

    def on_failure(self, reason: str) -> None:
        self.events.append(("failure", reason))

    def on_stop(self, status: AgentStatus) -> None:
        self.events.append(("stop", status))


@dataclass
class Agent:
    """A loop on a fake backend and a flaky view of a real store, with a fake clock."""

    api: Api
    store: FlakyStore
    backend: FakeBackend
    reconciler: CountingReconciler
    loop: AgentLoop
    clock: Clock
    recorder: Recorder

    def boot(self, name: str) -> None:
        self.api.boot("p", name, "m1.tiny", "cirros", HOST, None, ["net"])


@pytest.fixture
def agent(api: Api, store_url: str) -> Iterator[Agent]:
    api.net_create("p", "net", "10.0.0.0/24")
    api.image_create("admin", "cirros", "qcow2", "public")
    api.boot("p", "vm1", "m1.tiny", "cirros", HOST, None, ["net"])
    store = FlakyStore(open_store(store_url))
    backend = FakeBackend()
    reconciler = CountingReconciler(store, HOST, Config(), backend)
    clock, recorder = Clock(), Recorder()
    settings = LoopSettings(poll_interval=0.1, resync_interval=60, backoff_initial=0.5,
                            backoff_max=5)
    loop = AgentLoop(reconciler, settings, observers=[recorder], clock=clock)
    yield Agent(api, store, backend, reconciler, loop, clock, recorder)
    loop.wakeup.close()
    store.close()


# --------------------------------------------------------------------------- triggers


def test_first_pass_is_full_then_idle_until_something_happens(agent: Agent) -> None:
    agent.loop.step()
    assert agent.reconciler.passes == [True]
    assert agent.backend.kernel is not None and len(agent.backend.kernel) == 2  # port + chain
    assert agent.loop.status.healthy and agent.loop.status.revision == agent.api.store.revision()
    delay = agent.loop.step()
    assert agent.reconciler.passes == [True]  # nothing changed: no pass
    assert 0 < delay <= 0.1 + 1e-6


def test_store_change_runs_one_incremental_pass(agent: Agent) -> None:
    agent.loop.step()
    agent.boot("vm2")
    agent.loop.step()
    assert agent.reconciler.passes == [True, False]
    assert agent.backend.applied[-1].commands == (f"+port:{_tap(agent, 'vm2')}",)


def test_triggers_are_coalesced_into_one_pass(agent: Agent) -> None:
    """Store change, link events and SIGHUP queued together: ONE pass, full (SIGHUP)."""
    agent.loop.step()
    agent.boot("vm2")
    agent.loop.link_changed("tapfoo", True)
    agent.loop.link_changed("tapbar", True)
    agent.loop.request_full_sync()
    agent.loop.link_changed("tapfoo", False)
    agent.loop.step()
    assert agent.reconciler.passes == [True, True]
    agent.loop.step()
    assert agent.reconciler.passes == [True, True]  # nothing left over


def test_link_event_alone_runs_an_incremental_pass(agent: Agent) -> None:
    agent.loop.step()
    agent.loop.link_changed("tapnew", True)
    agent.loop.step()
    assert agent.reconciler.passes == [True, False]


def test_resync_timer_makes_the_next_pass_full(agent: Agent) -> None:
    agent.loop.step()
    agent.clock.now += 59
    agent.loop.step()
    assert agent.reconciler.passes == [True]
    agent.clock.now += 1.5
    agent.loop.step()
    assert agent.reconciler.passes == [True, True]


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_sighup_asks_for_a_full_pass(agent: Agent, restore_signals: None) -> None:
    agent.loop.install_signal_handlers()
    agent.loop.step()
    agent.boot("vm2")
    os.kill(os.getpid(), signal.SIGHUP)
    agent.loop.step()
    assert agent.reconciler.passes == [True, True]


def test_sigterm_stops_the_loop_after_the_pass(agent: Agent, restore_signals: None) -> None:
    agent.loop.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGTERM)
    agent.loop.run()  # returns: stop was queued
    assert agent.loop.stopping
    assert [e for e, _ in agent.recorder.events] == ["stop"]


# --------------------------------------------------------------------------- failures


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(0.5, 5)
    assert [backoff.next() for _ in range(7)] == [0.5, 1, 2, 4, 5, 5, 5]
    backoff.reset()
    assert backoff.next() == 0.5


def test_failing_passes_back_off_with_a_cap_and_wait_in_between(agent: Agent) -> None:
    agent.store.down = True
    delays = []
    for _ in range(6):
        agent.loop.step()
        delays.append(agent.loop.status.retry_in)
        passes = len(agent.reconciler.passes)
        agent.clock.now += agent.loop.status.retry_in / 2  # during backoff: no attempt
        agent.loop.link_changed("tapzz", True)
        agent.loop.step()
        assert len(agent.reconciler.passes) == passes
        agent.clock.now += agent.loop.status.retry_in / 2
    assert delays == [0.5, 1, 2, 4, 5, 5]
    assert agent.loop.status.consecutive_errors == 6 and not agent.loop.status.healthy
    agent.store.down = False
    agent.loop.step()
    assert agent.loop.status.healthy and agent.loop.status.consecutive_errors == 0
    assert agent.reconciler.passes[-1] is True  # the pass after failures is full


def test_sighup_cuts_a_backoff_short(agent: Agent) -> None:
    agent.backend.fail = [BackendError("nft: injected")]
    agent.loop.step()
    assert agent.loop.status.retry_in == 0.5
    agent.loop.request_full_sync()
    agent.loop.step()
    assert agent.loop.status.healthy and agent.reconciler.passes == [True, True]


def test_an_unexpected_exception_does_not_end_the_daemon(agent: Agent) -> None:
    """run() (in this thread: SQLite connections are per thread) survives a bug-like
    exception and a backend error, retries, and is healthy again; a helper thread
    moves the fake clock and stops the loop. After each failure the agent tries to
    close the taps (the kernel has no table yet): the first try fails too (hold
    failures are logged, not counted), the second installs the closed filter."""
    agent.backend.fail = [RuntimeError("bug"), BackendError("nft: refused"),
                          BackendError("nft: refused")]

    def drive() -> None:
        # a bound on a hang only (the loop's real waits add up to ~1.5 s idle, more
        # when the machine is loaded): ends as soon as the loop is healthy
        deadline = time.monotonic() + 60
        while not (agent.loop.status.healthy or time.monotonic() > deadline):
            agent.clock.now += 0.25
            time.sleep(0.01)
        agent.loop.stop()

    helper = threading.Thread(target=drive)
    helper.start()
    agent.loop.run()  # really waits: at most the 0.5 s and 1 s retry delays
    helper.join()
    assert agent.loop.status.healthy and agent.loop.status.errors == 2
    reasons = [r for e, r in agent.recorder.events if e == "failure"]
    assert reasons == ["internal", "backend"]
    assert agent.loop.status.last_error == "nft: refused"  # the latest, kept as history
    assert agent.backend.applied[0].target == frozenset()  # the closed filter came first


def test_a_failing_observer_is_ignored(agent: Agent) -> None:
    class Broken(LoopObserver):
        def on_status(self, status: AgentStatus) -> None:
            raise OSError("disk full")

    agent.loop.observers.insert(0, Broken())
    agent.loop.step()
    assert agent.loop.status.healthy and agent.backend.kernel


# --------------------------------------------------------------------------- drift, outage


def test_full_pass_repairs_drift_and_says_what_differed(agent: Agent) -> None:
    agent.loop.step()
    good = agent.backend.kernel
    assert good is not None
    agent.clock.now += 61
    agent.loop.step()
    assert agent.loop.status.drift_repairs == 0  # a resync with no tampering
    tampered = next(iter(sorted(good)))
    agent.backend.kernel = good - {tampered}
    agent.clock.now += 61
    agent.loop.step()
    assert agent.backend.kernel == good
    assert agent.loop.status.drift_repairs == 1
    assert agent.loop.status.last_drift is not None
    assert agent.loop.status.last_drift["changed"] == [f"+{tampered}"]


def test_table_deleted_is_drift_too(agent: Agent) -> None:
    agent.loop.step()
    good = agent.backend.kernel
    agent.backend.kernel = None
    agent.loop.request_full_sync()
    agent.loop.step()
    assert agent.backend.kernel == good
    assert agent.loop.status.last_drift is not None
    assert agent.loop.status.last_drift["table"] == "absent"


def test_a_new_agent_catching_up_is_not_drift(agent: Agent, store_url: str) -> None:
    agent.backend.kernel = frozenset({"port:tapold"})  # left by a previous agent
    agent.loop.step()
    assert agent.loop.status.drift_repairs == 0
    assert agent.backend.applied[-1].commands[-1] == "-port:tapold"


def test_store_outage_keeps_the_last_ruleset_then_catches_up(agent: Agent) -> None:
    agent.loop.step()
    good = agent.backend.kernel
    agent.store.down = True
    agent.clock.now += 61
    agent.loop.step()
    status = agent.loop.status
    assert not status.healthy and "injected" in str(status.last_error)
    assert agent.backend.kernel == good
    # Drift during the outage is repaired from the last cloud known.
    agent.backend.kernel = frozenset()
    agent.boot("vm2")  # the store changes meanwhile (the agent cannot see it)
    agent.clock.now += status.retry_in or 0
    agent.loop.step()
    assert agent.backend.kernel == good
    agent.store.down = False
    agent.clock.now += status.retry_in or 0
    agent.loop.step()
    assert status.healthy
    assert agent.backend.kernel is not None and f"port:{_tap(agent, 'vm2')}" in agent.backend.kernel


def test_store_down_from_start_installs_the_closed_filter_only_if_no_table(agent: Agent) -> None:
    agent.store.down = True
    agent.loop.step()
    assert agent.backend.kernel == frozenset()  # a table with no port: every tap dropped
    other = FakeBackend(kernel=frozenset({"port:tapprev"}))  # a previous agent's table
    loop = AgentLoop(Reconciler(agent.store, HOST, Config(), other), clock=agent.clock)
    loop.step()
    assert other.kernel == frozenset({"port:tapprev"}) and not other.applied
    loop.wakeup.close()


def test_store_revision_going_back_reloads_everything(agent: Agent, tmp_path: Path) -> None:
    agent.loop.step()
    agent.reconciler.cloud.revision += 5  # as if the store had been restored from a backup
    result = agent.reconciler.reconcile()
    assert result.revision == agent.api.store.revision()


def test_compacted_store_history_reloads_everything(etcd_server: EtcdServer) -> None:
    """etcd discards old history (compaction): an agent whose revision is older
    than what is kept must load the whole store, not stop nor miss changes."""
    api = Api(open_store(etcd_server.url()))
    reader = open_store(api.store.url)
    try:
        api.net_create("p", "net", "10.0.0.0/24")
        api.image_create("admin", "cirros", "qcow2", "public")
        api.boot("p", "vm1", "m1.tiny", "cirros", HOST, None, ["net"])
        backend = FakeBackend()
        reconciler = CountingReconciler(reader, HOST, Config(), backend)
        reconciler.reconcile(full=True)
        api.boot("p", "vm2", "m1.tiny", "cirros", HOST, None, ["net"])
        api.boot("p", "vm3", "m1.tiny", "cirros", HOST, None, ["net"])
        etcd_server.compact()  # vm2's boot is now out of the history (vm3's is kept)
        result = reconciler.reconcile()
        assert result.revision == api.store.revision()
        assert backend.kernel is not None
        assert len([fact for fact in backend.kernel if fact.startswith("port:")]) == 3
    finally:
        reader.close()
        api.store.close()


# --------------------------------------------------------------------------- status file


def _status(**fields: Any) -> AgentStatus:
    status = AgentStatus(healthy=True, revision=7, ports=3, resync_interval=60,
                         heartbeat_interval=5)
    for key, value in fields.items():
        setattr(status, key, value)
    return status


def test_status_report_roundtrip_and_states(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path, "host/../x")
    writer.on_status(_status())
    assert status_path(tmp_path, "host/../x").parent == tmp_path  # the name is hashed
    report = read_report(tmp_path, "host/../x")
    assert report.state == "healthy" and report.doc["revision"] == 7
    writer.on_status(_status(healthy=False, last_error="store missing"))
    report = read_report(tmp_path, "host/../x")
    assert report.state == "unhealthy" and "store missing" in report.reason
    writer.on_stop(_status())
    assert read_report(tmp_path, "host/../x").state == "stopped"
    assert not list(tmp_path.glob(".agent-*"))  # no temporary file left


def test_status_report_of_a_dead_or_silent_agent(tmp_path: Path) -> None:
    StatusWriter(tmp_path, HOST).on_status(_status())
    doc = json.loads(status_path(tmp_path, HOST).read_text())
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert classify({**doc, "pid": dead.pid}, 1)[0] == "gone"
    assert classify(doc, 3 * 5 + 31)[0] == "stale"
    assert classify(doc, 1)[0] == "healthy"


def test_no_report_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no agent has reported"):
        read_report(tmp_path, HOST)
    status_path(tmp_path, HOST).write_text("{}")
    with pytest.raises(StoreError, match="not a version 1 agent report"):
        read_report(tmp_path, HOST)


def test_write_report_is_atomic_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_report(path, {"a": 1})
    with pytest.raises(TypeError):
        write_report(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert not list(tmp_path.glob(".agent-*"))


def test_agent_status_command(cli: Any, tmp_path: Path) -> None:
    line = cli.fails("agent", "status", "--host", HOST, "--state-dir", str(tmp_path))
    assert "no agent has reported" in line
    StatusWriter(tmp_path, HOST).on_status(_status(drift_repairs=2))
    doc = cli.json("agent", "status", "--host", HOST, "--state-dir", str(tmp_path))
    assert doc["state"] == "healthy" and doc["drift_repairs"] == 2 and doc["revision"] == 7
    table = cli.ok("agent", "status", "--host", HOST, "--state-dir", str(tmp_path))
    assert "HEALTHY" in table and "drift repairs" in table


def test_agent_command_needs_a_host(cli: Any) -> None:
    assert "--host" in cli.fails("agent", code=2)


# --------------------------------------------------------------------------- logs, systemd


def test_logfmt_is_one_line_and_quotes_what_needs_it() -> None:
    assert logfmt({"a": 1, "b": "two words", "c": 'q"x', "d": "", "e": ["x", "y"],
                   "f": None, "g": True}) == 'a=1 b="two words" c="q\\"x" d="" e=x,y f="" g=True'
    record = logging.LogRecord("secfw.agent", logging.ERROR, "f", 1, "sync_failed", None, None)
    record.fields = {"error": "line one\nline two"}
    text = LogfmtFormatter().format(record)
    assert "\n" not in text and "msg=sync_failed" in text and "level=error" in text
    assert 'error="line one\\nline two"' in text


def test_log_lines_of_the_loop_are_logfmt(agent: Agent) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    logger = logging.getLogger("secfw.agent")
    logger.addHandler(handler)
    try:
        agent.loop.step()
        agent.backend.fail = [RuntimeError("multi\nline")]
        agent.backend.kernel = frozenset()  # so that the pass has something to apply
        agent.loop.request_full_sync()
        agent.loop.step()
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert any(" msg=sync " in line and "full=True" in line for line in lines)
    failed = [line for line in lines if "msg=sync_failed" in line]
    assert len(failed) == 1 and "reason=internal" in failed[0] and "traceback=" in failed[0]


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_sd_notify_ready_once_then_status_and_stopping(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier()
    notifier.on_status(_status(healthy=False, last_error="nft: refused"))  # nothing filters yet
    unready = notify_socket.recv(4096).decode().splitlines()
    assert "READY=1" not in unready and "kernel holds none" in unready[0]
    notifier.on_status(_status(enforcing="closed"))
    first = notify_socket.recv(4096).decode().splitlines()
    assert first[0] == "READY=1" and first[1].startswith("STATUS=healthy")
    assert "WATCHDOG=1" in first
    notifier.on_status(_status(healthy=False, last_error="x"))
    second = notify_socket.recv(4096).decode()
    assert "READY=1" not in second and "UNHEALTHY" in second
    notifier.on_stop(_status())
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_watchdog_pinged_during_a_long_pass_until_it_is_stuck(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass longer than WatchdogSec keeps the watchdog fed (a 50k-port first pass
    takes a minute); one longer than max_pass_seconds does not (systemd kills it)."""
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # pings every 20 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    clock = Clock()
    notifier = SystemdNotifier(max_pass_seconds=30, clock=clock)
    notify_socket.settimeout(2)
    notifier.on_pass(True)
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    clock.now += 31  # the pass is stuck
    time.sleep(0.1)  # let a ping already under way arrive, then drain
    notify_socket.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while notify_socket.recv(4096):
            pass
    notify_socket.settimeout(0.3)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)
    notifier.on_pass(False)
    notifier.on_stop(_status())


def test_sd_notify_outside_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False


# --------------------------------------------------------------------------- metrics


def test_metrics_follow_the_loop(agent: Agent) -> None:
    metrics = AgentMetrics()
    agent.loop.observers.append(metrics)
    agent.loop.step()
    agent.backend.kernel = frozenset()
    agent.loop.request_full_sync()
    agent.loop.step()
    agent.store.down = True
    agent.clock.now += 61
    agent.loop.step()
    text = generate_latest(metrics.registry).decode()
    assert 'secfw_agent_syncs_total{kind="full"} 2.0' in text
    assert "secfw_agent_transactions_total 2.0" in text
    assert "secfw_agent_drift_repairs_total 1.0" in text
    assert 'secfw_agent_sync_failures_total{reason="store"} 1.0' in text
    assert "secfw_agent_ports 1.0" in text and "secfw_agent_set_elements 2.0" in text
    assert "secfw_agent_healthy 0.0" in text
    assert f"secfw_agent_applied_revision {float(agent.api.store.revision())}" in text
    assert 'secfw_agent_sync_duration_seconds_count{kind="full"} 2.0' in text


def test_metrics_served_over_http() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = AgentMetrics()
    metrics.serve(f"127.0.0.1:{port}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read().decode()
    finally:
        metrics.close()
    assert "secfw_agent_healthy" in body and "process_open_fds" in body


def test_metrics_address_parsing() -> None:
    assert parse_address("127.0.0.1:9468") == ("127.0.0.1", 9468)
    assert parse_address("[::1]:9468") == ("::1", 9468)
    for bad in ("localhost:9468", "127.0.0.1", "127.0.0.1:0", "1.2.3.4:x", ":80"):
        with pytest.raises(ConfigError):
            parse_address(bad)


# --------------------------------------------------------------------------- plumbing


def test_transaction_summary_names_chains_sets_and_counts() -> None:
    tx = Transaction((
        'delete element inet secfw sg-a-ports { "tap1", "tap2" }',
        'add element inet secfw ingress_ports { "tap3" : goto ingress-filter }',
        "flush chain inet secfw forward-ingress",
        'add rule inet secfw forward-ingress oifname != "tap*" accept comment "x:1"',
        'add rule inet secfw forward-ingress drop comment "x:2"',
    ))
    assert summarize(tx) == {"replaced": False, "chains": ["forward-ingress"],
                             "sets": ["ingress_ports", "sg-a-ports"], "elements_added": 1,
                             "elements_deleted": 2, "rules": 2}
    assert summarize(Transaction(("add table inet secfw",), full=True)) == {"replaced": True}
    assert summarize(Transaction(("flush chain inet secfw c",))) == {"replaced": False,
                                                                     "chains": ["c"]}


def test_nftables_plan_description_caps_the_names_it_lists() -> None:
    """A first sync at 10k ports rewrites ~1,000 chains: the sync log line lists
    the first names and the counts, as the iptables backend's does."""
    backend = get_backend("nftables")
    many = Transaction(tuple(f"flush chain inet secfw c{i:02d}" for i in range(30))
                       + tuple(f'add element inet secfw s{i:02d} {{ "tap{i}" }}'
                               for i in range(25)))
    described = backend.describe(many)
    assert described["chains"] == [*(f"c{i:02d}" for i in range(20)), "…"]
    assert described["sets"] == [*(f"s{i:02d}" for i in range(20)), "…"]
    assert (described["chains_count"], described["sets_count"]) == (30, 25)
    assert described["elements_added"] == 25
    assert backend.describe(Transaction(("flush chain inet secfw c",))) == {
        "replaced": False, "chains": ["c"]}


def test_reopening_store_never_creates_and_notices_replacement(
    api: Api, store_url: str, tmp_path: Path
) -> None:
    api.secgroup_create("p", "web", "web")
    missing = ReopeningStore(f"sqlite:///{tmp_path}/nope.db")
    with pytest.raises(StoreError, match="missing"):
        missing.revision()
    assert not (tmp_path / "nope.db").exists()

    store = ReopeningStore(store_url)
    assert store.revision() == 1 and not store.replaced()
    path = Path(store_url.removeprefix("sqlite://"))
    copy = tmp_path / "copy.db"
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)  # a restore from backup: a new inode at the same path
    assert store.replaced()
    store.reopen()
    assert not store.replaced()
    with pytest.raises(StoreError, match="never writes"):
        store.write()
    store.close()


def test_reopening_store_refuses_an_emptied_store(api: Api, store_url: str) -> None:
    api.secgroup_create("p", "web", "web")
    store = ReopeningStore(store_url)
    assert store.revision() == 1
    path = Path(store_url.removeprefix("sqlite://"))
    api.store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    open_store(store_url).close()  # a fresh, empty store at the same path
    with pytest.raises(StoreError, match="empty"):
        store.reopen()
    store.close()


WAKE_LIMIT_S = 60.0


def test_wakeup_from_another_thread_is_prompt(agent: Agent) -> None:
    # Prompt means: the wait ends on the notification, well before its own timeout
    # (generous, so that a loaded machine's late Timer thread cannot look like a
    # missed wake-up; a wait that missed it lasts the whole timeout).
    started = time.monotonic()
    threading.Timer(0.05, agent.loop.link_changed, ("tapx", True)).start()
    agent.loop.wakeup.wait(WAKE_LIMIT_S)
    assert time.monotonic() - started < WAKE_LIMIT_S
    assert agent.loop.wakeup.take() == [Trigger("link", "tapx", True)]


def _tap(agent: Agent, name: str) -> str:
    state = agent.api.snapshot()
    (instance,) = [i for i in state.instances.values() if i.name == name]
    (port,) = state.ports_of(instance.id)
    return port.tap
