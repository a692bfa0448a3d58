"""The run's reports: ``latest.json``, ``latest.md`` (tables) and ``latest.png`` (plot).

Files are written beside each other in the output directory, each first to a
``.tmp`` file and then renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from secfw.bench import profiles, targets
from secfw.bench.common import Row, failed, ok, rows_of

STEM = "latest"
#: An agent pass's phases in pipeline order (see :mod:`.incremental`), as printed.
PHASES = (("changes_compile", "feed+compile"), ("read_back", "read-back"),
          ("render_plan", "render+plan"), ("apply", "nft apply"), ("committed", "committed"))


NEUTRON_JSON = "neutron.json"
SECTIONS_JSON = "sections.json"


def write(results: Row, out: Path) -> None:
    """Evaluate the targets, draw the plot, write the JSON and Markdown files.

    The Neutron comparison (``secfw.bench.neutron``) writes its own results; its
    summary is attached from ``out/neutron.json`` when that file exists."""
    out.mkdir(parents=True, exist_ok=True)
    results["neutron"] = neutron_from(out / NEUTRON_JSON)
    if "sections" not in results:  # the main suite alone: the last make bench's
        results["last_sections"] = sections_from(out / SECTIONS_JSON)
    results["targets"] = targets.evaluate(results)
    results["plot"] = _plot(results, out / f"{STEM}.png")
    _replace(out / f"{STEM}.json", json.dumps(results, indent=2, sort_keys=False) + "\n")
    _replace(out / f"{STEM}.md", markdown(results))


def neutron_from(path: Path) -> Row:
    """:func:`targets.neutron_summary` of the Neutron bench's JSON file, or why not."""
    try:
        neutron = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"skipped": f"no {path.name} (python -m secfw.bench.neutron writes it)"}
    except (OSError, ValueError) as exc:
        return failed(exc)
    summary = targets.neutron_summary(neutron) if isinstance(neutron, dict) else None
    return summary or {"skipped": f"{path.name} has no size with both drivers' full sync"}


def sections_from(path: Path) -> Row:
    """The last ``make bench``'s sections (``secfw.bench.whole``), or why not."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"skipped": f"no {path.name} (make bench writes it)"}
    except (OSError, ValueError) as exc:
        return failed(exc)
    return found if isinstance(found, dict) else {"skipped": f"{path.name}: not an object"}


def _plot(results: Row, path: Path) -> Row:
    try:
        from secfw.bench.plot import write_png
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install -e '.[bench]')"}
    try:
        write_png(results, path)
    except Exception as exc:
        return failed(exc)
    return {"file": path.name}


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------- formatting


def dig(row: Any, *keys: str) -> Any:
    """``row[k1][k2]…``, or None when a level is missing."""
    for key in keys:
        if not (isinstance(row, dict) and key in row):
            return None
        row = row[key]
    return row


def status(row: Any) -> str | None:
    """"skipped" / "error" for a step that did not produce figures, else None."""
    if isinstance(row, dict) and "skipped" in row:
        return "skipped"
    if isinstance(row, dict) and "error" in row:
        return "error"
    return None


def seconds(value: Any) -> str:
    """1.234 s, or 12.3 ms below a second."""
    if not isinstance(value, int | float):
        return "—"
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.1f} ms"


def millis(value: Any) -> str:
    return f"{value:,.1f} ms" if isinstance(value, int | float) else "—"


def count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "—"


def cell(step: Any, text: str) -> str:
    """``text``, or the step's status when it did not run."""
    return status(step) or text


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# ---------------------------------------------------------------------- sections


def markdown(results: Row) -> str:
    """The whole Markdown report."""
    parts = [_title(results), _sections(results), _targets(results), _control(results),
             _audit(results), _incremental(results), _membership(results), _during_resync(results),
             _datapath(results), _bridged(results), _connections(results),
             _flowtable(results), _restart(results), _problems(results)]
    return "\n\n".join("\n".join(part) for part in parts if part) + "\n"


def _title(results: Row) -> list[str]:
    m, options = results["machine"], results["options"]
    source = m.get("source", {})
    modified = " + local changes in src/" if source.get("src_modified") else ""
    return [
        f"# secfw benchmark — {m['date']}",
        "",
        f"Machine: {m['cores']} cores, {m.get('memory_gb')} GB, kernel {m['kernel']}, "
        f"{m['nft']}, {m['iperf3']}, Python {m['python']}; code {source.get('commit')}"
        f"{modified}; load average before/after {m.get('loadavg_before')} / "
        f"{m.get('loadavg_after')}.",
        f"Sizes {', '.join(f'{n:,}' for n in options['sizes'])} ports"
        f"{' (--quick)' if options['quick'] else ''}; run time {results['elapsed_s']:.0f} s "
        f"of a {options['budget_s']:.0f} s budget. Workload: {_workload(results['workload'])}",
    ]


