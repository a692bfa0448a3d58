"""The profile summariser of the bench (secfw.bench.profiles): shares by area
that add up, the kernel's share carved out of the nft call's, builtins booked
to their callers, and the report's cells built from them."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from secfw.bench import perfsample, profiles
from secfw.bench.profiles import IMPORTS, KERNEL, NFT_CALL, Measured

HERE = Path(__file__).stem


def spin(n: int) -> int:
    """A known amount of pure-Python work, with a builtin call (sorted) in it."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total + len(sorted(range(n, 0, -1)))


def test_shares_of_a_known_function_add_up_and_name_it() -> None:
    _, taken = profiles.profile_call(lambda: spin(300_000))
    summary = profiles.summarise(taken.stats, taken.measured)
    areas = dict(summary["areas"])
    assert math.isclose(sum(areas.values()), 1.0, abs_tol=1e-3)
    assert summary["areas"][0][0] == HERE  # spin's own time, and sorted's, booked to it
    assert areas[HERE] > 0.9
    assert profiles.BUILTINS not in areas
    assert "spin" in profiles.pstats_text(taken.stats)


class FakeStats:
    """What pstats.Stats holds: (file, line, name) → (cc, nc, own, cum, callers)."""

    def __init__(self, stats: dict[tuple[str, int, str], Any]) -> None:
        self.stats = stats


RENDER = ("/x/src/secfw/backends/nftables/render.py", 1, "render")
CMD = ("/venv/lib/python3.11/site-packages/nftables.py", 1, "cmd")
JOIN = ("~", 0, "<method 'join' of 'str' objects>")
IMPORT = ("<frozen importlib._bootstrap>", 1, "_find_and_load")


def test_kernel_share_is_carved_out_of_the_nft_call() -> None:
    stats = FakeStats({
        RENDER: (1, 1, 1.0, 3.0, {}),
        CMD: (1, 1, 1.0, 1.0, {RENDER: (1, 1, 1.0, 1.0)}),
        JOIN: (4, 4, 1.0, 1.0, {RENDER: (3, 3, 0.75, 0.75), IMPORT: (1, 1, 0.25, 0.25)}),
        IMPORT: (1, 1, 1.0, 1.25, {}),
    })
    summary = profiles.summarise(stats, Measured(nft_sys_s=0.4))  # type: ignore[arg-type]
    areas = dict(summary["areas"])
    assert areas == {"secfw render": 0.4375, NFT_CALL: 0.15, KERNEL: 0.1, IMPORTS: 0.3125}
    assert math.isclose(sum(areas.values()), 1.0)
    assert profiles.shares_text(summary, 2).startswith("44 % secfw render, 31 % imports, …")


def test_kernel_share_never_exceeds_the_nft_call() -> None:
    stats = FakeStats({CMD: (1, 1, 0.5, 0.5, {})})
    summary = profiles.summarise(stats, Measured(nft_sys_s=2.0))  # type: ignore[arg-type]
    assert dict(summary["areas"]) == {KERNEL: 1.0}


def test_areas_of_files() -> None:
    assert profiles.area_of(("/a/src/secfw/compiler/build.py", 3, "f")) == "secfw compiler.build"
    assert profiles.area_of(("/a/src/secfw/agent/__init__.py", 3, "f")) == "secfw agent"
    assert profiles.area_of(("/a/src/secfw/cli.py", 1, "<module>")) == IMPORTS
    assert profiles.area_of(("/v/lib/python3.11/site-packages/click/core.py", 1, "f")) == "click"
    assert profiles.area_of((profiles.json.__file__, 1, "loads")) == "json"
    assert profiles.area_of(("<string>", 2, "__init__")) == profiles.GENERATED


def test_the_report_cell_quotes_the_profile_and_the_next_step(tmp_path: Path) -> None:
    _, taken = profiles.profile_call(lambda: spin(50_000))
    row = profiles.record(taken, "10k ports: compile + full apply", 200, tmp_path)
    text = (tmp_path / row["file"]).read_text(encoding="utf-8")
    assert text.startswith("# 10k ports: compile + full apply") and "spin" in text
    results = {"profiles": {"10k ports: compile + full apply": row}}
    cell = profiles.explanation(results, {"target": "10k ports: compile + full apply < 2 s",
                                          "met": False}, "fewer elements")
    assert cell.startswith(f"measured: 100 % {HERE}") and cell.endswith("; next: fewer elements")
    assert profiles.explanation(results, {"target": "10k ports: compile + full apply < 2 s",
                                          "met": True}, "x") == ""


