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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import netaddr

from secfw.audit.policy import EVERYWHERE, CloudPolicy, PortView
from secfw.audit.reach import Answer, ingress_openers, region_fields, specials
from secfw.audit.space import (
    ALL,
    ICMP_OF,
    PORT_PROTOCOL_NUMBERS,
    SEL_MAX,
    CellPolicy,
    Label,
    Opener,
    Region,
    Spans,
    Special,
    UnionCache,
    label_key,
    merge_protocols,
    rule_box,
    sweep,
    sweep_window,
    unique_labels,
)
from secfw.compiler.ir import Family, GroupChain, IRRule

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


def exposure(cp: CloudPolicy, views: Iterable[PortView],
             shared: bool = True) -> list[dict[str, Any]]:
    """The exposure rows of ``views`` (module docstring), admin ports first.

    ``shared`` False sweeps each distinct port filter whole (the reference the
    tests compare with); True, the default, sweeps only the clusters of
    overlapping or touching rules of one protocol, once per distinct cluster for
    the whole run (:class:`Clusters`): the same answer, at a cost that grows with
    the distinct clusters (a group's rules recur on every port that has it)."""
    rows: list[dict[str, Any]] = []
    memo: dict[tuple[Any, ...], tuple[list[Region], list[Opener]]] = {}
    networks: dict[str, Counter[str]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] | None = {} if shared else None
    unions = UnionCache()  # the ports' sweeps meet the same unions of sets
    broads: dict[int, tuple[netaddr.IPSet, list[netaddr.IPNetwork]]] = {}
    clusters = Clusters(cp, unions, broads) if shared else None
    for view in views:
        for family in ("ipv4", "ipv6"):
            rows += _broad(cp, view, family, memo, unions, broads, clusters)
        rows += _other_project_groups(cp, view, groups)
        rows += _same_net(cp, view, networks)
    return sorted(rows, key=lambda r: (not r["admin_ports"], KINDS.index(r["kind"]),
                                       r["instance"], r["port"]))


def _broad(cp: CloudPolicy, view: PortView, family: Family,
           memo: dict[tuple[Any, ...], tuple[list[Region], list[Opener]]],
           unions: UnionCache | None = None,
           broads: dict[int, tuple[netaddr.IPSet, list[netaddr.IPNetwork]]] | None = None,
           clusters: Clusters | None = None) -> list[dict[str, Any]]:
    """The internet/broad rows of one port. Its regions depend only on what its
    ingress names (port security, same-net sets, group chains — sets and chains
    are the same on every host), so ports that share them share one sweep; with
    ``clusters``, only the broad regions are computed, cluster by cluster."""
    address = view.address(family)
    if address is None:
        return []
    found_regions = clusters.broad_regions(view, family) if clusters is not None else None
    if found_regions is not None:
        assert clusters is not None
        answer = Answer(view, family, address, "ingress", found_regions, [])
        rows = []
        for region in found_regions:
            fields = clusters.row_fields(answer, region)
            if fields is not None:
                rows.append({**_base(view, fields[0]), "address": address, **fields[1]})
        return rows
    else:
        policy = view.policy
        key = (family, policy.port_security, policy.same_net_sets, policy.ingress_chains)
        found = memo.get(key)
        if found is None:
            openers = ingress_openers(cp, view, family)
            found = memo[key] = (
                sweep(family, openers, (), specials(cp, view, "ingress", family), unions),
                openers)
        answer = Answer(view, family, address, "ingress", *found)
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


def _broad_cidrs(addresses: netaddr.IPSet | Spans, family: Family,
                 memo: dict[int, tuple[netaddr.IPSet, list[netaddr.IPNetwork]]] | None
                 ) -> list[netaddr.IPNetwork]:
    """The CIDRs of ``addresses`` at most :data:`BROAD_PREFIX` long; once per set
    object with ``memo`` (the ports' regions share their sets: see UnionCache;
    the memo keeps each set alive so its id stays its own)."""
    found = memo.get(id(addresses)) if memo is not None else None
    if found is None:
        found = (addresses, addresses.iter_cidrs(BROAD_PREFIX[family])
                 if isinstance(addresses, Spans) else
                 [c for c in addresses.iter_cidrs() if c.prefixlen <= BROAD_PREFIX[family]])
        if memo is not None:
            memo[id(addresses)] = found
    return found[1]


def _base(view: PortView, kind: str) -> dict[str, Any]:
    return {"instance": view.instance.name, "instance_id": view.instance.id,
            "project": view.instance.project, "port": view.port.tap, "kind": kind}


