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
from secfw.backends.nftables.state import ChainState, RuleState, SetState
from secfw.backends.nftables.syntax import Datum
from secfw.compiler.ir import (
    AddressPair,
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
NET = "0c0c0c0c-0000-4000-8000-00000000000c"
NET_V4, NET_V6 = f"net-{NET}-v4", f"net-{NET}-v6"
TAP_A, TAP_B, TAP_C = "tapaaaaaaaa-aa", "tapbbbbbbbb-bb", "tapcccccccc-cc"


def rule(rid: str = "r0000000-x", family: str = "ipv4", **kw: Any) -> IRRule:
    return IRRule(rid, family, **kw)  # type: ignore[arg-type]


MACS = {TAP_A: "fa:16:3e:00:00:0a", TAP_B: "fa:16:3e:00:00:0b", TAP_C: "fa:16:3e:00:00:0c"}
IPS = {TAP_A: "10.0.0.10", TAP_B: "10.0.0.11", TAP_C: "10.0.0.12"}


def port(tap: str, ingress: tuple[str, ...] = (), egress: tuple[str, ...] = (),
         egress_open: bool = True, same_net: tuple[str, ...] = (),
         **kw: Any) -> PortPolicy:
    return PortPolicy(tap, f"port-{tap}", f"inst-{tap}", MACS.get(tap, "fa:16:3e:00:00:01"),
                      (IPS.get(tap, "10.0.0.5"),), same_net, ingress, egress, egress_open, **kw)


def small() -> HostFilter:
    """Three ports, two groups (one with an egress chain), one source-group set and
    a network's same-net sets; port A has IPv6 and two allowed address pairs,
    port C has no port security."""
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
    pairs = (AddressPair("10.0.0.100/32", MACS[TAP_A]),
             AddressPair("10.9.9.0/28", "fa:16:3e:00:00:99"))
    ports = (
        port(TAP_A, (WEB_IN,), ipv6=("2001:db8::a",), allowed_pairs=pairs,
             same_net=(NET_V4, NET_V6)),
        port(TAP_B, (WEB_IN, SSH_IN), (WEB_OUT,), egress_open=False, same_net=(NET_V4,)),
        port(TAP_C, (SSH_IN,), port_security=False),
    )
    return HostFilter("h1", ports, (web_in, web_out, ssh_in), (web_v4, *NET_SETS))


NET_SETS = (
    AddressSet(NET_V4, NET, "ipv4", ("10.0.0.10/32", "10.0.0.11/32", "10.0.0.12/32",
                                     "10.0.0.100/32", "10.0.0.200/32")),
    AddressSet(NET_V6, NET, "ipv6", ("2001:db8::a/128",)),
)


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


def key(name: str, family: str = "inet") -> tuple[str, str]:
    """A KernelState key."""
    return (family, name)


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
     "ingress-filter", "egress-guard", "sg-" + "x" * 200],
)
def test_only_safe_identifiers_reach_the_ruleset(name: str) -> None:
    chain = GroupChain(name, "g", "ingress", ())
    with pytest.raises(BackendError):
        render(HostFilter("h", (), (chain,), ()))
    address_set = AddressSet(name, "g", "ipv4", ())
    if name not in ("ingress-filter", "egress-guard"):  # chain names
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
    clash = AddressSet(f"{NET_V4}-ports", WEB, "ipv4", ())  # same name as a -ports set
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


CT = "ct state vmap { established : accept, related : accept, invalid : drop }"


def fast_path(port_key: str) -> list[str]:
    """The established fast path of the egress base chains: anti-spoofing lookup
    and the tests of egress-protect's first rule in one rule per family."""
    return [f"ct state established meta l4proto {{ tcp, udp }} th sport != {{ 67, 547 }} "
            f"{port_key} . ether saddr . {ip} saddr @{name} accept"
            for ip, name in (("ip", "spoof4"), ("ip6", "spoof6"))]
NOT_SYN = "tcp flags & (fin | syn | rst | ack) != syn drop"
ND_IN = ("icmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, "
         "mld-listener-query } accept")


def test_port_membership_is_data_in_slot_maps() -> None:
    """Slot i maps a port to its i-th group chain (sorted by name): a new flow costs
    one lookup per slot, not one per group chain of the host."""
    ruleset = render(small())
    web, ssh, out = Verdict("jump", WEB_IN), Verdict("jump", SSH_IN), Verdict("jump", WEB_OUT)
    assert WEB_IN < SSH_IN
    assert named(ruleset, "ingress_slot0") == [
        Element((TAP_A,), web), Element((TAP_B,), web), Element((TAP_C,), ssh)]
    assert named(ruleset, "ingress_slot1") == [Element((TAP_B,), ssh)]
    assert named(ruleset, "egress_slot0") == [Element((TAP_B,), out)]
    assert "egress_slot1" not in {s.name for s in ruleset.sets}
    assert named(ruleset, f"{NET_V4}-ports") == [Element((TAP_A,)), Element((TAP_B,))]
    assert named(ruleset, f"{NET_V6}-ports") == [Element((TAP_A,))]
    assert chain_rules(ruleset, "ingress-filter") == [
        CT, NOT_SYN, ND_IN,
        f"oifname @{NET_V4}-ports ip saddr @{NET_V4} accept",
        f"oifname @{NET_V6}-ports ip6 saddr @{NET_V6} accept",
        "oifname vmap @ingress_slot0",
        "oifname vmap @ingress_slot1",
        "drop",
    ]
    assert chain_rules(ruleset, "egress-filter") == [
        "jump egress-guard", "iifname vmap @egress_slot0", "drop"]
    assert chain_rules(ruleset, "egress-open") == ["jump egress-guard", "accept"]


