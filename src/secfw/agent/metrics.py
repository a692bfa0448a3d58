"""Prometheus metrics of the host agent (prometheus-client).

:class:`AgentMetrics` is a loop observer (:class:`secfw.agent.LoopObserver`):
the loop reports every pass and every failure to it, and its status after each.
Each instance has its own registry, so several loops (tests) never collide.
:meth:`AgentMetrics.serve` exposes them over HTTP (``/metrics``) from a
background thread; the agent only does so when given ``--metrics-address``.

Metric names (all prefixed ``secfw_agent_``):

=============================== ========= ===============================================
name                            type      meaning
=============================== ========= ===============================================
sync_duration_seconds{kind}     histogram duration of successful passes (kind=full|incremental)
syncs_total{kind}               counter   successful passes
transactions_total              counter   non-empty transactions committed to the kernel
transaction_commands_total      counter   backend commands in those transactions
sync_failures_total{reason}     counter   failed passes (reason=store|backend|internal)
drift_repairs_total             counter   kernel state changed behind the agent's back and
                                          repaired (by a full pass, or br_netfilter's
                                          switches turned back on)
link_events_total{event}        counter   taps appearing / disappearing (event=appeared|gone)
kernel_checks_total{readback}   counter   periodic kernel checks done (readback=read: the
                                          tables listed; skipped: the nftables generation
                                          had not moved since the kernel held them)
ports                           gauge     ports filtered on this host
set_elements                    gauge     elements in secfw's sets and maps
unknown_taps                    gauge     taps no port claims (dropped: fail closed)
applied_revision                gauge     store revision the kernel reflects
store_revision                  gauge     latest store revision seen
healthy                         gauge     1 when the last pass succeeded, else 0
last_sync_timestamp_seconds     gauge     Unix time of the last successful pass
isolated_ports                  gauge     ports left closed: the backend cannot express them
enforcing{state}                gauge     1 for what the kernel holds (state=none|previous|
                                          closed|ruleset), 0 for the others
=============================== ========= ===============================================

Plus the standard ``process_*`` metrics (CPU, memory, open descriptors).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from secfw.agent.loop import LoopObserver
from secfw.errors import ConfigError

if TYPE_CHECKING:
    from secfw.agent.loop import AgentStatus
    from secfw.agent.reconciler import SyncResult

PREFIX = "secfw_agent_"
DEFAULT_ADDRESS = "127.0.0.1:9468"
#: From 1 ms (an empty incremental pass) to 30 s (a full sync of a large host).
_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Values of :attr:`AgentStatus.enforcing`.
ENFORCING_STATES = ("none", "previous", "closed", "ruleset")


class AgentMetrics(LoopObserver):
    """The agent's metrics in one registry (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.server: Any = None
        self._define_counters()
        self._define_gauges()
        self._drift_seen = 0

    def _define_counters(self) -> None:
        reg = self.registry
        self.sync_duration = Histogram(
            PREFIX + "sync_duration_seconds", "Duration of successful passes.", ["kind"],
            buckets=_BUCKETS, registry=reg)
        self.syncs = Counter(PREFIX + "syncs", "Successful passes.", ["kind"], registry=reg)
        self.transactions = Counter(
            PREFIX + "transactions", "Non-empty transactions committed.", registry=reg)
        self.commands = Counter(
            PREFIX + "transaction_commands", "Commands in committed transactions.", registry=reg)
        self.failures = Counter(
            PREFIX + "sync_failures", "Failed passes.", ["reason"], registry=reg)
        self.drift_repairs = Counter(
            PREFIX + "drift_repairs", "Kernel changes behind the agent's back, repaired.",
            registry=reg)
        self.link_events = Counter(
            PREFIX + "link_events", "Taps appearing or disappearing.", ["event"], registry=reg)
        for kind in ("full", "incremental"):  # export zeros before the first event
            self.syncs.labels(kind)
        for reason in ("store", "backend", "internal"):
            self.failures.labels(reason)
        for event in ("appeared", "gone"):
            self.link_events.labels(event)
        self.kernel_checks = Counter(
            PREFIX + "kernel_checks", "Periodic kernel checks (readback=read|skipped).",
            ["readback"], registry=reg)
        self._checks_seen = (0, 0)
        for readback in ("read", "skipped"):
            self.kernel_checks.labels(readback)

    def _define_gauges(self) -> None:
        reg = self.registry
        self.ports = Gauge(PREFIX + "ports", "Ports filtered on this host.", registry=reg)
        self.set_elements = Gauge(
            PREFIX + "set_elements", "Elements in secfw's sets and maps.", registry=reg)
        self.unknown_taps = Gauge(
            PREFIX + "unknown_taps", "Taps no port claims (dropped).", registry=reg)
        self.applied_revision = Gauge(
            PREFIX + "applied_revision", "Store revision the kernel reflects.", registry=reg)
        self.store_revision = Gauge(
            PREFIX + "store_revision", "Latest store revision seen.", registry=reg)
        self.healthy = Gauge(
            PREFIX + "healthy", "1 when the last pass succeeded.", registry=reg)
        self.last_sync = Gauge(
            PREFIX + "last_sync_timestamp_seconds", "Unix time of the last successful pass.",
            registry=reg)
        self.isolated_ports = Gauge(
            PREFIX + "isolated_ports",
            "Ports left closed because the backend cannot express them.", registry=reg)
        self.enforcing = Gauge(
            PREFIX + "enforcing",
            "1 for what the kernel holds: none (taps unfiltered), previous (an earlier "
            "agent's ruleset), closed (every tap dropped) or ruleset (this agent's).",
            ["state"], registry=reg)

    # ---- LoopObserver

    def on_sync(self, result: SyncResult) -> None:
        """Count a successful pass."""
        kind = "full" if result.full else "incremental"
        self.sync_duration.labels(kind).observe(result.seconds)
        self.syncs.labels(kind).inc()
        if result.commands:
            self.transactions.inc()
            self.commands.inc(result.commands)

    def on_failure(self, reason: str) -> None:
        """Count a failed pass (``reason``: store, backend or internal)."""
        self.failures.labels(reason).inc()

    def on_link(self, present: bool) -> None:
        """Count a tap appearing or disappearing."""
        self.link_events.labels("appeared" if present else "gone").inc()

    def on_status(self, status: AgentStatus) -> None:
        """Mirror the loop's status in the gauges."""
        self.healthy.set(1 if status.healthy else 0)
        self.ports.set(status.ports)
        self.set_elements.set(status.set_elements or 0)
        self.unknown_taps.set(len(status.unknown_taps or ()))
        self.isolated_ports.set(len(status.isolated_ports))
        for state in ENFORCING_STATES:
            self.enforcing.labels(state).set(1 if status.enforcing == state else 0)
        # Repairs by a pass and by the kernel guard (br_netfilter) alike.
        self.drift_repairs.inc(max(0, status.drift_repairs - self._drift_seen))
        self._drift_seen = max(self._drift_seen, status.drift_repairs)
        self._count_checks(status)
        if status.revision is not None:
            self.applied_revision.set(status.revision)
        if status.store_revision is not None:
            self.store_revision.set(status.store_revision)
        if status.last_sync is not None:
            self.last_sync.set(status.last_sync)

    def _count_checks(self, status: AgentStatus) -> None:
        """Mirror the status's kernel-check counts in ``kernel_checks_total``."""
        skipped = status.kernel_checks_skipped
        read = status.kernel_checks - skipped
        seen_read, seen_skipped = self._checks_seen
        self.kernel_checks.labels("read").inc(max(0, read - seen_read))
        self.kernel_checks.labels("skipped").inc(max(0, skipped - seen_skipped))
        self._checks_seen = (max(read, seen_read), max(skipped, seen_skipped))

    def on_stop(self, status: AgentStatus) -> None:
        """Stop serving (the process is about to exit)."""
        self.close()

    # ---- serving

    def serve(self, address: str) -> None:
        """Serve ``/metrics`` on ``HOST:PORT`` (``[v6]:PORT`` for IPv6) in a thread.

        Raises ConfigError for a malformed address or one that cannot be bound.
        """
        host, port = parse_address(address)
        try:
            self.server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics address {address}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Stop the HTTP server if one runs."""
        if self.server is not None:
            server, self.server = self.server, None
            server.shutdown()
            server.server_close()


def parse_address(address: str) -> tuple[str, int]:
    """``127.0.0.1:9468`` → ``("127.0.0.1", 9468)``; ``[::1]:9468`` → ``("::1", 9468)``.

    The host must be an IP address (no name resolution in a firewall daemon).
    Raises ConfigError otherwise.
    """
    host, sep, port_text = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError as exc:
        raise ConfigError(f"metrics address {address!r}: expected IP:PORT or [IPv6]:PORT") from exc
    if not sep or not 0 < port < 65536:
        raise ConfigError(f"metrics address {address!r}: port must be 1-65535")
    return host, port
