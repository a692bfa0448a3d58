"""The agent's peak RSS as the benchmark reports it: the agent's own (VmHWM),
not wait4's ru_maxrss, which a child forked from a big parent inherits."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from secfw.agent.daemon import LogfmtFormatter, peak_rss_kb
from secfw.bench import control

BIG_MB = 256
CHILD = "from secfw.agent.daemon import peak_rss_kb; print(peak_rss_kb())"


def test_a_child_of_a_big_process_reports_its_own_peak() -> None:
    """Forked from a process holding BIG_MB, the child's wait4 figure is at
    least that (why the bench stopped using it); its VmHWM is its own."""
    ballast = bytearray(BIG_MB << 20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
    assert child.stdout is not None
    printed = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.returncode == 0
    del ballast
    own_kb = int(printed)
    assert usage.ru_maxrss >= BIG_MB << 10
    assert 0 < own_kb < (BIG_MB // 2) << 10


def test_peak_rss_kb_is_at_least_the_current_rss() -> None:
    peak = peak_rss_kb()
    assert peak is not None
    with open("/proc/self/status", encoding="ascii") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    assert peak >= rss


def test_the_bench_reads_the_agents_process_line() -> None:
    """What ``secfw agent --once`` logs (LogfmtFormatter) is what the bench parses."""
    record = logging.LogRecord("secfw.agent", logging.INFO, __file__, 1, "process", None, None)
    record.fields = {"peak_rss_mb": 280.4, "cpu_s": 7.25}
    line = LogfmtFormatter().format(record)
    assert control._parse_process_line(f"x=1 msg=sync\n{line}\n") == {
        "peak_rss_mb": 280.4, "cpu_s": 7.25}
    assert "error" in control._parse_process_line("msg=sync commands=0 ms=1\n")
