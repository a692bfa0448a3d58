"""``secfw audit``: explain, reach, exposure and lint.

On the operations guide's cloud (:func:`secfw.lab.demo.build_guide_cloud`) the
answers are checked one by one; on hypothesis-generated clouds (two hosts,
IPv4 and IPv6, ingress and egress rules, source groups, address pairs, port
security off, same-net on and off) the audits are checked against the
independent oracle :func:`secfw.compiler.explain.decide`:

* ``explain``'s verdict equals the oracle's for random flows;
* for every port, direction and family, the points of each ``reach`` region
  (address and selector corners, protocol ends) are allowed by the oracle, and
  the points just outside every region are allowed exactly when another region
  holds them — the answer is the allowed space, no more, no less.

Flows of the other family's ICMP (protocol 58 in IPv4, 1 in IPv6) are left out:
the audits treat them as plain protocols, the oracle applies ICMP's rules to them.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netaddr
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from secfw.api import Api
from secfw.audit.explain import FlowQuery, explain
from secfw.audit.exposure import exposure
from secfw.audit.lint import lint
from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import Answer, answers_rows, reach
from secfw.audit.space import ICMP_OF, PORT_PROTOCOL_NUMBERS, SEL_MAX, Box, contains
from secfw.cloud import CloudState
from secfw.compiler.explain import Flow, decide
from secfw.errors import ConflictError
from secfw.lab.demo import build_guide_cloud
from secfw.store import open_store


@contextmanager
def fresh_api() -> Iterator[Api]:
    with tempfile.TemporaryDirectory() as tmp:
        api = Api(open_store(f"sqlite:///{Path(tmp)}/audit.db"))
        try:
            yield api
        finally:
            api.store.close()


def view_of(cp: CloudPolicy, name: str) -> PortView:
    return next(v for v in cp.ports.values() if v.instance.name == name)


# --------------------------------------------------------------------------- the guide


@pytest.fixture
def guide(api: Api) -> CloudPolicy:
    build_guide_cloud(api)
    return CloudPolicy(api.snapshot())


def test_explain_names_the_source_group_rule(guide: CloudPolicy) -> None:
    """web1 → db1 tcp/22 (two networks): allowed by cluster's source-group rule,
    web1's egress open; from outside: denied, the same rule as the near miss."""
    web1, db1 = view_of(guide, "web1"), view_of(guide, "db1")
    allowed = explain(guide, FlowQuery(web1.port.ip, db1.port.ip, 6, 22))
    assert allowed["verdict"] == "allow"
    [rule] = allowed["rules"]
    assert (rule["group"], rule["direction"]) == ("cluster", "ingress")
    assert rule["rule_id"] in guide.state.rules_by_group[rule["group_id"]]
    assert allowed["egress"]["verdict"] == "allow"

    denied = explain(guide, FlowQuery("203.0.113.5", db1.port.ip, 6, 22))
    assert denied["verdict"] == "deny" and denied["egress"] is None
    assert [(m["group"], m["mismatch"]) for m in denied["ingress"]["near_misses"]] == [
        ("cluster", "source")]
    wrong_port = explain(guide, FlowQuery(web1.port.ip, db1.port.ip, 6, 23))
    assert [m["mismatch"] for m in wrong_port["ingress"]["near_misses"]] == ["port"]


def test_explain_a_flow_to_a_floating_ip(api: Api) -> None:
    """A flow to web1's floating IP is judged after DNAT: to its fixed address,
    from the original source (global_http opens 80, not 22); an unassociated
    address is no port's."""
    from secfw.lab.demo import add_floating_ips

    build_guide_cloud(api)
    add_floating_ips(api)
    cp = CloudPolicy(api.snapshot())
    address = api.floating_ip_list("alpha")[0].id
    web1 = view_of(cp, "web1")
    allowed = explain(cp, FlowQuery("203.0.113.5", address, 6, 80))
    assert allowed["verdict"] == "allow"
    assert allowed["nat"] == {"floating": address, "fixed": web1.port.ip}
    assert allowed["destination"]["instance"] == "web1"
    assert allowed["reasons"][0] == f"DNAT: floating IP {address} -> {web1.port.ip}"
    assert explain(cp, FlowQuery("203.0.113.5", address, 6, 22))["verdict"] == "deny"
    api.remove_floating_ip("alpha", "web1", address)
    gone = explain(CloudPolicy(api.snapshot()), FlowQuery("203.0.113.5", address, 6, 80))
    assert "nat" not in gone and gone["destination"]["instance"] is None