def _other_project_groups(cp: CloudPolicy, view: PortView,
                          memo: dict[tuple[str, str], list[dict[str, Any]]] | None = None
                          ) -> list[dict[str, Any]]:
    """The port's source-group rules whose groups have members of other projects
    (their fields once per chain and project with ``memo``: a group's chain is
    the same on every port that has it)."""
    if not view.policy.port_security:
        return []
    rows = []
    for chain in cp.chains(view, "ingress"):
        key = (chain.name, view.instance.project)
        found = memo.get(key) if memo is not None else None
        if found is None:
            found = _other_project_rules(cp, chain, view.instance.project)
            if memo is not None:
                memo[key] = found
        rows += [{**_base(view, "other_project_group"), "address": view.port.ip, **fields}
                 for fields in found]
    return rows


def _other_project_rules(cp: CloudPolicy, chain: GroupChain,
                         project: str) -> list[dict[str, Any]]:
    """The row fields of ``chain``'s rules that admit members of projects other
    than ``project``, without the port's own."""
    found = []
    for rule in chain.rules:
        model = cp.state.rules.get(rule.rule_id)
        if model is None or model.remote_group_id is None:
            continue
        others = sorted({m.project for m in cp.state.group_members(model.remote_group_id)}
                        - {project})
        if others:
            found.append({"protocol": model.protocol or "any", "ports": None,
                          "sources": [f"group {cp.group_name(model.remote_group_id)}"],
                          "admin_ports": [], "rules": [cp.rule_ref(chain, rule)],
                          "detail": "members of projects " + ", ".join(others)})
    return found


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


# ---------------------------------------------------------------------- clusters


@dataclass
class ChainClusters:
    """One group chain's openers of one family, and its clusters: per protocol,
    maximal runs of rules whose selector intervals overlap or touch, as
    (protocol, low, high, opener indices). ``spread``: openers of several
    protocols (a rule of any protocol), which meet every cluster."""

    openers: list[Opener]
    clusters: list[tuple[int, int, int, list[int]]]
    spread: bool


