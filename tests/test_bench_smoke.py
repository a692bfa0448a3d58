"""Smoke test of the benchmark suite: ``python -m secfw.bench --quick`` end to end.

It checks the shape of the report — every section present, every step ran or
says why it was skipped, no step failed, the plot drawn, no namespace left
behind — and never a timing: benchmarks report, they do not fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from secfw.bench.resync import CHANGES
from secfw.bench.targets import TARGETS
from secfw.lab.hostlab import Lab, netns_exists

#: Bounds that only keep a hung bench finite (the runs end when they are done): a
#: loaded machine (``make test``'s 3 workers on 2 cores, other jobs beside them)
#: took more than the former 280 s for ``--quick``.
RUN_LIMIT_S = 1500

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.timeout(RUN_LIMIT_S + 120),
]

SECTIONS = ("machine", "options", "workload", "control_plane", "incremental", "membership",
            "datapath", "datapath_bridged", "connections", "flowtable", "neutron", "restart",
            "during_resync", "profiles", "targets", "plot")
QUICK_SIZES = [50, 200]
#: This module's bench runs name their scratch namespaces sfw-b-<TAG>… (other tests
#: may run benches beside it under pytest-xdist).
NS_TAG = f"{uuid.uuid4().hex[:6]}-"


def errors(node: Any, path: str = "") -> list[str]:
    """Every ``"error"`` recorded anywhere in the results, with where it was."""
    found: list[str] = []
    if isinstance(node, dict):
        if "error" in node:
            found.append(f"{path}: {node['error']}")
        for key, value in node.items():
            found += errors(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += errors(item, f"{path}[{index}]")
    return found


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Run ``--quick`` once into a temporary directory; its output dir and JSON.

    ``--budget`` well above what ``--quick`` takes: the budget is the bench's own
    wall-clock guard (a step that would not fit is skipped), and this test checks
    that every step ran — on a loaded machine the default quick budget (240 s)
    skipped steps and failed it, although nothing was wrong."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "secfw.bench", "--quick", "--budget", str(RUN_LIMIT_S),
         "--out", str(out)],
        capture_output=True, text=True, timeout=RUN_LIMIT_S, check=False,
        env=os.environ | {"SECFW_BENCH_NS_TAG": NS_TAG},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out, json.loads((out / "latest.json").read_text(encoding="utf-8"))


def test_report_has_every_section(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = quick_run
    assert [s for s in SECTIONS if s not in results] == []
    markdown = (out / "latest.md").read_text(encoding="utf-8")
    assert markdown.startswith("# secfw benchmark")
    assert "## make bench: budget and sections" in markdown
    # --quick measures no target, so none is missed and none profiled (the
    # profiles themselves: tests/netns/test_bench_profile_takes.py)
    assert results["profiles"] == {} and "Profiles: 0 taken in 0 s" in markdown
    for key in ("cores", "kernel", "nft", "python", "date"):
        assert results["machine"][key]


def test_every_step_ran_without_error(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    assert errors(results) == []
    assert [row["ports"] for row in results["control_plane"]] == QUICK_SIZES
    for row in results["control_plane"]:
        assert {"store", "compile", "ruleset", "full_apply", "agent"} <= set(row)
    assert [row["ports"] for row in results["membership"]] == QUICK_SIZES
    assert [row["ports"] for row in results["restart"]] == QUICK_SIZES
    assert len(results["incremental"]["changes"]) == 5
    during = results["during_resync"]
    assert len(during["runs"]) == CHANGES  # spread over the read-back
    assert during["changes_lost"] == 0  # every change reached the kernel: a real commit
    # nothing committed in the bench's namespace meanwhile: no read-back at all
    assert results["during_resync"]["without_readback"]["check_outcome"] == "unchanged"
    datapath = results["datapath"]
    assert "skipped" in datapath or [r["ports"] for r in datapath["rows"]] == [0, 0, *QUICK_SIZES]
    assert [t["target"] for t in results["targets"]] == [text for text, _ in TARGETS]
    bridged = results["datapath_bridged"]
    assert "skipped" in bridged or [r["ports"] for r in bridged["rows"]] == [0, 0, *QUICK_SIZES]
    assert "skipped" in results["connections"]  # no size above the data path's with --quick
    assert isinstance(results["flowtable"]["available"], bool)


def test_datapath_measures_both_backends_at_every_size(
        quick_run: tuple[Path, dict[str, Any]]) -> None:
    """One row per N with numbers for nftables and, under "iptables", for the
    iptables backend (its default variant); the baselines have no iptables part."""
    out, results = quick_run
    datapath = results["datapath"]
    if "skipped" in datapath:
        pytest.skip(f"data path skipped: {datapath['skipped']}")
    variant = datapath["iptables_variant"]
    assert variant in ("nft", "legacy")
    baseline, conntrack, *secfw = datapath["rows"]
    assert baseline["iptables"] is None and conntrack["iptables"] is None
    assert [row["ports"] for row in secfw] == QUICK_SIZES
    for row in secfw:
        assert row["filter"] == "secfw (nftables)"
        assert row["iptables"]["filter"] == f"secfw (iptables-{variant})"
        for figures in (row, row["iptables"]):
            for key in ("udp_pps", "tcp_bps", "udp_ratio", "tcp_ratio", "load_s", "conn_rate",
                        "conn_ratio", "conn_ct_ratio", "conn_p50_us", "conn_p99_us"):
                assert isinstance(figures[key], float) and figures[key] > 0, key
            assert len(figures["udp_ratio_runs"]) == len(figures["tcp_ratio_runs"]) == 1
    markdown = (out / "latest.md").read_text(encoding="utf-8")
    assert f"| iptables-{variant}: UDP 64 B (kpps) |" in markdown
    assert f"| iptables-{variant}: new conn/s |" in markdown
    assert f"iptables-{variant}" in datapath["method"]
    target = next(t for t in results["targets"] if t["target"].startswith("data path"))
    assert target["met"] is None  # 10,000 ports are not run with --quick
    assert "not yet implemented" not in markdown + json.dumps(results)


def test_plot_is_drawn(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = quick_run
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # `make test` installs only the test extra
        assert "matplotlib" in results["plot"]["skipped"]
        return
    assert results["plot"] == {"file": "latest.png"}
    assert (out / "latest.png").read_bytes().startswith(b"\x89PNG")


def test_no_namespace_left_behind(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    lab = Lab(results["workload"]["host"], Path("/nonexistent"))
    leftovers = [ns for ns in (lab.host_ns, lab.external_ns) if netns_exists(ns)]
    leftovers += [ns.name for ns in Path("/run/netns").glob(f"sfw-b-{NS_TAG}*")]
    assert leftovers == []


def test_backends_comparison_runs_every_backend_and_topology(tmp_path: Path) -> None:
    """``python -m secfw.bench.backends`` at a tiny size: one row per backend ×
    topology, each with figures (no error) and converged (nothing to do after)."""
    done = subprocess.run(
        [sys.executable, "-m", "secfw.bench.backends", "--sizes", "10", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=RUN_LIMIT_S, check=False)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "backends.json").read_text())
    combos = {(row["backend"], row["topology"]) for row in results["rows"]}
    assert combos == {(b, t) for b in ("nftables", "iptables-nft", "iptables-legacy")
                      for t in ("routed", "bridged")}
    assert errors(results) == []
    assert all(row["commands_after"] == 0 and row["full_apply_s"] > 0
               for row in results["rows"])
    assert "| 10 | iptables-legacy | bridged |" in (tmp_path / "backends.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "secfw.bench.backends", "--sizes", "x"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "--sizes" in bad.stderr
