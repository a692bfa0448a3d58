"""The Neutron bench's harness leaves a working ruleset for both drivers (so the
bench cannot rot unnoticed).

``secfw.bench.neutron.run_child`` runs the bench scenario (full sync, a port
added, a member joined) at a tiny size in a child process inside a fresh
namespace, and reads back what the driver left in the kernel. secfw's driver runs
in ``make test``; Neutron's ``IptablesFirewallDriver`` needs the ``neutron``
extra, so its case is marked ``conformance`` (``make conformance`` installs the
extra and sets SECFW_REQUIRE_CONFORMANCE=1, which turns its absence into a
failure). Figures are not checked: only that every step ran and what is in the
kernel.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from secfw.bench.common import Row, ok
from secfw.bench.neutron import Workload, build, run_child

pytestmark = pytest.mark.netns

#: A run takes seconds (Neutron's import most of it), not minutes: 3 ports in 2 of
#: 6 groups, so a handful of remote groups.
TIMEOUT = 240.0


@pytest.fixture(scope="module")
def tiny() -> Workload:
    return build(3, seed=7, groups=6, per_port=2)


def _devices(load: Workload) -> list[str]:
    """Every port the scenario filters: the workload's and the one it adds."""
    return [f"tapnb{i:08x}" for i in range(len(load.ports) + 1)]


def _remotes(load: Workload) -> set[str]:
    return load.remotes_of(load.groups_of_ports())


def _ran(row: Row) -> dict[str, Any]:
    if "skipped" in row:
        if os.environ.get("SECFW_REQUIRE_CONFORMANCE") == "1":
            pytest.fail(row["skipped"])
        pytest.skip(row["skipped"])
    assert ok(row), row
    for metric in ("full_sync_s", "port_added_s", "member_joined_s"):
        assert row[metric] > 0
    assert row["ports_refreshed_on_join"] >= 1
    ruleset: dict[str, Any] = row["ruleset"]
    assert ruleset["rules"] > 0
    return ruleset


def test_secfw_driver_leaves_its_chains_and_sets(tiny: Workload) -> None:
    """Every tap in the ruleset, a chain pair per group and an address set per
    remote group."""
    assert _remotes(tiny), "the tiny workload must have remote-group rules"
    ruleset = _ran(run_child("secfw", tiny, TIMEOUT, names=True))
    chains, sets = set(ruleset["chains"]), set(ruleset["sets"])
    assert set(_devices(tiny)) <= set(ruleset["taps"])
    assert {f"sg-{g}-{d}" for g in tiny.groups_of_ports() for d in ("in", "out")} <= chains
    assert {f"sg-{remote}-v4" for remote in _remotes(tiny)} <= sets


@pytest.mark.conformance
def test_neutron_iptables_driver_leaves_its_chains_and_ipsets(tiny: Workload) -> None:
    """Neutron's per-port chains (``i``/``o``/``s`` + the device without ``tap``,
    under the linuxbridge agent's prefix) and one ipset per remote group, in the
    namespace, not the host. Set names are cut to 29 characters: ipset's 31 less
    the ``-n`` Neutron appends to the set it swaps in (ipset_manager.py)."""
    ruleset = _ran(run_child("neutron", tiny, TIMEOUT, names=True))
    chains, sets = set(ruleset["chains"]), set(ruleset["sets"])
    assert set(_devices(tiny)) <= set(ruleset["taps"])
    for tap in _devices(tiny):
        assert {f"neutron-linuxbri-{d}{tap[3:]}" for d in "ios"} <= chains, tap
    assert {f"NIPv4{remote}"[:29] for remote in _remotes(tiny)} <= sets
