"""``make bench``: every bench section in turn, within one budget (``BENCH_BUDGET``).

``python -m secfw.bench.whole [--budget 3600] [--main-args ARGS] …`` runs, each
as its own process and in this order: the main suite (``python -m
secfw.bench``), backends, floating, multihost, manyhosts, metadata, Neutron's
comparison, then ``secfw.bench.readme``. Two sections take a budget of their
own and stop their steps within it (main and neutron); the others are bounded
by their sizes, so their time is *reserved*: their last recorded time from
``sections.json`` (else :data:`RESERVE_S`), with a margin. The main suite gets
:data:`MAIN_SHARE` of what the reserves leave; Neutron's comparison what is
left when it starts (less the readme's reserve). A section whose turn comes
when less than its reserve is left is skipped, its last results kept.

Writes ``sections.json`` beside the results (the budget, and each section's
budget, time and exit status) and, before the readme step, writes
``latest.md`` again with the run's sections and this run's ``neutron.json``
(the main suite ran before it). Exit status: 0 (benchmarks report).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from secfw.bench import report
from secfw.bench.common import Row
from secfw.bench.machine import REPO

DEFAULT_BUDGET_S = 3600.0
SECTIONS_JSON = "sections.json"
#: Seconds reserved for a section without a budget of its own, when no time was
#: recorded yet: estimates from the steps its last results record (2-core VM:
#: backends — the cloud grown to 10k, 12 render/apply/read-back rows — ~2 min;
#: floating < 1; multihost, 400 changes, ~4; manyhosts — cloud build and etcd
#: writes 50 s, agents' first passes 3 min, 12 changes — ~7; metadata < 1;
#: readme a second), before :data:`MARGIN`.
RESERVE_S = {"backends": 150.0, "floating": 45.0, "multihost": 240.0, "manyhosts": 480.0,
             "metadata": 45.0, "readme": 15.0}
MARGIN = 1.15
#: A budgeted section given less than this is skipped (its smallest sizes alone).
MIN_BUDGET_S = 60.0
#: The main suite's share of what the reserves leave (~1,730 s of 3,600; its idle
#: run took 1,400 s of 1,680 on 2026-12-07, before the profiles); Neutron's gets
#: what is left when it starts (~740 s or more: its 1,000-port runs took 630 s).
MAIN_SHARE = 0.7
#: Never more than the main suite's own default: steps beyond it are not planned.
MAIN_MAX_S = 1800.0


@dataclass(frozen=True)
class Section:
    """One ``python -m MODULE`` step; ``budgeted``: it takes ``--budget``."""

    name: str
    module: str
    budgeted: bool = False


SECTIONS = (Section("main", "secfw.bench", budgeted=True), Section("backends",
            "secfw.bench.backends"), Section("floating", "secfw.bench.floating"),
            Section("multihost", "secfw.bench.multihost"),
            Section("manyhosts", "secfw.bench.manyhosts"),
            Section("metadata", "secfw.bench.metadata"),
            Section("neutron", "secfw.bench.neutron", budgeted=True),
            Section("readme", "secfw.bench.readme"))


def reserves(previous: Row) -> dict[str, float]:
    """Seconds to keep for each section without a budget: its last time (from
    a previous ``sections.json``) or :data:`RESERVE_S`, times :data:`MARGIN`."""
    last = {s.get("name"): s.get("elapsed_s") for s in previous.get("sections", [])}
    return {name: MARGIN * float(last.get(name) or default)
            for name, default in RESERVE_S.items()}


def plan_budget(section: str, left: float, later_reserves: float) -> float:
    """``--budget`` for a budgeted section: main, :data:`MAIN_SHARE` of what the
    later sections' reserves leave (at most :data:`MAIN_MAX_S`); neutron, all
    of it."""
    free = max(left - later_reserves, 0.0)
    return min(free * MAIN_SHARE, MAIN_MAX_S) if section == "main" else free


def run(budget_s: float, out: Path, args: dict[str, list[str]]) -> Row:
    """Every section (module doc); the ``sections.json`` record."""
    path = out / SECTIONS_JSON
    previous = _read(path)
    reserve = reserves(previous)
    started = time.monotonic()
    record: Row = {"budget_s": budget_s, "started": datetime.now(UTC).isoformat(
        timespec="seconds"), "sections": []}
    for index, section in enumerate(SECTIONS):
        left = budget_s - (time.monotonic() - started)
        later = sum(reserve.get(s.name, 0.0) for s in SECTIONS[index + 1:])
        row: Row = {"name": section.name}
        if section.name == "readme":
            _rewrite_report(out, record)
        if section.budgeted:
            row["budget_s"] = round(plan_budget(section.name, left, later))
        minimum = MIN_BUDGET_S if section.budgeted else reserve.get(section.name, 0.0) / MARGIN
        if left < minimum or (section.budgeted and row["budget_s"] < MIN_BUDGET_S):
            row["skipped"] = f"only {left:.0f} s of the budget left"
        else:
            extra = ["--budget", str(row["budget_s"])] if section.budgeted else []
            command = [sys.executable, "-m", section.module, *extra, *args.get(section.name, [])]
            print(f"== {section.name}: {shlex.join(command[1:])}", flush=True)
            begun = time.monotonic()
            row["status"] = subprocess.run(command, check=False).returncode
            row["elapsed_s"] = round(time.monotonic() - begun, 1)
        record["sections"].append(row)
        record["elapsed_s"] = round(time.monotonic() - started, 1)
        _write(path, record)
    return record


def _read(path: Path) -> Row:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _write(path: Path, record: Row) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def _rewrite_report(out: Path, record: Row) -> None:
    """``latest.*`` again from ``latest.json``, with this run's sections and
    Neutron's results (they ran after the main suite wrote them)."""
    results = _read(out / "latest.json")
    if results.get("machine"):
        results["sections"] = record
        results.pop("last_sections", None)
        report.write(results, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secfw.bench.whole",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for every section (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                        help="where sections.json is kept and latest.* rewritten")
    for section in SECTIONS:
        parser.add_argument(f"--{section.name}-args", default="",
                            help=f"more arguments for python -m {section.module}")
    options = parser.parse_args(argv)
    args = {s.name: shlex.split(getattr(options, f"{s.name}_args")) for s in SECTIONS}
    record = run(options.budget, options.out, args)
    print(f"make bench: {record.get('elapsed_s', 0):.0f} s of a {options.budget:.0f} s budget; "
          f"{', '.join(_line(s) for s in record['sections'])}", flush=True)
    return 0


def _line(section: Row) -> str:
    if "skipped" in section:
        return f"{section['name']} skipped"
    return f"{section['name']} {section.get('elapsed_s', 0):.0f} s"


if __name__ == "__main__":
    sys.exit(main())