def test_a_data_path_target_is_split_by_the_baselines() -> None:
    rows = [{"ports": 0, "filter": "no filter (nothing loaded)", "udp_ratio": 1.0},
            {"ports": 0, "filter": "conntrack only", "udp_ratio": 0.75},
            {"ports": 10_000, "filter": "secfw (nftables)", "udp_ratio": 0.625}]
    results = {"datapath_bridged": {"topology": "bridged", "rows": rows}, "datapath": {}}
    text = profiles.datapath_text(results, "data path bridged within 5 points")
    assert text is not None
    assert text == "bridged UDP -38 points vs unfiltered: conntrack alone -25, secfw's rules -12"
    assert profiles.datapath_text(results, "data path routed, UDP 64 B") is None


def test_the_first_packet_target_quotes_the_large_runs_rows() -> None:
    rows = [{"ports": 0, "filter": "conntrack only", "conn_p50_us": 56.2, "conn_p99_us": 224.2},
            {"ports": 100, "filter": "secfw (nftables)", "conn_p50_us": 79.3,
             "conn_p99_us": 265.8},
            {"ports": 50000, "filter": "secfw (nftables)", "conn_p50_us": 80.4,
             "conn_p99_us": 294.9}]
    results = {"connections": {"topologies": {"routed": {"rows": rows}}}}
    text = profiles.datapath_text(results, "first-packet p99 within 10 %")
    assert text == ("routed connect() p50 / p99: conntrack only 56 / 224 µs, 100 ports "
                    "79 / 266 µs, 50,000 ports 80 / 295 µs; 100 → 50,000 ports: p50 +1 µs, "
                    "p99 +29 µs")
    alone = {"connections": {"topologies": {"routed": {"rows": rows[:2]}}}}
    assert profiles.datapath_text(alone, "first-packet p99 within 10 %") is None


def test_python_areas_are_scaled_to_the_measured_time() -> None:
    """cProfile slows the Python side only: the nft call keeps its seconds, the
    rest shrinks to fill the measured (unprofiled) time."""
    stats = FakeStats({RENDER: (1, 1, 3.0, 4.0, {}), CMD: (1, 1, 1.0, 1.0, {})})
    summary = profiles.summarise(stats, Measured(), measured_s=2.0)  # type: ignore[arg-type]
    assert dict(summary["areas"]) == {NFT_CALL: 0.5, "secfw render": 0.5}
    assert summary["profiled_s"] == 4.0 and summary["measured_s"] == 2.0


def test_a_process_profile_is_written_and_read_back(tmp_path: Path) -> None:
    """``python -m secfw.bench.profiled`` around a cheap secfw command: the
    pstats and the JSON side file (RSS samples) are there, imports among the areas."""
    stem = tmp_path / "help"
    done = subprocess.run([sys.executable, "-m", "secfw.bench.profiled", "--out", str(stem),
                           "--", "--help"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    taken = profiles.load_process(stem)
    assert taken.measured.wall_s > 0 and taken.measured.extra["peak_rss_mb"] > 0
    summary = profiles.summarise(taken.stats, taken.measured)
    assert IMPORTS in dict(summary["areas"])
    assert math.isclose(sum(dict(summary["areas"]).values()), 1.0, abs_tol=1e-3)


def test_perf_samples_are_booked_by_kernel_area() -> None:
    """perf report lines (samples, task, [k]/[.], symbol): the data path's tasks
    only, idle left out, the rest by area."""
    report = "\n".join(["   60  swapper  [k] pv_native_safe_halt",
                        "   10  iperf3  [k] nft_do_chain",
                        "    5  ksoftirqd/0  [k] nf_conntrack_in",
                        "    5  swapper  [k] br_nf_pre_routing", "   20  iperf3  [k] memcpy_orig",
                        "   60  iperf3  [.] iperf_send", "   99  python3  [k] nft_do_chain",
                        "# comment"])
    row = perfsample.classify(report)
    assert row["busy_samples"] == 100
    assert row["shares"] == {"nf_tables": 0.1, "conntrack": 0.05, "br_netfilter": 0.05,
                             "other kernel": 0.2, "user space": 0.6}
    results = {"datapath": {"topology": "routed", "rows": [], "perf": {
        "ports": 10_000, "run": "UDP 64 B, 3 s", **row}}}
    text = profiles.datapath_text(results, "data path routed, UDP 64 B")
    assert text == ("routed perf (UDP 64 B, 3 s at 10,000): nf_tables 10 %, conntrack 5 %, "
                    "br_netfilter 5 %, other kernel 20 %, user space 60 % of the data path's busy "
                    "samples")
