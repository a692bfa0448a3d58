"""The issue's targets, evaluated on a run's results: met, missed, or not measured.

Each target is checked at 10,000 ports (the membership flatness over every size
measured); a target whose size was not run (``--quick``, ``--sizes``) or whose
step was skipped is reported as not measured (``met`` is None), never guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from secfw.bench.common import Row, ok

TARGET_SIZE = 10_000
FLAT_FACTOR = 2.0  # "flat": the largest size costs at most this many times the smallest
FLAT_SPAN = 100  # ... over sizes at least this far apart (100 → 10,000 at least)


def find(rows: list[Row], ports: int) -> Row | None:
    """The row for ``ports`` in a list of per-size rows."""
    return next((row for row in rows if row.get("ports") == ports), None)


def _target(text: str, check: Callable[[Row], tuple[bool | None, str]], results: Row) -> Row:
    try:
        met, figure = check(results)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        met, figure = None, "not measured"
    return {"target": text, "figure": figure, "met": met}


def _control(results: Row) -> Row:
    row = find(results["control_plane"], TARGET_SIZE)
    if row is None:
        raise KeyError(TARGET_SIZE)
    return row


def compile_and_apply(results: Row) -> tuple[bool | None, str]:
    row = _control(results)
    compiled, applied = row["compile"], row["full_apply"]
    total = compiled["total_s"] + applied["full_apply_s"]
    return total < 2.0, (f"{total:.2f} s (compile {compiled['compile_s']:.2f} + render "
                         f"{compiled['render_s']:.2f} + text {compiled['text_s']:.2f} + "
                         f"apply {applied['full_apply_s']:.2f})")


def agent_rss(results: Row) -> tuple[bool | None, str]:
    agent = _control(results)["agent"]
    if not ok(agent):
        raise KeyError("agent")
    restart = find(results["restart"], TARGET_SIZE) or {}
    extra = f" (restart over the loaded table: {restart['peak_rss_mb']:.0f} MB)" if ok(
        restart) else ""
    return agent["peak_rss_mb"] < 300, f"{agent['peak_rss_mb']:.0f} MB{extra}"


def membership_fast(results: Row) -> tuple[bool | None, str]:
    row = find(results["membership"], TARGET_SIZE)
    if row is None or not ok(row):
        raise KeyError(TARGET_SIZE)
    ms = row["store_to_kernel_ms"]
    return ms < 10, f"{ms:,.1f} ms store→kernel ({row['commands']} command)"


def membership_flat(results: Row) -> tuple[bool | None, str]:
    rows = [r for r in results["membership"] if ok(r) and "store_to_kernel_ms" in r]
    if len(rows) < 2 or rows[-1]["ports"] < FLAT_SPAN * rows[0]["ports"]:
        raise KeyError("membership")
    low, high = rows[0], rows[-1]
    factor = high["store_to_kernel_ms"] / low["store_to_kernel_ms"]
    figure = (f"{low['store_to_kernel_ms']:,.0f} ms at {low['ports']:,} → "
              f"{high['store_to_kernel_ms']:,.0f} ms at {high['ports']:,} ports ({factor:.1f}×)")
    if high["ports"] < 50_000:
        figure += "; 50,000 not measured"
    return factor <= FLAT_FACTOR, figure


def datapath_ratio(results: Row) -> tuple[bool | None, str]:
    """The target is nftables' (the default backend); the iptables backend's
    ratios at the same size are shown beside it, for comparison only."""
    datapath = results["datapath"]
    row = find(datapath["rows"], TARGET_SIZE) if ok(datapath) else None
    if row is None:
        raise KeyError("datapath")
    udp, tcp = row["udp_ratio"], row["tcp_ratio"]
    figure = f"UDP {udp:.0%}, TCP {tcp:.0%} of unfiltered"
    return min(udp, tcp) >= 0.95, f"{figure} ({_iptables_ratio(datapath, row)})"


def _iptables_ratio(datapath: Row, row: Row) -> str:
    """``iptables-nft: UDP 80 %, TCP 95 %``, or that it was not measured."""
    name = f"iptables-{datapath.get('iptables_variant', '?')}"
    figures = row.get("iptables")
    ratios = [figures.get(key) for key in ("udp_ratio", "tcp_ratio")] if isinstance(
        figures, dict) else []
    if len(ratios) != 2 or not all(isinstance(r, int | float) for r in ratios):
        return f"{name}: not measured"
    return f"{name}: UDP {ratios[0]:.0%}, TCP {ratios[1]:.0%}"


def new_connections(results: Row) -> tuple[bool | None, str]:
    """nftables' new-connection rate at the target size against conntrack only."""
    datapath = results["datapath"]
    row = find(datapath["rows"], TARGET_SIZE) if ok(datapath) else None
    if row is None or not isinstance(row.get("conn_ct_ratio"), int | float):
        raise KeyError("new connections")
    ratio = row["conn_ct_ratio"]
    return ratio >= 0.90, f"{ratio:.0%} of conntrack only ({row['conn_rate']:,.0f}/s)"


