"""The resync's generation shortcut with real packets (issue #15 §3): while
nothing commits in the host's namespace the periodic kernel check reads
nothing back; a tampering — a rule replaced to accept, a map element deleted —
moves the nftables generation, so the next check reads the table back and the
full pass it asks for repairs it (traffic checked before and after).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from test_drift import EXT, web80
from test_resync_packets import Clock, tamper_open_22

from secfw.agent import AgentLoop, LoopSettings

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.backends("nftables", reason="the nftables generation (iptables: ipsets "
                                            "have none, so every check reads back)"),
]


def count_reads(reconciler: Any) -> list[int]:
    """Count the background read-backs of ``reconciler``'s kernel checks."""
    real = reconciler.kernel_reader
    reads: list[int] = []

    def counting() -> Callable[[], Any]:
        read = real()

        def counted() -> Any:
            reads.append(1)
            return read()
        return counted

    reconciler.kernel_reader = counting
    return reads


def check(loop: AgentLoop, clock: Clock) -> None:
    """One periodic kernel check to its end, and the loop's turn after it (a
    full pass when the check asked for one)."""
    clock.now += 61
    loop.step()
    loop.kernel_check.join(30)
    assert not loop.kernel_check.running
    loop.step()


def delete_dispatch_element(cloud: Any) -> None:
    """Delete the instance's tap from the map that dispatches its traffic."""
    tap = cloud.port("web").tap
    where = ("inet secfw ingress_ports" if cloud.topology == "routed"
             else "bridge secfw ingress_marks")
    cloud.tamper("nft", f'delete element {where} {{ "{tap}" }}')


def test_no_read_back_until_someone_commits_and_tampering_is_repaired(cloud: Any) -> None:
    web80(cloud)
    reconciler = cloud._reconciler
    reads = count_reads(reconciler)
    clock = Clock()
    loop = AgentLoop(reconciler, LoopSettings(resync_interval=60), clock=clock)
    try:
        loop.step()  # the loop's first pass (full): nothing to change
        check(loop, clock)
        assert (loop.status.kernel_checks, loop.status.kernel_checks_skipped) == (1, 1)
        assert not reads

        tamper_open_22(cloud)
        assert cloud.tcp(EXT, "web", 22), "the tampering did not open tcp/22"
        check(loop, clock)
        assert len(reads) == 1 and loop.status.drift_repairs == 1, loop.status
        assert not cloud.tcp(EXT, "web", 22)
        assert cloud.tcp(EXT, "web", 80)

        check(loop, clock)  # the repair was the last commit: no read-back again
        assert len(reads) == 1 and loop.status.kernel_checks_skipped == 2

        delete_dispatch_element(cloud)
        check(loop, clock)
        assert len(reads) == 2 and loop.status.drift_repairs == 2, loop.status
        assert cloud.tcp(EXT, "web", 80)
        assert not cloud.tcp(EXT, "web", 22)
    finally:
        loop.kernel_check.join(30)
        loop.wakeup.close()
