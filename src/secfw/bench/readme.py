"""README's performance table, generated from the bench's results.

``python -m secfw.bench.readme [--results DIR] [--readme FILE]`` reads
``DIR/latest.json`` (``python -m secfw.bench``) and ``DIR/neutron.json``
(``python -m secfw.bench.neutron``, when present), evaluates the targets
(:func:`secfw.bench.targets.evaluate`: the code's list, so a row is never
missing or stale) and replaces the text between :data:`BEGIN` and :data:`END`
in the README with one table: target, figure, met / **MISSED** / not measured,
and for a missed target what the run's profile measured limiting it
(:func:`secfw.bench.profiles.explanation`) and the next step
(:data:`secfw.bench.targets.NEXT_STEPS`).
``make bench`` runs it last. Exit 2 when a file is missing or the markers are
not there exactly once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from secfw.bench import profiles, report, targets
from secfw.bench.common import Row
from secfw.bench.machine import REPO

BEGIN = "<!-- bench:performance-table:begin (python -m secfw.bench.readme) -->"
END = "<!-- bench:performance-table:end -->"

def performance_table(results: Row) -> list[Row]:
    """The targets evaluated on ``results`` (``results["neutron"]`` included when set)."""
    return targets.evaluate(results)


def block(results: Row, evaluated: list[Row]) -> str:
    """The Markdown between the markers: where the figures come from, then the table."""
    m, options = results["machine"], results["options"]
    neutron = results.get("neutron") or {}
    source = m.get("source", {})
    lines = [
        BEGIN,
        f"Generated from `bench/results/latest.json` ({m['date'][:16].replace('T', ' ')} UTC, "
        f"code {source.get('commit')}{'+' if source.get('src_modified') else ''}, "
        f"{m['cores']} cores, kernel {m['kernel']}, load average before/after "
        f"{m.get('loadavg_before')} / {m.get('loadavg_after')}; sizes "
        f"{', '.join(f'{n:,}' for n in options['sizes'])}"
        f"{' --quick' if options.get('quick') else ''})"
        + (f" and `neutron.json` ({neutron['date']})" if "date" in neutron else "") + ".",
        "",
        "| target | measured | | limited by / next step |",
        "|---|---|---|---|",
    ]
    for row in evaluated:
        note = profiles.explanation(results, row, targets.next_step(row["target"]),
                                    "bench/results/")
        lines.append(f"| {row['target']} | {row['figure']} | {targets.verdict(row['met'])} "
                     f"| {note} |")
    return "\n".join([*lines, END])


def replace_block(text: str, new_block: str) -> str:
    """``text`` with the part from :data:`BEGIN` to :data:`END` replaced; ValueError
    unless each marker is there exactly once, in that order."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"the README must hold {BEGIN!r} and {END!r} once each")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    if start > end:
        raise ValueError("the end marker comes before the begin marker")
    return text[:start] + new_block + text[end:]


def load(results_dir: Path) -> Row:
    """``latest.json`` with the Neutron summary of ``neutron.json`` (or why none)."""
    results: Row = json.loads((results_dir / f"{report.STEM}.json").read_text(encoding="utf-8"))
    results["neutron"] = report.neutron_from(results_dir / report.NEUTRON_JSON)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secfw.bench.readme",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    try:
        results = load(args.results)
        text = args.readme.read_text(encoding="utf-8")
        updated = replace_block(text, block(results, performance_table(results)))
    except (OSError, ValueError) as exc:
        print(f"secfw.bench.readme: {exc}", file=sys.stderr)
        return 2
    args.readme.write_text(updated, encoding="utf-8")
    print(f"updated the performance table in {args.readme}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