def test_verdict_maps_dispatch_every_port() -> None:
    ruleset = render(small())
    to_ingress = Verdict("goto", "ingress-filter")
    assert named(ruleset, "ingress_ports") == [
        Element((TAP_A,), to_ingress), Element((TAP_B,), to_ingress),
        Element((TAP_C,), Verdict("accept"))]  # no port security: no filtering at all
    assert named(ruleset, "egress_ports") == [
        Element((TAP_A,), Verdict("goto", "egress-open")),  # no egress rule in its groups
        Element((TAP_B,), Verdict("goto", "egress-filter")),  # its groups' egress rules
        Element((TAP_C,), Verdict("accept")),  # no port security
    ]


def test_closed_egress_without_egress_chains_drops_after_the_guard() -> None:
    hf = small()
    hf = replace(hf, chains=tuple(c for c in hf.chains if c.direction == "ingress"),
                 ports=tuple(replace(p, egress_chains=()) for p in hf.ports))
    ruleset = render(hf)
    assert chain_rules(ruleset, "egress-filter") == ["jump egress-guard", "drop"]
    assert named(ruleset, "egress_ports")[1] == Element((TAP_B,), Verdict("goto",
                                                                          "egress-filter"))


def test_base_chains_fail_closed_and_leave_other_traffic_alone() -> None:
    ruleset = render(HostFilter("h", (), (), ()))
    hooks = {(c.family, c.name): c.hook for c in ruleset.chains if c.hook}
    assert hooks == {
        ("inet", "forward-egress"): Hook("filter", "forward", -1, "accept"),
        ("inet", "forward-ingress"): Hook("filter", "forward", 0, "accept"),
        ("inet", "input-egress"): Hook("filter", "input", 0, "accept"),
        ("arp", "arp-input"): Hook("filter", "input", 0, "accept"),
        # a tap that is a bridge port is closed on a routed host (wrong topology)
        ("bridge", "from-tap"): Hook("filter", "prerouting", -200, "accept"),
        ("bridge", "to-tap"): Hook("filter", "postrouting", -200, "accept"),
    }
    assert chain_rules(ruleset, "from-tap") == ['iifname "tap*" drop']
    assert chain_rules(ruleset, "to-tap") == ['oifname "tap*" drop']
    assert chain_rules(ruleset, "forward-ingress") == [
        'oifname != "tap*" accept', "oifname vmap @ingress_ports", 'oifname "tap*" drop']
    for name in ("forward-egress", "input-egress"):
        assert chain_rules(ruleset, name) == [
            'iifname != "tap*" accept', *fast_path("iifname"), "iifname vmap @egress_ports",
            'iifname "tap*" drop']
    assert not any(s.name.startswith("net-") for s in ruleset.sets)
    assert chain_rules(ruleset, "ingress-filter") == [CT, NOT_SYN, ND_IN, "drop"]


# ----------------------------------------------------------- port protection --


def test_anti_spoofing_sets_hold_every_source_of_protected_ports() -> None:
    ruleset = render(small())
    a, b = MACS[TAP_A], MACS[TAP_B]
    assert named(ruleset, "spoof4") == sorted([
        Element((TAP_A, a, "0.0.0.0/32")), Element((TAP_A, a, "10.0.0.10/32")),
        Element((TAP_A, a, "10.0.0.100/32")),
        Element((TAP_B, b, "0.0.0.0/32")), Element((TAP_B, b, "10.0.0.11/32"))])
    assert named(ruleset, "spoof4_nets") == [
        Element((TAP_A, "fa:16:3e:00:00:99", "10.9.9.0/28"))]  # the pair's own MAC
    assert named(ruleset, "spoof6") == sorted([
        Element((TAP_A, a, "2001:db8::a/128")), Element((TAP_A, a, "::/128")),
        Element((TAP_A, a, "fe80::f816:3eff:fe00:a/128")),
        Element((TAP_A, "fa:16:3e:00:00:99", "fe80::f816:3eff:fe00:99/128")),
        Element((TAP_B, b, "::/128")), Element((TAP_B, b, "fe80::f816:3eff:fe00:b/128"))])
    assert named(ruleset, "spoof6_nets") == []
    assert all(TAP_C not in e.key for s in ruleset.sets if s.name.startswith("spoof")
               for e in s.elements)  # port security off: not checked at all


