"""The data-path benchmark with both backends: configurations, pairing, report.

Pure parts (configurations, summary, report, targets, plot bars) run anywhere on
made-up figures; :class:`~secfw.bench.datapath.HostFilters` runs once against fakes
(what is cleared before what is loaded) and once for real in a scratch namespace
(only one filter at a time, nothing left). No timings are asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest
from test_ipt_render import small

from secfw.backends.iptables import IptPlan
from secfw.backends.nftables import full_transaction
from secfw.backends.nftables import render as nft_render
from secfw.bench import report, targets
from secfw.bench.datapath import (
    CONNTRACK_ONLY,
    IPTABLES,
    NFTABLES,
    NO_FILTER,
    SECFW,
    Configuration,
    HostFilters,
    HostRuleset,
    Measured,
    Settings,
    _summarise,
    configurations,
)
from secfw.bench.namespaces import scratch_netns
from secfw.compiler.ir import HostFilter

SIZES = (100, 10_000)


def rulesets() -> dict[int, HostRuleset]:
    return {n: HostRuleset(small(), f"nft text {n}") for n in SIZES}


def test_configurations_are_baselines_then_each_backend_at_every_size() -> None:
    planned: list[HostFilter] = []

    def plan_of(ir: HostFilter) -> IptPlan:
        planned.append(ir)
        return IptPlan(ipset_before=(f"plan {len(planned)}",))

    configs = configurations(rulesets(), plan_of, "nft")
    assert [(c.filter, c.ports, c.backend) for c in configs] == [
        (NO_FILTER, 0, None), (CONNTRACK_ONLY, 0, None),
        (SECFW, 100, NFTABLES), (SECFW, 10_000, NFTABLES),
        ("secfw (iptables-nft)", 100, IPTABLES), ("secfw (iptables-nft)", 10_000, IPTABLES),
    ]
    assert len(planned) == len(SIZES)  # one plan per N, reused by every repetition
    assert configs[0].nft_text is None and configs[0].ipt_plan is None
    assert configs[3].nft_text == "nft text 10000" and configs[3].ipt_plan is None
    assert configs[5].ipt_plan == IptPlan(ipset_before=("plan 2",)) and configs[5].nft_text is None


def measured(kpps: list[float], gbps: list[float], conns: list[float],
             p99_us: float = 100.0) -> Measured:
    return Measured(udp_pps=[v * 1e3 for v in kpps], tcp_bps=[v * 1e9 for v in gbps],
                    conn_rate=conns, conn_p50_us=[p99_us / 2] * len(kpps),
                    conn_p99_us=[p99_us] * len(kpps), load_s=[0.5] * len(kpps))


def summary() -> dict[str, Any]:
    """Two repetitions; the baseline doubles between them (drift that pairing removes)."""
    configs = configurations(rulesets(), lambda ir: IptPlan(), "nft")
    runs = [
        measured([100, 200], [10, 20], [2000, 4000]),  # no filter
        measured([90, 180], [10, 20], [1000, 2000]),  # conntrack only
        measured([95, 190], [10, 19], [950, 1900], 100.0),  # nftables, 100
        measured([96, 192], [9, 18], [800, 1600], 150.0),  # nftables, 10,000: TCP 90 %
        measured([60, 100], [8, 16], [500, 1000]),  # iptables, 100
        measured([30, 80], [5, 10], [250, 500]),  # iptables, 10,000
    ]
    return _summarise(configs, runs, Settings(3.0, 2), "nft")


def test_rows_pair_each_backend_with_the_baseline_of_the_same_repetition() -> None:
    dp = summary()
    assert dp["iptables_variant"] == "nft" and "iptables-nft" in dp["method"]
    assert [(r["ports"], r["filter"]) for r in dp["rows"]] == [
        (0, NO_FILTER), (0, CONNTRACK_ONLY), (100, SECFW), (10_000, SECFW)]
    base, conntrack, _, big = dp["rows"]
    assert base["iptables"] is None and conntrack["iptables"] is None
    assert big["udp_ratio_runs"] == [0.96, 0.96] and big["udp_ratio"] == 0.96
    ipt = big["iptables"]
    assert ipt["filter"] == "secfw (iptables-nft)"
    assert ipt["udp_pps"] == 55e3 and ipt["udp_pps_runs"] == [30e3, 80e3]
    assert ipt["udp_ratio_runs"] == [0.3, 0.4] and ipt["udp_ratio"] == 0.35
    assert ipt["tcp_ratio"] == 0.5 and ipt["load_s"] == 0.5
    for key in ("udp_pps", "tcp_bps", "udp_ratio", "tcp_ratio", "load_s"):
        assert isinstance(ipt[key], float), key
    assert "not yet implemented" not in json.dumps(dp)


def test_new_connections_are_paired_with_no_filter_and_with_conntrack_only() -> None:
    """New connections: the ratio to no filter and to conntrack only, per
    repetition, and the median connect() percentiles."""
    big = summary()["rows"][-1]
    assert big["conn_rate"] == 1200.0 and big["conn_rate_runs"] == [800.0, 1600.0]
    assert big["conn_ratio"] == 0.4 and big["conn_ct_ratio"] == 0.8
    assert big["conn_p50_us"] == 75.0 and big["conn_p99_us"] == 150.0
    assert big["iptables"]["conn_ct_ratio"] == 0.25


def test_new_connection_targets() -> None:
    """>= 90 % of conntrack only at 10k (here 80 %: missed); p99 within 10 % from the
    smallest N to the largest (here +50 %: missed)."""
    results = results_with(summary())
    assert targets.new_connections(results) == (
        False, "routed 80% of conntrack only (1,200/s); bridged: not measured")
    met, figure = targets.first_packet_flat(results)
    assert met is False and figure == ("p99 100 µs at 100 → 150 µs at 10,000 (+50%); "
                                       "larger sizes not measured")


def results_with(dp: dict[str, Any]) -> dict[str, Any]:
    return {"datapath": dp, "control_plane": [], "membership": [], "restart": []}


def test_report_shows_both_backends_side_by_side() -> None:
    lines = report._datapath(results_with(summary()))
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == ("| N | nftables: UDP 64 B (kpps) | ratio | TCP (Gbit/s) | ratio "
                        "| iptables-nft: UDP 64 B (kpps) | ratio | TCP (Gbit/s) | ratio |")
    assert table[1] == ("| 0: no filter (nothing loaded) | 150.0 | 100.0% | 15.00 | 100.0% "
                        "| — | — | — | — |")
    assert table[4] == ("| 10,000 | 144.0 | 96.0% | 13.50 | 90.0% "
                        "| 55.0 | 35.0% | 7.50 | 50.0% |")
    assert any("iptables-nft 500.0 ms" in line for line in lines)
    assert ("| 10,000 | 1,200 | 80.0% | 75 | 150 | 375 | 25.0% | 50 | 100 |") in table


def test_datapath_targets_are_nftables_with_iptables_beside_them() -> None:
    """UDP >= 90 % (here 96 %: met) and TCP >= 95 % (here 90 %: missed), one row each."""
    results = results_with(summary())
    assert targets.datapath_udp(results) == (True, "UDP 96% of unfiltered (iptables-nft: 35%)")
    assert targets.datapath_tcp(results) == (False, "TCP 90% of unfiltered (iptables-nft: 50%)")
    dp = summary()
    dp["rows"][-1]["iptables"] = None
    assert targets.datapath_udp(results_with(dp))[1].endswith("(iptables-nft: not measured)")


def test_bridged_target_compares_each_topology_with_its_own_baseline() -> None:
    """Bridged at most 5 points below routed, UDP and TCP; not measured without it."""
    results = results_with(summary())
    assert targets.evaluate(results)[9]["met"] is None  # no bridged run
    bridged = summary()
    big = bridged["rows"][-1]
    big["udp_ratio"], big["tcp_ratio"] = 0.92, 0.84
    results["datapath_bridged"] = bridged
    met, figure = targets.bridged_vs_routed(results)
    assert met is False  # UDP -4 points is within, TCP -6 is not
    assert figure == ("UDP 92% bridged vs 96% routed (-4 points); "
                      "TCP 84% bridged vs 90% routed (-6 points)")
    big["tcp_ratio"] = 0.86
    assert targets.bridged_vs_routed(results)[0] is True
    assert targets.new_connections(results) == (
        False, "routed 80% of conntrack only (1,200/s); bridged 80% of conntrack only (1,200/s)")


def test_first_packet_prefers_the_large_run() -> None:
    """With the new-connections run at the largest size, the flatness is read
    there (both sizes side by side), not from the data path."""
    results = results_with(summary())
    large = summary()
    large["rows"] = [r for r in large["rows"] if r["ports"] != 10_000]
    large["rows"].append(dict(large["rows"][-1], ports=50_000, conn_p99_us=105.0))
    results["connections"] = {"topologies": {"routed": large}}
    assert targets.first_packet_flat(results) == (
        True, "p99 100 µs at 100 → 105 µs at 50,000 (+5%)")


def test_plot_draws_iptables_bars_only_where_iptables_was_measured() -> None:
    plot = pytest.importorskip("secfw.bench.plot")
    rows = summary()["rows"][1:]

    def bars(backend: str, offset: float) -> list[tuple[float, float]]:
        found = plot._ratio_bars(rows, backend, "udp_ratio", offset)
        return [(round(x, 6), round(y, 6)) for x, y in found]

    assert bars("nftables", 0.0) == [(0.0, 90.0), (1.0, 95.0), (2.0, 96.0)]
    assert bars("iptables", 0.1) == [(1.1, 55.0), (2.1, 35.0)]  # none for conntrack only


class Recorder:
    """Stands in for both backends: records what is called, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def delete_table(self) -> None:
        self.calls.append("nft delete table")

    def apply_text(self, text: str) -> None:
        self.calls.append(f"nft apply {text}")

    def cleanup(self) -> None:
        self.calls.append("iptables cleanup")

    def apply(self, plan: IptPlan) -> None:
        self.calls.append(f"iptables apply {plan.ipset_before[0]}")


