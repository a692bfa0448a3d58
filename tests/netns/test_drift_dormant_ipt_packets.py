"""The iptables backend's dormant table, with real packets.

iptables-nft keeps its rules in nftables tables (``ip filter``, ``ip6
filter``, ``ip nat``): ``nft add table ip filter '{ flags dormant; }'`` unhooks
every chain of it — secfw's included — while ``iptables-nft-save`` prints the
same rules as before. The backend must see the flag: its read-back gives
nothing (the agent's full, from-scratch apply), and that apply clears the flag,
so tcp/22 — which the instance's only group does not allow — is dropped again,
by a full pass and by the daemon's periodic kernel check alike.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from test_drift import EXT, web80
from test_resync_generation_packets import check
from test_resync_packets import Clock

from secfw.agent import AgentLoop, LoopSettings

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.backends("iptables", reason="iptables-nft's tables (nftables: "
                                            "test_drift_dormant_packets.py)"),
]


def make_filter_dormant(cloud: Any) -> None:
    """The dormant flag on iptables-nft's ``ip filter`` and ``ip6 filter``."""
    if cloud.iptables_variant() != "nft":
        pytest.skip("iptables-legacy keeps no nftables table")
    for family in ("ip", "ip6"):
        cloud.tamper("nft", "add", "table", family, "filter", "{ flags dormant; }")
    assert cloud.tcp(EXT, "web", 22), "the dormant table did not open tcp/22"


def assert_filtering(cloud: Any) -> None:
    for family in ("ip", "ip6"):
        assert "flags dormant" not in cloud.nft("list", "table", family, "filter")
    assert not cloud.tcp(EXT, "web", 22), "tcp/22 still passes: the table stayed dormant"
    assert cloud.tcp(EXT, "web", 80)


def test_dormant_filter_table_is_repaired_by_a_full_pass(cloud: Any) -> None:
    web80(cloud)
    make_filter_dormant(cloud)
    result = cloud.sync(full=True)
    assert result.commands > 0, result
    assert_filtering(cloud)
    assert cloud.sync(full=True).commands == 0


def test_dormant_filter_table_is_repaired_by_the_kernel_check(cloud: Any) -> None:
    web80(cloud)
    clock = Clock()
    loop = AgentLoop(cloud._reconciler, LoopSettings(resync_interval=60), clock=clock)
    try:
        loop.step()  # the loop's first pass (full): nothing to change
        make_filter_dormant(cloud)
        check(loop, clock)
        assert loop.status.drift_repairs == 1, loop.status
        assert_filtering(cloud)
    finally:
        loop.kernel_check.join(30)
        loop.wakeup.close()
