"""A port added while the agent runs is filtered exactly as after a full sync, with
real packets: its incremental pass is made of element commands only (the
renderer's per-port patch, the patched address sets and set states), and the
same flows — to, from and about the new port — pass or drop as expected, and
the same way after a new agent's first pass rendered everything afresh and
read the kernel back (which then has nothing to change).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.backends("nftables", reason="the nftables backend's per-port element patch"),
    pytest.mark.topologies("routed", reason="the per-port patch is the routed layout's "
                                            "(a bridged host renders its port part whole)"),
]

EXT = "external"


def _flows(cloud: Any) -> dict[tuple[str, str, int], bool]:
    """TCP connections to, from and beside the new port: whether each passes."""
    flows = [(EXT, "new", 80), (EXT, "new", 22), (EXT, "new", 8080), ("db", "new", 22),
             ("new", "db", 22), ("new", EXT, 80), (EXT, "web", 80), (EXT, "db", 8080)]
    return {flow: cloud.tcp(*flow) for flow in flows}


def test_a_port_added_incrementally_filters_as_after_a_full_sync(cloud: Any) -> None:
    cloud.api.net_create("p", "net-a", "10.1.0.0/24")
    cloud.api.net_create("p", "net-b", "10.2.0.0/24")
    cloud.api.secgroup_create("p", "web", "http from anywhere")
    cloud.api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    cloud.api.secgroup_create("p", "cluster", "ssh from the web servers")
    cloud.api.secgroup_add_group_rule("p", "cluster", "web", "tcp", "22", "22")
    cloud.api.secgroup_create("p", "mgmt", "8080 from anywhere")
    cloud.api.secgroup_add_rule("p", "mgmt", "tcp", "8080", "8080", "0.0.0.0/0")
    # Two groups per port everywhere: the new port widens no slot and names a
    # same-net set already in use, so its pass is the per-port patch.
    cloud.boot("web", ["web", "mgmt"], "net-a")
    cloud.boot("db", ["cluster", "mgmt"], "net-b")
    assert cloud.sync().full

    cloud.boot("new", ["web", "cluster"], "net-a")
    result = cloud.sync()
    plan = cloud.backend.last_plan
    assert not result.full and not plan.full and plan.commands
    assert all(" element " in command for command in plan.commands), plan.text
    incremental = _flows(cloud)

    cloud.stop_agent()  # a new agent renders everything afresh and reads the kernel back
    assert cloud.sync().commands == 0  # the kernel already held the full rendering
    assert _flows(cloud) == incremental
    assert incremental == {
        (EXT, "new", 80): True,  # web
        (EXT, "new", 22): False,  # cluster: only from web's members
        (EXT, "new", 8080): False,  # not in mgmt
        ("db", "new", 22): False,  # db is no member of web
        ("new", "db", 22): True,  # new is: web's member set got its address
        ("new", EXT, 80): True,  # egress open, its address passes anti-spoofing
        (EXT, "web", 80): True,
        (EXT, "db", 8080): True,
    }
