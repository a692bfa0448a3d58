"""Neutron's firewall drivers through the L2 agent's calls: full sync, port added,
member joined — secfw's and Neutron's own IptablesFirewallDriver, side by side.

``python -m secfw.bench.neutron [--sizes 100,1000] [--repeat 3] [--timeout S]
[--budget S] [--out DIR]`` builds issue 18's workload in memory — 500 security
groups of 10 rules each, a third of the rules with a remote group, every port
in 20 groups, ~50 member addresses per remote group — and drives each driver
exactly as neutron/agent/securitygroups_rpc.py does:

* **full sync**: one ``defer_apply()`` (``filter_defer_apply_on``/``_off``)
  with the ports' groups' rules, their remote groups' members and
  ``prepare_port_filter`` for every port;
* **port added**: one ``defer_apply()`` with the new port's groups' rules and
  remote groups' members, then ``prepare_port_filter``;
* **member joined** (a port elsewhere joins a remote group): the agent refreshes
  every local port whose groups use that remote group — ``defer_apply()`` with
  those ports' groups' rules and members and ``update_port_filter`` for each.

Both drivers go through one harness (:func:`run_child`): every repetition is a
fresh process (:mod:`secfw.bench.neutron_child`) inside a fresh namespace, given
the same workload on stdin, killed (and reported) when it outlives
``--timeout``. Figures are medians over the repetitions. Writes ``neutron.json``
and ``neutron.md`` to ``--out``. Benchmarks report, never assert.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from secfw.bench.budget import Budget
from secfw.bench.common import Row, median, ok, rounded, skipped, timed
from secfw.bench.machine import REPO, machine_info
from secfw.bench.namespaces import scratch_netns

GROUPS, RULES_PER_GROUP, GROUPS_PER_PORT, MEMBERS = 500, 10, 20, 50
#: The member addresses of remote groups that live on other hosts.
_OFF_HOST = ipaddress.ip_network("10.128.0.0/10")
_LOCAL = ipaddress.ip_network("10.64.0.0/12")
_NETWORK_ID = str(uuid.UUID(int=0x5EC))


@dataclass
class Workload:
    """Issue 18's workload, as the Neutron server would hand it to one agent."""

    ports: list[dict[str, Any]]
    rules: dict[str, list[dict[str, Any]]]
    members: dict[str, dict[str, list[tuple[str, str]]]] = field(default_factory=dict)

    def remotes_of(self, groups: list[str]) -> set[str]:
        """The remote groups the rules of ``groups`` reference."""
        return {r["remote_group_id"] for g in groups for r in self.rules[g]
                if "remote_group_id" in r}

    def users_of(self, remote: str) -> list[dict[str, Any]]:
        """The local ports whose groups reference ``remote``."""
        return [p for p in self.ports if remote in self.remotes_of(p["security_groups"])]

    def groups_of_ports(self) -> list[str]:
        """The groups of the local ports: what the server sends on a full sync."""
        return sorted({g for p in self.ports for g in p["security_groups"]})

    def to_json(self) -> str:
        """The workload as one JSON document (what a driver's child process reads)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        """The workload :meth:`to_json` wrote; member pairs are tuples again, as
        the agent hands them over."""
        data = json.loads(text)
        members = {g: {v: [tuple(m) for m in ms] for v, ms in per.items()}
                   for g, per in data["members"].items()}
        return cls(data["ports"], data["rules"], members)


def _rule(rng: random.Random, index: int, groups: list[str]) -> dict[str, Any]:
    port = 1000 + rng.randrange(60000)
    rule: dict[str, Any] = {"direction": "ingress" if index % 5 else "egress",
                            "ethertype": "IPv4", "protocol": rng.choice(["tcp", "udp"]),
                            "port_range_min": port, "port_range_max": port}
    if index % 3 == 0:  # a third of the rules: a remote group
        rule["remote_group_id"] = rng.choice(groups)
    elif index % 3 == 1:
        rule["source_ip_prefix" if rule["direction"] == "ingress" else "dest_ip_prefix"] = (
            f"192.0.{rng.randrange(256)}.0/24")
    return rule


def _port(index: int, groups: list[str]) -> dict[str, Any]:
    ip = str(_LOCAL.network_address + 10 + index)
    return {"device": f"tapnb{index:08x}", "id": str(uuid.UUID(int=0x5EC << 64 | index)),
            "mac_address": f"fa:16:3e:{index >> 16 & 255:02x}:{index >> 8 & 255:02x}:"
                           f"{index & 255:02x}",
            "fixed_ips": [ip], "security_groups": groups, "allowed_address_pairs": [],
            "port_security_enabled": True, "network_id": _NETWORK_ID,
            "device_owner": "compute:nova"}


def build(ports: int, seed: int = 1, groups: int = GROUPS,
          per_port: int = GROUPS_PER_PORT) -> Workload:
    """``ports`` ports in ``per_port`` of ``groups`` groups each (issue 18: 20 of
    500); remote groups of ~50 members (the local ports in the group, topped up
    with addresses on other hosts). Deterministic for a given seed."""
    rng = random.Random(seed)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(groups)]
    rules = {g: [_rule(rng, i, ids) for i in range(RULES_PER_GROUP)] for g in ids}
    load = Workload([_port(i, rng.sample(ids, per_port)) for i in range(ports)], rules)
    off_host = iter(_OFF_HOST.hosts())
    for remote in sorted(load.remotes_of(ids)):
        local = [(p["fixed_ips"][0], p["mac_address"]) for p in load.ports
                 if remote in p["security_groups"]][:MEMBERS]
        extra = [(str(next(off_host)), "fa:16:3e:ff:00:01") for _ in range(MEMBERS - len(local))]
        load.members[remote] = {"IPv4": local + extra, "IPv6": []}
    return load


def push(driver: Any, load: Workload, groups: list[str]) -> None:
    """The agent's _update_security_group_info for ports in ``groups``."""
    for group in groups:
        driver.update_security_group_rules(group, load.rules[group])
    for remote in sorted(load.remotes_of(groups)):
        driver.update_security_group_members(remote, load.members[remote])


