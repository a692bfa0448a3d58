"""nftables backend, pure parts: IR → ruleset → text/JSON, read-back normal form, plan.

The kernel is the source of truth for whether the text loads and behaves; that is
``tests/netns/test_nft_executor.py``. These tests pin what is rendered and that a
plan is minimal. ``SECFW_UPDATE_GOLDEN=1`` rewrites the golden file.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from secfw.backends import get_backend
from secfw.backends.nftables import (
    KernelState,
    Transaction,
    plan,
    render,
    to_nft_json,
    to_nft_text,
)
from secfw.backends.nftables.render import (
    Element,
    Hook,
    Ruleset,
    Verdict,
    canonical_cidr,
    rule_text,
)
from secfw.backends.nftables.state import ChainState, SetState
from secfw.compiler.ir import (
    AddressSet,
    GroupChain,
    HostFilter,
    IcmpMatch,
    IRRule,
    PortPolicy,
    PortRange,
)
from secfw.errors import BackendError, UnsupportedError

GOLDEN = Path(__file__).parent / "golden" / "nft_small.nft"

WEB = "0a0a0a0a-0000-4000-8000-00000000000a"
SSH = "0b0b0b0b-0000-4000-8000-00000000000b"
WEB_IN, WEB_OUT, SSH_IN = f"sg-{WEB}-in", f"sg-{WEB}-out", f"sg-{SSH}-in"
WEB_V4 = f"sg-{WEB}-v4"
TAP_A, TAP_B, TAP_C = "tapaaaaaaaa-aa", "tapbbbbbbbb-bb", "tapcccccccc-cc"


def rule(rid: str = "r0000000-x", family: str = "ipv4", **kw: Any) -> IRRule:
    return IRRule(rid, family, **kw)  # type: ignore[arg-type]


def port(tap: str, ingress: tuple[str, ...] = (), egress: tuple[str, ...] = (),
         egress_open: bool = True, same_net: tuple[str, ...] = ("10.0.0.0/24",)) -> PortPolicy:
    return PortPolicy(tap, f"port-{tap}", f"inst-{tap}", "fa:16:3e:00:00:01", ("10.0.0.5",),
                      same_net, ingress, egress, egress_open)


def small() -> HostFilter:
    """Three ports, two groups (one with an egress chain), one address set."""
    web_in = GroupChain(WEB_IN, WEB, "ingress", (
        rule("a1111111-1", protocol=6, ports=PortRange(80, 80)),
        rule("a2222222-2", protocol=6, ports=PortRange(443, 443)),
    ))
    web_out = GroupChain(WEB_OUT, WEB, "egress", (
        rule("a3333333-3", protocol=6, ports=PortRange(5432, 5432), remote_cidr="192.0.2.0/24"),
    ))
    ssh_in = GroupChain(SSH_IN, SSH, "ingress", (
        rule("b1111111-1", protocol=6, ports=PortRange(22, 22), remote_set=WEB_V4),
        rule("b2222222-2", protocol=1, icmp=IcmpMatch(8, 0)),
    ))
    web_v4 = AddressSet(WEB_V4, WEB, "ipv4", ("10.0.0.5/32", "10.0.0.6/32", "10.9.0.0/16"))
    ports = (
        port(TAP_A, (WEB_IN,)),
        port(TAP_B, (WEB_IN, SSH_IN), (WEB_OUT,), egress_open=False),
        port(TAP_C, (SSH_IN,), egress_open=False, same_net=()),
    )
    return HostFilter("h1", ports, (web_in, web_out, ssh_in), (web_v4,))


def group_rule_text(ir: IRRule, direction: str = "ingress",
                    sets: tuple[AddressSet, ...] = ()) -> str:
    """The statements rendered for one IR rule (without its comment)."""
    name = "sg-x-in" if direction == "ingress" else "sg-x-out"
    chain = GroupChain(name, "x", direction, (ir,))  # type: ignore[arg-type]
    ruleset = render(HostFilter("h", (), (chain,), sets))
    (only,) = next(c for c in ruleset.chains if c.name == name).rules
    return rule_text(only).rsplit(" comment ", 1)[0]


def chain_rules(ruleset: Ruleset, name: str) -> list[str]:
    return [rule_text(r).rsplit(" comment ", 1)[0]
            for r in next(c for c in ruleset.chains if c.name == name).rules]


def named(ruleset: Ruleset, name: str) -> list[Element]:
    return list(next(s for s in ruleset.sets if s.name == name).elements)


# ----------------------------------------------------------------- rendering --


def test_small_filter_matches_golden_file() -> None:
    text = to_nft_text(render(small()))
    if os.environ.get("SECFW_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


@pytest.mark.parametrize(
    ("ir", "direction", "expected"),
    [
        (rule(), "ingress", "meta nfproto ipv4 accept"),
        (rule(family="ipv6"), "ingress", "meta nfproto ipv6 accept"),
        (rule(remote_cidr="0.0.0.0/0"), "ingress", "meta nfproto ipv4 accept"),
        (rule(protocol=6, ports=PortRange(80, 80)), "ingress",
         "meta nfproto ipv4 meta l4proto 6 th dport 80 accept"),
        (rule(protocol=17, ports=PortRange(1000, 2000), remote_cidr="10.0.0.0/8"), "ingress",
         "ip saddr 10.0.0.0/8 meta l4proto 17 th dport 1000-2000 accept"),
        (rule(protocol=132, ports=PortRange(1, 65535)), "ingress",
         "meta nfproto ipv4 meta l4proto 132 th dport 1-65535 accept"),
        (rule(protocol=136, ports=PortRange(7, 7)), "egress",
         "meta nfproto ipv4 meta l4proto 136 th dport 7 accept"),
        (rule(protocol=1, icmp=IcmpMatch(8)), "ingress",
         "meta nfproto ipv4 meta l4proto 1 icmp type 8 accept"),
        (rule(protocol=1, icmp=IcmpMatch(3, 4)), "ingress",
         "meta nfproto ipv4 meta l4proto 1 icmp type 3 icmp code 4 accept"),
        (rule(family="ipv6", protocol=58, icmp=IcmpMatch(128)), "ingress",
         "meta nfproto ipv6 meta l4proto 58 icmpv6 type 128 accept"),
        (rule(protocol=1), "ingress", "meta nfproto ipv4 meta l4proto 1 accept"),
        (rule(protocol=47), "ingress", "meta nfproto ipv4 meta l4proto 47 accept"),
        (rule(family="ipv6", remote_cidr="2001:DB8:0::/32"), "ingress",
         "ip6 saddr 2001:db8::/32 accept"),
        (rule(remote_cidr="192.0.2.0/24", protocol=6, ports=PortRange(443, 443)), "egress",
         "ip daddr 192.0.2.0/24 meta l4proto 6 th dport 443 accept"),
        (rule(family="ipv6", remote_cidr="2001:db8::1/128"), "egress",
         "ip6 daddr 2001:db8::1/128 accept"),
    ],
)
def test_every_ir_rule_variant(ir: IRRule, direction: str, expected: str) -> None:
    assert group_rule_text(ir, direction) == expected


@pytest.mark.parametrize(("direction", "field"), [("ingress", "saddr"), ("egress", "daddr")])
def test_remote_set_is_source_on_ingress_and_destination_on_egress(
        direction: str, field: str) -> None:
    sets = (AddressSet("sg-g-v6", "g", "ipv6", ("2001:db8::5/128",)),)
    ir = rule(family="ipv6", protocol=6, ports=PortRange(22, 22), remote_set="sg-g-v6")
    assert group_rule_text(ir, direction, sets) == (
        f"ip6 {field} @sg-g-v6 meta l4proto 6 th dport 22 accept")


@pytest.mark.parametrize(
    ("ir", "error"),
    [
        (rule(protocol=1, ports=PortRange(1, 2)), "no ports"),
        (rule(ports=PortRange(1, 2)), "no protocol"),
        (rule(icmp=IcmpMatch(8)), "no protocol"),
        (rule(protocol=6, icmp=IcmpMatch(8)), "ICMP type"),
        (rule(family="ipv6", protocol=1, icmp=IcmpMatch(8)), "ICMP type"),
        (rule(protocol=58, icmp=IcmpMatch(128)), "ICMP type"),
        (rule(protocol=6, ports=PortRange(90, 80)), "port range"),
        (rule(protocol=6, ports=PortRange(1, 70000)), "port range"),
        (rule(protocol=1, icmp=IcmpMatch(256)), "ICMP type/code"),
        (rule(protocol=300), "no IP protocol"),
        (rule(remote_cidr="2001:db8::/32"), "not an ipv4"),
        (rule(remote_cidr="10.0.0.0/8", remote_set="sg-g-v4"), "two remotes"),
    ],
)
def test_what_nftables_cannot_express_is_unsupported(ir: IRRule, error: str) -> None:
    with pytest.raises(UnsupportedError, match=error):
        group_rule_text(ir)


@pytest.mark.parametrize(
    "ir",
    [
        rule(remote_set="sg-missing-v4"),
        rule(family="ipv6", remote_set=WEB_V4),  # the set is ipv4
        rule(remote_cidr="10.0.0.1/8"),  # host bits set
        rule(remote_cidr='10.0.0.0/8" ; drop'),
        rule(rid='x"; flush ruleset'),
    ],
)
def test_inconsistent_rules_are_backend_errors(ir: IRRule) -> None:
    sets = (AddressSet(WEB_V4, WEB, "ipv4", ()),)
    with pytest.raises(BackendError):
        group_rule_text(ir, sets=sets)


@pytest.mark.parametrize(
    "name",
    ["tcp", "filter", "1abc-in", 'sg-x"in', "sg-x in", "sg-x;drop", "sg-x{", "", "é-x",
     "ingress-filter", "sg-" + "x" * 200],
)
def test_only_safe_identifiers_reach_the_ruleset(name: str) -> None:
    chain = GroupChain(name, "g", "ingress", ())
    with pytest.raises(BackendError):
        render(HostFilter("h", (), (chain,), ()))
    address_set = AddressSet(name, "g", "ipv4", ())
    if name != "ingress-filter":  # a chain name, free as a set name
        with pytest.raises(BackendError):
            render(HostFilter("h", (), (), (address_set,)))


@pytest.mark.parametrize("tap", ["eth0", 'tap"x', "tap x", "tap12345678901234", "tap", "tap*"])
def test_bad_tap_names_are_rejected(tap: str) -> None:
    with pytest.raises(BackendError, match="tap"):
        render(HostFilter("h", (port(tap),), (), ()))


def test_inconsistent_ports_are_rejected() -> None:
    hf = small()
    with pytest.raises(BackendError, match="unknown ingress chain"):
        render(replace(hf, ports=(port(TAP_A, ("sg-nope-in",)),)))
    with pytest.raises(BackendError, match="unknown egress chain"):
        render(replace(hf, ports=(port(TAP_A, egress=(WEB_IN,)),)))  # wrong direction
    with pytest.raises(BackendError, match="two ports"):
        render(replace(hf, ports=(port(TAP_A), port(TAP_A))))
    with pytest.raises(BackendError, match="used twice"):
        render(replace(hf, chains=(*hf.chains, hf.chains[0])))
    clash = AddressSet(f"{WEB_IN}-ports", WEB, "ipv4", ())  # same name as a -ports set
    with pytest.raises(BackendError, match="used twice"):
        render(replace(hf, sets=(*hf.sets, clash)))


def test_rendering_is_deterministic_whatever_the_ir_order() -> None:
    hf = small()
    text = to_nft_text(render(hf))
    assert to_nft_text(render(small())) == text
    rnd = random.Random(7)
    for _ in range(5):
        shuffled = replace(
            hf,
            ports=tuple(rnd.sample(hf.ports, len(hf.ports))),
            chains=tuple(rnd.sample(hf.chains, len(hf.chains))),
        )
        assert to_nft_text(render(shuffled)) == text


def test_port_membership_is_data_in_per_group_sets() -> None:
    ruleset = render(small())
    assert named(ruleset, f"{WEB_IN}-ports") == [Element((TAP_A,)), Element((TAP_B,))]
    assert named(ruleset, f"{SSH_IN}-ports") == [Element((TAP_B,)), Element((TAP_C,))]
    assert named(ruleset, f"{WEB_OUT}-ports") == [Element((TAP_B,))]
    assert chain_rules(ruleset, "ingress-filter") == [
        "oifname . ip saddr @same_net4 accept",
        f"oifname @{WEB_IN}-ports jump {WEB_IN}",
        f"oifname @{SSH_IN}-ports jump {SSH_IN}",
        "drop",
    ]
    assert chain_rules(ruleset, "egress-filter") == [
        f"iifname @{WEB_OUT}-ports jump {WEB_OUT}", "drop"]


def test_verdict_maps_dispatch_every_port() -> None:
    ruleset = render(small())
    to_ingress = Verdict("goto", "ingress-filter")
    assert named(ruleset, "ingress_ports") == [
        Element((TAP_A,), to_ingress), Element((TAP_B,), to_ingress),
        Element((TAP_C,), to_ingress)]
    assert named(ruleset, "egress_ports") == [
        Element((TAP_A,), Verdict("accept")),  # egress open
        Element((TAP_B,), Verdict("goto", "egress-filter")),  # closed, has egress rules
        Element((TAP_C,), Verdict("drop")),  # closed, no egress rules at all
    ]


def test_no_egress_chain_means_no_egress_filter() -> None:
    hf = small()
    hf = replace(hf, chains=tuple(c for c in hf.chains if c.direction == "ingress"),
                 ports=tuple(replace(p, egress_chains=()) for p in hf.ports))
    ruleset = render(hf)
    assert "egress-filter" not in {c.name for c in ruleset.chains}
    assert {e.verdict for e in named(ruleset, "egress_ports")} == {
        Verdict("accept"), Verdict("drop")}


def test_base_chains_fail_closed_and_leave_other_traffic_alone() -> None:
    ruleset = render(HostFilter("h", (), (), ()))
    hooks = {c.name: c.hook for c in ruleset.chains if c.hook}
    assert hooks == {
        "forward-egress": Hook("filter", "forward", -1, "accept"),
        "forward-ingress": Hook("filter", "forward", 0, "accept"),
        "input-egress": Hook("filter", "input", 0, "accept"),
    }
    ct = "ct state vmap { established : accept, related : accept, invalid : drop }"
    assert chain_rules(ruleset, "forward-ingress") == [
        'oifname != "tap*" accept', ct, "oifname vmap @ingress_ports", 'oifname "tap*" drop']
    for name in ("forward-egress", "input-egress"):
        assert chain_rules(ruleset, name) == [
            'iifname != "tap*" accept', ct, "iifname vmap @egress_ports", 'iifname "tap*" drop']
    assert "same_net4" not in {s.name for s in ruleset.sets}
    assert chain_rules(ruleset, "ingress-filter") == ["drop"]


def test_same_net_networks_are_merged_per_tap_and_per_family() -> None:
    ports = (
        port(TAP_A, same_net=("10.0.0.0/25", "10.0.0.128/25", "2001:db8:1::/64")),
        port(TAP_B, same_net=("10.0.0.0/24", "10.0.0.0/16")),
    )
    ruleset = render(HostFilter("h", ports, (), ()))
    assert named(ruleset, "same_net4") == [
        Element((TAP_A, "10.0.0.0/24")), Element((TAP_B, "10.0.0.0/16"))]
    assert named(ruleset, "same_net6") == [Element((TAP_A, "2001:db8:1::/64"))]
    assert chain_rules(ruleset, "ingress-filter")[:2] == [
        "oifname . ip saddr @same_net4 accept", "oifname . ip6 saddr @same_net6 accept"]


def test_address_sets_keep_the_irs_elements() -> None:
    """Not re-merged: adjacent hosts stay apart so one member is one element."""
    hf = HostFilter("h", (), (), (AddressSet("sg-g-v4", "g", "ipv4",
                                             ("10.0.0.4", "10.0.0.5/32", "10.1.0.0/16")),))
    assert named(render(hf), "sg-g-v4") == [
        Element(("10.0.0.4/32",)), Element(("10.0.0.5/32",)), Element(("10.1.0.0/16",))]


def test_comments_identify_rule_content() -> None:
    ruleset = render(small())
    rules = [r for c in ruleset.chains for r in c.rules]
    # Equal comments exactly when equal statements (the base chains share rules).
    assert len({r.comment for r in rules}) == len({r.statements for r in rules}) < len(rules)
    assert len({(r.comment, r.statements) for r in rules}) == len({r.comment for r in rules})
    web = next(c for c in ruleset.chains if c.name == WEB_IN)
    assert [r.comment.split(":")[0] for r in web.rules] == ["a1111111", "a2222222"]
    changed = replace(small(), chains=(replace(small().chains[0], rules=(
        rule("a1111111-1", protocol=6, ports=PortRange(81, 81)),)), *small().chains[1:]))
    web2 = next(c for c in render(changed).chains if c.name == WEB_IN)
    assert web2.rules[0].comment.split(":")[0] == "a1111111"
    assert web2.rules[0].comment != web.rules[0].comment


@pytest.mark.parametrize(("text", "cidr"), [
    ("10.0.0.1", "10.0.0.1/32"), ("10.0.0.1/32", "10.0.0.1/32"), ("10.0.0.0/8", "10.0.0.0/8"),
    ("2001:DB8::1", "2001:db8::1/128"), ("2001:db8:0:0::/64", "2001:db8::/64"),
])
def test_canonical_cidr(text: str, cidr: str) -> None:
    assert canonical_cidr(text) == cidr


@pytest.mark.parametrize("text", ["10.0.0.256", "10.0.0.1/33", "10.0.0.1/24", "x", "10.0.0.1 "])
def test_canonical_cidr_rejects_garbage(text: str) -> None:
    with pytest.raises(BackendError):
        canonical_cidr(text)


# ----------------------------------------------------------------------- JSON --


def listing_from(batch: dict[str, Any]) -> dict[str, Any]:
    """What ``list table`` would print after ``batch``: its added objects, in order."""
    objects = [cmd["add"] for cmd in batch["nftables"] if "add" in cmd]
    return {"nftables": [o for o in objects if "table" not in o]}


def test_json_batch_holds_the_same_objects_as_the_text() -> None:
    ruleset = render(small())
    batch = to_nft_json(ruleset)
    commands = batch["nftables"]
    assert commands[:3] == [{"add": {"table": {"family": "inet", "name": "secfw"}}},
                            {"delete": {"table": {"family": "inet", "name": "secfw"}}},
                            {"add": {"table": {"family": "inet", "name": "secfw"}}}]
    kinds = [next(iter(c["add"])) for c in commands[3:]]
    # Chains first (map verdicts name them), then sets and maps, then rules.
    assert kinds == sorted(kinds, key=["chain", "map", "set", "rule"].index)
    text = to_nft_text(ruleset)
    for cmd in commands[3:]:
        kind, body = next(iter(cmd["add"].items()))
        assert (f'comment "{body["comment"]}"' if kind == "rule"
                else f"{kind} {body['name']} {{") in text
    assert KernelState.from_nft_json(listing_from(batch)) == KernelState.from_ruleset(ruleset)


def test_json_rule_expressions() -> None:
    ruleset = render(small())
    batch = to_nft_json(ruleset)
    rules = {c["add"]["rule"]["comment"]: c["add"]["rule"]["expr"]
             for c in batch["nftables"] if "rule" in c.get("add", {})}
    icmp = next(r for c in ruleset.chains for r in c.rules if r.comment.startswith("b2222222"))
    assert rules[icmp.comment] == [
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": 1}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "icmp", "field": "type"}},
                   "right": 8}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "icmp", "field": "code"}},
                   "right": 0}},
        {"accept": None},
    ]
    same_net = next(r for c in ruleset.chains if c.name == "ingress-filter" for r in c.rules)
    assert rules[same_net.comment][0] == {"match": {
        "op": "==", "right": "@same_net4",
        "left": {"concat": [{"meta": {"key": "oifname"}},
                            {"payload": {"protocol": "ip", "field": "saddr"}}]}}}


# ------------------------------------------------------------------ read-back --


def test_read_back_normalises_every_element_form() -> None:
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "inet", "name": "secfw", "handle": 1}},
        {"set": {"family": "inet", "table": "secfw", "name": "a-v4", "type": "ipv4_addr",
                 "flags": ["interval"], "elem": [
                     "10.0.0.5", {"prefix": {"addr": "10.1.0.0", "len": 16}},
                     {"range": ["10.2.0.0", "10.2.0.255"]}, {"range": ["10.3.0.1", "10.3.0.9"]},
                     {"elem": {"val": "10.4.0.1", "comment": "x"}}]}},
        {"set": {"family": "inet", "table": "secfw", "name": "a-v6", "type": "ipv6_addr",
                 "flags": ["interval"], "elem": ["2001:0db8::1"]}},
        {"set": {"family": "inet", "table": "secfw", "name": "same_net4",
                 "type": ["ifname", "ipv4_addr"], "flags": ["interval"], "elem": [
                     {"concat": ["tap1", {"prefix": {"addr": "10.0.0.0", "len": 24}}]},
                     {"elem": {"val": {"concat": ["tap2", "10.0.0.9"]}}}]}},
        {"map": {"family": "inet", "table": "secfw", "name": "ingress_ports", "type": "ifname",
                 "map": "verdict", "elem": [["tap1", {"goto": {"target": "ingress-filter"}}],
                                            ["tap2", {"drop": None}]]}},
        {"chain": {"family": "inet", "table": "secfw", "name": "forward-ingress", "handle": 2,
                   "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "secfw", "name": "empty-chain", "handle": 3}},
        {"rule": {"family": "inet", "table": "secfw", "chain": "forward-ingress", "handle": 4,
                  "comment": "abc", "expr": []}},
        {"rule": {"family": "inet", "table": "secfw", "chain": "forward-ingress", "handle": 5,
                  "expr": []}},
        {"chain": {"family": "inet", "table": "other", "name": "foreign", "handle": 1}},
        {"set": {"family": "ip", "table": "secfw", "name": "foreign", "type": "ifname"}},
    ]}
    state = KernelState.from_nft_json(listing)
    v4 = frozenset({Element((c,)) for c in ("10.0.0.5/32", "10.1.0.0/16", "10.2.0.0/24",
                                             "10.3.0.1-10.3.0.9", "10.4.0.1/32")})
    assert state == KernelState(
        sets={
            "a-v4": SetState(("ipv4_addr",), ("interval",), False, v4),
            "a-v6": SetState(("ipv6_addr",), ("interval",), False,
                             frozenset({Element(("2001:db8::1/128",))})),
            "same_net4": SetState(("ifname", "ipv4_addr"), ("interval",), False, frozenset({
                Element(("tap1", "10.0.0.0/24")), Element(("tap2", "10.0.0.9/32"))})),
            "ingress_ports": SetState(("ifname",), (), True, frozenset({
                Element(("tap1",), Verdict("goto", "ingress-filter")),
                Element(("tap2",), Verdict("drop"))})),
        },
        chains={
            "forward-ingress": ChainState(Hook("filter", "forward", 0, "accept"), ("abc", "")),
            "empty-chain": ChainState(None, ()),
        },
    )


@pytest.mark.parametrize("listing", [
    {"nftables": [{"set": {"family": "inet", "table": "secfw", "name": "x"}}]},
    {"nftables": [{"map": {"family": "inet", "table": "secfw", "name": "x", "type": "ifname",
                           "map": "verdict", "elem": [["tap1", {"bogus": None}]]}}]},
    {"nftables": [{"set": {"family": "inet", "table": "secfw", "name": "x",
                           "type": ["ifname", "ipv4_addr"], "elem": ["tap1"]}}]},
    {"nftables": [{"chain": {"family": "inet", "table": "secfw", "name": "x", "hook": "input"}}]},
])
def test_malformed_listing_is_a_backend_error(listing: dict[str, Any]) -> None:
    with pytest.raises(BackendError, match="unexpected listing"):
        KernelState.from_nft_json(listing)


# ----------------------------------------------------------------------- plan --


def plan_between(before: HostFilter, after: HostFilter) -> Transaction:
    return plan(KernelState.from_ruleset(render(before)), render(after))


def test_plan_from_nothing_replaces_the_whole_table() -> None:
    tx = plan(None, render(small()))
    assert tx.full and tx.count == 3 and not tx.empty
    assert tx.commands[:2] == ("add table inet secfw", "delete table inet secfw")
    assert tx.text == to_nft_text(render(small())).split("\n", 1)[1]


def test_plan_without_change_is_empty() -> None:
    tx = plan_between(small(), small())
    assert tx.empty and tx.count == 0 and tx.size == 0 and tx.text == ""


def test_membership_change_touches_one_set() -> None:
    hf = small()
    joined = replace(hf, ports=(port(TAP_A, (WEB_IN, SSH_IN)), *hf.ports[1:]))
    assert plan_between(hf, joined).commands == (
        f'add element inet secfw {SSH_IN}-ports {{ "{TAP_A}" }}',)
    assert plan_between(joined, hf).commands == (
        f'delete element inet secfw {SSH_IN}-ports {{ "{TAP_A}" }}',)


def test_member_address_change_touches_its_address_set() -> None:
    hf = small()
    grown = replace(hf, sets=(replace(hf.sets[0], elements=(*hf.sets[0].elements,
                                                            "10.10.0.1/32")),))
    assert plan_between(hf, grown).commands == (
        f"add element inet secfw {WEB_V4} {{ 10.10.0.1/32 }}",)


def test_new_port_is_only_elements() -> None:
    hf = small()
    more = replace(hf, ports=(*hf.ports, port("tapdddddddd-dd", (WEB_IN, SSH_IN))))
    commands = plan_between(hf, more).commands
    assert all(c.startswith("add element ") for c in commands)
    assert sorted(c.split()[4] for c in commands) == sorted(
        ["egress_ports", "ingress_ports", "same_net4", f"{WEB_IN}-ports", f"{SSH_IN}-ports"])
    assert all('"tapdddddddd-dd"' in c for c in commands)
    removed = plan_between(more, hf).commands
    assert len(removed) == 5 and all(c.startswith("delete element ") for c in removed)


def test_changed_verdict_is_delete_then_add_of_the_map_element() -> None:
    hf = small()
    opened = replace(hf, ports=(hf.ports[0], hf.ports[1], replace(hf.ports[2], egress_open=True)))
    assert plan_between(hf, opened).commands == (
        f'delete element inet secfw egress_ports {{ "{TAP_C}" }}',
        f'add element inet secfw egress_ports {{ "{TAP_C}" : accept }}',
    )


def test_changed_rule_rewrites_only_its_chain() -> None:
    hf = small()
    ssh = hf.chains[2]
    more_rules = replace(ssh, rules=(*ssh.rules, rule("b3333333-3", protocol=6,
                                                      ports=PortRange(2222, 2222))))
    commands = plan_between(hf, replace(hf, chains=(*hf.chains[:2], more_rules))).commands
    assert commands[0] == f"flush chain inet secfw {SSH_IN}"
    assert [c.split()[4] for c in commands[1:]] == [SSH_IN] * 3
    assert all(c.startswith(f"add rule inet secfw {SSH_IN} ") for c in commands[1:])


def test_new_group_adds_chain_set_and_dispatch() -> None:
    hf = small()
    new = GroupChain("sg-new-in", "new", "ingress", (rule(protocol=17),))
    grown = replace(hf, chains=(*hf.chains, new),
                    ports=(port(TAP_A, (WEB_IN, "sg-new-in")), *hf.ports[1:]))
    commands = plan_between(hf, grown).commands
    assert commands[0] == "add chain inet secfw sg-new-in"
    assert commands[1] == (
        f'add set inet secfw sg-new-in-ports {{ type ifname; elements = {{ "{TAP_A}" }}; }}')
    assert "flush chain inet secfw ingress-filter" in commands
    assert len([c for c in commands if c.startswith("add rule inet secfw sg-new-in ")]) == 1
    assert not any("delete" in c for c in commands)


def test_removed_group_goes_after_everything_that_refers_to_it() -> None:
    hf = small()
    without_egress = replace(
        hf, chains=tuple(c for c in hf.chains if c.name != WEB_OUT),
        ports=tuple(replace(p, egress_chains=()) for p in hf.ports))
    commands = plan_between(hf, without_egress).commands
    assert commands == (
        f'delete element inet secfw egress_ports {{ "{TAP_B}" }}',
        f'add element inet secfw egress_ports {{ "{TAP_B}" : drop }}',
        "flush chain inet secfw egress-filter",
        f"flush chain inet secfw {WEB_OUT}",
        "delete chain inet secfw egress-filter",
        f"delete chain inet secfw {WEB_OUT}",
        f"delete set inet secfw {WEB_OUT}-ports",
    )


def test_foreign_objects_in_our_table_are_removed() -> None:
    ruleset = render(small())
    state = KernelState.from_ruleset(ruleset)
    chains = {**state.chains, "intruder-1": ChainState(None, ("",)),
              "forward-ingress": replace(state.chains["forward-ingress"], rules=("",))}
    sets = {**state.sets, "left.over": SetState(("ifname",), (), False, frozenset())}
    commands = plan(KernelState(sets, chains), ruleset).commands
    assert commands[0] == "flush chain inet secfw forward-ingress"
    assert commands[-3:] == ("flush chain inet secfw intruder-1",
                             "delete chain inet secfw intruder-1",
                             "delete set inet secfw left.over")


def test_changed_declaration_or_hook_means_full_replacement() -> None:
    ruleset = render(small())
    state = KernelState.from_ruleset(ruleset)
    flags = {**state.sets, WEB_V4: replace(state.sets[WEB_V4], flags=())}
    assert plan(KernelState(flags, state.chains), ruleset).full
    hook = Hook("filter", "forward", 10, "accept")
    chains = {**state.chains, "forward-ingress": ChainState(hook, ())}
    assert plan(KernelState(state.sets, chains), ruleset).full


def test_unknown_backend_name() -> None:
    with pytest.raises(BackendError, match="unknown backend"):
        get_backend("iptables-legacy")


@pytest.mark.parametrize("state_change", [
    lambda s: KernelState(s.sets, {**s.chains, "tcp": ChainState(None, ())}),
    lambda s: KernelState(s.sets, {**s.chains, 'x"; delete table inet other': ChainState(None,
                                                                                     ())}),
    lambda s: KernelState({**s.sets, "bad name": SetState(("ifname",), (), False, frozenset())},
                          s.chains),
    lambda s: KernelState({**s.sets, "ingress_ports": replace(
        s.sets["ingress_ports"], elements=s.sets["ingress_ports"].elements | {
            Element(('eth0" }\ndelete table inet other #',), Verdict("accept"))})}, s.chains),
])
def test_unprintable_read_back_means_full_replacement(state_change: Any) -> None:
    """Names or elements secfw did not write and cannot safely name are never
    printed into a command: the whole table is replaced instead."""
    ruleset = render(small())
    tx = plan(state_change(KernelState.from_ruleset(ruleset)), ruleset)
    assert tx.full and "other" not in tx.text


def test_fixed_names_that_went_away_are_deleted_by_name() -> None:
    hf = small()
    v6 = replace(hf, ports=(port(TAP_A, (WEB_IN,), same_net=("2001:db8::/64",)), *hf.ports[1:]))
    assert plan_between(v6, hf).commands[-1] == "delete set inet secfw same_net6"
