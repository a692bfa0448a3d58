"""The Neutron firewall driver through the L2 agent's calls: full sync, port added,
member joined.

``python -m secfw.bench.neutron [--ports 1000] [--out DIR]`` builds issue 18's
workload in memory — 500 security groups of 10 rules each, a third of the rules
with a remote group, every port in 20 groups, ~50 member addresses per remote
group — and drives :class:`~secfw.neutron.SecfwFirewallDriver` (bridged topology,
applying into a fresh namespace) exactly as neutron/agent/securitygroups_rpc.py
does:

* **full sync**: one ``defer_apply()`` with every group's rules, every remote
  group's members and ``prepare_port_filter`` for every port;
* **port added**: one ``defer_apply()`` with the new port's groups' rules and
  remote groups' members, then ``prepare_port_filter``;
* **member joined** (a port elsewhere joins a remote group): the agent refreshes
  every local port whose groups use that remote group — ``defer_apply()`` with
  those ports' groups' rules and members and ``update_port_filter`` for each.

Neutron's own IptablesFirewallDriver is listed beside it when it can be driven
here (see :func:`neutron_iptables`). Writes ``neutron.json`` and ``neutron.md``
to ``--out``. Single runs: figures report, never assert.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from secfw.bench.common import Row, guarded, rounded, timed
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
    return {"device": f"tapnb{index:08x}", "id": str(uuid.uuid4()),
            "mac_address": f"fa:16:3e:{index >> 16 & 255:02x}:{index >> 8 & 255:02x}:"
                           f"{index & 255:02x}",
            "fixed_ips": [ip], "security_groups": groups, "allowed_address_pairs": [],
            "port_security_enabled": True, "network_id": _NETWORK_ID,
            "device_owner": "compute:nova"}


def build(ports: int, seed: int = 1) -> Workload:
    """``ports`` ports in 20 of 500 groups each; remote groups of ~50 members
    (the local ports in the group, topped up with addresses on other hosts)."""
    rng = random.Random(seed)
    groups = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(GROUPS)]
    rules = {g: [_rule(rng, i, groups) for i in range(RULES_PER_GROUP)] for g in groups}
    load = Workload([_port(i, rng.sample(groups, GROUPS_PER_PORT)) for i in range(ports)], rules)
    off_host = iter(_OFF_HOST.hosts())
    for remote in sorted(load.remotes_of(groups)):
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


def scenario(driver: Any, load: Workload) -> Row:
    """Full sync, then one port added, then one member joined (see the module doc)."""
    everything = sorted(load.rules)

    def full() -> None:
        with driver.defer_apply():
            push(driver, load, everything)
            for port in load.ports:
                driver.prepare_port_filter(port)

    _, full_s = timed(full)
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


def secfw_driver(load: Workload) -> Row:
    """secfw's driver (bridged, nftables) in a fresh namespace."""
    from secfw.neutron import SecfwFirewallDriver

    with scratch_netns() as ns:
        driver = SecfwFirewallDriver(netns=ns, topology="bridged")
        row = scenario(driver, load)
        driver.cleanup()
    return {**row, "transactions": driver.applies}


def neutron_iptables(load: Workload) -> Row:
    """Neutron's IptablesFirewallDriver, when Neutron is importable and its
    driver can run here; otherwise the reason it cannot (recorded, not raised)."""
    try:
        from neutron.agent.linux import iptables_firewall  # noqa: F401
    except ImportError:
        return {"skipped": "neutron is not installed (pip install -e '.[neutron]')"}
    # Tried by hand (2026-12-07): constructed in-process with root_helper "",
    # privsep's client mode off and a lock_path, in a scratch namespace, a 10-port
    # full sync had not finished after 10 minutes on the loaded 2-core VM; why
    # (iptables-save/restore through `ip netns exec`, a lock, conntrack zones) was
    # not found in the time available.
    return {"skipped": "not driven: in-process IptablesFirewallDriver (root_helper '', "
                       "privsep client mode off) did not finish a 10-port sync in 10 min "
                       "here; cause not found"}


def run(ports: int, seed: int = 1) -> Row:
    load, build_s = timed(lambda: build(ports, seed))
    rows: list[Row] = []
    drivers: list[tuple[str, Callable[[Workload], Row]]] = [
        ("secfw (nftables, bridged)", secfw_driver),
        ("neutron IptablesFirewallDriver", neutron_iptables),
    ]
    for label, measure in drivers:
        row = {"driver": label, "ports": ports, **guarded(partial(measure, load))}
        print(f"  {row}", flush=True)
        rows.append(row)
    return {"machine": machine_info(), "workload_build_s": rounded(build_s),
            "workload": {"groups": GROUPS, "rules_per_group": RULES_PER_GROUP,
                         "groups_per_port": GROUPS_PER_PORT, "members": MEMBERS},
            "rows": rows}


def markdown(results: Row) -> str:
    machine = results["machine"]
    lines = [f"Neutron firewall drivers, {machine.get('date', '')}: "
             f"{machine.get('cores', '?')} cores. Issue 18's workload; single runs.", "",
             "| driver | ports | full sync | port added | member joined | note |",
             "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        note = row.get("skipped") or row.get("error") or (
            f"{row['transactions']} transactions; {row['ports_refreshed_on_join']} ports "
            "refreshed on the join")
        cells = [f"{row[k]} s" if k in row else "—"
                 for k in ("full_sync_s", "port_added_s", "member_joined_s")]
        lines.append(f"| {row['driver']} | {row['ports']:,} | {' | '.join(cells)} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secfw.bench.neutron",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.ports < 1:
        parser.error("--ports must be positive")
    results = run(args.ports)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "neutron.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "neutron.md").write_text(markdown(results))
    print(f"wrote {args.out}/neutron.json and neutron.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
