"""The bench's targets as issue #15 states them, on made-up results: each row's
verdict and figure, "not measured" when its step did not run. No timing is measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from secfw.bench import report, targets


def results() -> dict[str, Any]:
    """A run's results with just what these targets read."""
    return {
        "control_plane": [
            {"ports": 1_000, "agent": {"wall_s": 0.35, "sync_s": 0.2, "peak_rss_mb": 120.0}},
            {"ports": 10_000, "agent": {"wall_s": 2.0, "sync_s": 1.5, "peak_rss_mb": 280.0}},
            {"ports": 50_000, "agent": {"wall_s": 9.0, "sync_s": 7.0, "peak_rss_mb": 1100.0}},
        ],
        "incremental": {"ports": 10_000, "changes": [
            {"change": "source-group member added", "store_to_kernel_ms": 8.0},
            {"change": "port added", "store_to_kernel_ms": 12.0},
            {"change": "port removed", "store_to_kernel_ms": 9.5},
            {"change": "rule added to a group used by 1,000 ports", "store_to_kernel_ms": 40.0},
            {"change": "group removed from a port", "store_to_kernel_ms": 25.0},
        ]},
        "restart": [{"ports": 10_000, "wall_s": 2.5, "sync_s": 1.9, "commands": 0,
                     "peak_rss_mb": 300.0}],
        "membership": [], "datapath": {"skipped": "--skip-datapath"},
    }


def by_text(found: list[dict[str, Any]], start: str) -> dict[str, Any]:
    return next(t for t in found if t["target"].startswith(start))


def test_every_target_of_the_issue_is_one_row() -> None:
    texts = [text for text, _ in targets.TARGETS]
    for start in ("agent full sync of 1,000 ports", "agent peak RSS < 300 MB",
                  "agent peak RSS < 1 GB", "port added / port removed / group removed",
                  "data path routed, UDP", "data path routed, TCP", "data path bridged",
                  "new TCP connections/s", "first-packet p99", "restart of a loaded 10k host",
                  "secfw full sync ≥ 50× faster than Neutron"):
        assert sum(text.startswith(start) for text in texts) == 1, start


def test_agent_and_restart_targets() -> None:
    found = targets.evaluate(results())
    assert by_text(found, "agent full sync of 1,000")["met"] is True
    assert by_text(found, "agent full sync of 1,000")["figure"] == (
        "0.35 s process wall (agent's own sync 0.20 s)")
    assert by_text(found, "agent peak RSS < 300 MB")["met"] is True
    assert by_text(found, "agent peak RSS < 1 GB") == {
        "target": "agent peak RSS < 1 GB (50k ports, full sync)", "figure": "1,100 MB",
        "met": False}
    assert by_text(found, "restart of a loaded 10k host") == {
        "target": "restart of a loaded 10k host < 3 s to in sync",
        "figure": "2.5 s to in sync (agent's own sync 1.9 s, 0 commands)", "met": True}


def test_port_changes_need_all_three_under_20_ms() -> None:
    row = by_text(targets.evaluate(results()), "port added")
    assert row["met"] is False and row["figure"] == "12 / 10 / 25 ms store→kernel"
    fast = results()
    fast["incremental"]["changes"][4]["store_to_kernel_ms"] = 19.0
    assert targets.port_changes(fast)[0] is True


def test_unmeasured_steps_are_not_measured() -> None:
    found = targets.evaluate({"control_plane": [], "incremental": {"skipped": "budget"},
                              "restart": [], "membership": [], "datapath": {"skipped": "x"}})
    assert {t["met"] for t in found} == {None}
    assert {t["figure"] for t in found} == {"not measured"}


NEUTRON = {
    "machine": {"date": "2026-12-07T07:26:35+00:00"},
    "rows": [
        {"driver": "secfw (nftables, bridged)", "ports": 100, "full_sync_s": 2.0},
        {"driver": "Neutron IptablesFirewallDriver (iptables + ipset)", "ports": 100,
         "full_sync_s": 18.0},
        {"driver": "secfw (nftables, bridged)", "ports": 1000, "full_sync_s": 0.5},
        {"driver": "Neutron IptablesFirewallDriver (iptables + ipset)", "ports": 1000,
         "full_sync_s": 30.0},
        {"driver": "secfw (nftables, bridged)", "ports": 5000, "full_sync_s": 1.0},
        {"driver": "Neutron IptablesFirewallDriver (iptables + ipset)", "ports": 5000,
         "error": "timed out"},
    ],
}


def test_neutron_target_reads_the_largest_size_with_both_drivers(tmp_path: Path) -> None:
    (tmp_path / "neutron.json").write_text(json.dumps(NEUTRON))
    summary = report.neutron_from(tmp_path / "neutron.json")
    assert summary == {"ports": 1000, "secfw_s": 0.5, "neutron_s": 30.0, "factor": 60.0,
                       "date": "2026-12-07"}
    met, figure = targets.neutron_speedup({"neutron": summary})
    assert met is True
    assert figure == ("60.0× at 1,000 ports (Neutron 30.00 s, secfw 0.50 s; "
                      "neutron.json of 2026-12-07)")
    missing = report.neutron_from(tmp_path / "absent.json")
    assert "no absent.json" in missing["skipped"]
    assert targets.evaluate(results() | {"neutron": missing})[14]["met"] is None
