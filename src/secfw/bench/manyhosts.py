"""Bench section: a simulated 1,000-host cloud on one etcd (``python -m
secfw.bench.manyhosts``; ``make bench`` runs it).

The cloud (:mod:`secfw.bench.simcloud`): ``--hosts`` hosts × ``--ports`` ports
(one instance each, 3 of 500 groups, 5 rules per group, a third of them
source-group rules), plus host ``simbig`` with ``--big`` ports, on one etcd
member (127.0.0.1, free ports). ``--agents`` real agent loops
(:mod:`secfw.bench.simagent`: watch, incremental compile, render, plan; no
kernel) run as separate processes for hosts ``sim0001``…, ``simbig`` and
``simempty`` (no port): the host-size axis. What is measured:

* **cloud size**: an agent's RSS once it has loaded clouds of ``--sizes`` hosts
  and of the whole cloud (each a prefix of its own in the same etcd);
* **start**: each agent's first (full) pass, its RSS and peak;
* **idle**: agents' and etcd's CPU per second with nothing changing (the 0.1 s
  revision poll);
* **one whole load** by a client: time, bytes and etcd's CPU — what every agent's
  start reads, and a host whose view a change widened;
* **changes** (``--changes``, in turn a rule added to a group, an instance
  booted on a host without an agent, a source-group rule, through
  :class:`~secfw.api.Api`): per change and per agent, the writes and documents
  the watch delivered, the store reads and whole reloads, the passes and their
  CPU (the loop thread's), whether the host's filter changed, the view's size.

The agents' full resync reads only the changes since the view's revision (one
revision read when nothing was missed); it is set to ``--resync`` (an hour)
during the run so that passes are the changes' own.

The 1,000-host figures of what was not run (agents beyond ``--agents``) are
extrapolated from these (:func:`extrapolate`), each formula in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from secfw.api import Api
from secfw.bench import simcloud
from secfw.bench.machine import REPO
from secfw.lab import etcdlocal
from secfw.store import open_store

DEFAULT_OUT = REPO / "bench" / "results"
APPLY_LIMIT_S = 900.0  # an agent that has not applied a revision by then fails the run
IDLE_S = 10.0
RESYNC_S = 60.0  # LoopSettings.resync_interval: a full pass per agent
POLL_S = 5.0  # LoopSettings.watched_poll_interval: one revision read per agent


def _cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (/proc/PID/stat, fields 14-15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Agents:
    """The simulated agents' processes and their stats files."""

    def __init__(self, url: str, hosts: list[str], work: Path, resync: float) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.stats = {h: work / f"{h}.json" for h in hosts}
        self.procs = {h: subprocess.Popen(
            [sys.executable, "-m", "secfw.bench.simagent", "--store", url, "--host", h,
             "--stats", str(self.stats[h]), "--resync-interval", str(resync)],
            stdout=subprocess.DEVNULL, stderr=(work / f"{h}.log").open("w"))
            for h in hosts}

    def read(self) -> dict[str, dict[str, Any]]:
        found = {}
        for host, path in self.stats.items():
            try:
                found[host] = json.loads(path.read_text())
            except (OSError, ValueError):
                found[host] = {}
        return found

    def wait_applied(self, revision: int) -> float:
        """Seconds until every agent reports ``revision`` applied (RuntimeError past
        :data:`APPLY_LIMIT_S` or when one died)."""
        started = time.monotonic()
        while True:
            if all((s.get("applied") or -1) >= revision for s in self.read().values()):
                return time.monotonic() - started
            dead = [h for h, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() - started > APPLY_LIMIT_S:
                raise RuntimeError(f"agents {dead or 'all'} did not apply revision {revision}")
            time.sleep(0.02)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The whole section (module docstring); etcd and the agents stopped after."""
    member = etcdlocal.start(work / "etcd")
    try:
        return _measure(args, member, work)
    finally:
        member.stop()


def _measure(args: argparse.Namespace, member: etcdlocal.LocalEtcd,
             work: Path) -> dict[str, Any]:
    host_ports = {simcloud.host_name(i): args.ports for i in range(args.hosts)}
    host_ports["simbig"] = args.big
    started = time.perf_counter()
    cloud = simcloud.build(host_ports)
    report: dict[str, Any] = {
        "cloud": {"hosts": args.hosts, "ports_per_host": args.ports, "big_host_ports": args.big,
                  "documents": cloud.count, "groups": simcloud.GROUPS,
                  "rules_per_group": simcloud.RULES_PER_GROUP,
                  "groups_per_port": simcloud.GROUPS_PER_PORT,
                  "build_s": round(time.perf_counter() - started, 1)}}
    report["cloud_size"] = [_rss_at(member, host_ports, n, work) for n in args.sizes]
    url = member.url("sim")
    started = time.perf_counter()
    revision = simcloud.write(url, cloud.docs)
    report["cloud"]["etcd_write_s"] = round(time.perf_counter() - started, 1)
    report["whole_load"] = _whole_load(url, member)
    hosts = [simcloud.host_name(i) for i in range(args.agents)] + ["simbig", "simempty"]
    agents = Agents(url, hosts, work / "agents", args.resync)
    try:
        report["start"] = _start(agents, revision, host_ports)
        report["idle"] = _idle(agents, member)
        report["changes"] = _changes(agents, member, url, cloud, args)
    finally:
        agents.stop()
    report["extrapolated"] = extrapolate(report, args.hosts)
    return report


def _rss_at(member: etcdlocal.LocalEtcd, host_ports: dict[str, int], hosts: int,
            work: Path) -> dict[str, Any]:
    """One agent's RSS after its first pass over a cloud of the first ``hosts`` hosts."""
    subset = {simcloud.host_name(i): host_ports[simcloud.host_name(i)] for i in range(hosts)}
    url = member.url(f"size{hosts}")
    revision = simcloud.write(url, simcloud.build(subset).docs)
    agents = Agents(url, [simcloud.host_name(0)], work / f"size{hosts}", RESYNC_S)
    try:
        agents.wait_applied(revision)
        stats = agents.read()[simcloud.host_name(0)]
    finally:
        agents.stop()
    return {"hosts": hosts, "ports": sum(subset.values()), "rss_mb": stats["rss_kb"] // 1024,
            "peak_mb": stats["peak_kb"] // 1024, "view": stats.get("view"),
            "first_pass_s": round(stats["passes"][0][3], 2)}


def _whole_load(url: str, member: etcdlocal.LocalEtcd) -> dict[str, Any]:
    """One client's whole load of the store: time, JSON bytes, etcd's CPU."""
    store = open_store(url)
    try:
        cpu = _cpu(member.process.pid)
        started = time.perf_counter()
        snapshot = store.load()
        seconds = time.perf_counter() - started
        etcd_cpu = _cpu(member.process.pid) - cpu
    finally:
        store.close()
    size = sum(len(json.dumps(d)) for by_id in snapshot.docs.values() for d in by_id.values())
    return {"seconds": round(seconds, 2), "documents": sum(map(len, snapshot.docs.values())),
            "json_mb": round(size / 1e6, 1), "etcd_cpu_s": round(etcd_cpu, 2)}


def _start(agents: Agents, revision: int, host_ports: dict[str, int]) -> dict[str, Any]:
    """Every agent's first pass over the whole cloud, and its memory then."""
    seconds = agents.wait_applied(revision)
    rows = {}
    for host, stats in agents.read().items():
        first = stats["passes"][0]
        rows[host] = {"ports": host_ports.get(host, 0), "first_pass_s": round(first[3], 2),
                      "first_pass_cpu_s": round(first[2], 2),
                      "rss_mb": stats["rss_kb"] // 1024, "peak_mb": stats["peak_kb"] // 1024,
                      "view": stats.get("view")}
    return {"all_applied_s": round(seconds, 1), "agents": rows}


def _idle(agents: Agents, member: etcdlocal.LocalEtcd) -> dict[str, Any]:
    """CPU per second of the agents and etcd while nothing changes."""
    pids = [p.pid for p in agents.procs.values()]
    before = [_cpu(pid) for pid in pids], _cpu(member.process.pid)
    time.sleep(IDLE_S)
    after = [_cpu(pid) for pid in pids], _cpu(member.process.pid)
    per_agent = [(a - b) / IDLE_S for a, b in zip(after[0], before[0], strict=True)]
    return {"agent_cpu_per_s": round(statistics.median(per_agent), 4),
            "etcd_cpu_per_s": round((after[1] - before[1]) / IDLE_S, 4),
            "agents": len(pids)}


def _changes(agents: Agents, member: etcdlocal.LocalEtcd, url: str, cloud: simcloud.SimCloud,
             args: argparse.Namespace) -> dict[str, Any]:
    """``args.changes`` API writes; per change, what each agent received and spent."""
    api = Api(open_store(url))
    rng = random.Random(7)
    rows = []
    try:
        for i in range(args.changes):
            before = agents.read()
            cpu = _cpu(member.process.pid)
            started = time.perf_counter()
            kind = _one_change(api, rng, i, args, cloud.network_of)
            write_s = time.perf_counter() - started
            revision = api.store.revision()
            agents.wait_applied(revision)
            rows.append(_change_row(kind, write_s, _cpu(member.process.pid) - cpu,
                                    before, agents.read()))
    finally:
        api.store.close()
    return {"rows": rows, "summary": _summary(rows)}


def _one_change(api: Api, rng: random.Random, i: int, args: argparse.Namespace,
                network_of: dict[str, str]) -> str:
    """In turn: a rule added to a random group, an instance booted on a host
    that runs no agent in 3 random groups, a source-group rule between two
    random groups (which widens the view of a host using the first group
    when the second is new to it: that host reloads)."""
    port = str(40000 + i)
    if i % 3 == 0:
        api.secgroup_add_rule(simcloud.PROJECT, simcloud.group_name(rng.randrange(
            simcloud.GROUPS)), "tcp", port, port, "10.0.0.0/8")
        return "rule added"
    if i % 3 == 2:
        group, source = rng.sample(range(simcloud.GROUPS), 2)
        api.secgroup_add_group_rule(simcloud.PROJECT, simcloud.group_name(group),
                                    simcloud.group_name(source), "tcp", port, port)
        return "group rule added"
    host = simcloud.host_name(rng.randrange(args.agents, args.hosts))
    groups = [simcloud.group_name(g) for g in rng.sample(range(simcloud.GROUPS), 3)]
    api.boot(simcloud.PROJECT, f"new-{i}", "m1.tiny", "cirros", host, groups,
             [network_of[host]])
    return "instance booted"


def _change_row(kind: str, write_s: float, etcd_cpu: float, before: dict[str, Any],
                after: dict[str, Any]) -> dict[str, Any]:
    per_host = {}
    for host, now in after.items():
        old = before[host]
        new = now["passes"][len(old["passes"]):]
        passes = [p for p in new if not p[1]]  # a full pass is the 60 s resync's, not the change's
        per_host[host] = {
            "feed_docs": now["feed_docs"] - old["feed_docs"] + now["watch_docs"]
            - old["watch_docs"],
            "feed_bytes": now["feed_bytes"] - old["feed_bytes"] + now["watch_bytes"]
            - old["watch_bytes"],
            "watch_writes": now["watch_writes"] - old["watch_writes"],
            "store_reads": now["feeds"] - old["feeds"] + now["loads"] - old["loads"],
            "reloads": now["loads"] - old["loads"],
            "view_ports": now["view"]["ports"],
            "passes": len(passes), "full_passes": len(new) - len(passes),
            "pass_cpu_ms": round(sum(p[2] for p in passes) * 1000, 2),
            "changed_filter": now["transactions"] > old["transactions"],
        }
    return {"kind": kind, "write_s": round(write_s, 2), "etcd_cpu_s": round(etcd_cpu, 3),
            "hosts": per_host}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over changes and agents."""
    cells = [h for r in rows for h in r["hosts"].values()]
    return {
        "changes": len(rows),
        "feed_docs_per_host_per_change": statistics.median(c["feed_docs"] for c in cells),
        "feed_bytes_per_host_per_change": statistics.median(c["feed_bytes"] for c in cells),
        "passes_per_host_per_change": statistics.median(c["passes"] for c in cells),
        "watch_writes_per_host_per_change": statistics.median(c["watch_writes"] for c in cells),
        "store_reads_per_host_per_change": statistics.mean(c["store_reads"] for c in cells),
        "reloads_per_host_per_change": statistics.mean(c["reloads"] for c in cells),
        "pass_cpu_ms_per_host_per_change": round(statistics.median(
            c["pass_cpu_ms"] for c in cells), 2),
        "pass_cpu_ms_max": max(c["pass_cpu_ms"] for c in cells),
        "hosts_whose_filter_changed": round(statistics.mean(
            c["changed_filter"] for c in cells), 3),
        "write_s_median": statistics.median(r["write_s"] for r in rows),
        "etcd_cpu_s_per_change_median": statistics.median(r["etcd_cpu_s"] for r in rows),
    }


def extrapolate(report: dict[str, Any], hosts: int) -> dict[str, Any]:
    """The figures at ``hosts`` agents, from the measured ones (formulas included)."""
    idle, load = report["idle"], report["whole_load"]
    summary = report["changes"]["summary"]
    etcd_idle_per_agent = idle["etcd_cpu_per_s"] / max(1, idle["agents"])
    return {
        "hosts": hosts,
        "watch_events_per_change": hosts,  # one write's documents per agent's watch
        "feed_mb_per_change": round(hosts * summary["feed_bytes_per_host_per_change"] / 1e6, 2),
        "agent_requests_per_s_idle": round(hosts / POLL_S),
        "etcd_cores_idle": round(etcd_idle_per_agent * hosts, 2),
        # a resync reads the changes since the view's revision: one revision read
        # when nothing was missed; a whole load only after a gap or a widening
        "etcd_resync_requests_per_s": round(hosts / RESYNC_S, 1),
        "whole_loads_per_change_all_hosts": round(
            hosts * summary["reloads_per_host_per_change"], 1),
        "etcd_widening_mb_per_change": round(
            hosts * summary["reloads_per_host_per_change"] * load["json_mb"], 1),
        "agent_cpu_s_per_change_all_hosts": round(
            hosts * summary["pass_cpu_ms_per_host_per_change"] / 1000, 2),
        "formulas": {
            "feed_mb_per_change": "hosts x feed bytes per host per change",
            "agent_requests_per_s_idle": "hosts / 5 s revision poll (a watch is in place)",
            "etcd_cores_idle": "measured idle etcd CPU/s / agents run x hosts",
            "etcd_resync_requests_per_s": "hosts x one revision read / 60 s resync",
            "whole_loads_per_change_all_hosts": "hosts x mean reloads per host per change",
            "etcd_widening_mb_per_change": "that x whole-load JSON MB",
            "agent_cpu_s_per_change_all_hosts": "hosts x median pass CPU per host per change",
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secfw.bench.manyhosts",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--ports", type=int, default=50, help="ports per host")
    parser.add_argument("--big", type=int, default=500, help="ports of host simbig")
    parser.add_argument("--agents", type=int, default=6,
                        help="agent loops on hosts sim0001…, besides simbig and simempty")
    parser.add_argument("--changes", type=int, default=12)
    parser.add_argument("--resync", type=float, default=3600.0,
                        help="the agents' full-resync interval during the run (see above)")
    parser.add_argument("--sizes", type=lambda text: [int(x) for x in text.split(",") if x],
                        default=[125, 250, 500], help="cloud sizes (hosts) for the RSS axis")
    parser.add_argument("--quick", action="store_true", help="100 hosts, 2 agents, 4 changes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.hosts, args.agents, args.changes, args.sizes, args.big = 100, 2, 4, [25], 100
    args.agents = min(args.agents, args.hosts)
    with tempfile.TemporaryDirectory(prefix="secfw-bench-many-") as work:
        figures = run(args, Path(work))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "manyhosts.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "changes"}, indent=1))
    print(json.dumps(figures["changes"]["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
