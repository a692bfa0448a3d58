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
from operator import itemgetter
from typing import Any

import netaddr

from secfw.audit.policy import EVERYWHERE, CloudPolicy, PortView
from secfw.audit.reach import Answer, ingress_openers, region_fields, region_shape, specials
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
)
from secfw.compiler.ir import Family, GroupChain, IRRule
from secfw.gcpause import collector_paused

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
    if shared:
        # ~10^6 small acyclic objects (rows, entries, keys) beside the cloud's:
        # the collections their allocation triggers walk every live object
        # (secfw.gcpause; ~40 % of the run at 10k ports)
        with collector_paused():
            return _exposure_shared(cp, views)
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


def _bucket(row: dict[str, Any]) -> int:
    """The row's place in the output's order before the instance and port."""
    return (0 if row["admin_ports"] else len(KINDS)) + KINDS.index(row["kind"])


def _exposure_shared(cp: CloudPolicy, views: Iterable[PortView]) -> list[dict[str, Any]]:
    """:func:`exposure` by clusters. The output order (admin ports first, kind,
    instance, port; a port's rows in their own order) comes without sorting the
    rows: the ports are taken in (instance, port) order and each row goes to the
    end of its (admin, kind) bucket — what a stable sort of the rows gives (no
    two ports share an instance name and a tap)."""
    memo: dict[tuple[Any, ...], tuple[list[Region], list[Opener]]] = {}
    networks: dict[str, Counter[str]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    unions = UnionCache()
    broads: dict[int, tuple[netaddr.IPSet, list[netaddr.IPNetwork]]] = {}
    clusters = Clusters(cp, unions, broads)
    buckets: list[list[dict[str, Any]]] = [[] for _ in range(2 * len(KINDS))]
    for view in sorted(views, key=lambda v: (v.instance.name, v.port.tap)):
        for family in ("ipv4", "ipv6"):
            address = view.address(family)
            if address is None:
                continue
            entries = clusters.broad_entries(view, family)
            if entries is None:
                for row in _broad(cp, view, family, memo, unions, broads):
                    buckets[_bucket(row)].append(row)
                continue
            # the port's own values replace the template's placeholders, which
            # keep the keys in the rows' order (a copy and an update of a dict
            # of known keys: far cheaper than merging dicts, 385k rows at 10k)
            own = {"instance": view.instance.name, "instance_id": view.instance.id,
                   "project": view.instance.project, "port": view.port.tap,
                   "address": address}
            for bucket, _, _, labels, _, template in entries:
                row = template.copy()
                row.update(own)
                if labels is not None:
                    row["rules"] = labels
                buckets[bucket].append(row)
        for row in [*_other_project_groups(cp, view, groups), *_same_net(cp, view, networks)]:
            buckets[_bucket(row)].append(row)
    return [row for bucket in buckets for row in bucket]


def _broad(cp: CloudPolicy, view: PortView, family: Family,
           memo: dict[tuple[Any, ...], tuple[list[Region], list[Opener]]],
           unions: UnionCache | None = None,
           broads: dict[int, tuple[netaddr.IPSet, list[netaddr.IPNetwork]]] | None = None
           ) -> list[dict[str, Any]]:
    """The internet/broad rows of one port, from one sweep of its whole filter.
    Its regions depend only on what its ingress names (port security, same-net
    sets, group chains — sets and chains are the same on every host), so ports
    that share them share one sweep."""
    address = view.address(family)
    if address is None:
        return []
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
    project = view.instance.project
    chains = view.index.chains
    for name in view.policy.ingress_chains:  # cp.chains' order, without its list
        found = memo.get((name, project)) if memo is not None else None
        if found is None:
            chain = chains.get(name)
            if chain is None:
                continue
            found = _other_project_rules(cp, chain, project)
            if memo is not None:
                memo[(name, project)] = found
        if found:
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
    name: str = ""
    family: Family = "ipv4"
    direction: str = "ingress"
    #: the clusters as (protocol, low, high, index in ``clusters``)
    pieces: list[tuple[int, int, int, int]] = field(default_factory=list)
    #: id(same-net openers) -> the clusters' entries when alone (Clusters._alone_windows)
    alone: dict[int, list[tuple[int, int, list[Entry], int]]] = field(default_factory=dict)
    #: each opener's box and set as plain integers (:func:`_opener_key`)
    keys: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    #: the openers of the ICMP protocol of ``family``, in order, and their keys
    icmp: list[Opener] = field(default_factory=list)
    icmp_keys: tuple[tuple[int, int, int, int, int], ...] = ()
    #: the labels of ``icmp``; a number for ``icmp_keys`` (equal numbers: equal
    #: keys), given by :meth:`Clusters.chain`
    icmp_labels: list[Label] = field(default_factory=list)
    icmp_id: int = -1
    #: the indices of ``icmp`` among the openers, and of the ICMP clusters
    icmp_index: list[int] = field(default_factory=list)
    icmp_ks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pieces = [(p, lo, hi, k) for k, (p, lo, hi, _) in enumerate(self.clusters)]
        self.keys = [_opener_key(o) for o in self.openers]
        icmp = ICMP_OF[self.family]
        # a chain's ICMP clusters all go to the port's one ICMP window
        self.icmp_index = [i for i, o in enumerate(self.openers) if o.box.proto_lo == icmp]
        self.icmp = [self.openers[i] for i in self.icmp_index]
        self.icmp_ks = [k for k, (p, _, _, _) in enumerate(self.clusters) if p == icmp]
        self.icmp_keys = tuple(_opener_key(o) for o in self.icmp)
        self.icmp_labels = [o.label for o in self.icmp]


#: One broad row of a port without its port's fields: its (admin, kind) bucket,
#: kind, the other fields (``rules`` included), the labels replacing ``rules``
#: (None: keep them), the region (unlabelled when the labels are given) and the
#: row's template (:func:`_template`).
Entry = tuple[int, str, dict[str, Any], "list[Label] | None", Region, dict[str, Any]]

#: The fields of a row that are the port's own, in the rows' key order around
#: ``kind`` (the placeholders of :func:`_template`).
_OWN_BEFORE = ("instance", "instance_id", "project", "port")


def _template(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A row of ``kind`` with ``fields``, its port's own fields None: the keys in
    the order of every exposure row (the port's, kind, address, ``fields``)."""
    return {**dict.fromkeys(_OWN_BEFORE), "kind": kind, "address": None, **fields}


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
    sweeps the whole filter.

    What is shared: a chain cluster alone on a port gives the same rows on every
    port with the same same-net openers (computed once); a window of several
    clusters (the ICMP one holds a rule of most of the port's groups, so it
    differs from port to port) is swept once per distinct boxes and sets, and
    only its labels are the port's own."""

    cp: CloudPolicy
    unions: UnionCache
    broads: dict[int, tuple[netaddr.IPSet, list[netaddr.IPNetwork]]]
    chains: dict[tuple[str, str], ChainClusters] = field(default_factory=dict)
    same: dict[tuple[Any, ...], list[Opener]] = field(default_factory=dict)
    specials: dict[Family, Special] = field(default_factory=dict)
    # (family, protocol, low, high, (box, set id) of each opener) -> the broad
    # regions with their labels as positions among those openers (or the
    # special's own label), and each region's bucket, kind, row fields and
    # template; ICMP windows also by ("icmp", family, id(same-net openers),
    # the chains' icmp_id): the same lists
    windows: dict[tuple[Any, ...], list[Swept]] = field(default_factory=dict)
    sets: dict[tuple[str | None, str | None, Family], Spans] = field(default_factory=dict)
    alone: dict[tuple[int, int, int], list[Entry]] = field(default_factory=dict)
    # same-net labels by content: equal labels are one object (see same_net)
    same_labels: dict[str, Label] = field(default_factory=dict)
    conflicts: dict[tuple[Family, str], dict[str, frozenset[str]]] = field(
        default_factory=dict)
    # each distinct ChainClusters.icmp_keys -> its number (ChainClusters.icmp_id)
    icmp_ids: dict[tuple[tuple[int, int, int, int, int], ...], int] = field(
        default_factory=dict)

    def broad_entries(self, view: PortView, family: Family) -> list[Entry] | None:
        """The rows of ``view``'s broad regions in ``family`` as :data:`Entry`,
        in the whole sweep's order (None: sweep the whole filter instead)."""
        if not view.policy.port_security:
            return None
        same = self.same_net(view, family)
        chains = self.port_chains(view, family)
        if any(chain.spread for chain in chains) or self._broad_same(same, family):
            return None
        icmp = ICMP_OF[family]
        # only the windows with entries: empty ones add nothing to the list
        windows: list[tuple[int, int, list[Entry], int]] = []
        tangled = []
        for i, (chain, alone) in enumerate(zip(chains, self.apart(view, family, chains),
                                               strict=True)):
            if alone:
                windows += self._alone_windows(family, same, chain)
            else:
                tangled.append(i)
        for group in self.merged_windows(chains, tangled, icmp):
            first = group[0]
            found = self._alone(family, same, chains[first[3]], first[4]) \
                if len(group) == 1 else self._window(family, same, chains, group)
            if found:
                windows.append((first[0], first[1], found, _fulls(found)))
        found = self._icmp_window(family, same, chains)
        if found:
            windows.append((icmp, 0, found, _fulls(found)))
        windows.sort(key=_WINDOW_ORDER)
        entries = [entry for _, _, found, _ in windows for entry in found]
        if sum(window[3] for window in windows) > 1:
            return self._merged(family, entries)
        return entries

    def apart(self, view: PortView, family: Family, chains: Sequence[ChainClusters],
              direction: str = "ingress") -> list[bool]:
        """For each of the port's ``chains``, whether none of its clusters
        overlaps or touches a cluster of another of them (ICMP apart: it is one
        window anyway), from the cloud's :meth:`_conflicts`; with a chain listed
        twice, none is apart."""
        conflicts = self._conflicts(view, family, direction)
        names = [chain.name for chain in chains]
        present = set(names)
        if len(present) != len(names):
            return [False] * len(names)
        return [(found := conflicts.get(name)) is not None and found.isdisjoint(present)
                for name in names]

    def _conflicts(self, view: PortView, family: Family,
                   direction: str = "ingress") -> dict[str, frozenset[str]]:
        """For each chain of the cloud in ``direction``, the other chains with a
        cluster overlapping or touching one of its own (ICMP of ``family``
        apart); a chain with more than :data:`CROWDED` of them is left out (the
        caller then merges the port's clusters one by one). Once per family
        and direction."""
        found = self.conflicts.get((family, direction))
        if found is not None:
            return found
        icmp = ICMP_OF[family]
        pieces: list[tuple[int, int, int, str]] = []
        indexes = {id(v.index): v for v in self.cp.ports.values()}
        for some in indexes.values():
            for chain in some.index.hf.chains:
                if chain.direction == direction and (chain.name, family) not in self.chains:
                    self.chain(some, chain, family)
        for clustered in self.chains.values():
            if clustered.family == family and clustered.direction == direction:
                pieces += [(p, lo, hi, clustered.name) for p, lo, hi, _ in clustered.pieces
                           if p != icmp]
        pieces.sort()
        near: dict[str, set[str]] = {c.name: set() for c in self.chains.values()
                                     if c.family == family and c.direction == direction}
        crowded: set[str] = set()
        active: list[tuple[int, int, str]] = []  # (protocol, high, chain) still open
        for protocol, low, high, name in pieces:
            active = [a for a in active if a[0] == protocol and a[1] + 1 >= low]
            if len(active) > CROWDED:
                crowded.update(a[2] for a in active)
                crowded.add(name)
            for _, _, other in active:
                if other != name:
                    near[name].add(other)
                    near[other].add(name)
            active.append((protocol, high, name))
        crowded.update(name for name, others in near.items() if len(others) > CROWDED)
        found = self.conflicts[(family, direction)] = {name: frozenset(others)
                                          for name, others in near.items()
                                          if name not in crowded}
        return found

    def _alone_windows(self, family: Family, same: list[Opener], chain: ChainClusters
                       ) -> list[tuple[int, int, list[Entry], int]]:
        """(protocol, low, entries, how many of them are whole-selector regions)
        of each cluster of ``chain`` but the ICMP ones, each alone on the port,
        those with entries only (once per chain and same-net openers)."""
        found = chain.alone.get(id(same))
        if found is None:
            found = chain.alone[id(same)] = [
                (p, lo, entries, _fulls(entries))
                for p, lo, _, k in chain.pieces if p != ICMP_OF[family]
                if (entries := self._alone(family, same, chain, k))]
        return found

    @staticmethod
    def merged_windows(chains: Sequence[ChainClusters], which: Sequence[int], icmp: int
                 ) -> list[list[tuple[int, int, int, int, int]]]:
        """The clusters of the chains at positions ``which`` (protocol, low, high,
        chain position, index in the chain's clusters), ICMP apart, merged while
        they overlap or touch within a protocol (merged_clusters' merge), in
        (protocol, low) order."""
        pieces = [(p, lo, hi, i, k) for i in which for p, lo, hi, k in chains[i].pieces
                  if p != icmp]
        pieces.sort()
        groups: list[list[tuple[int, int, int, int, int]]] = []
        top = (-1, -2)  # the protocol and high end of the last group
        for piece in pieces:
            if piece[0] == top[0] and piece[1] <= top[1] + 1:
                groups[-1].append(piece)
                if piece[2] > top[1]:
                    top = (piece[0], piece[2])
            else:
                groups.append([piece])
                top = (piece[0], piece[2])
        return groups

    def _merged(self, family: Family, entries: list[Entry]) -> list[Entry]:
        """``entries`` with whole-protocol regions of neighbouring protocols merged
        as :func:`sweep` merges them (their fields computed again)."""
        regions = merge_protocols([
            Region(family, region.addresses, region.box,
                   region.labels if labels is None else labels)
            for _, _, _, labels, region, _ in entries])
        found: list[Entry] = []
        for region in regions:
            fields = self._fields(family, region)
            if fields is not None:
                found.append((*fields, None, region, _template(fields[1], fields[2])))
        return found

    def _broad_same(self, same: list[Opener], family: Family) -> bool:
        """Whether the same-net openers' union has a broad prefix."""
        return bool(same) and bool(_broad_cidrs(
            self.unions.union([o.addresses for o in same]), family, self.broads))

    def _alone(self, family: Family, same: list[Opener], chain: ChainClusters,
               k: int) -> list[Entry]:
        """The entries of ``chain``'s cluster ``k`` alone on a port (the lists are
        cached objects, alive for the run: their ids are theirs)."""
        key = (id(same), id(chain), k)
        found = self.alone.get(key)
        if found is None:
            protocol, low, high, members = chain.clusters[k]
            sub = [*same, *(chain.openers[m] for m in members)]
            keys = (*map(_opener_key, same), *(chain.keys[m] for m in members))
            found = self.alone[key] = [
                (bucket, kind, {**fields, "rules": labels}, None,
                 Region(family, region.addresses, region.box, labels),
                 _template(kind, {**fields, "rules": labels}))
                for region, labels, bucket, kind, fields, _
                in self._labelled(family, sub, keys, protocol, low, high)]
        return found

    def _window(self, family: Family, same: list[Opener], chains: Sequence[ChainClusters],
                group: list[tuple[int, int, int, int, int]]) -> list[Entry]:
        """The entries of one window of several clusters, labelled with this
        port's rules."""
        members = sorted((i, m) for _, _, _, i, k in group for m in chains[i].clusters[k][3])
        sub = [*same, *(chains[i].openers[m] for i, m in members)]
        keys = (*map(_opener_key, same), *(chains[i].keys[m] for i, m in members))
        return [(bucket, kind, fields, labels, region, template)
                for region, labels, bucket, kind, fields, template
                in self._labelled(family, sub, keys, group[0][0], group[0][1],
                                  max(piece[2] for piece in group))]

    def _icmp_window(self, family: Family, same: list[Opener],
                     chains: Sequence[ChainClusters]) -> list[Entry]:
        """The entries of the port's ICMP window: every ICMP rule of its chains
        (in the port's order; a chain's in its own), the same-net openers first,
        over every type and code. Looked up by the same-net openers' list (one
        object per content: :meth:`same_net`) and each chain's
        :attr:`~ChainClusters.icmp_id` — what says the window's boxes and sets
        in order, hashed without building each opener's key on every port."""
        icmp = ICMP_OF[family]
        key = ("icmp", family, id(same), tuple([chain.icmp_id for chain in chains]))
        found = self.windows.get(key)
        if found is None:
            sub = [*same, *(o for chain in chains for o in chain.icmp)]
            keys = (*map(_opener_key, same), *(k for chain in chains for k in chain.icmp_keys))
            found = self.windows[key] = self._swept(family, sub, keys, icmp, 0, SEL_MAX)
        if not found:
            return []
        own = [o.label for o in same]
        for chain in chains:
            own += chain.icmp_labels
        return [(bucket, kind, fields, labels, region, template)
                for region, labels, bucket, kind, fields, template
                in _with_labels(found, own)]

    def _labelled(self, family: Family, sub: Sequence[Opener], keys: tuple[Any, ...],
                  protocol: int, low: int, high: int
                  ) -> list[tuple[Region, list[Label], int, str, dict[str, Any],
                                  dict[str, Any]]]:
        """The broad regions of one window with ``sub``'s labels, and their rows'
        bucket, kind, fields and template: swept once per distinct window and
        ``keys`` (what says ``sub``'s boxes and sets, in order: the sweep depends
        on nothing else)."""
        return _with_labels(self._swept(family, sub, keys, protocol, low, high),
                            [o.label for o in sub])

    def _swept(self, family: Family, sub: Sequence[Opener], keys: tuple[Any, ...],
               protocol: int, low: int, high: int) -> list[Swept]:
        """The broad regions of one window labelled by positions in ``sub``, with
        their rows' bucket, kind, fields and template (once per ``keys``)."""
        key = (family, protocol, low, high, keys)
        found = self.windows.get(key)
        if found is None:
            found = self.windows[key] = [
                (region, positions, *fields, _template(fields[1], fields[2]))
                for region, positions in self._sweep(family, sub, protocol, low, high)
                for fields in (self._broad_fields(family, region),)]
        return found

    def _broad_fields(self, family: Family, region: Region) -> tuple[int, str, dict[str, Any]]:
        """:meth:`_fields` of a region known to be broad (``_sweep`` keeps only those)."""
        fields = self._fields(family, region)
        assert fields is not None
        return fields

    def _fields(self, family: Family, region: Region
                ) -> tuple[int, str, dict[str, Any]] | None:
        """The bucket, kind and port-independent row fields of a broad region
        (``rules``: its labels; None when it is not broad)."""
        broad = _broad_cidrs(region.addresses, family, self.broads)
        if not broad:
            return None
        kind = "internet" if any(c.prefixlen == 0 for c in broad) else "broad"
        fields = {**region_shape(family, region), "rules": region.labels,
                  "sources": [str(c) for c in broad], "admin_ports": admin_ports(region),
                  "detail": f"open to {', '.join(str(c) for c in broad)}"}
        return (0 if fields["admin_ports"] else len(KINDS)) + KINDS.index(kind), kind, fields

    def _sweep(self, family: Family, sub: Sequence[Opener], protocol: int, low: int,
               high: int) -> list[tuple[Region, list[int | Label]]]:
        """The broad regions of one window, labelled by positions in ``sub`` (the
        sets of ``sub`` are kept alive by the caches: their ids are theirs)."""
        special = self._special(family) if protocol == ICMP_OF[family] else None
        if special is None and not _broad_cidrs(self.unions.union([o.addresses for o in sub]),
                                                family, self.broads):
            # a cell's addresses are a subset of the openers' union, and a subset
            # of a set holding no aligned block of a broad prefix holds none
            # either: no broad region (without a special, nothing else opens)
            return []
        marked = [Opener(o.addresses, o.box, {"#": i}) for i, o in enumerate(sub)]
        found = []
        # distinct: the marks are distinct objects of distinct content, and the
        # special's labels are module constants (reach.ND_LABEL, UNFILTERED_LABEL)
        for region in sweep_window(family, marked, protocol, low, high, special, self.unions,
                                   distinct=True):
            if region.addresses and _broad_cidrs(region.addresses, family, self.broads):
                found.append((region, [lab["#"] if len(lab) == 1 and "#" in lab else lab
                                       for lab in region.labels]))
        return found

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
            label = {"reason": "same-net", "network": view.network.name,
                     "network_id": view.network.id}
            # one object per content: a label's identity then says its content
            label = self.same_labels.setdefault(label_key(label), label)
            found = self.same[key] = [Opener(members, ALL, label)] if members else []
        return found

    def port_chains(self, view: PortView, family: Family,
                    direction: str = "ingress") -> list[ChainClusters]:
        """:meth:`chain` of each of ``view``'s chains in ``direction``
        (:meth:`CloudPolicy.chains`: its names found on its host, in order)."""
        names = view.policy.ingress_chains if direction == "ingress" else \
            view.policy.egress_chains
        known, found = view.index.chains, []
        for name in names:
            chained = self.chains.get((name, family))
            if chained is None or name not in known:
                chain = known.get(name)
                if chain is None:
                    continue
                chained = self.chain(view, chain, family)
            found.append(chained)
        return found

    def chain(self, view: PortView, chain: GroupChain, family: Family) -> ChainClusters:
        """A chain's openers and clusters, once per chain (the same on every host)."""
        key = (chain.name, family)
        found = self.chains.get(key)
        if found is None:
            found = self.chains[key] = _chain_of(self.cp, view, chain, family, self.sets)
            found.icmp_id = self.icmp_ids.setdefault(found.icmp_keys, len(self.icmp_ids))
        return found


_VERSION: dict[Family, int] = {"ipv4": 4, "ipv6": 6}

#: A window's broad region labelled by positions among its openers (or a
#: special's own label), and its row's bucket, kind, fields and template.
Swept = tuple[Region, "list[int | Label]", int, str, dict[str, Any], dict[str, Any]]


def _with_labels(found: list[Swept], labels: list[Label]
                 ) -> list[tuple[Region, list[Label], int, str, dict[str, Any],
                                 dict[str, Any]]]:
    """``found`` with each region's positions turned into ``labels``' (the
    window's openers' labels, in order), repeats dropped.

    Labels are equal only when they are one object: the rules' references
    (CloudPolicy.rule_ref: one per group, rule and direction, which their content
    names), the same-net labels (one per content: Clusters.same_net) and the
    special's constants — so repeats are dropped by identity. A region's
    positions are distinct (the sweep's merges drop repeated marks), so when
    ``labels`` are distinct objects (checked once for the window, not per
    region) the mapped list has no repeats."""
    if len(set(map(id, labels))) == len(labels):
        return [(region, [labels[p] if isinstance(p, int) else p for p in positions],
                 bucket, kind, fields, template)
                for region, positions, bucket, kind, fields, template in found]
    return [(region, list({id(label): label for label in (
                labels[p] if isinstance(p, int) else p for p in positions)}.values()),
             bucket, kind, fields, template)
            for region, positions, bucket, kind, fields, template in found]


def _fulls(entries: list[Entry]) -> int:
    """How many of ``entries`` are whole-selector regions."""
    return sum(1 for entry in entries if _full(entry[4]))


#: A chain with more neighbours than this (clusters of other chains overlapping or
#: touching its own) makes the ports that have it merge their clusters one by one.
CROWDED = 64
_WINDOW_ORDER = itemgetter(0, 1)


def _opener_key(opener: Opener) -> tuple[int, int, int, int, int]:
    """An opener's box and set (by identity) as plain integers: hashed fast (a
    :class:`Box`'s generated hash is a Python call). The sets stay alive in the
    caches of the run, so their ids are theirs."""
    box = opener.box
    return box.proto_lo, box.proto_hi, box.sel_lo, box.sel_hi, id(opener.addresses)


def _full(region: Region) -> bool:
    """Whether ``region`` holds every selector of its protocols (only such
    regions of neighbouring protocols merge)."""
    return region.box.sel_lo == 0 and region.box.sel_hi == SEL_MAX


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
    return ChainClusters(openers, merged_clusters(pieces), spread, chain.name, family,
                         chain.direction)


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