def test_neighbour_advertisements_only_for_the_ports_own_addresses() -> None:
    ruleset = render(small())
    assert named(ruleset, "nd_targets") == [
        Element((TAP_A, "0x20010db800000000000000000000000a")),
        Element((TAP_A, "0xfe80000000000000f8163efffe000099")),  # the pair MAC's link-local
        Element((TAP_A, "0xfe80000000000000f8163efffe00000a")),
        Element((TAP_B, "0xfe80000000000000f8163efffe00000b")),
    ]  # TAP_C: no port security, not checked
    assert named(ruleset, "nd_target_nets") == []
    assert not any(c.name.startswith("nd-") for c in ruleset.chains)  # no chain per port


def test_neighbour_advertisement_targets_of_pair_networks_are_merged_ranges() -> None:
    mac, tap = "fa:16:3e:00:00:01", "tapdddddddd-dd"
    pairs = (AddressPair("2001:db8:1::/64", mac), AddressPair("2001:db8:1::/120", mac),
             AddressPair("2001:db8:2::5", mac))
    ruleset = render(HostFilter("h", (port(tap, allowed_pairs=pairs),), (), ()))
    assert named(ruleset, "nd_target_nets") == [Element((
        tap, "0x20010db8000100000000000000000000-0x20010db800010000ffffffffffffffff"))]
    assert Element((tap, "0x20010db8000200000000000000000005")) in named(ruleset, "nd_targets")
    text = to_nft_text(ruleset)
    assert "typeof iifname . @th,64,128; flags interval;" in text


def test_neighbour_advertisement_targets_are_keyed_by_mark_on_a_bridged_host() -> None:
    ruleset = render(small(), "bridged")
    declared = {s.name: s.typeof for s in ruleset.sets if s.name.startswith("nd_")}
    assert declared == {"nd_targets": "meta mark . @th,64,128",
                        "nd_target_nets": "meta mark . @th,64,128"}
    assert "icmpv6 type nd-neighbor-advert meta mark . @th,64,128 @nd_targets accept" in (
        chain_rules(ruleset, "egress-protect"))


def test_guard_and_protections() -> None:
    ruleset = render(small())
    assert chain_rules(ruleset, "egress-guard") == [
        "iifname . ether saddr . ip saddr @spoof4 goto egress-protect",
        "iifname . ether saddr . ip saddr @spoof4_nets goto egress-protect",
        "iifname . ether saddr . ip6 saddr @spoof6 goto egress-protect",
        "iifname . ether saddr . ip6 saddr @spoof6_nets goto egress-protect",
        "drop",
    ]
    assert chain_rules(ruleset, "egress-protect") == [
        "meta l4proto { tcp, udp } th sport != { 67, 547 } ct state established accept",
        "ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
        "ip saddr 0.0.0.0 drop",
        "ip6 saddr :: icmpv6 type { nd-neighbor-solicit, mld2-listener-report } accept",
        "ip6 saddr :: drop",
        "udp sport 67 udp dport 68 drop",
        "udp sport 547 udp dport 546 drop",
        "icmpv6 type { nd-router-advert, nd-redirect } drop",
        "icmpv6 type nd-neighbor-advert iifname . @th,64,128 @nd_targets accept",
        "icmpv6 type nd-neighbor-advert iifname . @th,64,128 @nd_target_nets accept",
        "icmpv6 type nd-neighbor-advert drop",
        "udp sport 68 udp dport 67 accept",
        "udp sport 546 udp dport 547 accept",
        "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, mld-listener-report, "
        "mld-listener-done, mld2-listener-report } accept",
        CT, NOT_SYN,
    ]


def test_arp_table_binds_sender_to_the_port() -> None:
    ruleset = render(small())
    a, b = MACS[TAP_A], MACS[TAP_B]
    arp = {s.name for s in ruleset.sets if s.family == "arp"}
    assert arp == {"arp_open", "arp_hosts", "arp_nets"}
    assert named(ruleset, "arp_open") == [Element((TAP_C,))]
    assert named(ruleset, "arp_hosts") == sorted([
        Element((TAP_A, a, a, "0.0.0.0/32")), Element((TAP_A, a, a, "10.0.0.10/32")),
        Element((TAP_A, a, a, "10.0.0.100/32")),
        Element((TAP_B, b, b, "0.0.0.0/32")), Element((TAP_B, b, b, "10.0.0.11/32"))])
    mac = "fa:16:3e:00:00:99"
    assert named(ruleset, "arp_nets") == [Element((TAP_A, mac, mac, "10.9.9.0/28"))]
    key_ = "iifname . ether saddr . arp saddr ether . arp saddr ip"
    assert chain_rules(ruleset, "arp-input") == [
        'iifname != "tap*" accept', "iifname @arp_open accept",
        f"{key_} @arp_hosts accept", f"{key_} @arp_nets accept", 'iifname "tap*" drop']