def _sections(results: Row) -> list[str]:
    """``make bench``'s whole budget and each section's budget and time: this
    run's (rewritten at its end), else the last run's ``sections.json``."""
    record = results.get("sections") or results.get("last_sections") or {}
    title = "## make bench: budget and sections"
    if not ok(record) or not record.get("sections"):
        why = record.get("skipped") or record.get("error") or "not recorded"
        return [title, "", f"Not recorded ({why}): this report's run was the main suite alone."]
    whose = "this run" if "sections" in results else "the last `make bench` before this report"
    rows = [[s["name"], f"{s['budget_s']:,} s" if "budget_s" in s else "— (its sizes)",
             f"skipped: {s['skipped']}" if "skipped" in s else
             f"{s.get('elapsed_s', 0):,.0f} s" + ("" if s.get("status") == 0 else
                                                   f" (exit {s.get('status')})")]
            for s in record["sections"]]
    return [title, "", f"Whole budget (`BENCH_BUDGET`) {record['budget_s']:,.0f} s, "
            f"{record.get('elapsed_s', 0):,.0f} s used ({whose}, started "
            f"{record.get('started', '?')}):", "",
            *table(["section", "budget", "time"], rows)]


def _workload(w: Row) -> str:
    return (f"{w['groups_per_port']} groups per port drawn from {w['host_groups']}, "
            f"{w['rules_per_group']} rules per group, {w['remote_group_rules']} referencing "
            f"one of {w['source_groups']} source groups of {w['source_group_members']}; "
            f"hot group {w['hot_group']}; data path: {w['data_path_pair']}.")


def _targets(results: Row) -> list[str]:
    rows = [[t["target"], t["figure"], targets.verdict(t["met"]),
             profiles.explanation(results, t, targets.next_step(t["target"]))]
            for t in results["targets"]]
    taken = results.get("profiles") or {}
    return ["## Targets", "", *table(["target", "figure", "result",
                                      "limited by (this run's profile) / next step"], rows),
            "", f"Profiles: {len(taken)} taken in {profiles.total_seconds(results):.0f} s of "
            "the run, each in an extra repetition (never the measured one), files under "
            "`profiles/`; shares of the target's measured time by area, the Python "
            "areas scaled down by cProfile's overhead (module doc of "
            "`secfw.bench.profiles`). " + profiles.PERF_NOTE]


def _control(results: Row) -> list[str]:
    rows = [_control_row(row) for row in results["control_plane"]]
    header = ["ports", "compile: model→IR / render / text", "rules", "sets", "elements",
              "full apply (fresh ns)", "compile + apply", "agent full sync: process (sync)",
              "agent peak RSS"]
    return ["## 1. Control plane (one host)", "", *table(header, rows), "",
            "Compile steps are in-process medians; the agent is a separate process "
            "(`ip netns exec NS secfw agent --once`) into a fresh namespace: process wall "
            "time includes interpreter start-up and the store load; (sync) is the pass "
            "the agent logs. Peak RSS from wait4(2)."]


def _audit(results: Row) -> list[str]:
    rows = []
    for row in results["control_plane"]:
        a = row.get("audit")
        if a is None:
            continue
        rows.append([f"{row['ports']:,}", cell(a, count(dig(a, "ports"))),
                     cell(a, seconds(dig(a, "index_s"))),
                     cell(a, f"{dig(a, 'explain_ms')} ms"),
                     cell(a, f"{dig(a, 'reach_ms')} ms ({dig(a, 'reach_first_ms')} ms)"),
                     cell(a, seconds(dig(a, "exposure_s"))), cell(a, seconds(dig(a, "lint_s"))),
                     cell(a, f"{seconds(dig(a, 'verify_s'))} ({dig(a, 'verify_probes')} probes,"
                             f" {dig(a, 'verify_differences')} differences)")])
    if not rows:
        return []
    header = ["host ports", "cloud ports", "index", "explain", "reach (first)",
              "exposure", "lint", "verify"]
    return ["## 1b. Audits (issue #14)", "", *table(header, rows), "",
            "explain and reach: medians over a few host instances (reach's first call "
            "fills the cloud's caches); exposure and lint: the whole cloud; verify: the "
            "agent's table read back from the namespace and evaluated."]