def test_explain_same_net_and_conntrack(guide: CloudPolicy) -> None:
    """beta1 (another project, default group) reaches web1 on the flat network by
    same-net; an ICMP echo reply cannot open a connection, whatever the rules."""
    web1, beta1, tools1 = (view_of(guide, n) for n in ("web1", "beta1", "tools1"))
    result = explain(guide, FlowQuery(beta1.port.ip, web1.port.ip, 6, 5432))
    assert result["verdict"] == "allow" and result["rules"] == []
    assert any("same-net" in r for r in result["ingress"]["reasons"])
    reply = explain(guide, FlowQuery("203.0.113.5", tools1.port.ip, 1, None, 0, 0))
    assert reply["verdict"] == "deny" and "invalid" in reply["reasons"][0]
    echo = explain(guide, FlowQuery("203.0.113.5", tools1.port.ip, 1, None, 8, 0))
    assert echo["verdict"] == "allow" and echo["rules"][0]["group"] == "open"


def test_reach_db1_ssh(guide: CloudPolicy) -> None:
    """What reaches db1 on tcp/22: global_http's members (web1 by the source-group
    rule, web2 also by same-net) and db1 itself — nothing else."""
    db1 = view_of(guide, "db1")
    answer = reach(guide, db1, "ingress", "ipv4")
    assert answer is not None
    [row] = answers_rows([answer], 6, 22, None)
    members = {view_of(guide, n).port.ip for n in ("web1", "web2", "db1")}
    assert netaddr.IPSet(row["sources"]) == netaddr.IPSet(members)
    assert {r.get("group") or r["reason"] for r in row["rules"]} == {"cluster", "same-net"}
    assert answers_rows([answer], 6, 22, "203.0.113.0/24") == []  # a guarantee


def test_reach_rows_name_one_icmp_type(api: Api) -> None:
    """A port without port security takes the ICMP types no connection starts
    with (conntrack: invalid) from unfiltered senders, types 0-7 in one sweep
    cell: the types (``icmp_type``..``icmp_type_last``) and codes the rows list
    for a source outside the cloud are exactly those ``explain`` allows from it
    (a row once said "type 0, any code" for the whole of types 0-7), and a
    region spanning types is cut into few rows, not one per type."""
    api.image_create("admin", "cirros", "qcow2", "public")
    api.net_create("p", "n0", "10.1.0.0/24")
    api.boot("p", "vm", "m1.tiny", "cirros", "h1", None, ["n0"])
    (port,) = api.snapshot().ports.values()
    api.port_update("p", port.id, port_security=False)
    cp = CloudPolicy(api.snapshot())
    vm = view_of(cp, "vm")
    answer = reach(cp, vm, "ingress", "ipv4")
    assert answer is not None
    source = "203.0.113.9"
    listed = {(kind, code) for row in answers_rows([answer], 1, None, None)
              if netaddr.IPAddress(source) in netaddr.IPSet(row["sources"])
              for kind in range(row["icmp_type"], row["icmp_type_last"] + 1)
              for code in (0, 255) if row["icmp_code"] == "any" or
              int(row["icmp_code"].split("-")[0]) <= code <= int(row["icmp_code"].split("-")[-1])}
    allowed = {(kind, code) for kind in range(256) for code in (0, 255)
               if explain(cp, FlowQuery(source, vm.port.ip, 1, None, kind, code))["verdict"]
               == "allow"}
    assert listed == allowed, sorted(allowed ^ listed)
    assert len(answers_rows([answer], 1, None, None)) < 10


def test_exposure_and_lint_on_the_guide(guide: CloudPolicy) -> None:
    views = sorted(guide.ports.values(), key=lambda v: v.instance.name)
    rows = exposure(guide, views)
    first = rows[0]
    assert first["instance"] == "tools1" and first["kind"] == "internet" and 22 in \
        first["admin_ports"]
    kinds = {(r["instance"], r["kind"]) for r in rows}
    assert ("web1", "same_net_other_projects") in kinds  # beta1 shares the flat network
    assert ("web2", "same_net_other_projects") not in kinds  # alpha-net is alpha's VLAN
    assert ("db1", "internet") not in {(i, k) for i, k in kinds}
    findings = lint(guide, guide.state.groups.values())
    assert {(f["kind"], f["group"]) for f in findings} == {("broad_admin_port", "open")}