def scenario(driver: Any, load: Workload,
             around: Callable[[Callable[[], None]], None] | None = None) -> Row:
    """Full sync, then one port added, then one member joined (see the module doc);
    ``around(full)`` runs the full sync when given (the profiler's call)."""
    everything = load.groups_of_ports()

    def full() -> None:
        with driver.defer_apply():
            push(driver, load, everything)
            for port in load.ports:
                driver.prepare_port_filter(port)

    _, full_s = timed(full if around is None else lambda: around(full))
    new = _port(len(load.ports), load.ports[0]["security_groups"])

    def add() -> None:
        with driver.defer_apply():
            push(driver, load, new["security_groups"])
            driver.prepare_port_filter(new)

    _, add_s = timed(add)
    remote = sorted(load.remotes_of(everything))[0]
    load.members[remote]["IPv4"].append(("10.255.0.1", "fa:16:3e:ff:00:02"))
    users = load.users_of(remote)

    def join() -> None:
        with driver.defer_apply():
            push(driver, load, sorted({g for p in users for g in p["security_groups"]}))
            for port in users:
                driver.update_port_filter(port)

    _, join_s = timed(join)
    return {"full_sync_s": rounded(full_s), "port_added_s": rounded(add_s),
            "member_joined_s": rounded(join_s), "ports_refreshed_on_join": len(users)}


#: The drivers the harness knows: ``neutron_child`` argument → report label.
DRIVERS = {"secfw": "secfw (nftables, bridged)",
           "neutron": "Neutron IptablesFirewallDriver (iptables + ipset)"}
METRICS = ("full_sync_s", "port_added_s", "member_joined_s")


def neutron_missing() -> str | None:
    """Why Neutron's driver cannot run here, or None when it can."""
    # find_spec, not an import: importing Neutron takes seconds, and the driver
    # runs in the child process anyway.
    if importlib.util.find_spec("neutron") is None:
        return "neutron is not installed (pip install -e '.[neutron]')"
    return None