def test_overlapping_pair_networks_are_merged() -> None:
    mac = "fa:16:3e:00:00:01"
    pairs = (AddressPair("10.8.0.0/24", mac), AddressPair("10.8.0.0/28", mac),
             AddressPair("10.8.1.0/24", mac))
    ruleset = render(HostFilter("h", (port("tapdddddddd-dd", allowed_pairs=pairs),), (), ()))
    assert named(ruleset, "spoof4_nets") == [Element(("tapdddddddd-dd", mac, "10.8.0.0/23"))]


def test_bad_macs_are_rejected() -> None:
    for mac in ("01:00:5e:00:00:01", "fa:16:3e:00:00", 'x"; drop'):
        bad = replace(port(TAP_A), mac=mac)
        with pytest.raises(BackendError, match="MAC"):
            render(HostFilter("h", (bad,), (), ()))


def test_same_net_sources_are_the_networks_port_addresses_not_its_cidr() -> None:
    """A same-net set is an address set like a source group's (its elements as the
    IR gives them, no subnet anywhere); which ports accept from it is a set of
    taps; a port without port security is in none; an unknown set is an error."""
    ports = (port(TAP_A, same_net=(NET_V4, NET_V6)), port(TAP_B, same_net=(NET_V4,)),
             port(TAP_C, same_net=(NET_V4,), port_security=False))
    ruleset = render(HostFilter("h", ports, (), NET_SETS))
    assert named(ruleset, NET_V4) == [Element((e,)) for e in NET_SETS[0].elements]
    assert named(ruleset, f"{NET_V4}-ports") == [Element((TAP_A,)), Element((TAP_B,))]
    assert named(ruleset, f"{NET_V6}-ports") == [Element((TAP_A,))]
    assert "10.0.0.0/24" not in to_nft_text(ruleset)
    with pytest.raises(BackendError, match="unknown same-net set"):
        render(HostFilter("h", ports, (), NET_SETS[:1]))


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
    """What ``list table`` would print after ``batch``: its added objects, in order
    (tables once each)."""
    objects = [cmd["add"] for cmd in batch["nftables"] if "add" in cmd]
    tables = [o for o in objects if "table" in o]
    return {"nftables": [o for o in objects if "table" not in o] + tables[::2]}