def test_explain_across_hosts_judges_both_ends(api: Api) -> None:
    """A flow between two hosts: the egress of the source port (host h1, only
    tcp 5432 out) and the ingress of the destination port (host h2, tcp 22-5432
    in); each side says its own verdict, a deny names the side and its near miss;
    ``--egress`` in the CLI is the same flow turned round."""
    api.net_create("p", "n", "10.1.0.0/24")
    api.image_create("admin", "cirros", "qcow2", "public")
    api.secgroup_create("p", "client", "")
    api.secgroup_create("p", "server", "")
    api.rule_create("p", "client", "egress", "IPv4", "tcp", dst_port="5432")
    api.secgroup_add_rule("p", "server", "tcp", "22", "5432", "10.0.0.0/8")
    api.boot("p", "app", "m1.tiny", "cirros", "h1", ["client"], ["n"])
    api.boot("p", "db", "m1.tiny", "cirros", "h2", ["server"], ["n"])
    cp = CloudPolicy(api.snapshot(), allow_same_net=False)
    app, db = view_of(cp, "app"), view_of(cp, "db")
    ok = explain(cp, FlowQuery(app.port.ip, db.port.ip, 6, 5432))
    assert ok["verdict"] == "allow"
    assert [(r["group"], r["direction"]) for r in ok["rules"]] == [
        ("client", "egress"), ("server", "ingress")]
    assert (ok["egress"]["host"], ok["ingress"]["host"]) == ("h1", "h2")
    out = explain(cp, FlowQuery(app.port.ip, db.port.ip, 6, 22))
    assert out["verdict"] == "deny" and out["egress"]["verdict"] == "deny"
    assert out["ingress"]["verdict"] == "allow"
    assert [m["mismatch"] for m in out["egress"]["near_misses"]] == ["port"]


# --------------------------------------------------------------------------- lint kinds


def test_lint_finds_each_kind(api: Api) -> None:
    api.net_create("p", "n", "10.1.0.0/24")
    api.image_create("admin", "cirros", "qcow2", "public")
    for name in ("a", "b", "unused", "nobody", "self"):
        api.secgroup_create("p", name, "")
    api.secgroup_add_rule("p", "a", "tcp", "20", "30", "10.0.0.0/16")
    api.secgroup_add_rule("p", "a", "tcp", "22", "22", "10.0.1.0/24")  # inside the first
    api.secgroup_add_rule("p", "b", "tcp", "20", "30", "10.0.0.0/16")  # a's, again
    api.secgroup_add_rule("p", "a", "icmp", "0", "-1", "0.0.0.0/0")  # echo reply
    api.secgroup_add_rule("p", "a", "tcp", "3389", "3389", "0.0.0.0/0")
    api.secgroup_add_rule("p", "unused", "tcp", "1", "2", "0.0.0.0/0")
    api.secgroup_add_group_rule("p", "a", "nobody", "tcp", "80", "80")
    api.secgroup_add_group_rule("p", "self", "self", "tcp", "81", "81")
    api.boot("p", "vm", "m1.tiny", "cirros", "h1", ["a", "b", "self"], ["n"])
    cp = CloudPolicy(api.snapshot())
    findings = lint(cp, cp.state.groups.values())
    seen = {(f["kind"], f["group"], f["rule"]) for f in findings}
    assert ("shadowed", "a", "tcp 22-22 from 10.0.1.0/24") in seen
    assert ("duplicate", "b", "tcp 20-30 from 10.0.0.0/16") in seen \
        or ("duplicate", "a", "tcp 20-30 from 10.0.0.0/16") in seen
    assert ("never_matches", "a", "icmp type 0 from 0.0.0.0/0") in seen
    assert ("broad_admin_port", "a", "tcp 3389-3389 from 0.0.0.0/0") in seen
    assert ("unused_group", "unused", None) in seen and ("unused_group", "nobody", None) in seen
    assert ("empty_source_group", "a", "tcp 80-80 from group nobody") in seen
    assert ("self_reference", "self", "tcp 81-81 from group self") in seen
    shadow = next(f for f in findings if f["kind"] == "shadowed" and f["group"] == "a"
                  and "22-22" in f["rule"])
    assert {c["group"] for c in shadow["covering"]} == {"a", "b"}
    # the rule that covers others is not shadowed itself (b's twin is, by it)
    assert not any(f["kind"] == "shadowed" and f["rule"] == "tcp 3389-3389 from 0.0.0.0/0"
                   for f in findings)


