"""Kernel symbols during one data-path run: ``perf record -a`` around it.

:func:`during` runs ``fn`` (one iperf3 run) while ``perf record -a -e
cpu-clock`` samples every CPU, then books the samples by symbol: nf_tables
(``nft_*``, the hook dispatcher), conntrack, br_netfilter, the rest of the
kernel, user space. Idle samples (a CPU in its idle loop) and the scheduler's
are left out, and only the data path's tasks count (:data:`TASKS`: iperf3,
softirq threads, an idle CPU's softirqs), so other work on a shared machine
does not dilute the shares. Without ``perf``, or when it fails, the row is
skipped with the reason: an optional diagnosis, not a figure.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
import time
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
START_S = 10.0
_LINE = re.compile(r"\s*(\d+)\s+(\S+)\s+\[(.)\]\s+(\S+)")
#: the tasks whose samples count: iperf3 (the sender's context runs the host's
#: hooks: veth hands the packet to the backlog, processed when it re-enables
#: bottom halves), softirq threads, and an idle CPU's task (softirqs it runs)
TASKS = ("iperf3", "ksoftirqd", "swapper")


def classify(report: str) -> Row:
    """``perf report -F sample,comm,sym`` → shares of the busy samples of
    :data:`TASKS` by area (other processes' samples are left out)."""
    counts: Counter[str] = Counter()
    for line in report.splitlines():
        found = _LINE.match(line)
        if not found or not found.group(2).startswith(TASKS):
            continue
        samples, where, symbol = int(found.group(1)), found.group(3), found.group(4)
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
        data = Path(work) / "perf.data"
        recorder = subprocess.Popen(
            ["perf", "record", "-q", "-a", "-e", "cpu-clock", "-F", str(FREQUENCY), "-o",
             str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_started(recorder, data)
            fn()
        finally:
            recorder.send_signal(signal.SIGINT)  # perf record's way to stop and write
            _, err = recorder.communicate(timeout=seconds + 60)
        if recorder.returncode not in (0, -signal.SIGINT):
            return {"skipped": f"perf record failed (exit {recorder.returncode}): "
                               f"{err.strip()[-200:]}"}
        report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "-q", "--sort",
                                 "comm,sym", "-F", "sample,comm,sym"], capture_output=True,
                                text=True, timeout=300, check=False)
    if report.returncode != 0:
        return {"skipped": f"perf report failed (exit {report.returncode})"}
    return classify(report.stdout)


def _wait_started(recorder: subprocess.Popen[str], data: Path) -> None:
    """Until perf has opened its events (its file has a header; at most
    :data:`START_S`): on a loaded machine its set-up takes a second or more,
    and a run started before would not be sampled."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and recorder.poll() is None:
        if data.exists() and data.stat().st_size > 0:
            time.sleep(0.2)
            return
        time.sleep(0.05)


def shares_text(row: Row) -> str:
    """``nf_tables 12 %, conntrack 5 %, …`` of a :func:`classify` row."""
    return ", ".join(f"{name} {share * 100:.0f} %" for name, share in row["shares"].items())
