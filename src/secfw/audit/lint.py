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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import netaddr

from secfw.audit.exposure import ADMIN_PORTS, BROAD_PREFIX, Clusters
from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import ingress_openers
from secfw.audit.space import (
    ICMP_OF,
    PORT_PROTOCOL_NUMBERS,
    Box,
    Opener,
    UnionCache,
    label_key,
    rule_box,
    sweep,
)
from secfw.compiler.build import ir_rule, port_addresses
from secfw.compiler.explain import describe_rule
from secfw.compiler.ir import Family
from secfw.constants import ICMP_NEW_TYPES, ICMPV6_NEW_TYPES, ICMPV6_UNTRACKED
from secfw.model import DEFAULT_GROUP, Rule, SecurityGroup, protocol_number

KINDS = ("shadowed", "duplicate", "unused_group", "empty_source_group", "never_matches",
         "broad_admin_port", "self_reference")


class _Shared:
    """What the shadow checks of one lint run share: each port filter's openers
    (built once per distinct filter, not once per rule of it) and the unions of
    address sets (:class:`~secfw.audit.space.UnionCache`); each port filter cut
    into clusters (:class:`_Layout`), each group's ports by what its rules'
    clusters meet, each rule's verdict per distinct neighbourhood."""

    def __init__(self, cp: CloudPolicy) -> None:
        self.openers: dict[tuple[Any, ...], list[Opener]] = {}
        self.unions = UnionCache()
        self.clusters = Clusters(cp, self.unions, {})
        self.layouts: dict[tuple[str, str, Family], _Layout | None] = {}
        self.signatures: dict[tuple[str, str, Family], list[tuple[Any, PortView]]] = {}
        self.verdicts: dict[tuple[str, Any], list[dict[str, Any]] | None] = {}
        self._label_keys: dict[int, tuple[dict[str, Any], str]] = {}
        self.parts: dict[tuple[str, Any], Any] = {}
        self.rule_boxes: dict[str, tuple[list[Box], Any, Box]] = {}
        self.rule_clusters: dict[tuple[str, Family, str], tuple[tuple[int, ...], list[Box]]] = {}
        # (id, id) -> (the two sets, kept alive so the ids stay theirs; overlap)
        self._overlaps: dict[tuple[int, int], tuple[Any, Any, bool]] = {}
        # (swept openers, the rule's openers) as (box, set id) -> does it add nothing
        self.adds_nothing: dict[tuple[Any, ...], bool] = {}

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
    filter (the reference the tests compare with); True, the default, reuses the
    openers of each distinct filter and sweeps only the openers that meet the
    rule's box: a rule adds a point only inside its box, and openers elsewhere do
    not change what is allowed there, so the answer is the same."""
    findings: list[dict[str, Any]] = []
    run = _Shared(cp) if shared else None
    for group in groups:
        rules = sorted(cp.state.rules_by_group.get(group.id, {}).values(), key=lambda r: r.id)
        used = bool(cp.state.instances_by_group.get(group.id))
        if not used and (group.name != DEFAULT_GROUP or rules):
            findings.append(_finding(cp, "unused_group", group, None,
                                     f"no instance uses it ({len(rules)} rule(s))"))
        for rule in rules:
            findings += _rule_findings(cp, group, rule, used, run)
    findings += _duplicates(cp, {g.id for g in groups}, run)
    return sorted(findings, key=lambda f: (KINDS.index(f["kind"]), f["group"], f["group_id"],
                                           f["rule"] or "", f["rule_id"] or ""))


def _finding(cp: CloudPolicy, kind: str, group: SecurityGroup, rule: Rule | None,
             detail: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "group": group.name, "group_id": group.id, "project": group.project,
            "rule_id": rule.id if rule else None,
            "rule": describe_rule(cp.state, rule) if rule else None, "detail": detail, **extra}


def _rule_findings(cp: CloudPolicy, group: SecurityGroup, rule: Rule,
                   used: bool, run: _Shared | None = None) -> list[dict[str, Any]]:
    found = []
    if rule.remote_group_id == group.id:
        found.append(_finding(cp, "self_reference", group, rule,
                              "the group's members may reach each other this way"))
    if rule.remote_group_id is not None and not _members_have(cp, rule):
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


def _members_have(cp: CloudPolicy, rule: Rule) -> bool:
    family = _family(rule)
    assert rule.remote_group_id is not None
    return any(port_addresses(port, family)
               for member in cp.state.group_members(rule.remote_group_id)
               for port in cp.state.ports_of(member.id))


def _never_matches(cp: CloudPolicy, group: SecurityGroup, rule: Rule) -> str | None:
    family = _family(rule)
    proto = protocol_number(rule.protocol)
    if proto == ICMP_OF[family] and rule.port_min is not None:
        if family == "ipv4" and rule.port_min not in ICMP_NEW_TYPES:
            return f"ICMP type {rule.port_min} cannot open a connection (conntrack: invalid)"
        if family == "ipv6" and rule.port_min not in ICMPV6_NEW_TYPES | ICMPV6_UNTRACKED:
            return f"ICMPv6 type {rule.port_min} cannot open a connection (conntrack: invalid)"
    members = cp.state.group_members(group.id)
    if family == "ipv6" and members and not any(
            p.ip6 for m in members for p in cp.state.ports_of(m.id)):
        return "no port of the group's instances has an IPv6 address"
    return None


def _broad_admin(rule: Rule) -> str | None:
    if rule.direction != "ingress" or rule.remote_group_id is not None:
        return None
    proto = protocol_number(rule.protocol)
    if proto is not None and proto not in PORT_PROTOCOL_NUMBERS:
        return None
    family = _family(rule)
    prefix = ipaddress.ip_network(rule.remote_cidr).prefixlen if rule.remote_cidr else 0
    if prefix > BROAD_PREFIX[family]:
        return None
    low = rule.port_min if rule.port_min is not None else 0
    high = rule.port_max if rule.port_max is not None else (65535 if rule.port_min is None
                                                            else low)
    opened = [f"{p} ({ADMIN_PORTS[p]})" for p in sorted(ADMIN_PORTS) if low <= p <= high]
    if not opened:
        return None
    return f"opens {capped(opened)} to {rule.remote_cidr or 'anywhere'}"


def capped(items: list[str], limit: int = 4) -> str:
    """The first ``limit`` items and how many more (a table cell stays readable)."""
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")


def _shadowed(cp: CloudPolicy, group: SecurityGroup, rule: Rule,
              run: _Shared | None = None) -> list[dict[str, Any]] | None:
    """The rules covering ``rule`` on every protected port that has it, or None."""
    if run is not None:
        return _shadowed_shared(cp, group, rule, run)
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


Origin = tuple[str, int]  # a chain's cluster: (chain name, index in its clusters)


@dataclass
class _Layout:
    """One port filter (direction, family) cut into clusters: ``openers`` in the
    filter's order (same-net first, at ``alls``; each chain's from
    ``offset[chain name]``); ``tokens[o]``, for each chain cluster ``o``, the
    chain clusters its merged cluster holds (overlapping or touching, one
    protocol: :func:`~secfw.audit.exposure.merged_clusters`), and ``first[o]``
    its first opener's position."""

    openers: list[Opener]
    alls: list[int]
    offset: dict[str, int]
    tokens: dict[Origin, tuple[Origin, ...]]
    first: dict[Origin, int]
    alls_token: tuple[int, ...]