def test_every_load_first_clears_both_backends() -> None:
    recorder = Recorder()
    filters = object.__new__(HostFilters)  # no namespace: the backends are fakes
    filters.netns, filters.variant = "unused", "legacy"
    filters.topology, filters.flowtable_loaded = "routed", False
    filters.nftables = recorder  # type: ignore[assignment]
    filters.iptables = recorder  # type: ignore[assignment]
    for config in (Configuration(SECFW, 1, NFTABLES, nft_text="T"),
                   Configuration("ipt", 1, IPTABLES, ipt_plan=IptPlan(ipset_before=("P",))),
                   Configuration(NO_FILTER, 0)):
        assert filters.load(config) >= 0
    clear = ["nft delete table", "iptables cleanup"]
    assert recorder.calls == [*clear, "nft apply T", *clear, "iptables apply P", *clear]
    recorder.calls.clear()
    filters.load(Configuration(SECFW, 1, NFTABLES, nft_text="F", flowtable=True))
    filters.clear()  # the flowtable's own table goes too (bench.flowtable)
    assert recorder.calls == [*clear, "nft apply F", "nft delete table",
                              "nft apply add table inet secfw_flow\n"
                              "delete table inet secfw_flow\n", "iptables cleanup"]


def in_ns(ns: str, *argv: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=60, check=False)
    return done.stdout


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_only_one_filter_is_ever_loaded_and_clear_leaves_nothing() -> None:
    ir = small()
    with scratch_netns() as ns:
        filters = HostFilters(ns)
        assert filters.variant in ("nft", "legacy")
        nft = Configuration(SECFW, 3, NFTABLES, nft_text=full_transaction(nft_render(ir)).text)
        ipt = Configuration("ipt", 3, IPTABLES, ipt_plan=filters.iptables_plan(ir))
        filters.load(nft)
        assert "table inet secfw" in in_ns(ns, "nft", "list", "tables")
        filters.load(ipt)
        assert "inet secfw" not in in_ns(ns, "nft", "list", "tables")
        assert ":secfw-fwd" in in_ns(ns, f"iptables-{filters.variant}-save", "-t", "filter")
        assert in_ns(ns, "ipset", "list", "-n").split()
        filters.load(nft)
        assert "secfw-" not in in_ns(ns, f"iptables-{filters.variant}-save", "-t", "filter")
        assert in_ns(ns, "ipset", "list", "-n").split() == []
        filters.load(ipt)
        filters.clear()
        assert in_ns(ns, "ipset", "list", "-n").split() == []
        assert "secfw-" not in in_ns(ns, f"iptables-{filters.variant}-save", "-t", "filter")
        if filters.variant == "nft":  # not even iptables-nft's emptied tables are left
            assert in_ns(ns, "nft", "list", "ruleset").strip() == ""