def first_packet_flat(results: Row) -> tuple[bool | None, str]:
    """nftables' p99 connect() time, smallest N > 0 against the largest."""
    datapath = results["datapath"]
    rows = [r for r in datapath.get("rows", []) if r.get("ports") and
            isinstance(r.get("conn_p99_us"), int | float)] if ok(datapath) else []
    if len(rows) < 2:
        raise KeyError("first packet")
    low, high = rows[0], rows[-1]
    growth = high["conn_p99_us"] / low["conn_p99_us"] - 1
    figure = (f"p99 {low['conn_p99_us']:,.0f} µs at {low['ports']:,} → "
              f"{high['conn_p99_us']:,.0f} µs at {high['ports']:,} ({growth:+.0%})")
    return growth <= 0.10, figure


def restart_quiet(results: Row) -> tuple[bool | None, str]:
    row = find(results["restart"], TARGET_SIZE)
    if row is None or not ok(row):
        raise KeyError("restart")
    return row["commands"] == 0, (f"{row['commands']} commands, in sync after "
                                  f"{row['wall_s']:.1f} s (agent's own sync {row['sync_s']:.1f} s)")


def _audit(results: Row) -> Row:
    """The audit figures at the target size (a whole-cloud run, not ``--quick``'s)."""
    audit = _control(results).get("audit")
    if not isinstance(audit, dict) or not ok(audit) or audit.get("audit_scope") != "cloud":
        raise KeyError("audit")
    return audit


def _audit_check(key: str, limit: float, unit: str) -> Callable[[Row], tuple[bool | None, str]]:
    """A check of one audit figure against ``limit`` (issue #14's speed targets)."""
    def check(results: Row) -> tuple[bool | None, str]:
        figure = _audit(results)[key]
        return figure < limit, f"{figure:,.{0 if unit == 'ms' and figure >= 10 else 2}f} {unit}"
    return check


TARGETS: tuple[tuple[str, Callable[[Row], tuple[bool | None, str]]], ...] = (
    ("10k ports: compile + full apply < 2 s", compile_and_apply),
    ("agent peak RSS < 300 MB (10k ports, full sync)", agent_rss),
    ("membership change at 10k < 10 ms store→kernel", membership_fast),
    (f"membership change flat 100 → 50k (≤ {FLAT_FACTOR:g}×)", membership_flat),
    ("data path at 10k ≥ 95 % of unfiltered (UDP and TCP)", datapath_ratio),
    ("new TCP connections/s at 10k ≥ 90 % of conntrack only", new_connections),
    ("first-packet p99 within 10 % from 100 ports to the largest N", first_packet_flat),
    ("restart at 10k: no rule rewritten (0 commands)", restart_quiet),
    ("audit explain at 10k < 50 ms", _audit_check("explain_ms", 50, "ms")),
    ("audit reach of one instance at 10k < 200 ms", _audit_check("reach_ms", 200, "ms")),
    ("audit exposure of the whole cloud at 10k < 5 s", _audit_check("exposure_s", 5, "s")),
    ("audit lint of the whole cloud at 10k < 5 s", _audit_check("lint_s", 5, "s")),
    ("audit verify of the 10k-port host < 10 s", _audit_check("verify_s", 10, "s")),
)


def evaluate(results: Row) -> list[Row]:
    """Every target with its figure and whether it was met (None: not measured)."""
    return [_target(text, check, results) for text, check in TARGETS]


def verdict(met: Any) -> str:
    """``met`` / ``MISSED`` / ``not measured`` for the Markdown table."""
    return {True: "met", False: "**MISSED**"}.get(met, "not measured")