def _layout(cp: CloudPolicy, view: PortView, direction: str, fam: Family,
            run: _Shared) -> _Layout | None:
    """``view``'s :class:`_Layout` (None when a rule of any protocol spreads over
    every cluster: the caller takes the per-port path), once per port."""
    key = (view.port.id, direction, fam)
    if key in run.layouts:
        return run.layouts[key]
    openers = list(run.clusters.same_net(view, fam)) if direction == "ingress" else []
    alls = list(range(len(openers)))
    pieces: list[tuple[int, int, int, Origin]] = []
    found: _Layout | None = _Layout(openers, alls, {}, {}, {},
                                    tuple(id(openers[i]) for i in alls))
    assert found is not None
    for chain in cp.chains(view, direction):
        chained = run.clusters.chain(view, chain, fam)
        if chained.spread:
            found = None
            break
        found.offset[chain.name] = len(openers)
        for k, (p, lo, hi, idx) in enumerate(chained.clusters):
            pieces.append((p, lo, hi, (chain.name, k)))
            found.first[(chain.name, k)] = len(openers) + idx[0]
        openers += chained.openers
    if found is not None:
        groups: list[list[Origin]] = []
        top: tuple[int, int] = (-1, -2)  # the last group's protocol and high end
        for protocol, low, high, origin in sorted(pieces, key=lambda p: (p[0], p[1])):
            # the merge of merged_clusters: overlapping or touching, one protocol
            if groups and top[0] == protocol and low <= top[1] + 1:
                groups[-1].append(origin)
                top = (protocol, max(top[1], high))
            else:
                groups.append([origin])
                top = (protocol, high)
        for group in groups:
            token = tuple(sorted(group, key=found.first.__getitem__))
            for origin in group:
                found.tokens[origin] = token
    run.layouts[key] = found
    return found


