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
from typing import Any

import netaddr

from secfw.audit.exposure import ADMIN_PORTS, BROAD_PREFIX
from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import ingress_openers
from secfw.audit.space import (
    ICMP_OF,
    PORT_PROTOCOL_NUMBERS,
    Opener,
    UnionCache,
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
    address sets (:class:`~secfw.audit.space.UnionCache`)."""

    def __init__(self) -> None:
        self.openers: dict[tuple[Any, ...], list[Opener]] = {}
        self.unions = UnionCache()
        # (id, id) -> (the two sets, kept alive so the ids stay theirs; overlap)
        self._overlaps: dict[tuple[int, int], tuple[Any, Any, bool]] = {}
        # (swept openers, the rule's openers) as (box, set id) -> does it add nothing
        self.adds_nothing: dict[tuple[Any, ...], bool] = {}

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
    run = _Shared() if shared else None
    for group in groups:
        rules = sorted(cp.state.rules_by_group.get(group.id, {}).values(), key=lambda r: r.id)
        used = bool(cp.state.instances_by_group.get(group.id))
        if not used and (group.name != DEFAULT_GROUP or rules):
            findings.append(_finding(cp, "unused_group", group, None,
                                     f"no instance uses it ({len(rules)} rule(s))"))
        for rule in rules:
            findings += _rule_findings(cp, group, rule, used, run)
    findings += _duplicates(cp, {g.id for g in groups})
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
    fam = _family(rule)
    openers = _openers(cp, view, rule.direction, fam, run)
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
    key = (tuple(sorted((o.box, id(o.addresses)) for o in swept)),
           tuple(sorted((m.box, id(m.addresses)) for m in mine)))
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


def _family(rule: Rule) -> Family:
    return "ipv4" if rule.ethertype == "IPv4" else "ipv6"


def _duplicates(cp: CloudPolicy, scope: set[str]) -> list[dict[str, Any]]:
    """Rules of two groups used by one instance with the same meaning (reported on
    the rule of the group that sorts later)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for instance in cp.state.instances.values():
        meaning: dict[tuple[Any, ...], Rule] = {}
        for group_id in instance.security_groups:
            for rule in sorted(cp.state.rules_by_group.get(group_id, {}).values(),
                               key=lambda r: r.id):
                key = rule.match_key()[1:]
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
