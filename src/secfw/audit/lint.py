"""``secfw audit lint``: findings about the rules themselves.

Each finding has a ``kind``, the ``group`` (name), ``group_id``, ``rule_id``
(None for a whole group) and a ``detail``:

* ``shadowed`` — a rule that adds nothing on any port that has it: the other
  rules of the port's groups in its direction (and same-net, for ingress) already
  allow everything it allows (the allowed space is computed with and without it,
  :func:`secfw.audit.space.sweep`); the covering rules are named;
* ``duplicate`` — a rule with the same meaning as a rule of another group, both
  groups used by one instance;
* ``unused_group`` — a group no instance uses (``default`` groups without rules
  are left out);
* ``empty_source_group`` — a source-group rule whose group admits nobody today
  (no member has an address of the rule's family);
* ``never_matches`` — a rule no flow can use: ICMP and ICMPv6 types that cannot
  open a connection (conntrack: invalid), IPv6 rules of groups whose ports have
  no IPv6 address;
* ``broad_admin_port`` — an ingress rule opening an administration or database
  port to the internet or a prefix at most /8 (/32 in IPv6);
* ``self_reference`` — a note: the group's members may reach each other.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import netaddr

from secfw.audit.exposure import ADMIN_PORTS, BROAD_PREFIX, ChainClusters, Clusters
from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import ingress_openers
from secfw.audit.space import (
    ICMP_OF,
    PORT_PROTOCOL_NUMBERS,
    Box,
    Opener,
    UnionCache,
    adds_nothing,
    label_key,
    rule_box,
    sweep,
)
from secfw.compiler.build import ir_rule, port_addresses
from secfw.compiler.explain import describe_rule
from secfw.compiler.ir import Family
from secfw.constants import ICMP_NEW_TYPES, ICMPV6_NEW_TYPES, ICMPV6_UNTRACKED
from secfw.gcpause import collector_paused
from secfw.model import DEFAULT_GROUP, Rule, SecurityGroup, protocol_number

KINDS = ("shadowed", "duplicate", "unused_group", "empty_source_group", "never_matches",
         "broad_admin_port", "self_reference")
_KIND_RANK = {kind: rank for rank, kind in enumerate(KINDS)}


class _Shared:
    """What the shadow checks of one lint run share: each port filter's openers
    (built once per distinct filter, not once per rule of it) and the unions of
    address sets (:class:`~secfw.audit.space.UnionCache`); each port filter cut
    into windows (:class:`_Window`), each rule's verdict per distinct window
    content."""

    def __init__(self, cp: CloudPolicy) -> None:
        self.openers: dict[tuple[Any, ...], list[Opener]] = {}
        self.unions = UnionCache()
        self.clusters = Clusters(cp, self.unions, {})
        self._label_keys: dict[int, tuple[dict[str, Any], str]] = {}
        # (id, id) -> (the two sets, kept alive so the ids stay theirs; overlap)
        self._overlaps: dict[tuple[int, int], tuple[Any, Any, bool]] = {}
        # (swept openers, the rule's openers) as (box, set id) -> does it add nothing
        self.adds_nothing: dict[tuple[Any, ...], bool] = {}
        # (direction, family) -> port id -> its plan (None: judged whole)
        self.plans: dict[tuple[str, Family], dict[str, _PortPlan | None]] = {}
        self.chain_groups: dict[str, str] = {}  # chain name -> its group's id
        self.contents: dict[tuple[Any, ...], int] = {}
        self.idents: dict[tuple[Any, ...], int] = {}
        self.alone: dict[tuple[Any, ...], _Window] = {}
        self.alone_lists: dict[tuple[Any, ...], dict[int, _Window]] = {}
        self.views_of: dict[str, list[PortView]] | None = None  # group id -> ports
        # (source group id, family) -> whether a member has an address of it
        self.members_have: dict[tuple[str, Family], bool] = {}
        self.by_cluster: dict[tuple[str, Family, str], Any] = {}
        self.group_shadows: dict[tuple[str, str, Family],
                                 dict[str, list[dict[str, Any]] | None]] = {}
        self.judged: dict[tuple[Any, ...], tuple[bool, list[int]]] = {}
        self.boxes: dict[str, tuple[Box, tuple[int, int, int, int]]] = {}

    def group_views(self, cp: CloudPolicy, group_id: str) -> list[PortView]:
        """The protected ports of the group's members, in the members' order (by
        instance id), each instance's by port id; made for every group at once
        (one pass over the instances in id order: a group's list grows in that
        order)."""
        if self.views_of is None:
            by_instance: dict[str, list[PortView]] = {}
            for port_id in sorted(cp.ports):
                view = cp.ports[port_id]
                if view.policy.port_security:
                    by_instance.setdefault(view.port.instance_id, []).append(view)
            self.views_of = {}
            instances = cp.state.instances
            for instance_id in sorted(by_instance):
                views = by_instance[instance_id]
                for member_of in set(instances[instance_id].security_groups):
                    self.views_of.setdefault(member_of, []).extend(views)
        return self.views_of.get(group_id, _NO_VIEWS)

    def label_key(self, label: dict[str, Any]) -> str:
        """:func:`~secfw.audit.space.label_key`, once per label object (kept alive)."""
        found = self._label_keys.get(id(label))
        if found is None:
            found = self._label_keys[id(label)] = (label, label_key(label))
        return found[1]

    def overlap(self, a: netaddr.IPSet, b: netaddr.IPSet) -> bool:
        """Whether ``a`` and ``b`` share an address (once per pair of sets)."""
        key = (id(a), id(b))
        found = self._overlaps.get(key)
        if found is None:
            found = self._overlaps[key] = (a, b, bool(a & b))
        return found[2]


def lint(cp: CloudPolicy, groups: Iterable[SecurityGroup],
         shared: bool = True) -> list[dict[str, Any]]:
    """Every finding about ``groups``, ordered by kind (:data:`KINDS`), group, rule
    (its description, then its id).

    ``shared`` False decides each shadow with two sweeps of the port's whole
    filter (the reference the tests compare with); True, the default, cuts each
    port filter into windows (:class:`_PortPlan`), judges a rule once per
    distinct window content with only the openers that meet its box (a rule adds
    a point only inside its box, and openers elsewhere do not change what is
    allowed there), cell by cell (:func:`~secfw.audit.space.adds_nothing`): the
    same answer."""
    if not shared:
        return _lint(cp, groups, None)
    # ~10^6 small acyclic objects (windows, keys, label lists) beside the
    # cloud's: the collections their allocation triggers walk every live object
    # (secfw.gcpause; ~30 % of the run at 10k ports)
    with collector_paused():
        return _lint(cp, groups, _Shared(cp))


def _lint(cp: CloudPolicy, groups: Iterable[SecurityGroup],
          run: _Shared | None) -> list[dict[str, Any]]:
    """:func:`lint`, shared with ``run`` unless None."""
    findings: list[dict[str, Any]] = []
    for group in groups:
        rules = sorted(cp.state.rules_by_group.get(group.id, {}).values(), key=lambda r: r.id)
        used = bool(cp.state.instances_by_group.get(group.id))
        if not used and (group.name != DEFAULT_GROUP or rules):
            findings.append(_finding(cp, "unused_group", group, None,
                                     f"no instance uses it ({len(rules)} rule(s))"))
        for rule in rules:
            findings += _rule_findings(cp, group, rule, used, run)
    findings += _duplicates(cp, {g.id for g in groups}, run)
    return sorted(findings, key=lambda f: (_KIND_RANK[f["kind"]], f["group"], f["group_id"],
                                           f["rule"] or "", f["rule_id"] or ""))


def _finding(cp: CloudPolicy, kind: str, group: SecurityGroup, rule: Rule | None,
             detail: str, described: dict[str, str] | None = None,
             **extra: Any) -> dict[str, Any]:
    """A finding; ``described``: the rules' descriptions already made, by id
    (a rule of a meaning many groups share is in thousands of duplicates)."""
    text = None
    if rule is not None:
        text = described.get(rule.id) if described is not None else None
        if text is None:
            text = describe_rule(cp.state, rule)
            if described is not None:
                described[rule.id] = text
    return {"kind": kind, "group": group.name, "group_id": group.id, "project": group.project,
            "rule_id": rule.id if rule else None, "rule": text, "detail": detail, **extra}


def _rule_findings(cp: CloudPolicy, group: SecurityGroup, rule: Rule,
                   used: bool, run: _Shared | None = None) -> list[dict[str, Any]]:
    found = []
    if rule.remote_group_id == group.id:
        found.append(_finding(cp, "self_reference", group, rule,
                              "the group's members may reach each other this way"))
    if rule.remote_group_id is not None and not _members_have(cp, rule, run):
        found.append(_finding(cp, "empty_source_group", group, rule,
                              f"group {cp.group_name(rule.remote_group_id)} has no member "
                              f"with an {rule.ethertype} address: it admits nobody"))
    never = _never_matches(cp, group, rule)
    if never:
        found.append(_finding(cp, "never_matches", group, rule, never))
    broad = _broad_admin(rule)
    if broad:
        found.append(_finding(cp, "broad_admin_port", group, rule, broad))
    if used and not never:
        shadow = _shadowed(cp, group, rule, run)
        if shadow is not None:
            found.append(_finding(cp, "shadowed", group, rule,
                                  "every flow it allows is allowed without it on every port "
                                  "that has it", covering=shadow))
    return found


def _members_have(cp: CloudPolicy, rule: Rule, run: _Shared | None = None) -> bool:
    """Whether a member of the rule's source group has an address of its
    family (once per group and family with ``run``)."""
    family = _family(rule)
    assert rule.remote_group_id is not None
    key = (rule.remote_group_id, family)
    found = run.members_have.get(key) if run is not None else None
    if found is None:
        found = any(port_addresses(port, family)
                    for member in cp.state.group_members(rule.remote_group_id)
                    for port in cp.state.ports_of(member.id))
        if run is not None:
            run.members_have[key] = found
    return found


def _never_matches(cp: CloudPolicy, group: SecurityGroup, rule: Rule) -> str | None:
    family = _family(rule)
    proto = protocol_number(rule.protocol)
    if proto == ICMP_OF[family] and rule.port_min is not None:
        if family == "ipv4" and rule.port_min not in ICMP_NEW_TYPES:
            return f"ICMP type {rule.port_min} cannot open a connection (conntrack: invalid)"
        if family == "ipv6" and rule.port_min not in ICMPV6_NEW_TYPES | ICMPV6_UNTRACKED:
            return f"ICMPv6 type {rule.port_min} cannot open a connection (conntrack: invalid)"
    if family != "ipv6":
        return None
    members = cp.state.group_members(group.id)
    if members and not any(p.ip6 for m in members for p in cp.state.ports_of(m.id)):
        return "no port of the group's instances has an IPv6 address"
    return None


def _broad_admin(rule: Rule) -> str | None:
    if rule.direction != "ingress" or rule.remote_group_id is not None:
        return None
    proto = protocol_number(rule.protocol)
    if proto is not None and proto not in PORT_PROTOCOL_NUMBERS:
        return None
    family = _family(rule)
    prefix = _prefix_length(rule.remote_cidr) if rule.remote_cidr else 0
    if prefix > BROAD_PREFIX[family]:
        return None
    low = rule.port_min if rule.port_min is not None else 0
    high = rule.port_max if rule.port_max is not None else (65535 if rule.port_min is None
                                                            else low)
    opened = [f"{p} ({ADMIN_PORTS[p]})" for p in sorted(ADMIN_PORTS) if low <= p <= high]
    if not opened:
        return None
    return f"opens {capped(opened)} to {rule.remote_cidr or 'anywhere'}"


@lru_cache(maxsize=4096)
def _prefix_length(cidr: str) -> int:
    """The prefix length of ``cidr`` (a cloud's rules name few distinct CIDRs)."""
    return ipaddress.ip_network(cidr).prefixlen


def capped(items: list[str], limit: int = 4) -> str:
    """The first ``limit`` items and how many more (a table cell stays readable)."""
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")


def _shadowed(cp: CloudPolicy, group: SecurityGroup, rule: Rule,
              run: _Shared | None = None) -> list[dict[str, Any]] | None:
    """The rules covering ``rule`` on every protected port that has it, or None."""
    if run is not None:
        return _group_shadows(cp, group, rule.direction, _family(rule), run).get(rule.id)
    views = [cp.ports[p.id] for m in cp.state.group_members(group.id)
             for p in cp.state.ports_of(m.id) if p.id in cp.ports]
    views = [v for v in views if v.policy.port_security]
    if not views:
        return None
    covering: list[dict[str, Any]] = []
    seen: set[tuple[tuple[str, ...], ...]] = set()
    for view in views:
        key = (view.policy.same_net_sets, view.policy.ingress_chains, view.policy.egress_chains)
        if key in seen:
            continue
        seen.add(key)
        found = _covered_on(cp, view, rule, run)
        if found is None:
            return None
        covering += [c for c in found if c not in covering]
    return covering


def _openers(cp: CloudPolicy, view: PortView, direction: str, fam: Family,
             run: _Shared | None) -> list[Opener]:
    """``view``'s openers in ``direction`` (once per distinct filter with ``run``)."""
    key = (direction, fam, view.policy.same_net_sets,
           view.policy.ingress_chains if direction == "ingress" else view.policy.egress_chains)
    found = run.openers.get(key) if run is not None else None
    if found is None:
        if direction == "ingress":
            found = ingress_openers(cp, view, fam)
        else:
            found = [Opener(cp.remote_set(view, r), rule_box(r), cp.rule_ref(chain, r))
                     for chain in cp.chains(view, "egress") for r in chain.rules
                     if r.family == fam]
        if run is not None:
            run.openers[key] = found
    return found


def _covered_on(cp: CloudPolicy, view: PortView, rule: Rule,
                run: _Shared | None = None) -> list[dict[str, Any]] | None:
    return _covered_by(_openers(cp, view, rule.direction, _family(rule), run), rule, run)


def _covered_by(openers: list[Opener], rule: Rule,
                run: _Shared | None = None) -> list[dict[str, Any]] | None:
    """The labels covering ``rule`` among ``openers`` (a port's, or all those of
    a port that may meet the rule's box), or None when it adds something."""
    fam = _family(rule)
    mine = [o for o in openers if o.label.get("rule_id") == rule.id]
    others = [o for o in openers if o.label.get("rule_id") != rule.id]
    if not mine:
        return None
    swept = others if run is None else \
        [o for o in others if any(o.box.meets(m.box) for m in mine)]
    unions = run.unions if run is not None else None
    # the verdict depends only on the openers' boxes and sets, not on their rules
    # (nor their order): ports whose rules differ but open the same share it; the
    # sets stay alive in run.openers, so their ids are theirs for the run
    key = (tuple(sorted(_box_key(o) for o in swept)), tuple(sorted(_box_key(m) for m in mine)))
    same = run.adds_nothing.get(key) if run is not None else None
    if same is None and run is not None:
        same = run.adds_nothing[key] = adds_nothing(mine, swept, unions)
    elif same is None:  # the reference: two sweeps compared
        before = [(r.box, r.addresses) for r in sweep(fam, swept, cache=unions)]
        same = before == [(r.box, r.addresses)
                          for r in sweep(fam, swept + mine, cache=unions)]
    if not same:
        return None
    box, addresses = rule_box(ir_rule(rule)), mine[0].addresses
    overlap = run.overlap if run is not None else lambda a, b: bool(a & b)
    return [o.label for o in others if o.box.meets(box) and overlap(o.addresses, addresses)]


def _box_key(opener: Opener) -> tuple[int, int, int, int, int]:
    """An opener's box and set (by identity) as plain integers: sorted and hashed
    fast (a :class:`Box`'s generated comparisons are Python calls)."""
    box = opener.box
    return box.proto_lo, box.proto_hi, box.sel_lo, box.sel_hi, id(opener.addresses)


def _family(rule: Rule) -> Family:
    return "ipv4" if rule.ethertype == "IPv4" else "ipv6"


def _duplicates(cp: CloudPolicy, scope: set[str],
                run: _Shared | None = None) -> list[dict[str, Any]]:
    """Rules of two groups used by one instance with the same meaning (reported on
    the rule of the group that sorts later). With ``run``, each group's rules are
    sorted and their meanings computed once (:func:`_shared_meanings`)."""
    if run is not None:
        return _duplicates_shared(cp, scope)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for instance in cp.state.instances.values():
        meaning: dict[tuple[Any, ...], Rule] = {}
        for group_id in instance.security_groups:
            rules = [(r, r.match_key()[1:]) for r in sorted(
                cp.state.rules_by_group.get(group_id, {}).values(), key=lambda r: r.id)]
            for rule, key in rules:
                first = meaning.setdefault(key, rule)
                if first.group_id == rule.group_id or rule.group_id not in scope:
                    continue
                pair = (first.id, rule.id)
                if pair not in found:
                    found[pair] = _duplicate(cp, first, rule, instance.name)
    return list(found.values())


def _duplicate(cp: CloudPolicy, first: Rule, rule: Rule, instance: str,
               described: dict[str, str] | None = None) -> dict[str, Any]:
    other = cp.state.groups[first.group_id]
    return _finding(cp, "duplicate", cp.state.groups[rule.group_id], rule,
                    f"same meaning as rule {first.id} of group {other.name} "
                    f"(both used by instance {instance})", described)


#: A rule in :func:`_duplicates_shared`: its number, its meaning's number, its
#: group's id, whether that group is in scope, the rule.
_Meant = tuple[int, int, str, bool, Rule]


def _shared_meanings(cp: CloudPolicy, scope: set[str]) -> dict[str, list[_Meant]]:
    """Each group's rules (by id) whose meaning (``match_key`` but the group)
    another group's rule has too — only those can make a duplicate — as
    :data:`_Meant`, meanings and rules numbered (an int hashes at once; a
    meaning's tuple is hashed anew on every instance)."""
    meanings = {group_id: [(r, r.match_key()[1:]) for r in sorted(
        rules.values(), key=lambda r: r.id)]
        for group_id, rules in cp.state.rules_by_group.items()}
    groups_of: dict[tuple[Any, ...], set[str]] = {}
    for group_id, pairs in meanings.items():
        for _, key in pairs:
            groups_of.setdefault(key, set()).add(group_id)
    numbers: dict[tuple[Any, ...], int] = {}
    ordered: dict[str, list[_Meant]] = {}
    count = 0
    for group_id, pairs in meanings.items():
        ordered[group_id] = []
        for rule, key in pairs:
            if len(groups_of[key]) > 1:
                ordered[group_id].append((count, numbers.setdefault(key, len(numbers)),
                                          rule.group_id, rule.group_id in scope, rule))
                count += 1
    return ordered


def _duplicates_shared(cp: CloudPolicy, scope: set[str]) -> list[dict[str, Any]]:
    """:func:`_duplicates` on the numbered meanings of :func:`_shared_meanings`:
    the same pairs, found on the same instances first."""
    ordered = _shared_meanings(cp, scope)
    found: dict[int, dict[str, Any]] = {}
    described: dict[str, str] = {}
    size = 1 + sum(len(rules) for rules in ordered.values())
    for instance in cp.state.instances.values():
        meaning: dict[int, _Meant] = {}
        for group_id in instance.security_groups:
            for entry in ordered.get(group_id, ()):
                first = meaning.setdefault(entry[1], entry)
                if first[2] == entry[2] or not entry[3]:
                    continue
                pair = first[0] * size + entry[0]
                if pair not in found:
                    found[pair] = _duplicate(cp, first[4], entry[4], instance.name,
                                             described)
    return list(found.values())


# ---------------------------------------------------------------------- by windows


@dataclass
class _Window:
    """One merged cluster of a port filter (direction, family): ``openers`` in the
    filter's order (the all-protocol ones first, then the clusters' by chain
    position and index), ``content`` an id for their boxes and sets in that order
    (equal ids: equal content), ``ident`` an id for the openers themselves (equal
    ids: the same openers, so the same judgement and labels), ``at[chain name]``
    the position of the chain's first opener and its openers' indices in the
    chain, in the window's order; ``parts`` (ICMP windows only, else None):
    its parts — the all-protocol openers' list (by id) and each chain (by name),
    whose openers are the same objects in every window naming them — with the
    positions (from, to: excluded) of their openers, and ``segs`` their keys."""

    openers: list[Opener]
    content: int
    ident: int
    at: dict[str, tuple[int, list[int]]]
    #: the openers' labels, in order
    labels: list[dict[str, Any]] = field(default_factory=list)
    parts: dict[Any, tuple[int, int]] | None = None
    segs: frozenset[Any] | None = None

    def __post_init__(self) -> None:
        if not self.labels:
            self.labels = [opener.label for opener in self.openers]
        if self.parts is not None:
            self.segs = frozenset(self.parts)


class _PortPlan:
    """One port filter's windows (direction, family): its chains' clusters
    (``chains``, their positions by group id in ``at``), the ICMP window (every
    ICMP cluster's, made at once: it is the one most judgements need; None
    when no chain has one) and, made when first asked for (:meth:`windows`),
    the windows of the other clusters. A group's rules mostly die on its first
    ports, so on most of a port's groups only the ICMP window is looked at."""

    __slots__ = ("_apart", "_direction", "_others", "_view", "alls", "at", "chains", "icmp")

    def __init__(self, view: PortView, direction: str, alls: list[Opener],
                 chains: list[ChainClusters], run: _Shared) -> None:
        self.alls, self.chains = alls, chains
        groups = run.chain_groups
        if any(chain.name not in groups for chain in chains):
            index = view.index.chains
            groups.update((chain.name, index[chain.name].group_id) for chain in chains)
        self.at = {groups[chain.name]: i for i, chain in enumerate(chains)}
        self.icmp = _icmp_window(alls, chains, run)
        self._view, self._direction = view, direction
        self._apart: list[bool] | None = None
        self._others: list[dict[int, _Window] | None] = [None] * len(chains)

    def apart(self, i: int, run: _Shared) -> bool:
        """Whether chain ``i``'s clusters are apart from the port's other
        chains' (exposure's Clusters.apart; once per port)."""
        if self._apart is None:
            self._apart = run.clusters.apart(self._view, self.chains[0].family, self.chains,
                                              self._direction)
        return self._apart[i]

    def windows(self, i: int, run: _Shared) -> dict[int, _Window]:
        """The windows of chain ``i``'s clusters but the ICMP ones, by cluster
        index: a chain apart from the others' clusters has each cluster alone
        (windows shared by every port where they are, with the same
        all-protocol openers: looked up, the port's other chains left alone),
        the others' are merged (exposure's Clusters), made at once for the
        port's chains that are not apart."""
        found = self._others[i]
        if found is not None:
            return found
        chains, alls = self.chains, self.alls
        if self.apart(i, run):
            found = self._others[i] = _alone_windows(alls, chains, i, run)
            return found
        tangled = [j for j, alone in enumerate(self._apart or ()) if not alone]
        for j in tangled:
            self._others[j] = {}
        for group in run.clusters.merged_windows(chains, tangled, ICMP_OF[chains[0].family]):
            window = _group_window(alls, chains, group, run)
            for _, _, _, j, k in group:
                self._others[j][k] = window  # type: ignore[index]
        return self._others[i]  # type: ignore[return-value]


def _port_plan(cp: CloudPolicy, view: PortView, direction: str, fam: Family,
               run: _Shared) -> _PortPlan | None:
    """``view``'s :class:`_PortPlan` in ``direction`` and ``fam`` (None when a
    rule of any protocol spreads over every cluster, or a chain is listed
    twice: the caller judges the whole filter), once per port."""
    plans = run.plans.setdefault((direction, fam), {})
    if view.port.id in plans:
        return plans[view.port.id]
    alls = run.clusters.same_net(view, fam) if direction == "ingress" else _NONE
    chains = run.clusters.port_chains(view, fam, direction)
    found: _PortPlan | None = None
    names = [chain.name for chain in chains]
    if chains and not any(chain.spread for chain in chains) and \
            len(set(names)) == len(names):
        # every ICMP rule is in one window (more openers than the overlapping
        # ones: the judgement takes only those meeting the rule's box, so it
        # is the same)
        found = _PortPlan(view, direction, alls, chains, run)
    plans[view.port.id] = found
    return found


_NONE: list[Opener] = []
_NO_VIEWS: list[PortView] = []


def _icmp_window(alls: list[Opener], chains: list[ChainClusters],
                 run: _Shared) -> _Window | None:
    """The window of every ICMP cluster of ``chains`` (None: they have none):
    ``alls``, then each chain's ICMP openers in its order, the chains in the
    port's — the openers :func:`_group_window` gives, from the chains' own
    lists (a port's ICMP window holds a rule of most of its groups: it is
    built on every port). Its content is numbered by ``alls`` (one list per
    content: Clusters.same_net) and the chains' ``icmp_id`` (equal numbers:
    equal ``icmp_keys``), as exposure finds its ICMP windows: equal keys, equal
    boxes and sets in order, without building each opener's key per port."""
    having = [chain for chain in chains if chain.icmp]
    if not having:
        return None
    openers = list(alls)
    labels = [o.label for o in alls]
    at: dict[str, tuple[int, list[int]]] = {}
    parts: dict[Any, tuple[int, int]] = {id(alls): (0, len(alls))}
    for chain in having:
        first = len(openers)
        at[chain.name] = (first, chain.icmp_index)
        openers += chain.icmp
        labels += chain.icmp_labels
        parts[chain.name] = (first, len(openers))
    # their own forms (a str first): no other window holds ICMP clusters
    content = ("icmp", id(alls), *(chain.icmp_id for chain in having))
    ident = ("icmp", *parts)
    return _Window(openers, run.contents.setdefault(content, len(run.contents)),
                   run.idents.setdefault(ident, len(run.idents)), at, labels, parts)


def _alone_windows(alls: list[Opener], chains: list[ChainClusters], i: int,
                   run: _Shared) -> dict[int, _Window]:
    """The windows of chain ``i``'s clusters (ICMP apart) by cluster index, each
    alone on the port: shared by every port where they are (with the same
    ``alls``)."""
    chain = chains[i]
    key = (id(alls), chain.name, chain.family)
    found = run.alone_lists.get(key)
    if found is None:
        icmp = ICMP_OF[chain.family]
        found = run.alone_lists[key] = {
            k: _group_window(alls, chains, [(p, lo, hi, i, k)], run)
            for p, lo, hi, k in chain.pieces if p != icmp}
    return found


def _group_window(alls: list[Opener], chains: list[ChainClusters],
                  group: list[tuple[int, int, int, int, int]], run: _Shared) -> _Window:
    """The window of the clusters ``group`` ((protocol, low, high, chain
    position, cluster index) each); one cluster alone: shared by every port
    where it is (with the same ``alls``)."""
    if len(group) == 1:
        _, _, _, i, k = group[0]
        chain = chains[i]
        alone = (id(alls), chain.name, chain.family, k)
        window = run.alone.get(alone)
        if window is None:
            window = run.alone[alone] = _window(alls, chains, [(i, m) for m in
                                                                chain.clusters[k][3]], run)
        return window
    members = sorted((i, m) for _, _, _, i, k in group for m in chains[i].clusters[k][3])
    return _window(alls, chains, members, run)


def _window(alls: list[Opener], chains: list[ChainClusters], members: list[tuple[int, int]],
            run: _Shared) -> _Window:
    """The window of ``alls`` and the chains' openers ``members`` (chain position,
    opener index), in that order."""
    openers = [*alls, *(chains[i].openers[m] for i, m in members)]
    content = (*(_box_key(o) for o in alls), *(chains[i].keys[m] for i, m in members))
    ident = (*(id(o) for o in alls), *((chains[i].name, m) for i, m in members))
    at: dict[str, tuple[int, list[int]]] = {}
    for position, (i, m) in enumerate(members, len(alls)):
        at.setdefault(chains[i].name, (position, []))[1].append(m)
    return _Window(openers, run.contents.setdefault(content, len(run.contents)),
                   run.idents.setdefault(ident, len(run.idents)), at)


def _group_shadows(cp: CloudPolicy, group: SecurityGroup, direction: str, fam: Family,
                   run: _Shared) -> dict[str, list[dict[str, Any]] | None]:
    """For each rule of ``group`` in ``direction`` and ``fam``, what
    :func:`_shadowed` says: the covering labels, or None (missing: None too).
    Judged window by window, once per distinct window of the group's clusters:
    a rule adds points only inside its box, and only the all-protocol openers
    and the clusters merged with its own (overlapping or touching, one
    protocol) meet it — the window's openers."""
    key = (group.id, direction, fam)
    found = run.group_shadows.get(key)
    if found is not None:
        return found
    rules = [r for r in cp.state.rules_by_group.get(group.id, {}).values()
             if r.direction == direction and _family(r) == fam]
    views = run.group_views(cp, group.id)
    if not rules or not views:  # no protected port (or nothing to judge)
        found = run.group_shadows[key] = {}
        return found
    alive: dict[str, dict[int, dict[str, Any]]] = {r.id: {} for r in rules}
    _judge_ports(cp, views, group, rules, alive, run)
    found = run.group_shadows[key] = {
        rule_id: _unique_by_content(list(labels.values()), run)
        for rule_id, labels in alive.items()}
    return found


def _judge_ports(cp: CloudPolicy, views: list[PortView], group: SecurityGroup,
                 rules: list[Rule], alive: dict[str, dict[int, dict[str, Any]]],
                 run: _Shared) -> None:
    """Judge ``rules`` (one direction and family) on each of ``views`` in turn
    while some are ``alive``: a rule adding something on a port is dropped from
    ``alive``; the others gain the labels covering them there. A window (by
    identity, and the cluster) is judged once for the group. One loop for the
    group's ports: it runs ~200k times at 10k ports."""
    direction, fam = rules[0].direction, _family(rules[0])
    seen: set[Any] = set()
    live: list[Any] = [None, None]  # _live's: what it was made from, the list
    plans, boxes = run.plans.setdefault((direction, fam), {}), run.boxes
    last: ChainClusters | None = None  # the group's chain: the same on nearly every port
    by_cluster: list[list[tuple[Rule, list[int]]]] = []
    missing: list[Rule] = []
    # ids of the all-protocol openers (kept alive by run.clusters) with which
    # the chain's windows were judged while it was apart
    judged_alone: set[int] = set()
    # the parts of ICMP windows (_Window.segs) whose labels each rule has gathered
    gathered: dict[str, set[Any]] = {rule.id: set() for rule in rules}
    # the live rules of the chain's ICMP clusters as _icmp_only gives them,
    # whether no other cluster holds one, and the _live list they were made from
    fast: list[_Fast] = []
    every_icmp = False
    fast_for: Any = None
    position, count = 0, len(views)
    while position < count:
        if not alive:
            return
        view = views[position]
        position += 1
        port_id = view.port.id
        plan = plans[port_id] if port_id in plans else \
            _port_plan(cp, view, direction, fam, run)
        i = plan.at.get(group.id) if plan is not None else None
        if plan is None or i is None:
            _judge_whole(cp, view, rules, alive, seen, run)
            continue
        chained = plan.chains[i]
        if chained is not last:
            by_cluster, missing = _rules_by_cluster(chained, rules, run)
            last, judged_alone = chained, set()
        for rule in missing:  # no opener on this port: it adds nothing, but is not covered
            if rule.id in alive:
                _record(alive, rule, None)
        lives = _live(by_cluster, alive, live)
        if lives is not fast_for:
            fast_for, (fast, every_icmp) = lives, _icmp_only(chained, lives, run)
        if _icmp_left(plan, i, every_icmp, judged_alone, run):
            if fast:
                position = _judge_icmp_run(cp, views, position - 1, group.id, chained,
                                           (fast, every_icmp, judged_alone), alive, gathered,
                                           run)
            continue
        # here a live rule is in a cluster other than the ICMP ones, whose
        # windows were not judged with these all-protocol openers (_icmp_left)
        for k, judged in lives:
            window = plan.icmp if k in chained.icmp_ks else plan.windows(i, run)[k]
            assert window is not None  # a chain with an ICMP cluster has the window
            segs = window.segs
            if segs is None:
                # an ICMP window (segs) is the port's own: judged again on a
                # port with the same one, it gives the same verdict and no new
                # part, so only the shared windows are marked
                mark = (window.ident, k)
                if mark in seen:
                    continue
                seen.add(mark)
            first, order = window.at[chained.name]
            for rule, indices in judged:
                if rule.id in alive:
                    mine = (first + order.index(indices[0]),) if len(indices) == 1 else \
                        tuple(first + order.index(m) for m in indices)
                    boxed = boxes.get(rule.id) or _boxed(rule, run)
                    covered, positions = _judged_in(window, mine, boxed, run)
                    if not covered:
                        del alive[rule.id]
                    elif segs is None:
                        labels = [window.labels[p] for p in positions]
                        alive[rule.id].update(zip(map(id, labels), labels, strict=True))
                    elif not segs <= gathered[rule.id]:
                        _gather_parts(alive[rule.id], window, positions, gathered[rule.id])
        if plan.apart(i, run):
            # apart, each cluster is alone with the same all-protocol openers on
            # every such port (_alone_windows): each window judged (or seen)
            # above, so on the next such port only the ICMP one is looked at
            judged_alone.add(id(plan.alls))


#: A live ICMP rule of a chain (:func:`_icmp_only`): the rule, its openers'
#: offsets among the chain's ICMP openers, its box as integers.
_Fast = tuple[Rule, tuple[int, ...], tuple[int, int, int, int]]


def _icmp_only(chained: ChainClusters, lives: list[tuple[int, list[tuple[Rule, list[int]]]]],
               run: _Shared) -> tuple[list[_Fast], bool]:
    """The rules in the ICMP clusters of ``lives`` (:func:`_live`), in its order,
    with their openers' offsets among the chain's ICMP openers and their boxes
    as integers (the same on every port where the chain is); and whether every
    cluster in ``lives`` is an ICMP one."""
    order, icmp_ks = chained.icmp_index, chained.icmp_ks
    fast = [(rule, tuple(order.index(m) for m in indices),
             (run.boxes.get(rule.id) or _boxed(rule, run))[1])
            for k, judged in lives if k in icmp_ks for rule, indices in judged]
    return fast, all(k in icmp_ks for k, _ in lives)


def _icmp_left(plan: _PortPlan, i: int, every_icmp: bool, judged_alone: set[int],
               run: _Shared) -> bool:
    """Whether only the ICMP window of chain ``i`` is left to look at on the
    port (:func:`_judge_ports`): only ICMP clusters hold live rules
    (``every_icmp``), or the chain's other windows are alone and were judged
    with the port's all-protocol openers already (``judged_alone``), so the
    loop over its windows would skip them."""
    return every_icmp or (id(plan.alls) in judged_alone and plan.apart(i, run))


def _judge_icmp_run(cp: CloudPolicy, views: list[PortView], start: int, group_id: str,
                    chained: ChainClusters, state: tuple[list[_Fast], bool, set[int]],
                    alive: dict[str, dict[int, dict[str, Any]]], gathered: dict[str, set[Any]],
                    run: _Shared) -> int:
    """:func:`_judge_ports`' loop from ``views[start]`` on, while only the
    chain's ICMP rules are left to judge (``state``: the live ones as
    :func:`_icmp_only` gives them, whether they are all the live rules, and
    the ids of the all-protocol openers with which the chain's other windows
    were judged): each rule judged in the port's ICMP window
    (:func:`_judged_in`), its labels gathered part by part. It stops after a
    port where a rule died (the live rules change), or before one where this
    no longer holds (another chain, or windows not judged yet); it returns the
    position of the first port not judged. Most of a group's ports are judged
    here: ~150k at 10k ports, so the loop is kept tight."""
    fast, every_icmp, judged_alone = state
    direction, fam = fast[0][0].direction, _family(fast[0][0])
    plans, judged, boxes = run.plans[(direction, fam)], run.judged, run.boxes
    name, position, count = chained.name, start, len(views)
    plan = plans[views[start].port.id]
    assert plan is not None
    while True:
        window = plan.icmp
        assert window is not None and window.segs is not None
        first, segs, content = window.at[name][0], window.segs, window.content
        died = False
        for rule, offsets, box in fast:
            rule_id = rule.id
            if rule_id not in alive:
                continue
            mine = (first + offsets[0],) if len(offsets) == 1 else \
                tuple(first + offset for offset in offsets)
            found = judged.get((content, mine, box))
            if found is None:
                found = _judged_in(window, mine, boxes[rule_id], run)
            if not found[0]:
                del alive[rule_id]
                died = True
            elif not segs <= gathered[rule_id]:
                _gather_parts(alive[rule_id], window, found[1], gathered[rule_id])
        position += 1
        if died or position == count:
            return position
        view = views[position]
        port_id = view.port.id
        next_plan = plans[port_id] if port_id in plans else \
            _port_plan(cp, view, direction, fam, run)
        if next_plan is None:
            return position
        plan = next_plan
        i = plan.at.get(group_id)
        if i is None or plan.chains[i] is not chained or \
                not _icmp_left(plan, i, every_icmp, judged_alone, run):
            return position


def _judge_whole(cp: CloudPolicy, view: PortView, rules: list[Rule],
                 alive: dict[str, dict[int, dict[str, Any]]], seen: set[Any],
                 run: _Shared) -> None:
    """:func:`_judge_ports` on a port without windows: its whole filter, once
    per distinct filter."""
    port_key = ("port", view.policy.same_net_sets, view.policy.ingress_chains,
                view.policy.egress_chains)
    if port_key in seen:
        return
    seen.add(port_key)
    for rule in rules:
        if rule.id in alive:
            _record(alive, rule, _covered_on(cp, view, rule, run))


def _rules_by_cluster(chained: ChainClusters, rules: list[Rule], run: _Shared
                      ) -> tuple[list[list[tuple[Rule, list[int]]]], list[Rule]]:
    """For each cluster of ``chained``, the rules with openers in it and their
    indices in the chain; and the rules without any (once per chain and rules)."""
    key = (chained.name, chained.family, rules[0].direction)
    found = run.by_cluster.get(key)
    if found is None:
        by_cluster: list[list[tuple[Rule, list[int]]]] = []
        placed: set[str] = set()
        for _, _, _, idx in chained.clusters:
            here = []
            for rule in rules:
                mine = [i for i in idx if chained.openers[i].label.get("rule_id") == rule.id]
                if mine:
                    here.append((rule, mine))
                    placed.add(rule.id)
            by_cluster.append(here)
        found = run.by_cluster[key] = (by_cluster, [r for r in rules if r.id not in placed])
    return found


def _live(by_cluster: list[list[tuple[Rule, list[int]]]],
          alive: dict[str, Any], cache: list[Any]) -> list[tuple[int, list[tuple[Rule,
                                                                            list[int]]]]]:
    """The clusters (index ascending: the order the labels are gathered in)
    holding a rule still alive, with those rules; made again only when a rule
    died or the clusters differ (``cache``: [what it was made from, the list]).
    A group's rules mostly die on its first port but one covered everywhere
    (an ICMP rule from anywhere, in most groups): only its cluster is then
    looked at on the group's other ports."""
    made = (id(by_cluster), len(alive))  # alive only shrinks
    if cache[0] != made:
        cache[0], cache[1] = made, [
            (k, here) for k, judged in enumerate(by_cluster)
            if (here := [(rule, idx) for rule, idx in judged if rule.id in alive])]
    found: list[tuple[int, list[tuple[Rule, list[int]]]]] = cache[1]
    return found


def _record(alive: dict[str, dict[int, dict[str, Any]]], rule: Rule,
            labels: list[dict[str, Any]] | None) -> None:
    if labels is None:
        del alive[rule.id]
    else:
        alive[rule.id].update(zip(map(id, labels), labels, strict=True))


def _boxed(rule: Rule, run: _Shared) -> tuple[Box, tuple[int, int, int, int]]:
    """The rule's box, and as plain integers (a :class:`Box`'s generated hash is
    a Python call), once per rule."""
    box = rule_box(ir_rule(rule))
    found = run.boxes[rule.id] = (box, (box.proto_lo, box.proto_hi, box.sel_lo, box.sel_hi))
    return found


def _judged_in(window: _Window, mine: tuple[int, ...],
               boxed: tuple[Box, tuple[int, int, int, int]],
               run: _Shared) -> tuple[bool, list[int]]:
    """:func:`_covered_by` of the window's openers: whether the rule whose
    openers are at positions ``mine`` of the window (``boxed``: its box) adds
    nothing, and the positions of the openers covering it. Once per window
    content, positions and box.

    Which openers cover it is decided opener by opener (its box meets the
    rule's, its addresses meet the rule's: :func:`_cover_positions`), so a part
    of the window (:attr:`_Window.segs`) gives the same labels in every window
    where the rule is covered."""
    key = (window.content, mine, boxed[1])
    positions = run.judged.get(key)
    if positions is None:
        positions = run.judged[key] = _cover_positions(window.openers, mine, boxed[0], run)
    return positions


def _gather_parts(labels: dict[int, dict[str, Any]], window: _Window, positions: list[int],
                  done: set[Any]) -> None:
    """Add to ``labels`` the covering labels (``positions``: ascending) of the
    window's parts not in ``done``, in the window's order, and add those parts
    to ``done``. A part gathered before for the rule gives the same labels
    again (:func:`_judged_in`), so ``labels`` ends as if every position had
    been added."""
    assert window.parts is not None and window.segs is not None
    new = window.segs - done
    done |= new
    every = window.labels
    for low, high in sorted(window.parts[part] for part in new):
        for i in positions[bisect_left(positions, low):bisect_left(positions, high)]:
            labels[id(every[i])] = every[i]


def _cover_positions(openers: list[Opener], mine: tuple[int, ...], box: Box,
                     run: _Shared) -> tuple[bool, list[int]]:
    """Whether the openers at ``mine`` add nothing to the others, and the
    positions of the others covering them (as :func:`_covered_by`)."""
    ours = [openers[i] for i in mine]
    others = [(i, o) for i, o in enumerate(openers) if i not in mine]
    swept = [o for _, o in others if any(o.box.meets(m.box) for m in ours)]
    key = (tuple(sorted(_box_key(o) for o in swept)), tuple(sorted(_box_key(m) for m in ours)))
    same = run.adds_nothing.get(key)
    if same is None:
        # what two sweeps (without and with the rule) compared say: the
        # reference, _covered_by without a run, does that
        same = run.adds_nothing[key] = adds_nothing(ours, swept, run.unions)
    if not same:
        return False, []
    return True, [i for i, o in others
                  if o.box.meets(box) and run.overlap(o.addresses, ours[0].addresses)]


def _unique_by_content(labels: list[dict[str, Any]], run: _Shared) -> list[dict[str, Any]]:
    """``labels`` in first-seen order without repeats of content (equal keys: equal labels)."""
    known: set[str] = set()
    found = []
    for label in labels:
        key = run.label_key(label)
        if key not in known:
            known.add(key)
            found.append(label)
    return found