def _control_row(row: Row) -> list[str]:
    c, r, a = row.get("compile"), row.get("ruleset"), row.get("agent")
    apply_s, compile_s = dig(row, "full_apply", "full_apply_s"), dig(c, "total_s")
    both = isinstance(apply_s, float) and isinstance(compile_s, float)
    total = compile_s + apply_s if both else None
    return [
        f"{row['ports']:,}",
        cell(c, f"{seconds(dig(c, 'compile_s'))} / {seconds(dig(c, 'render_s'))} / "
                f"{seconds(dig(c, 'text_s'))}"),
        cell(r, count(dig(r, "rules"))), cell(r, count(dig(r, "sets"))),
        cell(r, count(dig(r, "elements"))),
        cell(row.get("full_apply"), seconds(apply_s)),
        seconds(total),
        cell(a, f"{seconds(dig(a, 'wall_s'))} ({seconds(dig(a, 'sync_s'))})"),
        cell(a, f"{dig(a, 'peak_rss_mb')} MB"),
    ]


def _phases(row: Row) -> str:
    phases = row.get("phases_ms") or {}
    return ", ".join(f"{label} {phases[key]:,.0f}" for key, label in PHASES if key in phases)


def _incremental(results: Row) -> list[str]:
    inc = results["incremental"]
    title = f"## 2. Incremental changes ({inc.get('ports', 0):,} ports loaded)"
    if not ok(inc):
        return [title, "", f"{status(inc)}: {inc.get('skipped') or inc.get('error')}"]
    if "changes" not in inc:  # the run ended (budget) before the incremental size
        return [title, "", "not measured: the run ended before it"]
    rows = [[c["change"], millis(c["store_write_ms"]), millis(c["store_to_kernel_ms"]),
             count(c["commands"]), _phases(c)] for c in inc["changes"]]
    resync = inc["full_resync_after"]
    return [title, "", *table(["change", "store write", "store → kernel", "commands",
                               "store → kernel, by phase (ms)"], rows), "",
            "Store write: the API call until it returned (committed). Store → kernel: the "
            "in-process agent's pass right after it, until the nft transaction was committed.",
            f"Full resync after these changes: {resync['commands']} commands "
            f"({millis(resync['store_to_kernel_ms'])})."]


def _membership(results: Row) -> list[str]:
    rows = []
    for row in results["membership"]:
        if not ok(row):
            rows.append([f"{row['ports']:,}", status(row) or "", "", "", ""])
            continue
        rows.append([f"{row['ports']:,}", millis(row["store_write_ms"]),
                     millis(row["store_to_kernel_ms"]), count(row["commands"]),
                     _phases(row["runs"][-1])])
    return ["### Membership change (one source-group member added) versus size", "",
            *table(["ports", "store write", "store → kernel", "commands",
                    "last run by phase (ms)"], rows)]


def _datapath(results: Row, key: str = "datapath",
              title: str = "## 3. Data path, routed (two lab instances, N other ports loaded)"
              ) -> list[str]:
    """nftables and iptables side by side, one row per N (the baselines are shared)."""
    dp = results.get(key) or {"skipped": "not in these results"}
    if not ok(dp):
        return [title, "", f"{status(dp)}: {dp.get('skipped') or dp.get('error')}"]
    iptables = f"iptables-{dp.get('iptables_variant', '?')}"
    rows = [[_datapath_label(row), *_datapath_cells(row), *_datapath_cells(row.get("iptables"))]
            for row in dp["rows"]]
    header = ["N", "nftables: UDP 64 B (kpps)", "ratio", "TCP (Gbit/s)", "ratio",
              f"{iptables}: UDP 64 B (kpps)", "ratio", "TCP (Gbit/s)", "ratio"]
    return [title, "", *table(header, rows), "", *_new_connections(dp, iptables), "",
            f"{dp['method']}; {dp['reps']} repetitions of {dp['seconds']:g} s. The two "
            f"N = 0 rows are the baselines both backends are compared with.",
            f"Ruleset load (median, not part of the figures): {_load_times(dp, iptables)}."]


