"""``secfw audit exposure``: per instance, what its own filter opens to the whole
internet or very broad prefixes, and to other projects.

* ``internet`` / ``broad``: the regions of the port's ingress (its groups,
  same-net, port security — the reach of :mod:`.reach` without the senders'
  egress, which a host outside the cloud does not have) whose sources hold
  ``0.0.0.0/0`` / ``::/0``, or a prefix at most :data:`BROAD_PREFIX` long;
* ``other_project_group``: a source-group rule whose group has members of
  another project;
* ``same_net_other_projects``: with ``allow_same_net_traffic``, a flat network's
  ports of other projects reach the port on every protocol and port.

Rows that open an administration or database port (:data:`ADMIN_PORTS`) come
first, then by kind (:data:`KINDS`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import netaddr

from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import Answer, ingress_openers, region_fields, specials
from secfw.audit.space import PORT_PROTOCOL_NUMBERS, Opener, Region, UnionCache, sweep
from secfw.compiler.ir import Family

#: Administration and database ports an auditor wants to see first.
ADMIN_PORTS = {
    22: "ssh", 23: "telnet", 135: "msrpc", 445: "smb", 1433: "mssql", 2379: "etcd",
    3306: "mysql", 3389: "rdp", 5432: "postgresql", 5900: "vnc", 5984: "couchdb",
    6379: "redis", 9200: "elasticsearch", 11211: "memcached", 27017: "mongodb",
}
#: The kinds of rows, most exposed first.
KINDS = ("internet", "broad", "other_project_group", "same_net_other_projects")
#: The longest prefix still counted as "very broad", per family.
BROAD_PREFIX: dict[Family, int] = {"ipv4": 8, "ipv6": 32}


def admin_ports(region: Region) -> list[int]:
    """The admin ports a region opens (port protocols only)."""
    box = region.box
    if not any(box.proto_lo <= p <= box.proto_hi for p in PORT_PROTOCOL_NUMBERS):
        return []
    return [p for p in sorted(ADMIN_PORTS) if box.sel_lo <= p <= box.sel_hi]


def exposure(cp: CloudPolicy, views: Iterable[PortView]) -> list[dict[str, Any]]:
    """The exposure rows of ``views`` (module docstring), admin ports first."""
    rows: list[dict[str, Any]] = []
    memo: dict[tuple[Any, ...], tuple[list[Region], list[Opener]]] = {}
    networks: dict[str, Counter[str]] = {}
    unions = UnionCache()  # the ports' sweeps meet the same unions of sets
    broads: dict[int, tuple[netaddr.IPSet, list[netaddr.IPNetwork]]] = {}
    for view in views:
        for family in ("ipv4", "ipv6"):
            rows += _broad(cp, view, family, memo, unions, broads)
        rows += _other_project_groups(cp, view)
        rows += _same_net(cp, view, networks)
    return sorted(rows, key=lambda r: (not r["admin_ports"], KINDS.index(r["kind"]),
                                       r["instance"], r["port"]))


def _broad(cp: CloudPolicy, view: PortView, family: Family,
           memo: dict[tuple[Any, ...], tuple[list[Region], list[Opener]]],
           unions: UnionCache | None = None,
           broads: dict[int, tuple[netaddr.IPSet, list[netaddr.IPNetwork]]] | None = None
           ) -> list[dict[str, Any]]:
    """The internet/broad rows of one port. Its regions depend only on what its
    ingress names (port security, same-net sets, group chains — sets and chains
    are the same on every host), so ports that share them share one sweep."""
    address = view.address(family)
    if address is None:
        return []
    policy = view.policy
    key = (family, policy.port_security, policy.same_net_sets, policy.ingress_chains)
    found = memo.get(key)
    if found is None:
        openers = ingress_openers(cp, view, family)
        found = memo[key] = (
            sweep(family, openers, (), specials(cp, view, "ingress", family), unions), openers)
    regions, openers = found
    answer = Answer(view, family, address, "ingress", regions, openers)
    rows = []
    for region in answer.regions:
        broad = _broad_cidrs(region.addresses, family, broads)
        if not broad:
            continue
        row = region_fields(answer, region)
        kind = "internet" if any(c.prefixlen == 0 for c in broad) else "broad"
        rows.append({**_base(view, kind), **{k: row[k] for k in (
            "address", "ethertype", "protocol", "ports", "icmp_type", "icmp_type_last", "icmp_code",
            "rules")},
            "sources": [str(c) for c in broad], "admin_ports": admin_ports(region),
            "detail": f"open to {', '.join(str(c) for c in broad)}"})
    return rows


def _broad_cidrs(addresses: netaddr.IPSet, family: Family,
                 memo: dict[int, tuple[netaddr.IPSet, list[netaddr.IPNetwork]]] | None
                 ) -> list[netaddr.IPNetwork]:
    """The CIDRs of ``addresses`` at most :data:`BROAD_PREFIX` long; once per set
    object with ``memo`` (the ports' regions share their sets: see UnionCache;
    the memo keeps each set alive so its id stays its own)."""
    found = memo.get(id(addresses)) if memo is not None else None
    if found is None:
        found = (addresses, [c for c in addresses.iter_cidrs()
                             if c.prefixlen <= BROAD_PREFIX[family]])
        if memo is not None:
            memo[id(addresses)] = found
    return found[1]


def _base(view: PortView, kind: str) -> dict[str, Any]:
    return {"instance": view.instance.name, "instance_id": view.instance.id,
            "project": view.instance.project, "port": view.port.tap, "kind": kind}


def _other_project_groups(cp: CloudPolicy, view: PortView) -> list[dict[str, Any]]:
    if not view.policy.port_security:
        return []
    rows = []
    for chain in cp.chains(view, "ingress"):
        for rule in chain.rules:
            model = cp.state.rules.get(rule.rule_id)
            if model is None or model.remote_group_id is None:
                continue
            others = sorted({m.project for m in cp.state.group_members(model.remote_group_id)}
                            - {view.instance.project})
            if others:
                ref = cp.rule_ref(chain, rule)
                rows.append({**_base(view, "other_project_group"), "address": view.port.ip,
                             "protocol": model.protocol or "any", "ports": None,
                             "sources": [f"group {cp.group_name(model.remote_group_id)}"],
                             "admin_ports": [], "rules": [ref],
                             "detail": "members of projects " + ", ".join(others)})
    return rows


def _network_projects(cp: CloudPolicy, network_id: str,
                      memo: dict[str, Counter[str]]) -> Counter[str]:
    """How many ports of the network each project has (once per network: a flat
    network's ports are most of the cloud)."""
    found = memo.get(network_id)
    if found is None:
        found = memo[network_id] = Counter(
            cp.state.instances[cp.state.ports[p].instance_id].project
            for p in cp.state.ports_by_network.get(network_id, ()))
    return found


def _same_net(cp: CloudPolicy, view: PortView,
              memo: dict[str, Counter[str]]) -> list[dict[str, Any]]:
    if not view.policy.same_net_sets:
        return []
    projects = _network_projects(cp, view.network.id, memo)
    others = sorted(set(projects) - {view.instance.project})
    if not others:
        return []
    count = sum(projects[p] for p in others)
    return [{**_base(view, "same_net_other_projects"), "address": view.port.ip,
             "protocol": "any", "ports": "any", "sources": [f"network {view.network.name}"],
             "admin_ports": sorted(ADMIN_PORTS),
             "rules": [{"reason": "same-net", "network": view.network.name,
                        "network_id": view.network.id}],
             "detail": f"{count} port(s) of projects {', '.join(others)} on network "
                       f"{view.network.name} reach it on every protocol and port"}]
