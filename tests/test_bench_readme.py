"""README's performance table is generated from a results JSON (secfw.bench.readme):
consistent with the JSON given (never with the live README's numbers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_bench_targets import NEUTRON, results

from secfw.bench import readme, targets


def full_results() -> dict[str, Any]:
    return results() | {
        "machine": {"date": "2026-12-08T10:00:00+00:00", "cores": 2, "kernel": "6.1.0",
                    "source": {"commit": "abc1234", "src_modified": False},
                    "loadavg_before": [0.1, 0.1, 0.1], "loadavg_after": [1.0, 0.5, 0.2]},
        "options": {"sizes": [1000, 10000, 50000], "quick": False},
    }


def table_rows(text: str) -> list[list[str]]:
    inside = text[text.index(readme.BEGIN):text.index(readme.END)]
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in inside.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_generated_table_is_the_results_targets(tmp_path: Path) -> None:
    """Every target of the results, in order, with its figure and verdict; a
    missed one with its next step; the text outside the markers untouched."""
    (tmp_path / "latest.json").write_text(json.dumps(full_results()))
    (tmp_path / "neutron.json").write_text(json.dumps(NEUTRON))
    page = tmp_path / "README.md"
    page.write_text(f"# before\n\n{readme.BEGIN}\nold table\n{readme.END}\n\nafter\n")
    assert readme.main(["--results", str(tmp_path), "--readme", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# before\n\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text
    assert "(2026-12-08 10:00 UTC, code abc1234, 2 cores, kernel 6.1.0" in text
    assert "and `neutron.json` (2026-12-07)" in text
    loaded = results() | {"neutron": readme.load(tmp_path)["neutron"]}
    expected = targets.evaluate(loaded)
    rows = table_rows(text)
    assert [r[:3] for r in rows] == [[t["target"], t["figure"], targets.verdict(t["met"])]
                                     for t in expected]
    for row, target in zip(rows, expected, strict=True):
        assert bool(row[3]) == (target["met"] is False), row
    assert ["agent peak RSS < 1 GB (50k ports, full sync)", "1,100 MB", "**MISSED**",
            "no profile in this run; last profile: " + targets.next_step("agent peak RSS")
            ] in rows
    assert readme.main(["--results", str(tmp_path), "--readme", str(page)]) == 0
    assert page.read_text() == text  # idempotent


@pytest.mark.parametrize("page", ["no markers\n", f"{readme.BEGIN}\n{readme.BEGIN}\n{readme.END}\n",
                                  f"{readme.END}\n{readme.BEGIN}\n"])
def test_markers_must_be_there_once_and_in_order(tmp_path: Path, page: str) -> None:
    (tmp_path / "latest.json").write_text(json.dumps(full_results()))
    path = tmp_path / "README.md"
    path.write_text(page)
    assert readme.main(["--results", str(tmp_path), "--readme", str(path)]) == 2
    assert path.read_text() == page
    assert readme.main(["--results", str(tmp_path / "none"), "--readme", str(path)]) == 2
