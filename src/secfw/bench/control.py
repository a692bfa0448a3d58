"""Control-plane measurements at one size: compile, ruleset size, full apply, agent.

* :func:`measure_compile` — model → IR (``compile_host``), IR → ruleset
  (``render``) and ruleset → text (the full transaction's text), in process.
* :func:`ruleset_size` — rules, chains, sets (and maps), elements, bytes of text.
* :func:`measure_full_apply` — the full transaction into a fresh namespace
  (libnftables parse + kernel commit).
* :func:`run_agent_once` — the real agent as its own process,
  ``ip netns exec NS secfw --store URL agent --host H --once``: wall time, the
  sync time and command count it logs, and its peak RSS as it logs it (its own
  ``VmHWM``). Not ``wait4(2)``'s ``ru_maxrss``: that starts from the *parent's*
  resident size — the child is forked from this process, whose pages it maps
  until it execs, and exec keeps that peak (fs/exec.c) — so it reported this
  benchmark's own size (759 MB at 10,000 ports when the agent's was 693 MB for
  a full sync and 280 MB for a restart). It is kept as ``wait4_maxrss_mb``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from secfw.backends.nftables import NftablesExecutor, Ruleset, full_transaction, render
from secfw.bench import profiles
from secfw.bench.common import Row, median, rounded, timed
from secfw.bench.namespaces import scratch_netns
from secfw.cloud import CloudState
from secfw.compiler.build import compile_host
from secfw.compiler.ir import HostFilter
from secfw.store.base import Store

_SYNC_LINE = re.compile(r"^(?=.*\bsync\b)(?=.*\bcommands=(\d+))(?=.*\bms=([\d.]+)).*$", re.M)
_PROCESS_LINE = re.compile(
    r"^(?=.*\bmsg=process\b)(?=.*\bpeak_rss_mb=([\d.]+))(?=.*\bcpu_s=([\d.]+)).*$", re.M)


@dataclass
class Compiled:
    """One size's compile figures, its IR, its ruleset and the full transaction's
    text (the IR is kept for the data path's iptables ruleset)."""

    row: Row
    host_filter: HostFilter
    ruleset: Ruleset
    text: str


def measure_compile(store: Store, host: str, repeat: int) -> Compiled:
    """Median times of compile_host, render and text over ``repeat`` (≥ 1) runs."""
    state, load_s = timed(lambda: CloudState.from_snapshot(store.load()))
    runs = [_compile_once(state, host) for _ in range(max(repeat, 1))]
    row: Row = {"store_load_s": rounded(load_s), "repeat": len(runs)}
    for key in ("compile_s", "render_s", "text_s"):
        row[key] = rounded(median([run.row[key] for run in runs]))
    row["total_s"] = rounded(row["compile_s"] + row["render_s"] + row["text_s"])
    last = runs[-1]
    return Compiled(row, last.host_filter, last.ruleset, last.text)


def _compile_once(state: CloudState, host: str) -> Compiled:
    """One compile → render → text pass, each step timed."""
    host_filter, compile_s = timed(lambda: compile_host(state, host))
    ruleset, render_s = timed(lambda: render(host_filter))
    text, text_s = timed(lambda: full_transaction(ruleset).text)
    return Compiled({"compile_s": compile_s, "render_s": render_s, "text_s": text_s},
                    host_filter, ruleset, text)


def ruleset_size(ruleset: Ruleset, text: str) -> Row:
    """How big the ruleset is: rules, chains, sets and maps, elements, text bytes."""
    return {
        "rules": sum(len(chain.rules) for chain in ruleset.chains),
        "chains": len(ruleset.chains),
        "sets": len(ruleset.sets),
        "elements": sum(len(named.elements) for named in ruleset.sets),
        "text_bytes": len(text.encode()),
    }


def measure_full_apply(text: str) -> Row:
    """Seconds to commit the full transaction ``text`` into a fresh namespace."""
    with scratch_netns() as ns:
        executor = NftablesExecutor(netns=ns)
        _, seconds = timed(lambda: executor.apply_text(text))
    return {"full_apply_s": rounded(seconds)}


def profile_compile_apply(store: Store, host: str) -> profiles.Taken:
    """One more compile → render → text → full apply (into a fresh namespace)
    under the profiler: what :func:`measure_compile` and
    :func:`measure_full_apply` time, the store load and the namespace left out."""
    state = CloudState.from_snapshot(store.load())
    session = profiles.Session()
    with scratch_netns() as ns:
        executor = NftablesExecutor(netns=ns)
        compiled = session.call(lambda: _compile_once(state, host))
        session.call(lambda: executor.apply_text(compiled.text))
    return session.taken()


def profile_agent_once(ns: str, store_url: str, host: str, timeout: float,
                       stem: Path, timings: bool = True) -> profiles.Taken:
    """:func:`run_agent_once`'s process again, under :mod:`.profiled` (its
    pstats and RSS samples in ``stem``.*; without ``timings``, RSS samples
    only); raises RuntimeError when it failed."""
    command = ["ip", "netns", "exec", ns, sys.executable, "-m", "secfw.bench.profiled",
               "--out", str(stem), *([] if timings else ["--rss-only"]), "--",
               "--store", store_url, "agent", "--host", host, "--once"]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"profiled agent: exit {done.returncode}: "
                           f"{lines[-1] if lines else ''}")
    return profiles.load_process(stem)


def secfw_command() -> str:
    """The ``secfw`` console script beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "secfw"
    return str(beside) if beside.exists() else "secfw"


def run_agent_once(ns: str, store_url: str, host: str, timeout: float) -> Row:
    """Run ``secfw agent --once`` as its own process in ``ns``; see the module doc."""
    command = ["ip", "netns", "exec", ns, secfw_command(), "--store", store_url,
               "agent", "--host", host, "--once"]
    with tempfile.TemporaryFile(mode="w+") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        status, peak_kb = _wait_with_rusage(proc, timeout)
        wall = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    row: Row = {"wall_s": rounded(wall), "wait4_maxrss_mb": round(peak_kb / 1024, 1)}
    if status is None:
        row["error"] = f"timed out after {timeout:.0f} s and was killed"
        return row
    if status != 0:
        lines = output.strip().splitlines()
        row["error"] = f"exit status {status}: {lines[-1] if lines else ''}"
        return row
    return row | _parse_sync_line(output) | _parse_process_line(output)


def _parse_process_line(output: str) -> Row:
    """The agent's own peak RSS and CPU seconds from its ``process`` log line."""
    found = _PROCESS_LINE.search(output)
    if found is None:
        return {"error": "the agent logged no process line (peak RSS unknown)"}
    return {"peak_rss_mb": float(found.group(1)), "cpu_s": rounded(float(found.group(2)))}


def _parse_sync_line(output: str) -> Row:
    """The agent's own ``commands=`` and ``ms=`` from its ``sync`` log line."""
    found = _SYNC_LINE.search(output)
    if found is None:
        return {"error": "the agent logged no sync line"}
    return {"commands": int(found.group(1)), "sync_s": rounded(float(found.group(2)) / 1000)}


def _wait_with_rusage(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, int]:
    """(exit status or None if it had to be killed, peak RSS in KiB) of ``proc``.

    Polls ``wait4(WNOHANG)``: the child stays a zombie (its pid reserved) until
    reaped, so a kill on timeout can only ever hit this child.
    """
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return (None if killed else proc.returncode), usage.ru_maxrss
        if not killed and time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.02)