def _new_connections(dp: Row, iptables: str) -> list[str]:
    """New TCP connections per N: rate, its ratio to conntrack only, connect() p50/p99."""
    rows = [[_datapath_label(row), *_connection_cells(row),
             *_connection_cells(row.get("iptables"))] for row in dp["rows"]]
    header = ["N", "nftables: new conn/s", "vs conntrack only", "connect p50 (µs)", "p99",
              f"{iptables}: new conn/s", "vs conntrack only", "connect p50 (µs)", "p99"]
    return ["New TCP connections (the first packet walks the ruleset):", "",
            *table(header, rows)]


def _connection_cells(figures: Any) -> list[str]:
    """Connections/s, ratio to conntrack only, p50 and p99 connect µs — or dashes."""
    if not isinstance(figures, dict) or "conn_rate" not in figures:
        return ["—"] * 4
    return [_scaled(figures.get("conn_rate"), 1, ",.0f"), _percent(figures.get("conn_ct_ratio")),
            _scaled(figures.get("conn_p50_us"), 1, ",.0f"),
            _scaled(figures.get("conn_p99_us"), 1, ",.0f")]


def _datapath_cells(figures: Any) -> list[str]:
    """UDP kpps, its ratio, TCP Gbit/s, its ratio — or dashes (nothing measured)."""
    if not isinstance(figures, dict):
        return ["—"] * 4
    return [_scaled(figures.get("udp_pps"), 1e3, ",.1f"), _percent(figures.get("udp_ratio")),
            _scaled(figures.get("tcp_bps"), 1e9, ",.2f"), _percent(figures.get("tcp_ratio"))]


def _scaled(value: Any, unit: float, spec: str) -> str:
    return format(value / unit, spec) if isinstance(value, int | float) else "—"


def _percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, int | float) else "—"


def _load_times(dp: Row, iptables: str) -> str:
    """Per N: how long each backend took to load its ruleset."""
    parts = [f"{row['ports']:,}: nftables {seconds(row.get('load_s'))}, "
             f"{iptables} {seconds(dig(row, 'iptables', 'load_s'))}"
             for row in dp["rows"] if row["ports"]]
    return "; ".join(parts) or "—"


def _datapath_label(row: Row) -> str:
    return f"{row['ports']:,}" if row["ports"] else f"0: {row['filter']}"


def _bridged(results: Row) -> list[str]:
    """The bridged data path's own table, then both topologies' ratios per N."""
    lines = _datapath(results, "datapath_bridged",
                      "## 3b. Data path, bridged (the same rulesets rendered for a bridged host)")
    routed, bridged = rows_of(results.get("datapath")), rows_of(results.get("datapath_bridged"))
    if len(routed) < 2 or len(bridged) < 2:
        return lines
    by_n = {row["ports"]: row for row in bridged if row["filter"] != NO_FILTER_LABEL}
    rows = []
    for row in routed[1:]:
        other = by_n.get(row["ports"])
        rows.append([_datapath_label(row), *(f"{_percent(row.get(k))} / "
                                             f"{_percent(dig(other, k))}" for k in RATIOS)])
    return [*lines, "", "### Bridged vs routed (nftables; each against its own no-filter "
            "baseline)", "", *table(["N", "UDP 64 B: routed / bridged", "TCP",
                                     "new conn/s vs conntrack only"], rows)]


NO_FILTER_LABEL = "no filter (nothing loaded)"
RATIOS = ("udp_ratio", "tcp_ratio", "conn_ct_ratio")


def _connections(results: Row) -> list[str]:
    """New connections and first-packet latency: every topology and size measured
    (the data paths' nftables rows, then the large-size run)."""
    rows = []
    for key, topology in (("datapath", "routed"), ("datapath_bridged", "bridged")):
        for row in rows_of(results.get(key)):
            rows.append([topology, _datapath_label(row), *_connection_cells(row),
                         *_connection_cells(row.get("iptables"))])
    large = results.get("connections") or {}
    for topology, run in (large.get("topologies") or {}).items():
        for row in rows_of(run):
            rows.append([f"{topology} (large run)", _datapath_label(row),
                         *_connection_cells(row), *(["—"] * 4)])
    title = "## 3c. New connections and first-packet latency"
    if not rows:
        return [title, "", "not measured"]
    header = ["topology", "N", "nftables: new conn/s", "vs conntrack only", "connect p50 (µs)",
              "p99", "iptables: new conn/s", "vs conntrack only", "p50", "p99"]
    note = ("The large run measures new connections only, at the smallest and the largest "
            "size side by side (with its own baselines); the iptables backend is not loaded "
            f"there: {large.get('iptables', '—')}." if large.get("topologies") else
            f"Large run: {status(large) or 'not run'}"
            f"{': ' + str(large.get('skipped') or large.get('error')) if status(large) else ''}.")
    return [title, "", *table(header, rows), "",
            "connect() time is SYN → SYN-ACK as the client sees it (secfw.bench.connrate): "
            "the one packet of a flow that walks the ruleset. " + note]