def _kill_group(pid: int) -> None:
    """SIGKILL the session the child leads (it, ``ip netns exec``, privsep's daemon)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def run_child(which: str, load: Workload, timeout: float, names: bool = False,
              profile: Path | None = None) -> Row:
    """One repetition: ``which`` driver in a fresh process inside a fresh namespace.

    The row :func:`secfw.bench.neutron_child.run` wrote, an ``error`` row when
    the child failed or outlived ``timeout`` seconds (then it is killed: a hang
    is reported, never waited on), or a ``skipped`` row when Neutron is missing.
    ``names`` asks for the chain and set names the driver left in the kernel;
    ``profile``, the full sync under the profiler (its stem: ``neutron_child``).
    """
    if which == "neutron" and (reason := neutron_missing()):
        return skipped(reason)
    with scratch_netns() as ns, tempfile.TemporaryDirectory(prefix="secfw-nb-") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "stderr.log"
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "secfw.bench.neutron_child",
               which, str(result), *(["--listing"] if names else [])]
        with log.open("w") as err:
            env = os.environ | ({PROFILE_ENV: str(profile)} if profile else {})
            child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=err, stderr=err,
                                     text=True, start_new_session=True, env=env)
            try:
                child.communicate(load.to_json(), timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(child.pid)
                child.wait()
                return {"error": f"timed out after {timeout:.0f} s (killed)"}
            finally:
                _kill_group(child.pid)
        if not result.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            return {"error": f"exit {child.returncode}: {' | '.join(tail)}"[:2000]}
        row: Row = json.loads(result.read_text())
        return row


def measure(which: str, load: Workload, repeat: int, timeout: float,
            budget: Budget | None = None) -> Row:
    """Up to ``repeat`` runs; medians of the good ones, and every run's figures.

    Stops at the first failed run (a hang would otherwise cost ``repeat`` ×
    ``timeout``) and before a run the budget has no room for (judged by the
    slowest run so far).
    """
    runs: list[Row] = []
    while len(runs) < repeat:
        slowest = max((sum(r[m] for m in METRICS) for r in runs), default=0.0)
        if runs and budget is not None and budget.remaining() < 1.5 * slowest:
            break
        runs.append(run_child(which, load, timeout))
        if not ok(runs[-1]):
            break
    good = [r for r in runs if ok(r)]
    if not good:
        return runs[0]
    row: Row = {m: rounded(median([r[m] for r in good])) for m in METRICS}
    row.update(repetitions=len(good), runs=[{m: r[m] for m in METRICS} for r in good],
               ruleset=good[0]["ruleset"], ports_refreshed_on_join=good[0][
                   "ports_refreshed_on_join"],
               peak_rss_mb=max(r["peak_rss_mb"] for r in good))
    if "transactions" in good[0]:
        row["transactions"] = good[0]["transactions"]
    if len(runs) > len(good):
        row["error"] = runs[-1].get("error") or runs[-1].get("skipped")
    return row


def run(sizes: list[int], repeat: int, timeout: float, budget_s: float,
        seed: int = 1, out: Path | None = None) -> Row:
    """Every driver at every size, within ``budget_s`` seconds.

    Not :meth:`Budget.run`'s linear estimate from the previous size: Neutron's
    driver grows faster than linearly, and the 1,000-port comparison is the one
    that matters. A step starts while budget is left; one run never outlives
    what is left (nor ``timeout``), and :func:`measure` starts no repetition the
    budget cannot hold. With ``out``, a missed speed-up target gets a profile of
    secfw's full sync (:func:`profile_secfw`).
    """
    budget, rows, load_before = Budget(budget_s), [], os.getloadavg()
    profile: Row | None = None
    for ports in sizes:
        load, build_s = timed(lambda n=ports: build(n, seed))  # type: ignore[misc]
        for which, label in DRIVERS.items():
            left = budget.remaining()
            row = measure(which, load, repeat, min(timeout, left), budget) if left > 0 else (
                skipped(f"time budget of {budget_s:.0f} s used up"))
            row = {"driver": label, "ports": ports, "workload_build_s": rounded(build_s), **row}
            print(f"  {row}", flush=True)
            rows.append(row)
        if out is not None and ports == max(sizes):
            profile = profile_secfw(rows, load, ports, min(timeout, budget.remaining()), out)
    machine = {**machine_info(), "loadavg_before": [round(x, 2) for x in load_before],
               "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    return {"machine": machine, "versions": versions(), "repeat": repeat, "timeout_s": timeout,
            "budget_s": budget_s, "elapsed_s": round(budget.elapsed(), 1),
            "workload": {"groups": GROUPS, "rules_per_group": RULES_PER_GROUP,
                         "groups_per_port": GROUPS_PER_PORT, "members": MEMBERS},
            "rows": rows} | ({"profile": profile} if profile else {})


#: the environment variable that asks neutron_child for a profile (its stem)
PROFILE_ENV = "SECFW_BENCH_NEUTRON_PROFILE"
#: the target's text, as bench/targets.py starts it
PROFILE_TARGET = "secfw full sync"


def profile_secfw(rows: list[Row], load: Workload, ports: int, left: float,
                  out: Path) -> Row | None:
    """When secfw's full sync at ``ports`` is less than the target's factor
    faster than Neutron's and one more run fits in ``left`` (3x the measured
    one), that run with the full sync under the profiler (never one of the
    measured runs): its row (:func:`secfw.bench.profiles.record`), else None."""
    from secfw.bench import profiles, targets

    summary = targets.neutron_summary({"rows": rows})
    if (summary is None or summary["ports"] != ports
            or summary["factor"] >= targets.NEUTRON_FACTOR or left < 3 * summary["secfw_s"]):
        return None
    with tempfile.TemporaryDirectory(prefix="secfw-nbp-") as tmp:
        stem = Path(tmp) / "secfw"
        started = time.perf_counter()
        done = run_child("secfw", load, left, profile=stem)
        if not ok(done) or not stem.with_suffix(".json").exists():
            return {"error": str(done.get("error", "no profile written"))}
        row = profiles.record(profiles.load_process(stem), PROFILE_TARGET, ports, out,
                              summary["secfw_s"])
    return row | {"profile_s": rounded(time.perf_counter() - started)}


def versions() -> Row:
    """Neutron's version and the tools its driver runs (the first line of each)."""
    found: Row = {}
    try:
        found["neutron"] = importlib.metadata.version("neutron")
    except importlib.metadata.PackageNotFoundError:
        found["neutron"] = None
    for tool in ("iptables", "ipset"):
        done = subprocess.run([tool, "--version"], capture_output=True, text=True,
                              timeout=30, check=False)
        found[tool] = (done.stdout or done.stderr).strip().split("\n")[0]
    return found