# --------------------------------------------------------------------------- random clouds

V4_POOL = ("0.0.0.0/0", "203.0.113.0/24", "203.0.113.8/29", "10.0.0.0/8", "10.1.0.0/24",
           "10.1.0.2/32", "10.2.0.0/25", "198.51.100.0/24")
V6_POOL = ("::/0", "2001:db8:1::/64", "2001:db8:1::2/128", "2001:db8::/32", "2001:db8:99::/48")
PAIRS = ("10.1.0.200", "10.1.0.128/28", "10.2.0.0/25", "2001:db8:1::200", "10.9.0.1")
PORT_EDGES = (1, 21, 22, 23, 80, 443, 1000, 65535)
NETWORKS = (("n0", "10.1.0.0/24", "2001:db8:1::/64"), ("n1", "10.2.0.0/24", None))


@dataclass(frozen=True)
class RuleSpec:
    direction: str
    ethertype: str
    protocol: str | None
    low: int | None
    high: int | None
    remote: str | int | None  # a CIDR, a group index or anywhere


@st.composite
def rule_specs(draw: st.DrawFn, n_groups: int) -> RuleSpec:
    direction = draw(st.sampled_from(("ingress", "ingress", "egress")))
    ethertype = draw(st.sampled_from(("IPv4", "IPv4", "IPv6")))
    protocol = draw(st.sampled_from(("tcp", "udp", "icmp", "47", None)))
    low = high = None
    if protocol in ("tcp", "udp"):
        low = draw(st.sampled_from(PORT_EDGES) | st.integers(1, 65535))
        high = draw(st.just(low) | st.integers(low, min(low + 30, 65535)))
    elif protocol == "icmp":
        types = (0, 3, 8, 13) if ethertype == "IPv4" else (128, 129, 135, 136)
        low = draw(st.none() | st.sampled_from(types))
        high = None if low is None else draw(st.none() | st.sampled_from((0, 1)))
    pool = V4_POOL if ethertype == "IPv4" else V6_POOL
    remote = draw(st.none() | st.sampled_from(pool) | st.integers(0, n_groups - 1))
    return RuleSpec(direction, ethertype, protocol, low, high, remote)


@dataclass(frozen=True)
class InstanceSpec:
    net: int
    groups: tuple[int, ...]
    host: str
    pairs: tuple[str, ...]
    port_security: bool


@dataclass(frozen=True)
class CloudSpec:
    groups: tuple[tuple[RuleSpec, ...], ...]
    instances: tuple[InstanceSpec, ...]
    allow_same_net: bool


@st.composite
def cloud_specs(draw: st.DrawFn) -> CloudSpec:
    n_groups = draw(st.integers(1, 3))
    groups = tuple(tuple(draw(st.lists(rule_specs(n_groups), max_size=4)))
                   for _ in range(n_groups))
    instances = tuple(
        InstanceSpec(draw(st.integers(0, 1)),
                     tuple(draw(st.lists(st.integers(0, n_groups - 1), unique=True, max_size=2))),
                     draw(st.sampled_from(("h1", "h2"))),
                     tuple(draw(st.lists(st.sampled_from(PAIRS), unique=True, max_size=2))),
                     draw(st.sampled_from((True, True, True, False))))
        for _ in range(draw(st.integers(2, 4))))
    return CloudSpec(groups, instances, draw(st.booleans()))


