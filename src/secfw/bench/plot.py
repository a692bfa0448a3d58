"""``latest.png``: cost versus number of ports (matplotlib, no display needed).

Three panels: control-plane times (log–log), the agent's peak RSS, and the
data-path ratios to the unfiltered baseline, nftables and iptables side by side.
Targets are drawn as dashed lines.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from secfw.bench.common import Row, ok
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
    ax.set_xticks(range(len(rows)), labels)
    ax.set(xlabel="other ports loaded (N)", ylabel="% of no filter",
           title="Data path (dashed: 95 %)" if rows else "Data path: not measured")
    ax.legend(fontsize=7, loc="lower right")


def write_png(results: Row, path: Path) -> None:
    """Draw the three panels into ``path``."""
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    try:
        _panel_times(axes[0], results)
        _panel_rss(axes[1], results)
        _panel_datapath(axes[2], results)
        date = results["machine"]["date"]
        fig.suptitle(f"secfw benchmark — {date} — {results['machine']['cores']} cores, "
                     f"kernel {results['machine']['kernel']}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