def test_json_batch_holds_the_same_objects_as_the_text() -> None:
    ruleset = render(small())
    batch = to_nft_json(ruleset)
    commands = batch["nftables"]
    for family, at in (("inet", 0), ("arp", 3), ("bridge", 6)):
        table = {"table": {"family": family, "name": "secfw"}}
        assert commands[at:at + 3] == [{"add": table}, {"delete": table}, {"add": table}]
    kinds = [next(iter(c["add"])) for c in commands[9:]]
    # Chains first (map verdicts name them), then sets and maps, then rules.
    assert kinds == sorted(kinds, key=["chain", "map", "set", "rule"].index)
    text = to_nft_text(ruleset)
    for cmd in commands[9:]:
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
    same_net = [r for c in ruleset.chains if c.name == "ingress-filter" for r in c.rules][3]
    assert rules[same_net.comment] == [
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}},
                   "right": f"@{NET_V4}-ports"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                   "right": f"@{NET_V4}"}},
        {"accept": None},
    ]


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
        {"set": {"family": "inet", "table": "secfw", "name": "spoof6",
                 "type": ["ifname", "ether_addr", "ipv6_addr"], "elem": [
                     {"concat": ["tap1", "FA:16:3E:00:00:01", "fe80::1"]}]}},
        {"table": {"family": "arp", "name": "secfw", "handle": 7}},
        {"set": {"family": "arp", "table": "secfw", "name": "arp_hosts",
                 "type": ["ifname", "ether_addr", "ether_addr", "ipv4_addr"], "elem": [
                     {"concat": ["tap1", "fa:16:3e:00:00:01", "fa:16:3e:00:00:01", "0.0.0.0"]}]}},
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
    mac = "fa:16:3e:00:00:01"
    assert state == KernelState(
        sets={
            key("a-v4"): SetState(("ipv4_addr",), ("interval",), False, v4),
            key("a-v6"): SetState(("ipv6_addr",), ("interval",), False,
                                  frozenset({Element(("2001:db8::1/128",))})),
            key("same_net4"): SetState(("ifname", "ipv4_addr"), ("interval",), False, frozenset({
                Element(("tap1", "10.0.0.0/24")), Element(("tap2", "10.0.0.9/32"))})),
            key("spoof6"): SetState(("ifname", "ether_addr", "ipv6_addr"), (), False,
                                    frozenset({Element(("tap1", mac, "fe80::1/128"))})),
            key("ingress_ports"): SetState(("ifname",), (), True, frozenset({
                Element(("tap1",), Verdict("goto", "ingress-filter")),
                Element(("tap2",), Verdict("drop"))})),
            key("arp_hosts", "arp"): SetState(
                ("ifname", "ether_addr", "ether_addr", "ipv4_addr"), (), False,
                frozenset({Element(("tap1", mac, mac, "0.0.0.0/32"))})),
        },
        chains={
            key("forward-ingress"): ChainState(Hook("filter", "forward", 0, "accept"),
                                               (RuleState("abc", ()), RuleState("", ()))),
            key("empty-chain"): ChainState(None, ()),
        },
        tables=frozenset({"inet", "arp"}),
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
    assert tx.full and tx.count == 9 and not tx.empty
    assert tx.commands[:6] == ("add table inet secfw", "delete table inet secfw",
                               "add table arp secfw", "delete table arp secfw",
                               "add table bridge secfw", "delete table bridge secfw")
    assert tx.text == to_nft_text(render(small())).split("\n", 1)[1]


def test_a_missing_table_means_full_replacement() -> None:
    ruleset = render(small())
    state = KernelState.from_ruleset(ruleset)
    inet_only = KernelState({k: v for k, v in state.sets.items() if k[0] == "inet"},
                            {k: v for k, v in state.chains.items() if k[0] == "inet"},
                            frozenset({"inet"}))
    assert plan(inet_only, ruleset).full


def test_plan_without_change_is_empty() -> None:
    tx = plan_between(small(), small())
    assert tx.empty and tx.count == 0 and tx.size == 0 and tx.text == ""


def test_membership_change_touches_the_slot_maps_of_one_port() -> None:
    hf = small()
    joined = replace(hf, ports=(replace(hf.ports[0], ingress_chains=(WEB_IN, SSH_IN)),
                                *hf.ports[1:]))
    assert plan_between(hf, joined).commands == (
        f'add element inet secfw ingress_slot1 {{ "{TAP_A}" : jump {SSH_IN} }}',)
    assert plan_between(joined, hf).commands == (
        f'delete element inet secfw ingress_slot1 {{ "{TAP_A}" }}',)


def test_member_address_change_touches_its_address_set() -> None:
    hf = small()
    grown = replace(hf, sets=(replace(hf.sets[0], elements=(*hf.sets[0].elements,
                                                            "10.10.0.1/32")), *hf.sets[1:]))
    assert plan_between(hf, grown).commands == (
        f"add element inet secfw {WEB_V4} {{ 10.10.0.1/32 }}",)


def test_new_port_is_only_elements() -> None:
    """No chain per port: a port booting or going is set elements only (so the
    chain count libnftables lists before each element change stays O(groups))."""
    hf = small()
    tap = "tapdddddddd-dd"
    more = replace(hf, ports=(*hf.ports, port(tap, (WEB_IN, SSH_IN), same_net=(NET_V4,))))
    commands = plan_between(hf, more).commands
    assert all(c.startswith("add element ") for c in commands)
    assert sorted(c.split()[4] for c in commands) == sorted(
        ["egress_ports", "ingress_ports", f"{NET_V4}-ports", "ingress_slot0", "ingress_slot1",
         "spoof4", "spoof6", "nd_targets", "arp_hosts"])
    assert all(f'"{tap}"' in c for c in commands)
    assert (f'add element inet secfw nd_targets {{ "{tap}" . '
            f'0xfe80000000000000f8163efffe000001 }}') in commands
    removed = plan_between(more, hf).commands
    assert all(c.startswith("delete element ") for c in removed)
    assert len(removed) == len(commands)


def test_changed_verdict_is_delete_then_add_of_the_map_element() -> None:
    hf = small()
    opened = replace(hf, ports=(hf.ports[0], replace(hf.ports[1], egress_open=True),
                                hf.ports[2]))
    assert plan_between(hf, opened).commands == (
        f'delete element inet secfw egress_ports {{ "{TAP_B}" }}',
        f'add element inet secfw egress_ports {{ "{TAP_B}" : goto egress-open }}',
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


def test_new_group_adds_chain_and_slot_elements() -> None:
    hf = small()
    new = GroupChain("sg-new-in", "new", "ingress", (rule(protocol=17),))
    grown = replace(hf, chains=(*hf.chains, new),
                    ports=(replace(hf.ports[0], ingress_chains=(WEB_IN, "sg-new-in")),
                           *hf.ports[1:]))
    commands = plan_between(hf, grown).commands
    assert commands[0] == "add chain inet secfw sg-new-in"
    assert WEB_IN < "sg-new-in"  # sorted by name: the port's slot 1
    assert commands[1] == (
        f'add element inet secfw ingress_slot1 {{ "{TAP_A}" : jump sg-new-in }}')
    assert "flush chain inet secfw ingress-filter" not in commands  # still two slots
    assert len([c for c in commands if c.startswith("add rule inet secfw sg-new-in ")]) == 1
    assert len(commands) == 3
    assert not any("delete" in c for c in commands)


def test_removed_group_goes_after_everything_that_refers_to_it() -> None:
    hf = small()
    without_egress = replace(
        hf, chains=tuple(c for c in hf.chains if c.name != WEB_OUT),
        ports=tuple(replace(p, egress_chains=()) for p in hf.ports))
    commands = plan_between(hf, without_egress).commands
    guard, drop = render(hf).chains[0].rules[0], render(hf).chains[0].rules[-1]
    assert [guard.comment, drop.comment] == ["bd72ddd08c18d772", "d90ee9ccf6bea1d2"]
    assert commands == (
        "flush chain inet secfw egress-filter",
        f'add rule inet secfw egress-filter jump egress-guard comment "{guard.comment}"',
        f'add rule inet secfw egress-filter drop comment "{drop.comment}"',
        f"flush chain inet secfw {WEB_OUT}",
        "delete map inet secfw egress_slot0",  # it jumps to WEB_OUT: deleted first
        f"delete chain inet secfw {WEB_OUT}",
    )


def test_foreign_objects_in_our_table_are_removed() -> None:
    ruleset = render(small())
    state = KernelState.from_ruleset(ruleset)
    chains = {**state.chains, key("intruder-1"): ChainState(None, (RuleState("", ()),)),
              key("arp-intruder", "arp"): ChainState(None, ()),
              key("forward-ingress"): ChainState(state.chains[key("forward-ingress")].hook,
                                                 (RuleState("", ()),))}
    sets = {**state.sets, key("left.over"): SetState(("ifname",), (), False, frozenset())}
    commands = plan(KernelState(sets, chains, state.tables), ruleset).commands
    assert commands[0] == "flush chain inet secfw forward-ingress"
    assert commands[-5:] == ("flush chain arp secfw arp-intruder",
                             "flush chain inet secfw intruder-1",
                             "delete set inet secfw left.over",
                             "delete chain arp secfw arp-intruder",
                             "delete chain inet secfw intruder-1")


def test_changed_declaration_or_hook_means_full_replacement() -> None:
    ruleset = render(small())
    state = KernelState.from_ruleset(ruleset)
    web = state.sets[key(WEB_V4)]
    flags = {**state.sets, key(WEB_V4): SetState(web.key_type, (), web.is_map, web.elements)}
    assert plan(KernelState(flags, state.chains), ruleset).full
    hook = Hook("filter", "forward", 10, "accept")
    chains = {**state.chains, key("forward-ingress"): ChainState(hook, ())}
    assert plan(KernelState(state.sets, chains), ruleset).full


def test_unknown_backend_name() -> None:
    with pytest.raises(BackendError, match="unknown backend"):
        get_backend("iptables-legacy")


@pytest.mark.parametrize("state_change", [
    lambda s: KernelState(s.sets, {**s.chains, key("tcp"): ChainState(None, ())}),
    lambda s: KernelState(s.sets, {**s.chains, key('x"; delete table inet other'):
                                   ChainState(None, ())}),
    lambda s: KernelState({**s.sets, key("bad name"): SetState(("ifname",), (), False,
                                                               frozenset())}, s.chains),
    lambda s: KernelState({**s.sets, key("ingress_ports"): s.sets[
        key("ingress_ports")].with_elements(s.sets[key("ingress_ports")].elements | {
            Element(('eth0" }\ndelete table inet other #',), Verdict("accept"))})}, s.chains),
    lambda s: KernelState({**s.sets, key("arp_hosts", "arp"): s.sets[
        key("arp_hosts", "arp")].with_elements(frozenset({
            Element(("tap1", "fa:16:3e:00:00:01", "x } ; flush ruleset", "10.0.0.1/32"))}))},
        s.chains),
])
def test_unprintable_read_back_means_full_replacement(state_change: Any) -> None:
    """Names or elements secfw did not write and cannot safely name are never
    printed into a command: the whole table is replaced instead."""
    ruleset = render(small())
    tx = plan(state_change(KernelState.from_ruleset(ruleset)), ruleset)
    assert tx.full and "other" not in tx.text


def test_a_same_net_set_no_port_names_goes_after_its_rule() -> None:
    hf = small()
    v4 = replace(hf, ports=(replace(hf.ports[0], same_net_sets=(NET_V4,)), *hf.ports[1:]))
    commands = plan_between(hf, v4).commands
    assert commands[-1] == f"delete set inet secfw {NET_V6}-ports"
    assert commands[0] == "flush chain inet secfw ingress-filter"
    assert not any(NET_V6 in c for c in commands[1:-1])


# ------------------------------------------------------------ bridged hosts --


def test_bridged_host_uses_a_bridge_table_and_marks_instead_of_interface_names() -> None:
    ruleset = render(small(), "bridged")
    assert ruleset.families() == ("inet", "bridge")  # no arp table: ARP is bridged
    marks = {e.key[0]: int(e.verdict.text) for e in named(ruleset, "egress_marks")
             if isinstance(e.verdict, Datum)}
    ingress = {e.key[0]: int(e.verdict.text) for e in named(ruleset, "ingress_marks")
               if isinstance(e.verdict, Datum)}
    assert set(marks) == set(ingress) == {TAP_A, TAP_B, TAP_C}
    assert len(set(marks.values())) == 3 and all(m and not m & 0x80000080 for m in marks.values())
    assert all(ingress[tap] == marks[tap] | 0x80000080 for tap in marks)
    swapped = {m: int.from_bytes(m.to_bytes(4, "little"), "big")
               for m in (*marks.values(), *ingress.values())}
    assert all(m == s for m, s in swapped.items())  # byte order cannot change them
    # The inet table keys every port by mark.
    # A tap seen as an IP interface is not a bridge port (wrong topology, not yet
    # plugged): dropped, where the routed layout would have dispatched it.
    # Established packets leave early: egress after the anti-spoofing lookup, ingress
    # after the two drops that hold whatever the state.
    for name in ("forward-egress", "input-egress"):
        assert chain_rules(ruleset, name) == [
            'meta mark 0 iifname != "tap*" accept', *fast_path("meta mark"),
            "meta mark vmap @egress_ports", 'iifname "tap*" drop']
    assert chain_rules(ruleset, "postrouting-ingress") == [
        'oifname "tap*" drop', "meta mark 2147483776 drop", "ct state established accept",
        "meta mark vmap @ingress_ports"]
    assert chain_rules(ruleset, "forward-ingress") == [
        "ct state established accept", "meta mark set ip daddr map @ingress_addrs4",
        "meta mark set ip6 daddr map @ingress_addrs6"]
    inet_sets = [s for s in ruleset.sets if s.family == "inet"]
    assert all("ifname" not in s.key_type for s in inet_sets)
    egress_keys = {e.key[0] for e in named(ruleset, "egress_ports")}
    assert egress_keys == {str(m) for m in marks.values()}
    assert {e.key[0] for e in named(ruleset, "ingress_ports")} == {
        str(m) for m in ingress.values()}
    assert {e.key[0] for e in named(ruleset, "spoof4")} <= egress_keys


def test_bridged_layer2_chain_checks_macs_and_arp_before_marking() -> None:
    ruleset = render(small(), "bridged")
    assert chain_rules(ruleset, "from-tap") == [
        'iifname != "tap*" accept',
        "iifname @arp_open accept",
        "iifname . ether saddr != @port_macs drop",
        "ether type arp iifname . ether saddr . arp saddr ether . arp saddr ip @arp_hosts accept",
        "ether type arp iifname . ether saddr . arp saddr ether . arp saddr ip @arp_nets accept",
        "ether type != { ip, ip6 } drop",
        "meta mark set iifname map @egress_marks accept",
        "drop",
    ]
    assert chain_rules(ruleset, "to-tap") == [
        'meta mark & 0x80000080 2147483776 oifname != "tap*" meta mark set 0 accept',
        'oifname != "tap*" accept', "meta mark set oifname map @ingress_marks accept", "drop"]
    hooks = {c.name: c.hook for c in ruleset.chains if c.family == "bridge"}
    assert hooks["from-tap"] == Hook("filter", "prerouting", -200, "accept")
    assert hooks["to-tap"] == Hook("filter", "postrouting", -200, "accept")
    # tap C has port security off: no MAC of its in port_macs, it is in arp_open.
    assert {e.key for e in named(ruleset, "port_macs")} == {
        (TAP_A, MACS[TAP_A]), (TAP_A, "fa:16:3e:00:00:99"), (TAP_B, MACS[TAP_B])}
    assert [e.key for e in named(ruleset, "arp_open")] == [(TAP_C,)]
    text = to_nft_text(ruleset)
    assert "priority -200;" in text and "type ifname : mark;" in text


def test_bridged_host_marks_what_it_routes_to_a_port_by_destination_address() -> None:
    """Every address a port has or may use maps to its ingress mark (port security
    off included: its ingress_ports element accepts); a network an allowed pair
    gives makes the map an interval map; an address two ports claim maps to the
    shared mark, which postrouting-ingress drops."""
    ruleset = render(small(), "bridged")
    ingress = {e.key[0]: e.verdict.text for e in named(ruleset, "ingress_marks")
               if isinstance(e.verdict, Datum)}
    v4 = {e.key[0]: e.verdict for e in named(ruleset, "ingress_addrs4")}
    assert v4 == {
        "10.0.0.10/32": Datum(ingress[TAP_A]), "10.0.0.11/32": Datum(ingress[TAP_B]),
        "10.0.0.12/32": Datum(ingress[TAP_C]), "10.0.0.100/32": Datum(ingress[TAP_A]),
        "10.9.9.0/28": Datum(ingress[TAP_A])}
    assert next(s for s in ruleset.sets if s.name == "ingress_addrs4").flags == ("interval",)
    v6 = next(s for s in ruleset.sets if s.name == "ingress_addrs6")
    assert v6.flags == () and [e.key[0] for e in v6.elements] == ["2001:db8::a/128"]
    # tap B also claims 10.9.9.4: that address is shared, the rest of the /28 is A's.
    pairs = (AddressPair("10.9.9.4/32", MACS[TAP_B]),)
    hf = small()
    hf = replace(hf, ports=(hf.ports[0], replace(hf.ports[1], allowed_pairs=pairs),
                            hf.ports[2]))
    shared = {e.key[0]: e.verdict for e in named(render(hf, "bridged"), "ingress_addrs4")}
    assert shared["10.9.9.4/32"] == Datum("2147483776")
    assert [c for c in shared if c.startswith("10.9.9.")] == [
        "10.9.9.0/30", "10.9.9.4/32", "10.9.9.5/32", "10.9.9.6/31", "10.9.9.8/29"]
    assert {shared[c] for c in ("10.9.9.0/30", "10.9.9.5/32", "10.9.9.6/31",
                                "10.9.9.8/29")} == {Datum(ingress[TAP_A])}
    assert plan(KernelState.from_ruleset(render(hf, "bridged")), render(hf, "bridged")).empty


def test_bridged_state_round_trips_and_plans_nothing() -> None:
    ruleset = render(small(), "bridged")
    state = KernelState.from_ruleset(ruleset)
    assert plan(state, ruleset).empty
    document = to_nft_json(ruleset)["nftables"]
    maps = [c["add"]["map"] for c in document if "map" in c.get("add", {})]
    egress_marks = next(m for m in maps if m["name"] == "egress_marks")
    assert egress_marks["map"] == "mark" and isinstance(egress_marks["elem"][0][1], int)


def test_switching_topology_replaces_every_table() -> None:
    routed = KernelState.from_ruleset(render(small(), "routed"))
    tx = plan(routed, render(small(), "bridged"))
    assert tx.full and "delete table arp secfw" in tx.commands
    back = plan(KernelState.from_ruleset(render(small(), "bridged")), render(small()))
    assert back.full and "delete table bridge secfw" in back.commands


def test_unknown_topology_is_refused() -> None:
    with pytest.raises(BackendError, match="unknown topology 'flat'"):
        render(small(), "flat")
    with pytest.raises(BackendError, match="unknown topology"):
        get_backend("nftables", topology="flat")


def test_marks_are_distinct_even_when_names_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    """CRC-32 collisions (forced here) probe for the next free mark, in sorted order."""
    from secfw.backends.nftables import layout

    monkeypatch.setattr(layout.zlib, "crc32", lambda data: 0)
    assert layout.assign_marks(["tapb", "tapa", "tapc"]) == {
        "tapa": 0x00010100, "tapb": 0x00020200, "tapc": 0x00030300}
    monkeypatch.setattr(layout.zlib, "crc32", lambda data: layout.MAX_MARKED_TAPS - 1)
    assert layout.assign_marks(["tapa", "tapb"]) == {"tapa": 0x7FFFFF7F, "tapb": 0x00010100}
    with pytest.raises(BackendError, match="at most 32767 taps"):
        layout.assign_marks(f"tap{i}" for i in range(layout.MAX_MARKED_TAPS + 1))


def test_source_group_sets_are_hash_sets_until_they_hold_a_network() -> None:
    """Hosts only: no interval flag (cheap element adds in libnftables 1.0.6); with
    a network (an address pair's CIDR): interval; the change is a full replacement."""
    hosts = AddressSet(WEB_V4, WEB, "ipv4", ("10.0.0.5/32", "10.0.0.6/32"))
    with_net = AddressSet(WEB_V4, WEB, "ipv4", ("10.0.0.5/32", "10.9.0.0/16"))
    base = small()
    only_hosts = replace(base, sets=(hosts, *NET_SETS))
    ruleset = render(only_hosts)
    (named,) = [s for s in ruleset.sets if s.name == WEB_V4]
    assert named.flags == ()
    assert f"set {WEB_V4} {{\n\t\ttype ipv4_addr;\n\t\telements = {{\n\t\t\t10.0.0.5,\n" \
        in to_nft_text(ruleset)
    assert next(s for s in render(replace(base, sets=(with_net, *NET_SETS))).sets
            if s.name == WEB_V4).flags == ("interval",)
    assert plan_between(only_hosts, replace(base, sets=(with_net, *NET_SETS))).full
    grown = AddressSet(WEB_V4, WEB, "ipv4", ("10.0.0.5/32", "10.0.0.6/32", "10.0.0.7/32"))
    assert plan_between(only_hosts, replace(base, sets=(grown, *NET_SETS))).commands == (
        f"add element inet secfw {WEB_V4} {{ 10.0.0.7 }}",)


def test_bridged_port_without_port_security_with_a_bad_address_is_a_backend_error() -> None:
    """Ports without port security skip the anti-spoofing sets that check addresses;
    the address maps still refuse a malformed one as a BackendError."""
    hf = small()
    bad = replace(hf.ports[2], ipv4=("10.0.0.12/24",))
    with pytest.raises(BackendError, match="not a CIDR"):
        render(replace(hf, ports=(*hf.ports[:2], bad)), "bridged")
