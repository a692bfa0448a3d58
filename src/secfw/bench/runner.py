"""One benchmark run: the sizes in order, the data path, then the report.

The store grows size by size (:meth:`BenchCloud.grow_to`), so every size is the
same cloud with more ports on the host. At each size (:func:`measure_size`):
compile, ruleset size, full apply into a fresh namespace, the agent as a process
(full sync, then the restart over the loaded table), then an in-process agent for
the membership change — and, at the incremental size (10,000), every change of
the issue. The data path runs once every size up to 10,000 has its ruleset (its
IR and nftables text are kept for it: both backends load the same IR), before
larger sizes, which are the first to be cut when the budget runs short.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from secfw.api import Api
from secfw.bench import audit, control, incremental, report
from secfw.bench.budget import Budget
from secfw.bench.common import Row, guarded, ok, rounded, skipped, timed
from secfw.bench.datapath import HostRuleset, Settings, run_datapath
from secfw.bench.machine import machine_info
from secfw.bench.namespaces import scratch_netns
from secfw.bench.workload import BenchCloud, describe
from secfw.store import open_store

INCREMENTAL_SIZE = 10_000
DATAPATH_MAX = 10_000


@dataclass(frozen=True)
class Options:
    """What to run (see ``python -m secfw.bench --help``)."""

    sizes: tuple[int, ...]
    out: Path
    quick: bool = False
    datapath: bool = True
    budget_s: float = 1200.0
    seed: int = 1
    reps: int = 5
    iperf_seconds: float = 3.0
    compile_repeat: int = 3
    membership_reps: int = 5

    @property
    def incremental_size(self) -> int:
        """10,000 when measured, else the largest size below it (or the smallest)."""
        below = [n for n in self.sizes if n <= INCREMENTAL_SIZE]
        return max(below) if below else min(self.sizes)

    @property
    def datapath_sizes(self) -> tuple[int, ...]:
        return tuple(n for n in self.sizes if n <= DATAPATH_MAX)


@dataclass
class Run:
    """State of one run: the cloud, the budget and what was measured so far."""

    options: Options
    cloud: BenchCloud
    store_url: str
    budget: Budget
    control: list[Row] = field(default_factory=list)
    restart: list[Row] = field(default_factory=list)
    membership: list[Row] = field(default_factory=list)
    incremental: Row = field(default_factory=dict)
    rulesets: dict[int, HostRuleset] = field(default_factory=dict)
    datapath: Row = field(default_factory=dict)


def run(options: Options) -> Row:
    """Run everything, write the reports to ``options.out``; return the results."""
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="secfw-bench-"))
    try:
        results = _run_in(work, options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["loadavg_before"] = [round(x, 2) for x in load_before]
    results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    report.write(results, options.out)
    return results


def _run_in(work: Path, options: Options) -> Row:
    store_url = f"sqlite:///{work / 'bench.db'}"
    api = Api(open_store(store_url))
    cloud = BenchCloud(api, f"bench-{uuid.uuid4().hex[:6]}", seed=options.seed)
    state = Run(options, cloud, store_url, Budget(options.budget_s))
    try:
        _, base_s = timed(cloud.build_base)
        for n in sorted(options.sizes):
            if n > DATAPATH_MAX and not state.datapath:
                _datapath(state)
            measure_size(state, n)
        if not state.datapath:
            _datapath(state)
    finally:
        api.store.close()
    return _results(state, base_s)


def _results(state: Run, base_s: float) -> Row:
    options = state.options
    return {
        "schema": 1,
        "machine": machine_info(),
        "options": {
            "sizes": list(options.sizes), "quick": options.quick,
            "datapath": options.datapath, "budget_s": options.budget_s,
            "seed": options.seed, "incremental_size": options.incremental_size,
        },
        "workload": describe() | {"host": state.cloud.host, "base_build_s": rounded(base_s)},
        "control_plane": state.control,
        "incremental": state.incremental,
        "membership": state.membership,
        "datapath": state.datapath,
        "restart": state.restart,
        "elapsed_s": round(state.budget.elapsed(), 1),
    }


# ---------------------------------------------------------------------- one size


def measure_size(state: Run, n: int) -> None:
    """Every control-plane, restart and incremental figure at ``n`` ports."""
    budget, cloud = state.budget, state.cloud
    row: Row = {"ports": n}
    state.control.append(row)
    row["store"] = budget.run("grow", n, lambda: _grow(cloud, n))
    if not ok(row["store"]):
        _skip_rest(state, n, f"the store could not be grown to {n:,} ports")
        return
    compiled = _compile(state, n, row)
    row["full_apply"] = (
        budget.run("apply", n, lambda: control.measure_full_apply(compiled.text))
        if compiled else skipped("no ruleset"))
    if not _is_root():
        _skip_rest(state, n, "needs root (network namespaces)")
        return
    outcome = guarded(lambda: _in_agent_namespace(state, n, row))
    if not ok(outcome):
        row.setdefault("agent", outcome)


def _grow(cloud: BenchCloud, n: int) -> Row:
    _, seconds = timed(lambda: cloud.grow_to(n))
    return {"grow_s": rounded(seconds), "host_ports": n + 2}


def _compile(state: Run, n: int, row: Row) -> control.Compiled | None:
    """Compile figures and ruleset size into ``row``; the ruleset, or None."""
    holder: list[control.Compiled] = []
    repeat = state.options.compile_repeat if n <= INCREMENTAL_SIZE else 1

    def measure() -> Row:
        holder.append(control.measure_compile(state.cloud.api.store, state.cloud.host, repeat))
        return holder[0].row

    row["compile"] = state.budget.run("compile", n, measure)
    if not holder:
        row["ruleset"] = skipped("not compiled")
        return None
    compiled = holder[0]
    row["ruleset"] = control.ruleset_size(compiled.ruleset, compiled.text)
    if n in state.options.datapath_sizes and state.options.datapath:
        state.rulesets[n] = HostRuleset(compiled.host_filter, compiled.text)
    return compiled


def _in_agent_namespace(state: Run, n: int, row: Row) -> Row:
    """Agent process (full sync, restart), then the in-process agent, in one namespace."""
    budget = state.budget
    with scratch_netns() as ns:
        timeout = max(budget.remaining(), 1.0)
        row["agent"] = budget.run(
            "agent", n, lambda: control.run_agent_once(ns, state.store_url, state.cloud.host,
                                                      timeout))
        restart = (
            budget.run("restart", n, lambda: control.run_agent_once(
                ns, state.store_url, state.cloud.host, max(budget.remaining(), 1.0)))
            if ok(row["agent"]) else skipped("the agent's full sync did not complete"))
        state.restart.append({"ports": n} | restart)
        # --quick: exposure and lint on a sample, no verify (minutes over the 5,000
        # member ports); the smoke run only checks that the audits run.
        verify_ns = ns if ok(row["agent"]) and not state.options.quick else None
        row["audit"] = budget.run("audit", n, lambda: audit.measure(
            state.cloud.api.store, state.cloud.host, verify_ns,
            whole_cloud=not state.options.quick))
        _incremental(state, n, ns, ready=ok(row["agent"]))
    return row


def _incremental(state: Run, n: int, ns: str, ready: bool) -> None:
    """Membership change at ``n``; at the incremental size, every change too."""
    if not ready:
        state.membership.append({"ports": n, **skipped("the table could not be loaded")})
        return
    session = incremental.AgentSession(state.store_url, state.cloud.host, ns)
    try:
        first = state.budget.run("agent in-process", n, lambda: session.sync(full=True))
        if not ok(first):
            state.membership.append({"ports": n, **skipped("the in-process agent failed")})
            return
        reps = state.options.membership_reps if n <= INCREMENTAL_SIZE else 3
        member = state.budget.run("membership", n, lambda: incremental.membership_runs(
            session, state.cloud, reps, state.options.seed + n))
        state.membership.append({"ports": n, "first_sync": first} | member)
        if n == state.options.incremental_size:
            state.incremental = state.budget.run("incremental", n,
                                                 lambda: _all_changes(state, session, n))
    finally:
        session.close()


def _all_changes(state: Run, session: incremental.AgentSession, n: int) -> Row:
    changes = incremental.all_changes(session, state.cloud, state.options.seed)
    resync = session.sync(full=True)
    return {"ports": n, "changes": changes, "full_resync_after": resync}


def _skip_rest(state: Run, n: int, reason: str) -> None:
    for row in (state.restart, state.membership):
        row.append({"ports": n, **skipped(reason)})


def _is_root() -> bool:
    return os.geteuid() == 0


# ---------------------------------------------------------------------- data path


def _datapath(state: Run) -> None:
    """The data-path measurements over every ruleset kept (sizes ≤ 10,000), with
    both backends; the rulesets are dropped afterwards (they are big)."""
    options = state.options
    if not options.datapath:
        state.datapath = skipped("--skip-datapath")
    elif not _is_root():
        state.datapath = skipped("needs root (network namespaces)")
    else:
        settings = Settings(options.iperf_seconds, options.reps)
        cloud = state.cloud
        state.datapath = state.budget.run("datapath", 0, lambda: run_datapath(
            cloud.data_path_ports(cloud.api.snapshot()), cloud.host, state.rulesets, settings))
    state.rulesets.clear()
    if not state.datapath:
        state.datapath = skipped("nothing to measure")