def _signatures(cp: CloudPolicy, group: SecurityGroup, direction: str, fam: Family,
                run: _Shared) -> list[tuple[Any, PortView]]:
    """The group's protected ports, one per distinct signature, in the ports'
    order: a signature says what the group's chain clusters meet on the port
    (the same-net openers, the merged clusters holding them), or names the port
    itself when it has no :class:`_Layout`."""
    key = (group.id, direction, fam)
    found = run.signatures.get(key)
    if found is not None:
        return found
    found = []
    seen: set[Any] = set()
    for member in cp.state.group_members(group.id):
        for port in cp.state.ports_of(member.id):
            view = cp.ports.get(port.id)
            if view is None or not view.policy.port_security:
                continue
            signature = _signature(cp, view, group, direction, fam, run)
            if signature not in seen:
                seen.add(signature)
                found.append((signature, view))
    run.signatures[key] = found
    return found


def _signature(cp: CloudPolicy, view: PortView, group: SecurityGroup, direction: str,
               fam: Family, run: _Shared) -> Any:
    layout = _layout(cp, view, direction, fam, run)
    chain = next((c for c in cp.chains(view, direction) if c.group_id == group.id), None)
    if layout is None or chain is None:
        return ("port", view.port.id)
    clusters = run.clusters.chain(view, chain, fam).clusters
    # each token lists its chain clusters in the port's order: the order of the
    # covering rules found
    return ("layout", layout.alls_token, chain.name,
            tuple(layout.tokens[(chain.name, k)] for k in range(len(clusters))))


def _shadowed_shared(cp: CloudPolicy, group: SecurityGroup, rule: Rule,
                     run: _Shared) -> list[dict[str, Any]] | None:
    """:func:`_shadowed` once per distinct neighbourhood of the rule: on a port,
    only the openers meeting the rule's box decide (a rule adds points only
    inside its box), and they are same-net ones or lie in chain clusters that
    overlap the rule's box, in the merged clusters holding the rule's openers."""
    fam = _family(rule)
    signatures = _signatures(cp, group, rule.direction, fam, run)
    if not signatures:
        return None
    covering: list[dict[str, Any]] = []
    known: set[str] = set()  # the covering labels' keys (equal keys: equal labels)
    seen: set[Any] = set()
    for signature, view in signatures:
        if signature[0] == "port":
            found = _covered_on(cp, view, rule, run)
        else:
            found = _covered_near(cp, view, rule, signature, run, seen)
            if found is _SEEN:
                continue
        if found is None:
            return None
        for label in found:
            key = run.label_key(label)
            if key not in known:
                known.add(key)
                covering.append(label)
    return covering


#: A neighbourhood already judged for this rule (its labels are in the list).
_SEEN: list[dict[str, Any]] = []


def _covered_near(cp: CloudPolicy, view: PortView, rule: Rule, signature: Any,
                  run: _Shared, seen: set[Any]) -> list[dict[str, Any]] | None:
    """:func:`_covered_on` from the same-net openers and the chain clusters that
    hold the rule's openers or overlap their boxes (``signature``: the port's,
    with a :class:`_Layout`); :data:`_SEEN` when ``seen`` has them already."""
    _, alls_token, chain_name, tokens = signature
    fam = _family(rule)
    ks, boxes = _rule_clusters(view, chain_name, rule, fam, run)
    if not ks:
        return None
    layout = run.layouts[(view.port.id, rule.direction, fam)]
    assert layout is not None
    origins = {(chain_name, k) for k in ks}
    for k in ks:
        for origin in tokens[k]:
            if origin[0] != chain_name and origin not in origins:
                _, low, high, _ = _clusters_of(view, origin[0], fam, run)[origin[1]]
                if any(low <= b.sel_hi and b.sel_lo <= high for b in boxes):
                    origins.add(origin)
    near = (alls_token, tuple(sorted(origins, key=layout.first.__getitem__)))
    if near in seen:
        return _SEEN
    seen.add(near)
    chains = [name for name, _ in near[1]]
    if len(set(chains)) == len(chains):  # each chain's openers in one piece
        return _covered_by_parts(view, layout, rule, near, run)
    key = (rule.id, near)
    if key not in run.verdicts:
        positions = list(layout.alls)
        for name, k in near[1]:
            offset = layout.offset[name]
            positions += [offset + i for i in _clusters_of(view, name, fam, run)[k][3]]
        run.verdicts[key] = _covered_by([layout.openers[p] for p in sorted(positions)],
                                        rule, run)
    return run.verdicts[key]