def _note(row: Row) -> str:
    parts = []
    if "ruleset" in row:
        r = row["ruleset"]
        parts.append(f"{r['rules']:,} rules, {r['chains']:,} chains, {r['sets']:,} sets")
        parts.append(f"{row['ports_refreshed_on_join']} ports refreshed on the join")
    if "transactions" in row:
        parts.append(f"{row['transactions']} nft transactions")
    for key in ("error", "skipped"):
        if row.get(key):
            parts.append(f"{key}: {row[key]}")
    return "; ".join(parts)


def markdown(results: Row) -> str:
    """The comparison table, with the medians and each run's figures."""
    machine = results["machine"]
    lines = [f"# Neutron firewall drivers — {machine.get('date', '')}", "",
             f"{machine.get('cores', '?')} cores, load average before/after "
             f"{machine.get('loadavg_before')} / {machine.get('loadavg_after')}; Neutron "
             f"{results['versions'].get('neutron')}, {results['versions'].get('iptables')}, "
             f"{results['versions'].get('ipset')}. Issue 18's "
             f"workload, the L2 agent's calls; each run a fresh process in a fresh "
             f"namespace; medians of up to {results['repeat']} runs (per-run figures in "
             f"neutron.json); {results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s "
             "budget.", "",
             "| driver | ports | full sync | port added | member joined | runs | peak RSS "
             "| ruleset, notes |", "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        cells = [f"{row[k]:.2f} s" if row.get(k) is not None else "—" for k in METRICS]
        rss = f"{row['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in row else "—"
        lines.append(f"| {row['driver']} | {row['ports']:,} | {' | '.join(cells)} | "
                     f"{row.get('repetitions', 0)} | {rss} | {_note(row)} |")
    return "\n".join(lines) + "\n"


def _stop(signum: int, _frame: object) -> None:
    """SIGTERM ends the run like Ctrl-C, so the ``finally`` blocks kill the
    running child and remove its namespace."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secfw.bench.neutron",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000",
                        help="comma-separated port counts (default 100,1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per driver and size")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds before one run is killed and reported")
    parser.add_argument("--budget", type=float, default=1800.0,
                        help="seconds for the whole comparison")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes: comma-separated integers")
    if min(sizes) < 1 or args.repeat < 1 or args.timeout <= 0:
        parser.error("--sizes, --repeat and --timeout must be positive")
    signal.signal(signal.SIGTERM, _stop)
    results = run(sizes, args.repeat, args.timeout, args.budget, args.seed, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "neutron.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "neutron.md").write_text(markdown(results))
    print(f"wrote {args.out}/neutron.json and neutron.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