@dataclass
class Clusters:
    """The broad regions of a port's ingress, computed cluster by cluster.

    Why it is exact: with port security on, a cell outside every cluster is
    covered only by the openers of every protocol (same-net, rules of any
    protocol): its addresses are their union S. When S holds no broad prefix,
    such a cell is never in a broad region, so a broad region lies inside one
    cluster (clusters are separated by such cells) and :func:`sweep_window` over
    the cluster — its openers and the all-protocol ones, in the port's order —
    gives it; the family's ICMP protocol is one window (its special cells).
    Whole-protocol regions of neighbouring protocols are then merged as
    :func:`sweep` merges them. Otherwise (S broad, port security off) the caller
    sweeps the whole filter."""

    cp: CloudPolicy
    unions: UnionCache
    broads: dict[int, tuple[netaddr.IPSet, list[netaddr.IPNetwork]]]
    chains: dict[tuple[str, str], ChainClusters] = field(default_factory=dict)
    same: dict[tuple[Any, ...], list[Opener]] = field(default_factory=dict)
    specials: dict[Family, Special] = field(default_factory=dict)
    # (family, protocol, low, high, (box, set id) of each opener) -> broad regions,
    # their labels as positions among those openers (or the special's own label)
    windows: dict[tuple[Any, ...], list[tuple[Region, list[int | Label]]]] = field(
        default_factory=dict)
    label_keys: dict[int, tuple[Label, str]] = field(default_factory=dict)
    sets: dict[tuple[str | None, str | None, Family], Spans] = field(default_factory=dict)
    alone: dict[tuple[int, int, int], list[Region]] = field(default_factory=dict)
    labelled: dict[tuple[Any, ...], list[Region]] = field(default_factory=dict)
    rows: dict[int, tuple[Region, tuple[str, dict[str, Any]] | None]] = field(
        default_factory=dict)

    def broad_regions(self, view: PortView, family: Family) -> list[Region] | None:
        """The regions of ``view``'s ingress in ``family`` with a broad source, in
        the whole sweep's order (None: sweep the whole filter instead). A cluster
        of one chain alone on the port gives the same regions on every port with
        the same same-net openers: they are computed once and shared."""
        if not view.policy.port_security:
            return None
        same = self.same_net(view, family)
        chains = [self.chain(view, chain, family)
                  for chain in self.cp.chains(view, "ingress")]
        if any(chain.spread for chain in chains) or self._broad_same(same, family):
            return None
        icmp = ICMP_OF[family]
        pieces = [(icmp, 0, SEL_MAX, -1, -1)]
        for i, chain in enumerate(chains):
            pieces += [(p, lo, hi, i, k) for k, (p, lo, hi, _) in enumerate(chain.clusters)]
        pieces.sort()
        groups: list[list[tuple[int, int, int, int, int]]] = []
        top = (-1, -2)  # the protocol and high end of the last group
        for piece in pieces:  # merged_clusters' merge: overlapping or touching
            if groups and top[0] == piece[0] and piece[1] <= top[1] + 1:
                groups[-1].append(piece)
                top = (piece[0], max(top[1], piece[2]))
            else:
                groups.append([piece])
                top = (piece[0], piece[2])
        regions: list[Region] = []
        for group in groups:
            if len(group) == 1 and group[0][0] != icmp:
                regions += self._alone(family, same, chains[group[0][3]], group[0][4])
            else:
                members = sorted((i, m) for _, _, _, i, k in group if i >= 0
                                 for m in chains[i].clusters[k][3])
                sub = [*same, *(chains[i].openers[m] for i, m in members)]
                regions += self._window(family, sub, group[0][0], group[0][1],
                                        max(piece[2] for piece in group))
        return merge_protocols(regions)

    def _broad_same(self, same: list[Opener], family: Family) -> bool:
        """Whether the same-net openers' union has a broad prefix."""
        return bool(same) and bool(_broad_cidrs(
            self.unions.union([o.addresses for o in same]), family, self.broads))

    def _alone(self, family: Family, same: list[Opener], chain: ChainClusters,
               k: int) -> list[Region]:
        """The broad regions of ``chain``'s cluster ``k`` alone on a port (the
        lists are cached objects, alive for the run: their ids are theirs)."""
        key = (id(same), id(chain), k)
        found = self.alone.get(key)
        if found is None:
            protocol, low, high, members = chain.clusters[k]
            sub = [*same, *(chain.openers[m] for m in members)]
            found = self.alone[key] = self._window(family, sub, protocol, low, high)
        return found

    def row_fields(self, answer: Answer, region: Region
                   ) -> tuple[str, dict[str, Any]] | None:
        """The kind and the port-independent fields of ``region``'s row (None: not
        broad), once per region object (shared regions are shared by ports)."""
        found = self.rows.get(id(region))
        if found is None:
            broad = _broad_cidrs(region.addresses, answer.family, self.broads)
            fields: tuple[str, dict[str, Any]] | None = None
            if broad:
                row = region_fields(answer, region)
                fields = ("internet" if any(c.prefixlen == 0 for c in broad) else "broad",
                          {**{k: row[k] for k in ("ethertype", "protocol", "ports",
                                                  "icmp_type", "icmp_type_last",
                                                  "icmp_code", "rules")},
                           "sources": [str(c) for c in broad],
                           "admin_ports": admin_ports(region),
                           "detail": f"open to {', '.join(str(c) for c in broad)}"})
            found = self.rows[id(region)] = (region, fields)
        return found[1]

    def _window(self, family: Family, sub: Sequence[Opener], protocol: int, low: int,
                high: int) -> list[Region]:
        """The broad regions of one window with ``sub``'s labels: swept once per
        distinct boxes and sets, labelled once per distinct labels."""
        key = (family, protocol, low, high, tuple((o.box, id(o.addresses)) for o in sub))
        found = self.windows.get(key)
        if found is None:
            found = self.windows[key] = self._sweep(family, sub, protocol, low, high)
        labelled = (key, tuple(id(o.label) for o in sub))
        regions = self.labelled.get(labelled)
        if regions is None:
            regions = [Region(family, region.addresses, region.box,
                              self._labels([sub[p].label if isinstance(p, int) else p
                                            for p in positions]))
                       for region, positions in found]
            # the labels are the rules' shared references (CloudPolicy.rule_ref)
            # and the cached same-net openers': alive, their ids stay theirs
            self.labelled[labelled] = regions
        return regions

    def _sweep(self, family: Family, sub: Sequence[Opener], protocol: int, low: int,
               high: int) -> list[tuple[Region, list[int | Label]]]:
        """The broad regions of one window, labelled by positions in ``sub`` (the
        sets of ``sub`` are kept alive by the caches: their ids are theirs)."""
        marked = [Opener(o.addresses, o.box, {"#": i}) for i, o in enumerate(sub)]
        special = self._special(family) if protocol == ICMP_OF[family] else None
        found = []
        for region in sweep_window(family, marked, protocol, low, high, special, self.unions):
            if region.addresses and _broad_cidrs(region.addresses, family, self.broads):
                found.append((region, [lab["#"] if set(lab) == {"#"} else lab
                                       for lab in region.labels]))
        return found

    def _labels(self, labels: list[Label]) -> list[Label]:
        """:func:`unique_labels`, each label's key computed once per label object."""
        if len(labels) < 2:
            return labels
        keys = []
        for label in labels:
            known = self.label_keys.get(id(label))
            if known is None:
                known = self.label_keys[id(label)] = (label, label_key(label))
            keys.append(known[1])
        if len(set(keys)) == len(keys):
            return labels
        return unique_labels(labels)

    def _special(self, family: Family) -> Special:
        """The ICMP special of a filtered port's ingress (the same for every one),
        its policies' sets as :class:`Spans`."""
        found = self.specials.get(family)
        if found is None:
            view = next(v for v in self.cp.ports.values() if v.policy.port_security)
            found = self.specials[family] = _spans_special(
                specials(self.cp, view, "ingress", family)[0], _VERSION[family])
        return found

    def same_net(self, view: PortView, family: Family) -> list[Opener]:
        """The port's same-net opener (none or one), once per network and sets."""
        key = (family, view.policy.same_net_sets, view.network.id)
        found = self.same.get(key)
        if found is None:
            # ingress_openers' same-net opener: the union of the port's same-net
            # sets of the family, when not empty
            suffix = "-v4" if family == "ipv4" else "-v6"
            members = Spans.merged(_VERSION[family], [
                pair for name in view.policy.same_net_sets if name.endswith(suffix)
                for pair in _set_spans(view, name, _VERSION[family]).spans])
            found = self.same[key] = [Opener(members, ALL, {
                "reason": "same-net", "network": view.network.name,
                "network_id": view.network.id})] if members else []
        return found

    def chain(self, view: PortView, chain: GroupChain, family: Family) -> ChainClusters:
        """A chain's openers and clusters, once per chain (the same on every host)."""
        key = (chain.name, family)
        found = self.chains.get(key)
        if found is None:
            found = self.chains[key] = _chain_of(self.cp, view, chain, family, self.sets)
        return found


