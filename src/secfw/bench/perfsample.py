"""Kernel symbols during one data-path run: ``perf record -a`` around it.

:func:`during` runs ``fn`` (one iperf3 run) while ``perf record -a -e
cpu-clock`` samples every CPU, then books the samples by symbol: nf_tables
(``nft_*``, the hook dispatcher), conntrack, br_netfilter, the rest of the
kernel, user space. Idle samples (a CPU in its idle loop) and the scheduler's
are left out, so the shares are of the machine's *busy* time during the run —
on a machine shared with other work that includes theirs (the report says
so). Without ``perf``, or when it fails, the row is skipped with the reason: an
optional diagnosis, not a figure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from secfw.bench.common import Row

#: samples per second per CPU: ~1,000, so a 3 s run on 2 CPUs is ~6,000 samples
FREQUENCY = 999
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("nf_tables", ("nft_", "__nft", "nf_tables", "nf_hook_slow")),
    ("conntrack", ("nf_conntrack", "__nf_conntrack", "nf_ct_", "__nf_ct", "nf_confirm",
                   "ipv4_conntrack", "ipv6_conntrack")),
    ("br_netfilter", ("br_nf_", "br_netfilter", "nf_bridge")),
)
IDLE = ("default_idle", "pv_native_safe_halt", "native_safe_halt", "cpuidle", "cpu_idle",
        "acpi_idle", "intel_idle", "do_idle", "poll_idle", "mwait_idle", "finish_task_switch",
        "__schedule", "schedule", "_raw_spin_unlock_irq")
_LINE = re.compile(r"\s*(\d+)\s+\[(.)\]\s+(\S+)")


def classify(report: str) -> Row:
    """``perf report -F sample,sym`` → shares of the busy samples by area."""
    counts: Counter[str] = Counter()
    for line in report.splitlines():
        found = _LINE.match(line)
        if not found:
            continue
        samples, where, symbol = int(found.group(1)), found.group(2), found.group(3)
        if symbol.startswith(IDLE):
            continue
        area = next((name for name, prefixes in AREAS if symbol.startswith(prefixes)), None)
        counts[area or ("other kernel" if where == "k" else "user space")] += samples
    busy = sum(counts.values())
    shares = {name: round(counts[name] / busy, 4) if busy else 0.0
              for name in (*(a for a, _ in AREAS), "other kernel", "user space")}
    return {"busy_samples": busy, "shares": shares}


def during(fn: Callable[[], object], seconds: float) -> Row:
    """``fn()`` (expected to last ``seconds``) with every CPU sampled; its
    :func:`classify` row, or why not."""
    if shutil.which("perf") is None:
        return {"skipped": "perf is not installed"}
    with tempfile.TemporaryDirectory(prefix="secfw-perf-") as work:
        data = str(Path(work) / "perf.data")
        recorder = subprocess.Popen(
            ["perf", "record", "-q", "-a", "-e", "cpu-clock", "-F", str(FREQUENCY), "-o",
             data, "--", "sleep", f"{seconds:g}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            fn()
        finally:
            _, err = recorder.communicate(timeout=seconds + 60)
        if recorder.returncode != 0:
            return {"skipped": f"perf record failed (exit {recorder.returncode}): "
                               f"{err.strip()[-200:]}"}
        report = subprocess.run(["perf", "report", "-i", data, "--stdio", "-q", "--sort", "sym",
                                 "-F", "sample,sym"], capture_output=True, text=True,
                                timeout=300, check=False)
    if report.returncode != 0:
        return {"skipped": f"perf report failed (exit {report.returncode})"}
    return classify(report.stdout)


def shares_text(row: Row) -> str:
    """``nf_tables 12 %, conntrack 5 %, …`` of a :func:`classify` row."""
    return ", ".join(f"{name} {share * 100:.0f} %" for name, share in row["shares"].items())
