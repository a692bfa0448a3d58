"""``latest.png``: cost versus number of ports (matplotlib, no display needed).

Two rows of panels. First: control-plane times (log–log), the agent's peak RSS,
and the routed data-path ratios to the unfiltered baseline, nftables and
iptables side by side. Second: new connections/s against conntrack only and the
first-packet p99 (both topologies, the large-size run included), bridged against
routed, and the flowtable and changes-during-a-resync figures (or why there are
none). Targets are drawn as dashed lines.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from secfw.bench.common import Row, ok, rows_of
from secfw.bench.report import dig

Series = list[tuple[int, float]]


def _series(rows: list[Row], value: Callable[[Row], Any]) -> Series:
    """(ports, value) for every row where ``value`` gives a number."""
    points = []
    for row in rows:
        found = value(row)
        if isinstance(found, int | float) and found > 0:
            points.append((int(row["ports"]), float(found)))
    return points


def _compile_apply(row: Row) -> Any:
    total, applied = dig(row, "compile", "total_s"), dig(row, "full_apply", "full_apply_s")
    return total + applied if isinstance(total, float) and isinstance(applied, float) else None


def _time_series(results: Row) -> dict[str, Series]:
    control, membership = results["control_plane"], results["membership"]
    ms = 1000.0
    return {
        "compile (model→IR→text)": _series(control, lambda r: dig(r, "compile", "total_s")),
        "full apply, fresh namespace": _series(
            control, lambda r: dig(r, "full_apply", "full_apply_s")),
        "compile + full apply": _series(control, _compile_apply),
        "agent process, full sync": _series(control, lambda r: dig(r, "agent", "wall_s")),
        "agent process, restart": _series(results["restart"], lambda r: r.get("wall_s")),
        "membership change, store→kernel": _series(
            membership, lambda r: (r.get("store_to_kernel_ms") or 0) / ms),
        "membership change, store write": _series(
            membership, lambda r: (r.get("store_write_ms") or 0) / ms),
    }


def _size_label(ports: int) -> str:
    return f"{ports // 1000:,}k" if ports >= 1000 and ports % 1000 == 0 else str(ports)


def _size_axis(ax: Any, results: Row) -> None:
    """Log x axis with a tick at every size measured."""
    sizes = sorted(int(row["ports"]) for row in results["control_plane"])
    ax.set_xscale("log")
    ax.set_xticks(sizes, [_size_label(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("ports on the host")


def _panel_times(ax: Any, results: Row) -> None:
    for label, points in _time_series(results).items():
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.axhline(2.0, color="grey", linestyle="--", linewidth=1)
    ax.axhline(0.010, color="grey", linestyle=":", linewidth=1)
    ax.set(yscale="log", ylabel="seconds", title="Control plane (dashed: 2 s; dotted: 10 ms)")
    _size_axis(ax, results)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)


def _panel_rss(ax: Any, results: Row) -> None:
    full = _series(results["control_plane"], lambda r: dig(r, "agent", "peak_rss_mb"))
    restart = _series(results["restart"], lambda r: r.get("peak_rss_mb"))
    for label, points in (("full sync", full), ("restart", restart)):
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.axhline(300, color="grey", linestyle="--", linewidth=1)
    ax.set(ylabel="MB", title="Agent process peak RSS (dashed: 300 MB)")
    _size_axis(ax, results)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)


#: The data-path bars of each N, left to right: (backend, ratio key, label).
DATAPATH_BARS = (("nftables", "udp_ratio", "UDP 64 B pps"), ("nftables", "tcp_ratio", "TCP"),
                 ("iptables", "udp_ratio", "UDP 64 B pps"), ("iptables", "tcp_ratio", "TCP"))
BAR_WIDTH = 0.2


def _figures(row: Row, backend: str) -> Any:
    """A data-path row's figures for ``backend`` (iptables' are nested; None in
    the baseline rows)."""
    return row.get("iptables") if backend == "iptables" else row


def _ratio_bars(rows: list[Row], backend: str, key: str, offset: float
                ) -> list[tuple[float, float]]:
    """(x, percent of no filter) for every row where ``backend`` has a ratio."""
    bars = []
    for index, row in enumerate(rows):
        value = dig(_figures(row, backend), key)
        if isinstance(value, int | float):
            bars.append((index + offset, value * 100))
    return bars


def _panel_datapath(ax: Any, results: Row) -> None:
    """Both backends' ratios side by side for every N (and conntrack only)."""
    datapath = results["datapath"]
    rows = datapath["rows"][1:] if ok(datapath) else []  # all but the baseline
    labels = [f"{r['ports']:,}" if r["ports"] else "conntrack\nonly" for r in rows]
    names = {"nftables": "nftables",
             "iptables": f"iptables-{datapath.get('iptables_variant', '?')}"}
    for slot, (backend, key, label) in enumerate(DATAPATH_BARS):
        offset = (slot - (len(DATAPATH_BARS) - 1) / 2) * BAR_WIDTH
        bars = _ratio_bars(rows, backend, key, offset)
        if bars:
            ax.bar(*zip(*bars, strict=True), width=BAR_WIDTH, label=f"{names[backend]} {label}",
                   hatch="//" if backend == "iptables" else None)
    ax.axhline(95, color="grey", linestyle="--", linewidth=1)
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(rows)), labels)
    ax.set(xlabel="other ports loaded (N)", ylabel="% of no filter",
           title="Data path, routed (targets: TCP 95 % dashed, UDP 90 % dotted)" if rows
           else "Data path: not measured")
    ax.legend(fontsize=7, loc="lower right")