def _flowtable(results: Row) -> list[str]:
    """The flowtable probe and, where the kernel has it, on/off figures."""
    ft = results.get("flowtable")
    title = "## 3d. Flowtable fast path (optional, `--flowtable auto|on`)"
    if not isinstance(ft, dict) or not ft:
        return [title, "", "not measured in this run"]
    if not ok(ft):
        return [title, "", f"{status(ft)}: {ft.get('skipped') or ft.get('error')}"]
    if not ft.get("available"):
        return [title, "", f"flowtable: not available on this kernel ({ft.get('reason')}); "
                "the fast path stays off and is untested here."]
    measured = rows_of(ft.get("datapath"))
    if not measured:
        return [title, "", "flowtable: available; on/off not measured "
                f"({status(ft.get('datapath')) or 'the data path did not run'})."]
    rows = [[_datapath_label(row) + f" ({row['filter']})", *_datapath_cells(row),
             *_connection_cells(row)[:2]] for row in measured]
    return [title, "", *table(["N", "UDP 64 B (kpps)", "ratio", "TCP (Gbit/s)", "ratio",
                               "new conn/s", "vs conntrack only"], rows)]


def _restart(results: Row) -> list[str]:
    rows = []
    for row in results["restart"]:
        rows.append([f"{row['ports']:,}", cell(row, seconds(row.get("wall_s"))),
                     cell(row, seconds(row.get("sync_s"))), cell(row, count(row.get("commands"))),
                     cell(row, f"{row.get('peak_rss_mb')} MB")])
    return ["## 4. Restart (fresh agent process, table loaded, nothing changed)", "",
            *table(["ports", "process wall", "sync (agent's log)", "commands", "peak RSS"],
                   rows)]


def _during_resync(results: Row) -> list[str]:
    """Changes made while the resync reads the table back (bench/resync.py)."""
    row = results.get("during_resync")
    if not row:
        return []
    title = f"### Changes during a full resync ({row.get('ports', 0):,} ports loaded)"
    if not ok(row):
        return [title, "", f"Not measured: {row.get('skipped') or row.get('error')}"]
    runs = [[str(i), millis(r["store_to_kernel_ms"]) if r["store_to_kernel_ms"] is not None
             else "never", count(r.get("commands")),
             "yes" if r["during_check"] else "no (the check had ended)"]
            for i, r in enumerate(row["runs"], start=1)]
    checks = ", ".join(f"{c['outcome']} ({seconds(c['seconds'])})" for c in row.get("checks", []))
    return [title, "", *table(["change", "store → kernel", "commands", "read-back still running"],
                              runs), "",
            f"Source-group members added while the resync's kernel check read the table back "
            f"on its own thread, spread over the read-back ({seconds(row['resync_check_s'])} "
            f"from the resync to the end of the check; checks: {checks or '?'}; one listing "
            f"alone: {seconds(row.get('listing_alone_s'))}). Store → kernel: from the API "
            "call's return (the store committed) to the return of the kernel's commit of "
            "that change, the loop told of the write as its store watch tells it (the "
            "watch's delivery not included); a change counts once the agent's applied "
            "revision passed the write's and the nftables generation moved. The same change "
            f"with no check running: {millis(row.get('idle_store_to_kernel_ms'))} (median). "
            "Before, the resync was one full pass on the loop's thread, and a change waited "
            "for all of it (section 2, full resync)."]


def _problems(results: Row) -> list[str]:
    found = list(_walk_problems(results, ""))
    return ["## Skipped or failed steps", "", *[f"- `{p}`: {r}" for p, r in found]] if found else []


def _walk_problems(node: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key in ("skipped", "error"):
            if key in node:
                yield path or "run", f"{key}: {node[key]}"
        for key, value in node.items():
            label = f"{path}.{key}" if path else str(key)
            if isinstance(value, dict | list):
                yield from _walk_problems(value, label)
    elif isinstance(node, list):
        for item in node:
            label = f"{path}[{item.get('ports')}]" if isinstance(item, dict) and (
                "ports" in item) else path
            yield from _walk_problems(item, label)