def build(api: Api, spec: CloudSpec) -> CloudState:
    with api.batch():
        api.image_create("admin", "cirros", "qcow2", "public")
        for name, cidr, cidr6 in NETWORKS:
            api.net_create("p", name, cidr, cidr6=cidr6)
        for i in range(len(spec.groups)):
            api.secgroup_create("p", f"g{i}", "")
        for i, rules in enumerate(spec.groups):
            for r in rules:
                icmp = r.protocol == "icmp"
                with contextlib.suppress(ConflictError):  # the same rule twice
                    api.rule_create(
                        "p", f"g{i}", r.direction, r.ethertype, r.protocol,
                        dst_port=f"{r.low}:{r.high}" if r.protocol in ("tcp", "udp") else None,
                        icmp_type=r.low if icmp else None, icmp_code=r.high if icmp else None,
                        remote_ip=r.remote if isinstance(r.remote, str) else None,
                        remote_group=f"g{r.remote}" if isinstance(r.remote, int) else None)
        for i, inst in enumerate(spec.instances):
            api.boot("p", f"vm{i}", "m1.tiny", "cirros", inst.host,
                     [f"g{g}" for g in inst.groups] or None, [NETWORKS[inst.net][0]])
    state = api.snapshot()
    for i, inst in enumerate(spec.instances):
        port = next(p for p in state.ports.values()
                    if state.instances[p.instance_id].name == f"vm{i}")
        if not inst.port_security:
            api.port_update("p", port.id, port_security=False)
        elif inst.pairs:
            api.port_update("p", port.id, allowed_address_pairs=list(inst.pairs))
    return api.snapshot()


def oracle(state: CloudState, allow_same_net: bool, src: str, dst: str, proto: int,
           sel: int, family: str) -> bool:
    port = icmp_type = icmp_code = None
    if proto in PORT_PROTOCOL_NUMBERS:
        port = sel
    elif proto == ICMP_OF[family]:
        icmp_type, icmp_code = divmod(sel, 256)
    return decide(state, Flow(src, dst, proto, port, icmp_type, icmp_code),
                  allow_same_net).allowed


def sample_points(answer: Answer, owned: list[str]) -> set[tuple[str, int, int]]:
    """Corners, insides and just-outside neighbours of every region, and the
    addresses the cloud's ports own (the holes of a region) on its corners."""
    family = answer.family
    top = (1 << (32 if family == "ipv4" else 128)) - 1
    points = set()
    for region in answer.regions:
        cidrs = list(region.addresses.iter_cidrs())
        ends = {cidrs[0].first, cidrs[0].last, cidrs[-1].first, cidrs[-1].last,
                (cidrs[0].first + cidrs[0].last) // 2}
        ends |= {cidrs[0].first - 1, cidrs[-1].last + 1}
        box = region.box
        services = {(box.proto_lo, box.sel_lo), (box.proto_hi, box.sel_hi),
                    (box.proto_lo, box.sel_lo - 1), (box.proto_lo, box.sel_hi + 1),
                    (box.proto_lo - 1, box.sel_lo), (box.proto_hi + 1, box.sel_hi)}
        ends |= {int(netaddr.IPAddress(a)) for a in owned
                 if netaddr.IPAddress(a).version == (4 if family == "ipv4" else 6)}
        for value in ends:
            if not 0 <= value <= top:
                continue
            address = str(netaddr.IPAddress(value, 4 if family == "ipv4" else 6))
            for proto, sel in services:
                if 0 <= proto <= 255 and 0 <= sel <= SEL_MAX:
                    points.add((address, proto, sel))
    return points


def checked(family: str, proto: int) -> bool:
    """Not the other family's ICMP (see the module docstring)."""
    return proto != ICMP_OF["ipv6" if family == "ipv4" else "ipv4"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=cloud_specs(), data=st.data())
def test_reach_is_exactly_the_oracles_allowed_space(spec: CloudSpec, data: st.DataObject
                                                   ) -> None:
    with fresh_api() as api:
        state = build(api, spec)
        note(str(spec))
        cp = CloudPolicy(state, spec.allow_same_net)
        owned = [a for p in state.ports.values() for a in (p.ip, p.ip6) if a]
        owned += [str(netaddr.IPNetwork(c.split(",")[0]).ip) for p in state.ports.values()
                  for c in p.allowed_address_pairs]
        extra = data.draw(st.lists(st.tuples(
            st.sampled_from(["203.0.113.9", "10.1.0.200", "10.2.0.3", "10.1.0.77",
                             "2001:db8:1::2", "2001:db8:1::200", "::1"]),
            st.sampled_from([6, 17, 1, 58, 47, 0]),
            st.sampled_from([0, 22, 80, 2048, 2049, 768, 32768, 34560, 65535])), max_size=8))
        for view in sorted(cp.ports.values(), key=lambda v: v.instance.name):
            for direction in ("ingress", "egress"):
                for family in ("ipv4", "ipv6"):
                    answer = reach(cp, view, direction, family)
                    if answer is None:
                        continue
                    points = sorted(sample_points(answer, owned))
                    points += [p for p in extra if netaddr.IPAddress(p[0]).version ==
                               (4 if family == "ipv4" else 6)]
                    for address, proto, sel in points:
                        if not checked(family, proto):
                            continue
                        src, dst = (address, answer.address) if direction == "ingress" \
                            else (answer.address, address)
                        expected = oracle(state, spec.allow_same_net, src, dst, proto, sel,
                                          family)
                        got = contains(answer.regions, address, Box(proto, proto, sel, sel))
                        assert got == expected, (view.instance.name, direction, src, dst,
                                                 proto, sel)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=cloud_specs(), data=st.data())
