"""The Neutron bench's workload: the same for both drivers and every run."""

from __future__ import annotations

from secfw.bench.neutron import Workload, build


def test_build_is_deterministic_for_a_seed() -> None:
    """Both drivers' children rebuild nothing, but two builds must still agree:
    the port ids used to be random."""
    assert build(5, seed=3, groups=8, per_port=3) == build(5, seed=3, groups=8, per_port=3)
    assert build(5, seed=3, groups=8, per_port=3) != build(5, seed=4, groups=8, per_port=3)


def test_the_json_a_child_reads_is_the_workload() -> None:
    """Member pairs come back as tuples, as the agent hands them over."""
    load = build(4, seed=2, groups=6, per_port=2)
    again = Workload.from_json(load.to_json())
    assert again == load
    pairs = [m for per in again.members.values() for m in per["IPv4"]]
    assert pairs and all(isinstance(m, tuple) and len(m) == 2 for m in pairs)


def test_a_full_sync_pushes_the_ports_groups_only() -> None:
    """What the server sends the agent: the local ports' groups, not all of them."""
    load = build(2, seed=5, groups=30, per_port=3)
    assert set(load.groups_of_ports()) == {g for p in load.ports for g in p["security_groups"]}
    assert len(load.groups_of_ports()) <= 6 < len(load.rules)
