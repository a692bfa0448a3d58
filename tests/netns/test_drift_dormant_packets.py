"""A dormant table is drift, with real packets.

``nft add table inet secfw '{ flags dormant; }'`` keeps every chain of the
table but unregisters its hooks (nft(8), TABLES: "dormant — table is not
evaluated any more"): all traffic passes unfiltered. The read-back must not take
such a table for secfw's: the next full pass, the periodic kernel check (the
flag is a commit, so the generation moves), a new agent's first pass and an
``agent --once`` holding a kernel record (the record is trusted only while the
generation holds still) each replace it, and tcp/22 — which the instance's
only group does not allow — is dropped again. The layer-2 table (``arp
secfw`` routed, ``bridge secfw`` bridged) made dormant is repaired the same way.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from agentproc import web_cloud
from test_agent_restart_record import once
from test_drift import EXT, web80
from test_resync_generation_packets import check
from test_resync_packets import Clock

from secfw.agent import AgentLoop, LoopSettings
from secfw.lab import netns_tools

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.backends("nftables", reason="nftables' table flags (iptables has none)"),
]


GATEWAY = "10.1.0.1"  # web80's network, 10.1.0.0/24
STRANGER = "10.1.0.77"  # an address of that network no port holds


def make_dormant(cloud: Any, family: str = "inet") -> None:
    """Set the dormant flag on one of secfw's tables behind the agent's back."""
    cloud.tamper("nft", "add", "table", family, "secfw", "{ flags dormant; }")
    assert "flags dormant" in cloud.nft("list", "table", family, "secfw")


def assert_filtering(cloud: Any, family: str = "inet") -> None:
    """The table carries no flag again and tcp/22 is dropped, tcp/80 passes."""
    assert "flags dormant" not in cloud.nft("list", "table", family, "secfw")
    assert not cloud.tcp(EXT, "web", 22), "tcp/22 still passes: the table stayed dormant"
    assert cloud.tcp(EXT, "web", 80)


def test_dormant_table_is_replaced_by_a_full_pass(cloud: Any) -> None:
    web80(cloud)
    make_dormant(cloud)
    assert cloud.tcp(EXT, "web", 22), "the dormant table did not open tcp/22"
    result = cloud.sync(full=True)
    assert result.commands > 0 and result.drift is not None, result
    assert_filtering(cloud)
    again = cloud.sync(full=True)
    assert again.commands == 0 and again.drift is None, again


def test_dormant_table_is_repaired_by_the_kernel_check(cloud: Any) -> None:
    """The daemon's path: the flag moved the generation, so the periodic check
    reads the table back, finds it differs and asks for the full pass."""
    web80(cloud)
    clock = Clock()
    loop = AgentLoop(cloud._reconciler, LoopSettings(resync_interval=60), clock=clock)
    try:
        loop.step()  # the loop's first pass (full): nothing to change
        make_dormant(cloud)
        assert cloud.tcp(EXT, "web", 22), "the dormant table did not open tcp/22"
        check(loop, clock)
        assert loop.status.drift_repairs == 1, loop.status
        assert_filtering(cloud)
    finally:
        loop.kernel_check.join(30)
        loop.wakeup.close()


def test_dormant_table_is_repaired_by_a_new_agent(cloud: Any) -> None:
    web80(cloud)
    make_dormant(cloud)
    cloud.stop_agent()
    first = cloud.sync()
    assert first.full and first.commands > 0, first
    assert_filtering(cloud)


def arp_answered(cloud: Any, sender_ip: str) -> bool:
    """Whether the instance's ARP request for its gateway, sent in
    ``sender_ip``'s name, is answered (by the host's proxy ARP, routed; by the
    router, bridged): the layer-2 table drops a request in another's name."""
    from scapy.layers.l2 import ARP, Ether

    port = cloud.port("web")
    request = Ether(src=port.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=port.mac, psrc=sender_ip, pdst=GATEWAY)
    return netns_tools.send_and_sniff(
        request, src_ns=cloud.ns("web"), dst_ns=cloud.ns("web"), bpf="arp[6:2] = 2",
        timeout=0.5, sniff_iface="eth0") is not None


def test_dormant_layer2_table_is_repaired(cloud: Any) -> None:
    """The layer-2 table dormant (the inet one untouched): ARP in another
    address's name is answered; a full pass replaces the table and it is
    dropped again."""
    layer2 = "bridge" if cloud.topology == "bridged" else "arp"
    web80(cloud)
    assert arp_answered(cloud, cloud.ip("web"))
    assert not arp_answered(cloud, STRANGER)
    make_dormant(cloud, layer2)
    assert arp_answered(cloud, STRANGER), "the dormant table did not let the lie through"
    result = cloud.sync(full=True)
    assert result.commands > 0 and result.drift is not None, result
    assert_filtering(cloud, layer2)
    assert not arp_answered(cloud, STRANGER)
    assert arp_answered(cloud, cloud.ip("web"))


def test_dormant_table_is_repaired_by_an_agent_holding_a_restart_record(cloud: Any) -> None:
    """``agent --once`` twice: the second trusts its kernel record (the
    generation held still). The dormant flag is a commit: the generation
    moves, so the next ``--once`` reads back — and must not take the dormant
    table for the recorded one."""
    web_cloud(cloud)
    action, commands = once(cloud)
    assert commands > 0 and not cloud.tcp(EXT, "web", 22)
    assert once(cloud) == ("in sync, nothing loaded", 0)
    make_dormant(cloud)
    assert cloud.tcp(EXT, "web", 22), "the dormant table did not open tcp/22"
    action, commands = once(cloud)
    assert commands > 0, action
    assert_filtering(cloud)
