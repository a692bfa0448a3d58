"""``make bench`` as one budget (secfw.bench.whole): the sections' budgets and
reserves, and the record of each section's time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secfw.bench import whole
from secfw.bench.whole import MAIN_MAX_S, MAIN_SHARE, MARGIN, RESERVE_S, Section


def test_reserves_come_from_the_last_run_else_the_defaults() -> None:
    last = {"sections": [{"name": "manyhosts", "elapsed_s": 100.0},
                         {"name": "multihost", "skipped": "budget"}]}
    found = whole.reserves(last)
    assert found["manyhosts"] == pytest.approx(100.0 * MARGIN)
    assert found["multihost"] == pytest.approx(RESERVE_S["multihost"] * MARGIN)
    assert set(found) == set(RESERVE_S)


def test_main_gets_its_share_and_neutron_the_rest() -> None:
    assert whole.plan_budget("main", 3000.0, 1000.0) == pytest.approx(2000.0 * MAIN_SHARE)
    assert whole.plan_budget("main", 9000.0, 1000.0) == MAIN_MAX_S
    assert whole.plan_budget("neutron", 900.0, 20.0) == pytest.approx(880.0)
    assert whole.plan_budget("neutron", 10.0, 20.0) == 0.0


def test_every_section_is_timed_and_recorded(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in sections (``python -m this`` ignores its arguments): each runs
    with its budget and is recorded; one with no room left is skipped."""
    monkeypatch.setattr(whole, "SECTIONS", (
        Section("main", "this", budgeted=True), Section("metadata", "this"),
        Section("neutron", "this", budgeted=True), Section("readme", "this")))
    monkeypatch.setattr(whole, "RESERVE_S", {"metadata": 1.0, "readme": 1.0})
    record = whole.run(600.0, tmp_path, {"main": ["--quick"]})
    assert [s["name"] for s in record["sections"]] == ["main", "metadata", "neutron", "readme"]
    assert all(s["status"] == 0 and s["elapsed_s"] >= 0 for s in record["sections"])
    assert record["sections"][0]["budget_s"] == round((600.0 - 2 * MARGIN) * MAIN_SHARE)
    assert json.loads((tmp_path / whole.SECTIONS_JSON).read_text()) == record
    tight = whole.run(50.0, tmp_path, {})  # a budgeted section needs a minute at least
    assert ["skipped" in s for s in tight["sections"]] == [True, False, True, False]