def _covered_by_parts(view: PortView, layout: _Layout, rule: Rule, near: Any,
                     run: _Shared) -> list[dict[str, Any]] | None:
    """:func:`_covered_by` of the openers of ``near`` (at most one cluster per
    chain: their positions are in ``near``'s order), from parts computed once per
    rule and same-net openers or chain cluster: what each part adds to the
    verdict's key, and the covering labels it gives — a rule whose neighbourhood
    spans many chains (a rule of ICMP from anywhere in every group) is judged on
    thousands of ports, each with its own combination of the same parts."""
    swept: list[tuple[int, int, int, int, int]] = []
    mine: list[tuple[int, int, int, int, int]] = []
    labels: list[dict[str, Any]] = []
    fam = _family(rule)
    parts = [((near[0], None), [layout.openers[p] for p in layout.alls])]
    for name, k in near[1]:
        chained = run.clusters.chain(view, view.index.chains[name], fam)
        parts.append(((name, k), [chained.openers[i] for i in chained.clusters[k][3]]))
    for origin, openers in parts:
        part = _part(rule, origin, openers, run)
        if part is None:
            return _covered_by([o for _, openers in parts for o in openers], rule, run)
        swept += part[0]
        mine += part[1]
        labels += part[2]
    if not mine:
        return None
    key = (tuple(sorted(swept)), tuple(sorted(mine)))
    if key not in run.adds_nothing:
        found = _covered_by([o for _, openers in parts for o in openers], rule, run)
        assert key in run.adds_nothing  # _covered_by judged the same openers
        return found
    return labels if run.adds_nothing[key] else None


def _part(rule: Rule, origin: Any, openers: list[Opener], run: _Shared) -> Any:
    """One part of :func:`_covered_by_parts`: the keys of its openers meeting the
    rule's openers' boxes (not the rule's), of the rule's, and the labels of those
    meeting the rule's box with an address in common with it; None when the
    rule's addresses are not known yet (its openers are in another part)."""
    key = (rule.id, origin)
    found = run.parts.get(key)
    if found is None:
        ks_boxes = run.rule_boxes.get(rule.id)
        if ks_boxes is None:
            return None
        boxes, addresses, box = ks_boxes
        mine = [o for o in openers if o.label.get("rule_id") == rule.id]
        others = [o for o in openers if o.label.get("rule_id") != rule.id]
        found = run.parts[key] = (
            [_box_key(o) for o in others if any(o.box.meets(b) for b in boxes)],
            [_box_key(m) for m in mine],
            [o.label for o in others if o.box.meets(box) and run.overlap(o.addresses,
                                                                         addresses)])
    return found


def _clusters_of(view: PortView, chain_name: str, fam: Family,
                 run: _Shared) -> list[tuple[int, int, int, list[int]]]:
    return run.clusters.chain(view, view.index.chains[chain_name], fam).clusters


def _rule_clusters(view: PortView, chain_name: str, rule: Rule, fam: Family,
                   run: _Shared) -> tuple[tuple[int, ...], list[Box]]:
    """The clusters of chain ``chain_name`` holding ``rule``'s openers, and their
    boxes (once per chain and rule)."""
    key = (chain_name, fam, rule.id)
    found = run.rule_clusters.get(key)
    if found is None:
        chained = run.clusters.chain(view, view.index.chains[chain_name], fam)
        ks, boxes, sets = [], [], []
        for k, (_, _, _, idx) in enumerate(chained.clusters):
            mine = [chained.openers[i] for i in idx
                    if chained.openers[i].label.get("rule_id") == rule.id]
            if mine:
                ks.append(k)
                boxes += [m.box for m in mine]
                sets += [m.addresses for m in mine]
        found = run.rule_clusters[key] = (tuple(ks), boxes)
        if sets and rule.id not in run.rule_boxes:
            # what _covered_by takes as the rule's box and addresses
            run.rule_boxes[rule.id] = (boxes, sets[0], rule_box(ir_rule(rule)))
    return found


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
    if same is None:
        before = [(r.box, r.addresses) for r in sweep(fam, swept, cache=unions)]
        same = before == [(r.box, r.addresses)
                          for r in sweep(fam, swept + mine, cache=unions)]
        if run is not None:
            run.adds_nothing[key] = same
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
    sorted and their meanings computed once."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    ordered: dict[str, list[tuple[Rule, tuple[Any, ...]]]] = {}
    for instance in cp.state.instances.values():
        meaning: dict[tuple[Any, ...], Rule] = {}
        for group_id in instance.security_groups:
            rules = ordered.get(group_id) if run is not None else None
            if rules is None:
                rules = [(r, r.match_key()[1:]) for r in sorted(
                    cp.state.rules_by_group.get(group_id, {}).values(), key=lambda r: r.id)]
                if run is not None:
                    ordered[group_id] = rules
            for rule, key in rules:
                first = meaning.setdefault(key, rule)
                if first.group_id == rule.group_id or rule.group_id not in scope:
                    continue
                pair = (first.id, rule.id)
                if pair not in found:
                    other = cp.state.groups[first.group_id]
                    found[pair] = _finding(
                        cp, "duplicate", cp.state.groups[rule.group_id], rule,
                        f"same meaning as rule {first.id} of group {other.name} "
                        f"(both used by instance {instance.name})")
    return list(found.values())
