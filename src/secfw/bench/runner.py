"""One benchmark run: the sizes in order, the data path, then the report.

The store grows size by size (:meth:`BenchCloud.grow_to`), so every size is the
same cloud with more ports on the host. At each size (:func:`measure_size`):
compile, ruleset size, full apply into a fresh namespace, the agent as a process
(full sync, then the restart over the loaded table), then an in-process agent for
the membership change — and, at the incremental size (10,000), every change of
the issue. The routed data path runs once every size up to 10,000 has its
ruleset (its IR and nftables text are kept for it: both backends load the same
IR), before larger sizes, which are the first to be cut when the budget runs
short. After the last size: the bridged data path (same rulesets, fewer
repetitions), then new connections at the largest size (above 10,000: nftables
only, beside the smallest size, both topologies), then the flowtable probe.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from secfw.api import Api
from secfw.bench import audit, control, flowtable, incremental, profiles, report, resync, targets
from secfw.bench.budget import Budget
from secfw.bench.common import Row, ensure_bytecode, guarded, ok, rounded, skipped, timed
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
    budget_s: float = 1800.0
    seed: int = 1
    reps: int = 5
    iperf_seconds: float = 3.0
    compile_repeat: int = 3
    membership_reps: int = 5
    bridged_reps: int = 3
    conn_reps: int = 3
    datapath_max: int = DATAPATH_MAX
    #: which targets get a profile: "missed" (those the run misses), "all" (every
    #: one profiled, met or not measured: the smoke test), "none"
    profile: str = "missed"

    @property
    def incremental_size(self) -> int:
        """10,000 when measured, else the largest size below it (or the smallest)."""
        below = [n for n in self.sizes if n <= INCREMENTAL_SIZE]
        return max(below) if below else min(self.sizes)

    @property
    def datapath_sizes(self) -> tuple[int, ...]:
        return tuple(n for n in self.sizes if n <= self.datapath_max)

    @property
    def connections_size(self) -> int | None:
        """The largest size, when it is above the data path's (new connections
        only are measured there), else None."""
        largest = max(self.sizes)
        return largest if largest > self.datapath_max else None


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
    during_resync: Row = field(default_factory=dict)
    rulesets: dict[int, HostRuleset] = field(default_factory=dict)
    large_ruleset: HostRuleset | None = None
    datapath: Row = field(default_factory=dict)
    datapath_bridged: Row = field(default_factory=dict)
    connections: Row = field(default_factory=dict)
    flowtable: Row = field(default_factory=dict)
    #: target text (its start) → the profile's row (:func:`profiles.record`)
    profiles: dict[str, Row] = field(default_factory=dict)


def run(options: Options) -> Row:
    """Run everything, write the reports to ``options.out``; return the results."""
    ensure_bytecode()  # the agent's whole-process figures: see its docstring
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
            if n > options.datapath_max and not state.datapath:
                _datapath(state)
            measure_size(state, n)
        if not state.datapath:
            _datapath(state)
        _datapath_bridged(state)
        _connections_large(state)
        state.large_ruleset = None
        _flowtable(state)
        state.rulesets.clear()
        _late_profiles(state)
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
        "datapath_bridged": state.datapath_bridged,
        "connections": state.connections,
        "flowtable": state.flowtable,
        "restart": state.restart,
        "during_resync": state.during_resync,
        "profiles": state.profiles,
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
    if compiled and ok(row["full_apply"]) and _is_root():
        figure = row["compile"]["total_s"] + row["full_apply"]["full_apply_s"]
        maybe_profile(state, n, COMPILE_APPLY, figure, lambda: control.profile_compile_apply(
            cloud.api.store, cloud.host))
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
    if state.options.datapath and n in state.options.datapath_sizes:
        state.rulesets[n] = HostRuleset(compiled.host_filter, compiled.text)
    elif state.options.datapath and n == state.options.connections_size:
        state.large_ruleset = HostRuleset(compiled.host_filter, compiled.text)
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
        if ok(row["agent"]):  # after the restart: the RSS target's figure quotes it
            _agent_profiles(state, n, row["agent"])
        # --quick: exposure and lint on a sample, no verify (minutes over the 5,000
        # member ports); the smoke run only checks that the audits run.
        verify_ns = ns if ok(row["agent"]) and not state.options.quick else None
        row["audit"] = budget.run("audit", n, lambda: audit.measure(
            state.cloud.api.store, state.cloud.host, verify_ns,
            whole_cloud=not state.options.quick))
        if ok(row["audit"]):
            _audit_profiles(state, n, row["audit"], verify_ns)
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
            state.during_resync = state.budget.run(
                "changes during a resync", n, lambda: resync.changes_during_resync(
                    session, state.cloud, n, state.options.seed))
            if ok(state.incremental):
                passes = [c["store_to_kernel_ms"] / 1000 for c in state.incremental["changes"]
                          if c["change"] in targets.PORT_CHANGES]
                maybe_profile(state, n, PORT_CHANGES, sum(passes), lambda: (
                    incremental.profile_port_changes(session, state.cloud)))
    finally:
        session.close()


def _all_changes(state: Run, session: incremental.AgentSession, n: int) -> Row:
    changes = incremental.all_changes(session, state.cloud, state.options.seed)
    resync = session.sync(full=True)
    return {"ports": n, "changes": changes, "full_resync_after": resync}


# ---------------------------------------------------------------------- profiles

#: The profiled targets, by the start of their text (targets.TARGETS).
COMPILE_APPLY = "10k ports: compile + full apply"
AGENT_1K = "agent full sync of 1,000 ports"
RSS_10K = "agent peak RSS < 300 MB"
RSS_50K = "agent peak RSS < 1 GB"
PORT_CHANGES = "port added / port removed"
RSS_50K_SIZE = 50_000


def profile_size(options: Options, target: str) -> int | None:
    """The size at which ``target`` is profiled: the size its figure is taken at
    (with ``--profile all``, a run without it profiles at a size it has)."""
    every = options.profile == "all"
    if target == AGENT_1K:
        return 1_000 if 1_000 in options.sizes else (min(options.sizes) if every else None)
    if target == RSS_50K:
        return RSS_50K_SIZE if RSS_50K_SIZE in options.sizes else None
    return options.incremental_size


def wants_profile(state: Run, n: int, target: str) -> bool:
    """True when ``target`` is profiled at ``n``: its profile size, and missed on
    what the run measured so far (any outcome with ``--profile all``)."""
    options = state.options
    if options.profile == "none" or profile_size(options, target) != n:
        return False
    return options.profile == "all" or targets.is_met(target, _partial(state)) is False


def _partial(state: Run) -> Row:
    """The results measured so far, as :func:`targets.evaluate` reads them."""
    return {"control_plane": state.control, "restart": state.restart,
            "membership": state.membership, "incremental": state.incremental,
            "during_resync": state.during_resync}


#: a profiled repetition's time, guessed for the budget: this many times the
#: measured one (cProfile's overhead on the Python side; namespace set-up)
PROFILE_COST = 2.5


def maybe_profile(state: Run, n: int, target: str, figure_s: float,
                  take: Callable[[], profiles.Taken]) -> None:
    """Profile ``target`` with ``take()`` when :func:`wants_profile`, within the
    budget (``figure_s``: the measured repetition's seconds)."""
    if wants_profile(state, n, target):
        record_profile(state, n, [target], figure_s, take)


def record_profile(state: Run, n: int, names: list[str], figure_s: float,
                   take: Callable[[], profiles.Taken]) -> None:
    """``take()`` once (budget permitting: guessed at :data:`PROFILE_COST` ×
    ``figure_s``, the measured repetition's seconds) and its profile recorded
    for each of ``names`` as shares of ``figure_s``, with the step's wall time
    (``profile_s``: the run's cost of it)."""
    step = f"profile: {names[0]}"
    state.budget.history[step] = (n, PROFILE_COST * figure_s)

    def one() -> Row:
        taken, seconds = timed(take)
        rows = {name: profiles.record(taken, name, n, state.options.out, figure_s)
                for name in names}
        return {name: row | {"profile_s": rounded(seconds / len(names))}
                for name, row in rows.items()}

    outcome = state.budget.run(step, n, one)
    for name in names:
        state.profiles[name] = outcome.get(name, outcome) if ok(outcome) else (
            outcome | {"target": name, "ports": n})


def _agent_profiles(state: Run, n: int, agent: Row) -> None:
    """The agent process again, profiled, for its missed time and RSS targets
    (one process for both when they are profiled at the same size)."""
    names = [t for t in (AGENT_1K, RSS_10K) if wants_profile(state, n, t)]
    if names:
        record_profile(state, n, names, agent["wall_s"], lambda: _profiled_agent(state, n))


def _profiled_agent(state: Run, n: int, timings: bool = True) -> profiles.Taken:
    """A profiled full sync by a fresh agent process into a fresh namespace
    (without ``timings``: its RSS samples only)."""
    stem = state.options.out / "profiles" / f"agent-{n}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    with scratch_netns() as ns:
        try:
            return control.profile_agent_once(ns, state.store_url, state.cloud.host,
                                              max(state.budget.remaining(), 1.0), stem,
                                              timings)
        finally:
            for suffix in (".json", ".pstats"):
                stem.with_suffix(suffix).unlink(missing_ok=True)


def _audit_profiles(state: Run, n: int, row: Row, verify_ns: str | None) -> None:
    """Each missed audit, run again under the profiler."""
    keys = {"audit exposure": "exposure_s", "audit lint": "lint_s", "audit verify": "verify_s"}
    for name in audit.PROFILED:
        if name == "audit verify" and verify_ns is None:
            continue
        figure = float(row.get(keys[name]) or 1.0)
        maybe_profile(state, n, name, figure, lambda name=name: audit.profile(  # type: ignore[misc]
            state.cloud.api.store, state.cloud.host, verify_ns, name,
            whole_cloud=not state.options.quick))


def _late_profiles(state: Run) -> None:
    """Profiles left for the end of the run (they would take the budget of the
    data path's steps): the agent's full sync at 50,000 ports, its RSS sampled
    without cProfile (a minute and a half more at 50k) — the store has grown
    past it only by the few ports of section 2."""
    agent: Row = (find_row(state.control, RSS_50K_SIZE) or {}).get("agent") or {}
    if ok(agent) and agent and _is_root() and wants_profile(state, RSS_50K_SIZE, RSS_50K):
        record_profile(state, RSS_50K_SIZE, [RSS_50K], agent["wall_s"],
                       lambda: _profiled_agent(state, RSS_50K_SIZE, timings=False))


def _skip_rest(state: Run, n: int, reason: str) -> None:
    for row in (state.restart, state.membership):
        row.append({"ports": n, **skipped(reason)})


def _is_root() -> bool:
    return os.geteuid() == 0


# ---------------------------------------------------------------------- data path


def _why_no_datapath(options: Options) -> str | None:
    if not options.datapath:
        return "--skip-datapath"
    if not _is_root():
        return "needs root (network namespaces)"
    return None


def _datapath(state: Run) -> None:
    """The routed data-path measurements over every ruleset kept (sizes ≤ 10,000),
    with both backends (the rulesets stay for the bridged run)."""
    reason = _why_no_datapath(state.options)
    if reason is not None:
        state.datapath = skipped(reason)
        return
    options, cloud = state.options, state.cloud
    settings = Settings(options.iperf_seconds, options.reps, perf=options.profile != "none")
    state.datapath = state.budget.run("datapath", 0, lambda: run_datapath(
        cloud.data_path_ports(cloud.api.snapshot()), cloud.host, state.rulesets, settings))
    if not state.datapath:
        state.datapath = skipped("nothing to measure")


def _datapath_bridged(state: Run) -> None:
    """The same configurations on a bridged lab, ``bridged_reps`` repetitions.

    Its time is guessed from the routed run's, scaled by the repetitions, so
    the budget skips it (with that reason) rather than overrun."""
    reason = _why_no_datapath(state.options)
    if reason is None and not ok(state.datapath):
        reason = "the routed data path did not run"
    if reason is not None:
        state.datapath_bridged = skipped(reason)
        return
    options, cloud, budget = state.options, state.cloud, state.budget
    routed_s = budget.history.get("datapath", (0, 0.0))[1]
    budget.history["datapath-bridged"] = (0, routed_s * options.bridged_reps / options.reps)
    settings = Settings(options.iperf_seconds, options.bridged_reps,
                        perf=options.profile != "none")
    state.datapath_bridged = budget.run("datapath-bridged", 0, lambda: run_datapath(
        cloud.data_path_ports(cloud.api.snapshot()), cloud.host, state.rulesets, settings,
        topology="bridged"))


def _connections_large(state: Run) -> None:
    """New connections at the largest size (above the data path's), beside the
    smallest size, routed and bridged, nftables only: see :func:`connections_large`."""
    size = state.options.connections_size
    reason = _why_no_datapath(state.options)
    if reason is None and size is None:
        reason = "no size above the data path's was run"
    if reason is None and (state.large_ruleset is None or not state.rulesets):
        reason = f"the ruleset at {size:,} ports was not compiled"
    if reason is not None:
        state.connections = skipped(reason)
        return
    assert size is not None and state.large_ruleset is not None
    row = find_row(state.control, size)
    apply_s = (row or {}).get("full_apply", {}).get("full_apply_s") or 60.0
    reps = state.options.conn_reps
    # per topology: render the bridged text once, then per repetition 4 configurations
    # of `seconds` each and one load of the large ruleset
    guess = 2 * reps * (4 * (state.options.iperf_seconds + 1.0) + apply_s) + apply_s
    state.budget.history["connections"] = (size, guess)
    smallest = min(state.rulesets)
    rulesets = {smallest: state.rulesets[smallest], size: state.large_ruleset}
    state.connections = state.budget.run("connections", size, lambda: connections_large(
        state, rulesets))


def connections_large(state: Run, rulesets: dict[int, HostRuleset]) -> Row:
    """New connections/s and connect() p50/p99 with nftables at the sizes of
    ``rulesets``, paired with no filter and conntrack only, routed and bridged.
    The iptables backend is not loaded at this size: its load alone took
    ~10 s at 10,000 ports and grows with them (see the data path's load times)."""
    options, cloud = state.options, state.cloud
    settings = Settings(options.iperf_seconds, options.conn_reps, kinds=("conn",),
                        iptables=False)
    pair = cloud.data_path_ports(cloud.api.snapshot())

    def one(topology: str) -> Row:
        return guarded(lambda: run_datapath(pair, cloud.host, rulesets, settings, topology))

    return {"sizes": sorted(rulesets),
            "iptables": "not measured above the data path's sizes (its load time)",
            "topologies": {topology: one(topology) for topology in ("routed", "bridged")}}


def _flowtable(state: Run) -> None:
    """The flowtable probe (always: it is one nft command); where the kernel has
    one and the data path ran, the routed data path with and without it
    (:mod:`.flowtable`) — if its guessed time (half the routed run's
    configurations, ``bridged_reps`` repetitions) fits the budget left."""
    options, cloud, budget = state.options, state.cloud, state.budget
    routed_s = budget.history.get("datapath", (0, 0.0))[1]
    budget.history["flowtable"] = (0, routed_s * options.bridged_reps / options.reps / 2)
    runs = ok(state.datapath) and budget.why_not("flowtable", 0) is None
    pair = cloud.data_path_ports(cloud.api.snapshot()) if runs else None
    settings = Settings(options.iperf_seconds, options.bridged_reps, iptables=False)
    state.flowtable = guarded(lambda: flowtable.measure(pair, cloud.host, state.rulesets,
                                                         settings))


def find_row(rows: list[Row], ports: int) -> Row | None:
    """The row of ``rows`` for ``ports``."""
    return next((row for row in rows if row.get("ports") == ports), None)
