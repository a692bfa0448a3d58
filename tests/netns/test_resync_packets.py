"""The background resync with real packets (issue #15 §3, "no stall").

The agent's loop runs in-process over the ``cloud`` fixture's reconciler; the
resync's kernel read-back (secfw.agent.resync) is held on an Event so that the
test acts *while* it runs: a rule added meanwhile passes traffic at once — the
pass does not wait for the read-back — and a tampering made meanwhile (it opens
tcp/22) is found by that check — or, when the tampered chain is one the loop
changed during the listing, by the next resync's — and repaired by the full
pass it asks for.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from test_drift import EXT, replace_keeping_comment, web80

from secfw.agent import AgentLoop, LoopSettings
from secfw.agent.resync import compare

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]


class Clock:
    """A monotonic clock the test moves by hand (the resync timer)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate_reads(reconciler: Any, gate: threading.Event) -> list[int]:
    """Make the reconciler's background reader wait for ``gate``; the list
    counts the reads that went through."""
    real = reconciler.kernel_reader
    reads: list[int] = []

    def gated() -> Callable[[], Any]:
        read = real()

        def wait_then_read() -> Any:
            assert gate.wait(30), "the test never opened the gate"
            reads.append(1)
            return read()
        return wait_then_read

    reconciler.kernel_reader = gated
    return reads


def commit_elsewhere(cloud: Any) -> None:
    """A commit in the host's namespace that leaves secfw's tables alone
    (nftables: it moves the generation; iptables: nothing to do)."""
    if cloud.backend_name == "nftables":
        cloud.tamper("nft", f"add table ip other{uuid.uuid4().hex[:8]}")


def tamper_open_22(cloud: Any) -> None:
    """Open tcp/22 behind the agent's back, the way test_drift.py does."""
    if cloud.backend_name == "nftables":  # a chain the rule added meanwhile leaves alone
        replace_keeping_comment(cloud, "ingress-filter",
                                lambda rule: rule["expr"] == [{"drop": None}])
    else:
        cloud.tamper("iptables", "-w", "-I", "FORWARD", "1", "-j", "ACCEPT")


def test_change_and_tampering_while_the_resync_reads_back(cloud: Any) -> None:
    web80(cloud)
    reconciler = cloud._reconciler
    # The read-back of an untouched kernel equals what was committed (else every
    # resync would end in a full pass: the stall again). Someone else's commit
    # (a table of their own) moves the nftables generation first, so the check
    # does read back (it skips the read-back while the generation holds still:
    # test_resync_generation_packets.py).
    commit_elsewhere(cloud)
    assert compare(reconciler, reconciler.kernel_reader()) == "same"
    gate = threading.Event()
    reads = gate_reads(reconciler, gate)
    clock = Clock()
    loop = AgentLoop(reconciler, LoopSettings(resync_interval=60), clock=clock)
    try:
        loop.step()  # the loop's first pass (full): nothing to change
        commit_elsewhere(cloud)
        clock.now += 61
        loop.step()  # resync: the read-back starts and waits on the gate
        assert loop.kernel_check.running

        cloud.api.secgroup_add_rule("p", "web80", "tcp", "8080", "8080", "0.0.0.0/0")
        loop.step()  # the change: applied now, the read-back still held
        assert loop.kernel_check.running and not reads
        assert cloud.tcp(EXT, "web", 8080)

        tamper_open_22(cloud)
        assert cloud.tcp(EXT, "web", 22), "the tampering did not open tcp/22"
        gate.set()
        checks = 0
        while checks < 3:  # bounded: this check, or the next resync's
            checks += 1
            loop.kernel_check.join(30)
            loop.step()
            if loop.status.drift_repairs:
                break
            if not loop.kernel_check.running:
                clock.now += 61
                loop.step()
        if cloud.backend_name == "nftables":  # the untouched chain is judged at once
            assert checks == 1
        assert loop.status.drift_repairs == 1, loop.status
        assert not cloud.tcp(EXT, "web", 22)
        assert cloud.tcp(EXT, "web", 80)
        assert cloud.tcp(EXT, "web", 8080)
    finally:
        gate.set()
        loop.kernel_check.join(30)
        loop.wakeup.close()


def test_restart_cuts_connections_a_rule_removed_while_no_agent_ran(cloud: Any) -> None:
    """An agent's first pass has no previous filter: it judges every connection
    with the new one (conntrack.revoke with previous None, which now dumps the
    table once and skips the judging when it is empty). A TCP connection to
    tcp/81 carries data; the agent stops, the rule goes, a new agent's first
    pass must cut the connection (tcp/81: web80's probes keep a listener on 80)."""
    import socket

    from secfw.lab import netns_tools as nt

    web80(cloud)
    cloud.api.secgroup_add_rule("p", "web80", "tcp", "81", "81", "0.0.0.0/0")
    cloud.sync()
    server = nt.socket_in_netns(cloud.ns("web"), socket.AF_INET, socket.SOCK_STREAM)
    client = nt.socket_in_netns(cloud.ns(EXT), socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind(("0.0.0.0", 81))
        server.listen(1)
        client.settimeout(1.0)
        client.connect((cloud.ip("web"), 81))
        conn, _ = server.accept()
        conn.settimeout(0.5)
        client.sendall(b"before")
        assert conn.recv(100) == b"before"

        cloud.stop_agent()
        cloud.api.secgroup_delete_rule("p", "web80", "tcp", "81", "81", "0.0.0.0/0")
        result = cloud.sync()
        assert result.full and result.commands > 0
        client.sendall(b"after")
        try:
            received = conn.recv(100)
        except TimeoutError:
            received = b""
        assert received == b"", "an established connection outlived the rule at restart"
    finally:
        client.close()
        server.close()