#: The data paths whose new-connection figures are plotted: (results key, label).
CONNECTION_RUNS = (("datapath", "routed"), ("datapath_bridged", "bridged"))


def _connection_series(results: Row, key: str) -> dict[str, Series]:
    """Per topology (and the large-size run's), (ports, ``key``) of the nftables rows."""
    found: dict[str, Series] = {}
    for source, label in CONNECTION_RUNS:
        found[label] = _series([r for r in rows_of(results.get(source)) if r["ports"]],
                               lambda r: r.get(key))
    large = (results.get("connections") or {}).get("topologies") or {}
    for topology, run in large.items():
        found[f"{topology}, large run"] = _series([r for r in rows_of(run) if r["ports"]],
                                                  lambda r: r.get(key))
    return {label: points for label, points in found.items() if points}


def _panel_lines(ax: Any, series: dict[str, Series], title: str, ylabel: str) -> None:
    for label, points in series.items():
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xscale("log")
    ax.set(xlabel="ports on the host", ylabel=ylabel,
           title=title if series else f"{title}: not measured")
    if series:
        ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)


def _panel_connections(ax: Any, results: Row) -> None:
    series = {k: [(n, v * 100) for n, v in points]
              for k, points in _connection_series(results, "conn_ct_ratio").items()}
    _panel_lines(ax, series, "New connections/s, % of conntrack only (dashed: 90 %)",
                 "% of conntrack only")
    ax.axhline(90, color="grey", linestyle="--", linewidth=1)


def _panel_first_packet(ax: Any, results: Row) -> None:
    _panel_lines(ax, _connection_series(results, "conn_p99_us"),
                 "First packet: connect() p99 (target: flat within 10 %)", "µs")


def _panel_bridged(ax: Any, results: Row) -> None:
    """nftables' UDP and TCP ratios per N, routed beside bridged."""
    bars: list[tuple[str, list[tuple[float, float]]]] = []
    rows: list[Row] = []
    for slot, (source, topology) in enumerate(CONNECTION_RUNS):
        if not rows_of(results.get(source)):
            continue
        rows = rows_of(results.get(source))[1:]
        for kind_slot, key in enumerate(("udp_ratio", "tcp_ratio")):
            offset = (slot * 2 + kind_slot - 1.5) * BAR_WIDTH
            bars.append((f"{topology} {key.split('_')[0].upper()}",
                         _ratio_bars(rows, "nftables", key, offset)))
    for label, points in bars:
        if points:
            ax.bar(*zip(*points, strict=True), width=BAR_WIDTH, label=label)
    ax.axhline(90, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)),
                  [f"{r['ports']:,}" if r["ports"] else "conntrack\nonly" for r in rows])
    ax.set(xlabel="other ports loaded (N)", ylabel="% of no filter",
           title="Bridged vs routed, nftables (dashed: 90 %)" if bars else
           "Bridged vs routed: not measured")
    if bars:
        ax.legend(fontsize=7, loc="lower right")


def _panel_extras(ax: Any, results: Row) -> None:
    """Flowtable on/off and changes during a resync: bars where measured, else why not."""
    notes: list[str] = []
    bars: list[tuple[str, float]] = []
    ft = results.get("flowtable") or {}
    measured = rows_of(ft.get("datapath")) if isinstance(ft, dict) else []
    if measured:
        bars += [(f"{r['filter']}\nUDP", (r.get("udp_ratio") or 0) * 100)
                 for r in measured if r["ports"]]
    elif isinstance(ft, dict) and ft.get("available") is False:
        notes.append(f"flowtable: not available on this kernel\n({ft.get('reason', '')[:120]})")
    else:
        notes.append("flowtable: not measured")
    resync = [t for t in results.get("targets", []) if "resync" in t["target"]]
    notes += [f"{t['target']}:\n{t['figure']}" for t in resync] or [
        "changes during a resync: not in these results"]
    if bars:
        ax.bar(range(len(bars)), [v for _, v in bars], width=0.6)
        ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=6)
        ax.set(ylabel="% of no filter")
    else:
        ax.set_axis_off()
    ax.set_title("Flowtable on/off; changes during a resync")
    ax.text(0.02, 0.95, "\n\n".join(notes), transform=ax.transAxes, fontsize=7, va="top",
            wrap=True)


def write_png(results: Row, path: Path) -> None:
    """Draw the eight panels into ``path``."""
    fig, grid = plt.subplots(2, 4, figsize=(24, 11))
    axes = grid.flatten()
    try:
        _panel_times(axes[0], results)
        _panel_rss(axes[1], results)
        _panel_datapath(axes[2], results)
        _panel_bridged(axes[3], results)
        _panel_connections(axes[4], results)
        _panel_first_packet(axes[5], results)
        _panel_extras(axes[6], results)
        axes[7].set_axis_off()
        date = results["machine"]["date"]
        fig.suptitle(f"secfw benchmark — {date} — {results['machine']['cores']} cores, "
                     f"kernel {results['machine']['kernel']}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