_VERSION: dict[Family, int] = {"ipv4": 4, "ipv6": 6}


def _spans_special(special: Special, version: int) -> Special:
    """``special`` deciding with :class:`Spans` (one converted policy per policy
    object; the originals are kept alive, so their ids stay theirs)."""
    converted: dict[int, tuple[CellPolicy, CellPolicy]] = {}

    def decide(selector: int) -> CellPolicy | None:
        policy = special.decide(selector)
        if policy is None:
            return None
        found = converted.get(id(policy))
        if found is None:
            found = converted[id(policy)] = (policy, CellPolicy(
                None if policy.primary is None else Spans.of(policy.primary, version),
                policy.label, policy.constraints,
                None if policy.block is None else Spans.of(policy.block, version)))
        return found[1]

    return Special(special.protocol, special.breakpoints, decide)


def _rule_spans(cp: CloudPolicy, view: PortView, rule: IRRule,
                memo: dict[tuple[str | None, str | None, Family], Spans]) -> Spans:
    """:meth:`CloudPolicy.remote_set` of ``rule`` as :class:`Spans`, built from the
    set's elements or the CIDR directly (once per set or CIDR; a set's elements
    are the same on every host, as :meth:`CloudPolicy.address_set` says)."""
    key = (rule.remote_set, rule.remote_cidr, rule.family)
    found = memo.get(key)
    if found is None:
        if rule.remote_set is not None:
            found = _set_spans(view, rule.remote_set, _VERSION[rule.family])
        else:
            found = Spans.of_cidrs(_VERSION[rule.family],
                                   [rule.remote_cidr or EVERYWHERE[rule.family]])
        memo[key] = found
    return found


def _set_spans(view: PortView, name: str, version: int) -> Spans:
    """The IR address set ``name`` of ``view``'s host as :class:`Spans`."""
    elements = next((s.elements for s in view.index.hf.sets if s.name == name), ())
    return Spans.of_cidrs(version, elements)


def _chain_of(cp: CloudPolicy, view: PortView, chain: GroupChain, family: Family,
              memo: dict[tuple[str | None, str | None, Family], Spans]) -> ChainClusters:
    openers = [Opener(_rule_spans(cp, view, rule, memo), rule_box(rule),
                      cp.rule_ref(chain, rule))
               for rule in chain.rules if rule.family == family]
    spread = any(o.box.proto_lo != o.box.proto_hi for o in openers)
    pieces = [(o.box.proto_lo, o.box.sel_lo, o.box.sel_hi, [i]) for i, o in enumerate(openers)]
    return ChainClusters(openers, merged_clusters(pieces), spread)


def merged_clusters(pieces: list[tuple[int, int, int, list[int]]]
                     ) -> list[tuple[int, int, int, list[int]]]:
    """Pieces (protocol, low, high, opener indices) merged while they overlap or
    touch within a protocol, in (protocol, low) order, indices ascending."""
    merged: list[tuple[int, int, int, list[int]]] = []
    for protocol, low, high, members in sorted(pieces, key=lambda p: (p[0], p[1])):
        if merged and merged[-1][0] == protocol and low <= merged[-1][2] + 1:
            last = merged[-1]
            merged[-1] = (protocol, last[1], max(last[2], high), last[3] + members)
        else:
            merged.append((protocol, low, high, list(members)))
    return [(p, lo, hi, sorted(m)) for p, lo, hi, m in merged]