def test_explain_verdict_is_the_oracles(spec: CloudSpec, data: st.DataObject) -> None:
    with fresh_api() as api:
        state = build(api, spec)
        note(str(spec))
        cp = CloudPolicy(state, spec.allow_same_net)
        ports = sorted(state.ports.values(), key=lambda p: state.instances[p.instance_id].name)
        addresses = [a for p in ports for a in (p.ip, p.ip6) if a]
        addresses += ["203.0.113.9", "10.1.0.200", "10.1.0.130", "10.1.0.77", "10.9.0.1",
                      "2001:db8:1::200", "2001:db8:99::1"]
        for _ in range(25):
            src = data.draw(st.sampled_from(addresses))
            same = [a for a in addresses if (":" in a) == (":" in src) and a != src]
            dst = data.draw(st.sampled_from(same))
            family = "ipv6" if ":" in src else "ipv4"
            proto = data.draw(st.sampled_from((6, 17, 47, ICMP_OF[family])))
            sel = data.draw(st.sampled_from((0, 1, 22, 23, 80, 443, 65535, 2048, 768, 3328,
                                             32768, 33024, 34560, 34816)))
            if proto in PORT_PROTOCOL_NUMBERS:
                query = FlowQuery(src, dst, proto, sel)
            elif proto == ICMP_OF[family]:
                query = FlowQuery(src, dst, proto, None, *divmod(sel, 256))
            else:
                query = FlowQuery(src, dst, proto)
            expected = oracle(state, spec.allow_same_net, src, dst, proto, sel, family)
            result = explain(cp, query)
            assert (result["verdict"] == "allow") == expected, (query, result)


# --------------------------------------------------------------------------- the CLI


def test_cli_json_and_errors(cli: Any, store_url: str) -> None:
    api = Api(open_store(store_url))
    build_guide_cloud(api)
    api.store.close()
    run = cli  # the conftest's CLI driver
    result = run.json("--project", "alpha", "audit", "explain", "--to",
                      "db1:alpha-net", "--from", "web1", "--protocol", "tcp", "--port", "22")
    assert result["verdict"] == "allow"
    assert {"group", "group_id", "rule_id", "direction"} <= set(result["rules"][0])
    rows = run.json("--project", "alpha", "audit", "reach", "--to", "db1",
                    "--protocol", "tcp", "--port", "22")
    assert len(rows) == 1 and rows[0]["protocol"] == "tcp" and rows[0]["ports"] == "22"
    assert run.json("--project", "alpha", "audit", "reach", "--to", "db1",
                    "--port", "22", "--from-prefix", "203.0.113.0/24") == []
    lint_rows = run.json("audit", "lint", "--all-projects")
    assert {r["kind"] for r in lint_rows} == {"broad_admin_port"}
    exposure_rows = run.json("audit", "exposure", "--project", "alpha")
    assert exposure_rows[0]["admin_ports"]
    out = run.fails("--project", "alpha", "audit", "explain", "--to", "nosuch", "--from",
                    "web1", "--protocol", "tcp", "--port", "22", code=3)
    assert "nosuch" in out  # fails() checked the one-line contract
    run.fails("--project", "alpha", "audit", "explain", "--to", "db1", "--from",
              "web1", "--protocol", "tcp", code=2)
    turned = run.json("--project", "alpha", "audit", "explain", "--to", "web1", "--from",
                      "203.0.113.5", "--protocol", "tcp", "--port", "80", "--egress")
    assert (turned["flow"]["src"], turned["flow"]["dst"]) == (
        result["source"]["address"], "203.0.113.5")
    assert turned["verdict"] == "allow" and turned["ingress"] is None
    assert json.loads(run.ok("--project", "alpha", "audit", "reach", "--from", "web1",
                             "-f", "json", "--protocol", "tcp", "--port", "5432"))
