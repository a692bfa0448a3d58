"""A restart that needs no read-back (agent.kernelrecord): ``agent --once``
keeps the generation and digest of what the kernel holds in its state
directory; a second ``--once`` with nothing changed trusts it — no read-back,
0 commands — and after a tampering (the generation moved) reads back and
repairs, judged with real packets.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from agentproc import web_cloud

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.backends("nftables", reason="the nftables generation"),
]

EXT = "external"


def once(cloud: Any) -> tuple[str, int]:
    """An ``agent --once`` run: its ``kernel_record`` action (``""`` when it
    logged none) and the commands of its sync."""
    stderr = cloud.agent_cli("--once").stderr
    record = re.findall(r'msg=kernel_record action="([^"]+)"', stderr)
    commands = re.findall(r"msg=sync .*\bcommands=(\d+)\b", stderr)
    assert len(commands) == 1, stderr
    return (record[0] if record else ""), int(commands[0])


def test_a_restart_with_nothing_changed_reads_nothing_back(cloud: Any) -> None:
    web_cloud(cloud)
    action, commands = once(cloud)
    assert action == "" and commands > 0  # the first agent: no record yet
    assert not cloud.tcp(EXT, "web", 22)

    assert once(cloud) == ("no read-back", 0)
    assert once(cloud) == ("no read-back", 0)  # the record stays true

    cloud.tamper("nft", "insert rule inet secfw forward-ingress accept"
                 if cloud.topology == "routed" else
                 "insert rule inet secfw postrouting-ingress accept")
    assert cloud.tcp(EXT, "web", 22), "the tampering did not open tcp/22"
    action, commands = once(cloud)
    assert action == "" and commands > 0  # the generation moved: read back, repaired
    assert not cloud.tcp(EXT, "web", 22)
    assert cloud.tcp(EXT, "web", 80)

    cloud.api.secgroup_add_rule("p", "global_http", "tcp", "22", "22", "203.0.113.0/24")
    action, commands = once(cloud)
    assert action == "read back" and commands > 0  # another ruleset: another digest
    assert cloud.tcp(EXT, "web", 22)
