"""iptables backend, pure parts: IR → state → restore text, read-back normal form, plan,
and the executor against a fake process runner.

The kernel is the source of truth for whether the text loads, reads back equal and
behaves; that is ``tests/netns/test_ipt_executor.py``. These tests pin what is
rendered and that a plan is minimal. ``SECFW_UPDATE_GOLDEN=1`` rewrites the golden
files ``tests/golden/ipt_*.txt``.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from secfw.backends import BACKENDS, get_backend
from secfw.backends.iptables import (
    IpSet,
    IptablesBackend,
    IptablesExecutor,
    IptPlan,
    IptState,
    RenderOptions,
    Table,
    compile_text,
    detect_variant,
    from_save,
    plan,
    render,
    to_text,
)
from secfw.backends.iptables import executor as executor_module
from secfw.backends.iptables.executor import batched, first_error
from secfw.backends.iptables.render import (
    ALLOW,
    EGRESS,
    EGRESS_OPEN,
    INGRESS,
    MAX_CHAIN,
    MAX_SET,
    PASS,
    group_chain_name,
    group_rule,
    policy_chain,
    set_name,
)
from secfw.backends.iptables.state import normalise_rule, parse_ipsets, parse_table, split_quoted
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
from secfw.compiler.sources import link_local
from secfw.errors import BackendError, UnsupportedError

GOLDEN = Path(__file__).parent / "golden"

WEB = "0a0a0a0a-0000-4000-8000-00000000000a"
SSH = "0b0b0b0b-0000-4000-8000-00000000000b"
WEB_IN, WEB_OUT, SSH_IN = f"sg-{WEB}-in", f"sg-{WEB}-out", f"sg-{SSH}-in"
WEB_V4, WEB_V6 = f"sg-{WEB}-v4", f"sg-{WEB}-v6"
TAP_A, TAP_B, TAP_C = "tapaaaaaaaa-aa", "tapbbbbbbbb-bb", "tapcccccccc-cc"
NET = "0c0c0c0c-0000-4000-8000-00000000000c"
NET_V4, NET_V6 = f"net-{NET}-v4", f"net-{NET}-v6"
NET_SETS = (
    AddressSet(NET_V4, NET, "ipv4", ("10.0.0.5/32", "10.0.0.6/32", "10.0.0.100/32",
                                     "10.0.0.200/32")),
    AddressSet(NET_V6, NET, "ipv6", ("2001:db8::5/128",)),
)
MARK = "0x1000000/0x1000000"


def rule(rid: str = "r0000000-x", family: str = "ipv4", **kw: Any) -> IRRule:
    return IRRule(rid, family, **kw)  # type: ignore[arg-type]


def port(tap: str, ingress: tuple[str, ...] = (), egress: tuple[str, ...] = (),
         egress_open: bool = True, same_net: tuple[str, ...] = (),
         **kw: Any) -> PortPolicy:
    return PortPolicy(tap, f"port-{tap}", f"inst-{tap}", kw.pop("mac", "fa:16:3e:00:00:01"),
                      kw.pop("ipv4", ("10.0.0.5",)), same_net, ingress, egress, egress_open, **kw)


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
        port(TAP_A, (WEB_IN, SSH_IN), (WEB_OUT,), egress_open=False, same_net=(NET_V4,)),
        port(TAP_B, (SSH_IN,), mac="fa:16:3e:00:00:02", ipv4=("10.0.0.6",), same_net=(NET_V4,)),
        port(TAP_C, (), mac="fa:16:3e:00:00:03", ipv4=("10.0.1.7",)),
    )
    return HostFilter("compute1", ports, (ssh_in, web_in, web_out), (web_v4, NET_SETS[0]))


def protection() -> HostFilter:
    """Port protection in every form: IPv6, address pairs with a MAC of their own,
    port security off, closed egress with and without egress groups."""
    web_in = GroupChain(WEB_IN, WEB, "ingress", (
        rule("a1111111-1", protocol=6, ports=PortRange(80, 80)),
        rule("a5555555-5", "ipv6", protocol=58, icmp=IcmpMatch(128)),
        rule("a6666666-6", "ipv6", protocol=6, ports=PortRange(22, 22), remote_set=WEB_V6),
    ))
    web_out = GroupChain(WEB_OUT, WEB, "egress", (
        rule("a3333333-3", protocol=17, ports=PortRange(53, 53), remote_set=WEB_V4),
    ))
    sets = (AddressSet(WEB_V4, WEB, "ipv4", ("0.0.0.0/0",)),
            AddressSet(WEB_V6, WEB, "ipv6", ("2001:db8::5/128", "2001:db8:1::/48")))
    pairs = (AddressPair("10.0.0.100/32", "fa:16:3e:00:00:01"),
             AddressPair("10.9.0.0/16", "fa:16:3e:00:00:99"),
             AddressPair("2001:db8:9::/64", "fa:16:3e:00:00:99"))
    ports = (
        port(TAP_A, (WEB_IN,), (WEB_OUT,), egress_open=False, ipv6=("2001:db8::5",),
             same_net=(NET_V4, NET_V6), allowed_pairs=pairs),
        port(TAP_B, (WEB_IN,), (), egress_open=False, mac="FA:16:3E:00:00:02",
             ipv4=("10.0.0.6",), same_net=(NET_V4,)),
        port(TAP_C, (WEB_IN,), port_security=False, mac="fa:16:3e:00:00:03",
             ipv4=("10.0.0.7",)),
    )
    return HostFilter("compute1", ports, (web_in, web_out), (*sets, *NET_SETS))


def chains(state: IptState, family: str = "ipv4") -> dict[str, tuple[str, ...]]:
    return dict(state.tables[family].chains)  # type: ignore[index]


# --------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("name, hf", [("small", small), ("protection", protection)])
def test_rendering_matches_golden_file(name: str, hf: Any) -> None:
    text = compile_text(hf())
    path = GOLDEN / f"ipt_{name}.txt"
    if os.environ.get("SECFW_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_rendering_is_deterministic_whatever_the_ir_order() -> None:
    hf = protection()
    shuffled = HostFilter(hf.host, tuple(reversed(hf.ports)), tuple(reversed(hf.chains)),
                          tuple(reversed(hf.sets)))
    assert render(shuffled) == render(hf)
    assert to_text(render(shuffled)) == to_text(render(hf))


# --------------------------------------------------------------------------- names


def test_names_fit_the_kernel_limits_whatever_the_ir_names() -> None:
    long = "sg-" + "x" * 200
    taps = [f"tap{i:011x}"[:15] for i in range(300)]  # the longest taps: 15 characters
    chain = GroupChain(long + "-in", "g", "ingress", (rule(protocol=6, ports=PortRange(1, 1),
                                                          remote_set=long + "-v4"),))
    hf = HostFilter("h", tuple(port(t, (chain.name,)) for t in taps), (chain,),
                    (AddressSet(long + "-v4", "g", "ipv4", ("10.0.0.1/32",)),))
    state = render(hf)
    for family in ("ipv4", "ipv6"):
        for name in state.tables[family].chains:  # type: ignore[index]
            assert name.startswith("secfw-") and len(name) <= MAX_CHAIN, name
    assert all(name.startswith("secfw-") and len(name) <= MAX_SET for name in state.sets)


def test_names_are_hashes_of_the_ir_names() -> None:
    assert group_chain_name(WEB_IN) == group_chain_name(WEB_IN) != group_chain_name(WEB_OUT)
    assert re.fullmatch(r"secfw-g-[0-9a-f]{10}", group_chain_name(WEB_IN))
    assert re.fullmatch(r"secfw-a-[0-9a-f]{10}", set_name(WEB_V4))
    assert policy_chain("ingress", ["a", "b"]) != policy_chain("ingress", ["b", "a"])
    assert policy_chain("ingress", ["a"]) != policy_chain("egress", ["a"])


# --------------------------------------------------------------------------- IR rules


SETS = {WEB_V4: AddressSet(WEB_V4, WEB, "ipv4", ()), WEB_V6: AddressSet(WEB_V6, WEB, "ipv6", ())}
SET_NAMES = {WEB_V4: set_name(WEB_V4), WEB_V6: set_name(WEB_V6)}
COMMENT = "-m comment --comment r-r0000000"


@pytest.mark.parametrize("ir, ingress, expected", [
    (rule(), True, f"{COMMENT} -g {ALLOW}"),
    (rule(family="ipv6"), True, f"{COMMENT} -g {ALLOW}"),
    (rule(remote_cidr="10.0.0.0/8"), True, f"-s 10.0.0.0/8 {COMMENT} -g {ALLOW}"),
    (rule(remote_cidr="10.0.0.0/8"), False, f"-d 10.0.0.0/8 {COMMENT} -g {ALLOW}"),
    (rule(remote_cidr="0.0.0.0/0"), True, f"{COMMENT} -g {ALLOW}"),
    (rule(family="ipv6", remote_cidr="2001:DB8::/32"), True,
     f"-s 2001:db8::/32 {COMMENT} -g {ALLOW}"),
    (rule(remote_set=WEB_V4), True,
     f"-m set --match-set {SET_NAMES[WEB_V4]} src {COMMENT} -g {ALLOW}"),
    (rule(remote_set=WEB_V4), False,
     f"-m set --match-set {SET_NAMES[WEB_V4]} dst {COMMENT} -g {ALLOW}"),
    (rule(protocol=47), True, f"-p 47 {COMMENT} -g {ALLOW}"),
    (rule(protocol=6, ports=PortRange(80, 80)), True,
     f"-p 6 -m tcp --dport 80 {COMMENT} -g {ALLOW}"),
    (rule(protocol=17, ports=PortRange(1000, 2000)), True,
     f"-p 17 -m udp --dport 1000:2000 {COMMENT} -g {ALLOW}"),
    (rule(protocol=132, ports=PortRange(9, 9)), True,
     f"-p 132 -m sctp --dport 9 {COMMENT} -g {ALLOW}"),
    (rule(protocol=136, ports=PortRange(7, 70)), True,
     f"-p 136 -m multiport --dports 7:70 {COMMENT} -g {ALLOW}"),
    (rule(protocol=1, icmp=IcmpMatch(8)), True,
     f"-p 1 -m icmp --icmp-type 8 {COMMENT} -g {ALLOW}"),
    (rule(protocol=1, icmp=IcmpMatch(3, 4)), True,
     f"-p 1 -m icmp --icmp-type 3/4 {COMMENT} -g {ALLOW}"),
    (rule(family="ipv6", protocol=58, icmp=IcmpMatch(128, 0)), True,
     f"-p 58 -m icmp6 --icmpv6-type 128/0 {COMMENT} -g {ALLOW}"),
    (rule(family="ipv6", protocol=6, ports=PortRange(22, 22), remote_set=WEB_V6), True,
     f"-p 6 -m set --match-set {SET_NAMES[WEB_V6]} src -m tcp --dport 22 {COMMENT} "
     f"-g {ALLOW}"),
    (rule(protocol=6, ports=PortRange(22, 22), remote_cidr="192.0.2.0/24"), False,
     f"-d 192.0.2.0/24 -p 6 -m tcp --dport 22 {COMMENT} -g {ALLOW}"),
])
def test_every_ir_rule_variant(ir: IRRule, ingress: bool, expected: str) -> None:
    assert group_rule(ir, ingress, SETS, SET_NAMES) == expected


@pytest.mark.parametrize("ir, error", [
    (rule(protocol=0), "protocol 0"),
    (rule(protocol=256), "no IP protocol"),
    (rule(protocol=1, icmp=IcmpMatch(255)), "ICMP type 255"),
    (rule(protocol=47, ports=PortRange(1, 2)), "has no ports"),
    (rule(protocol=6, ports=PortRange(5, 4)), "bad port range"),
    (rule(protocol=6, ports=PortRange(1, 70000)), "bad port range"),
    (rule(ports=PortRange(1, 2)), "ports but no protocol"),
    (rule(protocol=58, icmp=IcmpMatch(128)), "ICMP type with protocol 58 over ipv4"),
    (rule(family="ipv6", protocol=1, icmp=IcmpMatch(8)), "ICMP type with protocol 1"),
    (rule(protocol=1, icmp=IcmpMatch(8, 256)), "bad ICMP"),
    (rule(protocol=6, ports=PortRange(1, 1), icmp=IcmpMatch(8)), "ports and ICMP"),
    (rule(remote_cidr="10.0.0.0/8", remote_set=WEB_V4), "two remotes"),
    (rule(remote_cidr="2001:db8::/32"), "not an ipv4 network"),
])
def test_what_iptables_cannot_express_is_unsupported(ir: IRRule, error: str) -> None:
    with pytest.raises(UnsupportedError, match=error):
        group_rule(ir, True, SETS, SET_NAMES)


def test_icmpv6_type_255_is_a_type_not_a_wildcard() -> None:
    ir = rule(family="ipv6", protocol=58, icmp=IcmpMatch(255))
    assert "--icmpv6-type 255 " in group_rule(ir, True, SETS, SET_NAMES)


@pytest.mark.parametrize("ir", [
    rule(remote_set="sg-unknown-v4"),
    rule(remote_set=WEB_V6),  # an IPv6 set in an IPv4 rule
    rule("bad id!"),
    rule(remote_cidr="10.0.0.1/8"),  # host bits set
])
def test_inconsistent_rules_are_backend_errors(ir: IRRule) -> None:
    with pytest.raises(BackendError) as info:
        group_rule(ir, True, SETS, SET_NAMES)
    assert not isinstance(info.value, UnsupportedError)


# --------------------------------------------------------------------------- ports


@pytest.mark.parametrize("tap", ["eth0", "tap", "tap0123456789abc", "tap a", "tap+", "tap\n1"])
def test_bad_tap_names_are_rejected(tap: str) -> None:
    with pytest.raises(BackendError, match="tap name"):
        render(HostFilter("h", (port(tap),), (), ()))


@pytest.mark.parametrize("changes", [
    {"mac": "fa:16:3e:00:00"},
    {"mac": "fa-16-3e-00-00-01"},
    {"mac": "01:00:5e:00:00:01"},  # multicast
    {"ipv4": ("10.0.0.300",)},
    {"ingress": ("sg-unknown-in",)},
    {"egress": (WEB_IN,)},  # an ingress chain used for egress
    {"allowed_pairs": (AddressPair("10.0.0.0/8", "nonsense"),)},
])
def test_inconsistent_ports_are_rejected(changes: dict[str, Any]) -> None:
    hf = small()
    bad = replace(hf.ports[0], **{
        {"ingress": "ingress_chains", "egress": "egress_chains"}.get(k, k): v
        for k, v in changes.items()})
    with pytest.raises(BackendError):
        render(replace(hf, ports=(bad, *hf.ports[1:])))


def test_a_tap_used_twice_is_rejected() -> None:
    hf = small()
    with pytest.raises(BackendError, match="two ports"):
        render(replace(hf, ports=(hf.ports[0], replace(hf.ports[1], tap=TAP_A))))


def test_anti_spoofing_binds_every_source_to_its_mac_and_tap() -> None:
    egress = chains(render(protection()))[EGRESS]
    mine = [r for r in egress if f"-i {TAP_A} " in r]
    target = policy_chain("egress", [group_chain_name(WEB_OUT)])
    assert sorted(mine) == sorted([
        f"-s 0.0.0.0/32 -i {TAP_A} -m mac --mac-source fa:16:3e:00:00:01 -g {target}",
        f"-s 10.0.0.5/32 -i {TAP_A} -m mac --mac-source fa:16:3e:00:00:01 -g {target}",
        f"-s 10.0.0.100/32 -i {TAP_A} -m mac --mac-source fa:16:3e:00:00:01 -g {target}",
        f"-s 10.9.0.0/16 -i {TAP_A} -m mac --mac-source fa:16:3e:00:00:99 -g {target}",
        f"-i {TAP_A} -j DROP",
    ])
    assert mine[-1] == f"-i {TAP_A} -j DROP"
    v6 = [r for r in chains(render(protection()), "ipv6")[EGRESS] if f"-i {TAP_A} " in r]
    assert sorted(r.split(" -i ")[0] for r in v6[:-1]) == sorted([
        "-s ::/128", f"-s {link_local('fa:16:3e:00:00:01')}",
        f"-s {link_local('fa:16:3e:00:00:99')}", "-s 2001:db8::5/128", "-s 2001:db8:9::/64"])


def test_link_local_is_eui64() -> None:
    assert link_local("fa:16:3e:00:00:01") == "fe80::f816:3eff:fe00:1/128"
    assert link_local("00:00:00:00:00:00") == "fe80::200:ff:fe00:0/128"


def test_macs_are_lower_case_whatever_the_ir_says() -> None:
    text = compile_text(protection())
    assert "FA:16" not in text and "-m mac --mac-source fa:16:3e:00:00:02" in text


def test_port_security_off_is_allowed_both_ways_without_anti_spoofing() -> None:
    state = render(protection())
    for family in ("ipv4", "ipv6"):
        c = chains(state, family)
        assert [r for r in c[EGRESS] if TAP_C in r] == [f"-i {TAP_C} -j RETURN"]
        assert [r for r in c[INGRESS] if TAP_C in r] == [f"-o {TAP_C} -j RETURN"]


def test_strict_mode_refuses_ports_that_need_arp_anti_spoofing() -> None:
    with pytest.raises(UnsupportedError, match="ARP"):
        render(small(), RenderOptions(strict=True))
    open_ports = replace(small(), ports=tuple(replace(p, port_security=False)
                                              for p in small().ports))
    render(open_ports, RenderOptions(strict=True))


def test_egress_open_goes_to_the_shared_tail_closed_to_a_policy_chain() -> None:
    c = chains(render(small()))
    egress_b = [r for r in c[EGRESS] if TAP_B in r]
    assert egress_b[0].endswith(f"-g {EGRESS_OPEN}")
    closed = policy_chain("egress", [group_chain_name(WEB_OUT)])
    assert c[closed] == ("-j secfw-egress-base", f"-j {group_chain_name(WEB_OUT)}",
                         f"-m mark --mark {MARK} -g {PASS}", "-j DROP")
    # closed egress without any egress group: the protections, then drop
    hf = protection()
    assert chains(render(hf))[policy_chain("egress", [])] == (
        "-j secfw-egress-base", f"-m mark --mark {MARK} -g {PASS}", "-j DROP")


def test_dhcp_nd_router_advertisements_and_conntrack_protections() -> None:
    v4, v6 = chains(render(small())), chains(render(small()), "ipv6")
    assert v4[EGRESS_OPEN] == (
        "-s 0.0.0.0/32 -p 17 -m udp --sport 68 --dport 67 -j RETURN",
        "-s 0.0.0.0/32 -j DROP",
        "-p 17 -m udp --sport 67 --dport 68 -j DROP",
        "-p 17 -m udp --sport 68 --dport 67 -j RETURN",
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-m conntrack --ctstate INVALID -j DROP",
        "-p 6 -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -j DROP",
        "-j RETURN")
    assert v6[EGRESS_OPEN][:3] == (
        "-s ::/128 -p 58 -m icmp6 --icmpv6-type 135 -j RETURN",
        "-s ::/128 -p 58 -m icmp6 --icmpv6-type 143 -j RETURN",
        "-s ::/128 -j DROP")
    for dropped in ("-p 58 -m icmp6 --icmpv6-type 134 -j DROP",
                    "-p 58 -m icmp6 --icmpv6-type 137 -j DROP",
                    "-p 17 -m udp --sport 547 --dport 546 -j DROP"):
        assert dropped in v6[EGRESS_OPEN]
    base = v6["secfw-egress-base"]
    assert "-p 58 -m icmp6 --icmpv6-type 135 -g secfw-allow" in base
    assert "-p 17 -m udp --sport 546 --dport 547 -g secfw-allow" in base
    assert base.index("-p 58 -m icmp6 --icmpv6-type 134 -j DROP") < base.index(
        "-m conntrack --ctstate RELATED,ESTABLISHED -g secfw-allow")
    assert base[-1] == "-p 6 -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -j DROP"
    assert v6["secfw-ingress-base"] == (
        "-m conntrack --ctstate INVALID -j DROP",
        "-p 6 -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -j DROP",
        *(f"-p 58 -m icmp6 --icmpv6-type {t} -g secfw-allow" for t in (130, 134, 135, 136)))


def test_same_net_sources_pass_after_the_base_and_before_the_groups() -> None:
    """The port's same-net set of the family (its network's port addresses, an
    ipset like a source group's), never the network's CIDR."""
    web = group_chain_name(WEB_IN)
    for family, net in (("ipv4", NET_V4), ("ipv6", NET_V6)):
        state = render(protection())
        c = chains(state, family)
        name = policy_chain("ingress", [web], [set_name(net)])
        assert [r for r in c[INGRESS] if TAP_A in r] == [f"-o {TAP_A} -g {name}"]
        assert c[name] == ("-j secfw-ingress-base",
                           f"-m set --match-set {set_name(net)} src -g {PASS}", f"-j {web}",
                           f"-m mark --mark {MARK} -g {PASS}", "-j DROP")
        assert state.sets[set_name(net)].family == family
    with pytest.raises(BackendError, match="unknown same-net set"):
        render(replace(protection(), sets=protection().sets[:-1]))


# --------------------------------------------------------------------------- chains


def test_fixed_chains_fail_closed_and_never_accept() -> None:
    for family in ("ipv4", "ipv6"):
        c = chains(render(small()), family)
        assert c["secfw-fwd"] == ("-i tap+ -j secfw-egress", "-o tap+ -j secfw-ingress")
        assert c["secfw-in"] == ("-i tap+ -j secfw-egress",)
        assert c[EGRESS][0] == "-j MARK --set-xmark 0x0/0x1000000"
        assert c[INGRESS][:2] == ("-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
                                  "-j MARK --set-xmark 0x0/0x1000000")
        for name in c:
            if name.startswith(("secfw-egress", "secfw-ingress", "secfw-eb-", "secfw-ib-",
                                "secfw-pi-", "secfw-pe-")) and not name.endswith("-base"):
                assert c[name][-1] in ("-j DROP", "-j RETURN"), name
        assert not any("ACCEPT" in r for rules in c.values() for r in rules)


def test_group_chains_are_shared_and_per_family() -> None:
    v4, v6 = chains(render(protection())), chains(render(protection()), "ipv6")
    web = group_chain_name(WEB_IN)
    assert v4[web] == (f"-m mark --mark {MARK} -j RETURN",
                       f"-p 6 -m tcp --dport 80 -m comment --comment r-a1111111 -g {ALLOW}")
    assert len(v6[web]) == 3
    # WEB_OUT has no IPv6 rule: no chain, and nothing jumps to it
    assert group_chain_name(WEB_OUT) not in v6
    assert not any(group_chain_name(WEB_OUT) in r for rules in v6.values() for r in rules)


def test_ports_with_the_same_groups_and_network_share_their_policy_chain() -> None:
    state = render(protection())
    ingress = chains(state)[INGRESS]
    shared = policy_chain("ingress", [group_chain_name(WEB_IN)], [set_name(NET_V4)])
    assert sum(r.endswith(f"-g {shared}") for r in ingress) == 2  # TAP_A and TAP_B


def test_a_port_without_groups_gets_the_base_and_same_net_only() -> None:
    c = chains(render(small()))
    assert [r for r in c[INGRESS] if TAP_C in r] == [
        f"-o {TAP_C} -g {policy_chain('ingress', [])}"]
    assert c[policy_chain("ingress", [])] == (
        "-j secfw-ingress-base", f"-m mark --mark {MARK} -g {PASS}", "-j DROP")


def test_mark_bit_is_configurable_and_one_bit() -> None:
    text = compile_text(small(), RenderOptions(mark=0x4000000))
    assert "0x4000000/0x4000000" in text and "0x1000000" not in text
    for bad in (0, 3, 1 << 32):
        with pytest.raises(BackendError):
            RenderOptions(mark=bad)


def _dispatch_rules(state: IptState, top: str, tap: str) -> list[str]:
    """Walk the dispatch tree like the kernel would for interface ``tap``: the
    rules that name it, reached through the bucket jumps."""
    c = chains(state)
    found: list[str] = []
    chain = top
    flag = "-i" if top == EGRESS else "-o"
    while True:
        bucket = None
        for r in c[chain]:
            match = re.search(rf"{flag} (\S+)", r)
            if not match:
                continue
            name = match.group(1)
            if name.endswith("+") and tap.startswith(name[:-1]):
                bucket = r.rsplit(" ", 1)[1]
                break
            if name == tap:
                found.append(r)
        if bucket is None:
            assert c[chain][-1] == "-j DROP"
            return found
        chain = bucket


def test_large_dispatch_lists_are_split_into_buckets_that_reach_every_tap() -> None:
    taps = sorted({f"tap{random.Random(i).getrandbits(44):011x}" for i in range(700)})
    taps += ["tapab", "tapabc"]  # one tap is a prefix of another
    hf = HostFilter("h", tuple(port(t, ipv4=(f"10.{i // 250}.{i % 250}.1",))
                               for i, t in enumerate(taps)), (), ())
    state = render(hf, RenderOptions(leaf_rules=48))
    c = chains(state)
    buckets = [n for n in c if n.startswith(("secfw-eb-", "secfw-ib-"))]
    assert buckets and all(c[n][-1] == "-j DROP" for n in buckets)
    assert max(len(c[n]) for n in buckets) < 16 * 3 + 16
    for tap in taps:
        assert len(_dispatch_rules(state, EGRESS, tap)) == 3  # 0.0.0.0, its address, drop
        assert _dispatch_rules(state, INGRESS, tap) == [
            f"-o {tap} -g {policy_chain('ingress', [])}"]
    assert _dispatch_rules(state, EGRESS, "tap00000000000") == []  # unknown: the final drop


# --------------------------------------------------------------------------- sets


def test_address_sets_are_hash_net_in_ipset_save_form() -> None:
    state = render(protection())
    v4, v6 = state.sets[set_name(WEB_V4)], state.sets[set_name(WEB_V6)]
    assert v4.header() == "hash:net family inet maxelem 65536"
    assert v4.elements == ("0.0.0.0/1", "128.0.0.0/1")  # hash:net cannot hold /0
    assert v6.elements == ("2001:db8::5", "2001:db8:1::/48")
    assert v6.header().startswith("hash:net family inet6")


def test_big_sets_get_room_to_grow() -> None:
    many = tuple(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}/32" for i in range(40_000))
    hf = replace(small(), sets=(AddressSet(WEB_V4, WEB, "ipv4", many), NET_SETS[0]))
    assert render(hf).sets[set_name(WEB_V4)].maxelem == 131072


# --------------------------------------------------------------------------- read-back


def save_text(state: IptState, family: str = "ipv4", printed: bool = True) -> str:
    """``iptables-save`` output for ``state``, as the tools print it (protocol
    names, MACs in upper case here to check the normalisation) plus foreign rules."""
    table = state.tables[family]  # type: ignore[index]
    names = {"6": "tcp", "17": "udp", "1": "icmp", "58": "ipv6-icmp", "132": "sctp",
             "136": "udplite", "47": "gre"}
    lines = ["# Generated by iptables-save v1.8.9", "*filter", ":INPUT ACCEPT [0:0]",
             ":FORWARD DROP [3:180]", ":OUTPUT ACCEPT [0:0]", ":DOCKER - [0:0]"]
    lines += [f":{name} - [0:0]" for name in sorted(table.chains)]
    lines += ["-A INPUT -j secfw-in", "-A FORWARD -j secfw-fwd",
              "-A FORWARD -m comment --comment \"-j secfw-fwd\" -j ACCEPT",
              "-A FORWARD -o docker0 -j DOCKER"]
    for name, rules in table.chains.items():
        for r in rules:
            if printed:
                r = re.sub(r"-p (\d+)", lambda m: "-p " + names.get(m.group(1), m.group(1)), r)
                r = re.sub(r"--mac-source (\S+)", lambda m: "--mac-source " + m.group(1).upper(),
                           r)
            lines.append(f"-A {name} {r}")
    return "\n".join([*lines, "COMMIT", "# Completed"]) + "\n"


def ipset_save(state: IptState) -> str:
    lines = ["create other hash:ip family inet hashsize 1024 maxelem 65536", "add other 1.2.3.4"]
    for s in state.sets.values():
        lines.append(f"create {s.name} {s.kind} family {'inet6' if s.family == 'ipv6' else 'inet'}"
                     f" hashsize 1024 maxelem {s.maxelem} bucketsize 12 initval 0x5f2c6b3e")
        lines += [f"add {s.name} {e}" for e in reversed(s.elements)]
    return "\n".join(lines) + "\n"


def test_read_back_of_what_was_rendered_is_equal() -> None:
    state = render(protection())
    back = from_save({"ipv4": save_text(state), "ipv6": save_text(state, "ipv6")},
                     ipset_save(state))
    assert back == state
    assert plan(back, state).empty


def test_read_back_ignores_everything_that_is_not_secfw() -> None:
    table = parse_table(save_text(render(small())), "ipv4")
    assert "DOCKER" not in table.chains
    assert table.jumps == {("INPUT", "-j secfw-in"): 1, ("FORWARD", "-j secfw-fwd"): 1}
    assert set(parse_ipsets(ipset_save(render(small())))) == set(render(small()).sets)
    assert from_save({"ipv4": "", "ipv6": ""}, "") is None


@pytest.mark.parametrize("printed, normal", [
    ("-p tcp -m tcp --dport 80 -j RETURN", "-p 6 -m tcp --dport 80 -j RETURN"),
    ("-p ipv6-icmp -m icmp6 --icmpv6-type 128 -j RETURN",
     "-p 58 -m icmp6 --icmpv6-type 128 -j RETURN"),
    ("-p ipencap -j RETURN", "-p 4 -j RETURN"),
    ("-p 255 -j RETURN", "-p 255 -j RETURN"),
    ("-s 10.0.0.5/32 -m mac --mac-source FA:16:3E:00:00:01 -j RETURN",
     "-s 10.0.0.5/32 -m mac --mac-source fa:16:3e:00:00:01 -j RETURN"),
    ("-s ::ffff:1.2.3.4/128 -j RETURN", "-s ::ffff:102:304/128 -j RETURN"),
    ('-m comment --comment "a b" -j RETURN', '-m comment --comment "a b" -j RETURN'),
    ('-m comment --comment "r:1" -j RETURN', "-m comment --comment r:1 -j RETURN"),
])
def test_read_back_normalises_what_iptables_save_prints_differently(printed: str,
                                                                    normal: str) -> None:
    assert normalise_rule(printed) == normal


def test_split_quoted_reads_like_iptables_restore() -> None:
    assert split_quoted('-m comment --comment "a \\"b\\" c" -j X') == [
        "-m", "comment", "--comment", 'a "b" c', "-j", "X"]
    with pytest.raises(BackendError):
        split_quoted('--comment "open')


def test_ipset_elements_read_back_in_render_form() -> None:
    sets = parse_ipsets("create secfw-a-1 hash:net family inet6 hashsize 64 maxelem 65536\n"
                        "add secfw-a-1 2001:DB8::1\nadd secfw-a-1 2001:db8::/32\n"
                        "add secfw-a-1 2001:db8:0:0::2/128\n")
    assert sets["secfw-a-1"] == IpSet("secfw-a-1", "ipv6",
                                      ("2001:db8::/32", "2001:db8::1", "2001:db8::2"))


# --------------------------------------------------------------------------- plan


def test_plan_from_nothing_creates_everything_and_ensures_the_jumps() -> None:
    state = render(small())
    p = plan(None, state)
    assert p.full and not p.empty
    for family in ("ipv4", "ipv6"):
        t = p.tables[family]  # type: ignore[index]
        assert {name for name, _ in t.created} == set(state.tables[family].chains)  # type: ignore[index]
        assert t.ensure_jumps == (("FORWARD", "-j secfw-fwd"), ("INPUT", "-j secfw-in"))
        assert not t.commit and not t.removed
    assert p.ipset_before and not p.ipset_after


def test_plan_without_change_is_empty() -> None:
    state = render(protection())
    assert plan(state, render(protection())).empty
    assert plan(state, state).size == 0


def test_membership_change_is_only_ipset_element_commands() -> None:
    hf = small()
    old = render(hf)
    grown = AddressSet(WEB_V4, WEB, "ipv4", ("10.0.0.5/32", "10.0.0.7/32", "10.9.0.0/16"))
    p = plan(old, render(replace(hf, sets=(grown, NET_SETS[0]))))
    assert p.commands == (f"add {set_name(WEB_V4)} 10.0.0.7", f"del {set_name(WEB_V4)} 10.0.0.6")
    assert p.summary == {"sets": [set_name(WEB_V4)], "elements_added": 1, "elements_deleted": 1}


def test_changed_rule_rewrites_only_its_group_chain() -> None:
    hf = small()
    web_in = hf.chain(WEB_IN)
    assert web_in is not None
    changed = replace(web_in, rules=(*web_in.rules, rule("a4444444-4", protocol=6,
                                                         ports=PortRange(8080, 8080))))
    p = plan(render(hf), render(replace(hf, chains=tuple(
        changed if c.name == WEB_IN else c for c in hf.chains))))
    name = group_chain_name(WEB_IN)
    assert p.summary["chains"] == [name]
    t = p.tables["ipv4"]  # type: ignore[index]
    assert t.commit[:2] == (f":{name} - [0:0]", f"-F {name}")
    assert len(t.commit) == 2 + 4 and not t.created and not t.removed
    assert p.tables["ipv6"].size == 0 and not p.ipset_before  # type: ignore[index]


def test_new_port_touches_its_dispatch_and_maybe_a_policy_chain() -> None:
    hf = small()
    new = port("tapdddddddd-dd", (WEB_IN,), mac="fa:16:3e:00:00:04", ipv4=("10.0.0.8",),
               same_net=(NET_V4,))
    p = plan(render(hf), render(replace(hf, ports=(*hf.ports, new))))
    assert set(p.summary["chains"]) == {
        EGRESS, INGRESS,
        policy_chain("ingress", [group_chain_name(WEB_IN)], [set_name(NET_V4)])}
    assert not p.ipset_before and not p.ipset_after


def test_removed_group_goes_after_everything_that_refers_to_it() -> None:
    hf = small()
    ports = tuple(replace(p, ingress_chains=tuple(c for c in p.ingress_chains if c != SSH_IN))
                  for p in hf.ports)
    chains_ = tuple(c for c in hf.chains if c.name != SSH_IN)
    p = plan(render(hf), render(HostFilter(hf.host, ports, chains_, NET_SETS[:1])))
    t = p.tables["ipv4"]  # type: ignore[index]
    assert group_chain_name(SSH_IN) in t.removed
    lines = t.lines()
    assert lines.index(f"-X {group_chain_name(SSH_IN)}") > max(
        i for i, line in enumerate(lines) if line.startswith("-A "))
    assert p.ipset_after == (f"destroy {set_name(WEB_V4)}",)


def test_foreign_and_duplicate_objects_in_secfw_namespace_are_removed() -> None:
    state = render(small())
    v4 = state.tables["ipv4"]  # type: ignore[index]
    drifted = IptState(
        {**state.tables, "ipv4": Table("ipv4", {**v4.chains, "secfw-stale": ("-j DROP",)},
                                       {("FORWARD", "-j secfw-fwd"): 2,
                                        ("INPUT", "-j secfw-in"): 1,
                                        ("FORWARD", "-j secfw-stale"): 1})},
        {**state.sets, "secfw-a-stale": IpSet("secfw-a-stale", "ipv4", ())})
    p = plan(drifted, state)
    t = p.tables["ipv4"]  # type: ignore[index]
    assert t.commit == ("-D FORWARD -j secfw-fwd", "-D FORWARD -j secfw-stale")
    assert t.removed == ("secfw-stale",) and not t.ensure_jumps
    assert p.ipset_after == ("destroy secfw-a-stale",)


def test_missing_jump_is_ensured_not_duplicated() -> None:
    state = render(small())
    v4 = state.tables["ipv4"]  # type: ignore[index]
    unhooked = IptState({**state.tables, "ipv4": Table("ipv4", v4.chains,
                                                       {("INPUT", "-j secfw-in"): 1})},
                        state.sets)
    t = plan(unhooked, state).tables["ipv4"]  # type: ignore[index]
    assert t.ensure_jumps == (("FORWARD", "-j secfw-fwd"),) and t.size == 1


def test_a_foreign_rule_above_secfw_jump_reads_as_buried() -> None:
    """A rule that is not secfw's jump, above it, in a built-in chain (a foreign
    ``-j ACCEPT`` there bypasses every group); foreign rules below do not count."""
    text = save_text(render(small()))
    assert parse_table(text, "ipv4").buried == frozenset()
    above = text.replace("-A FORWARD -j secfw-fwd", "-A FORWARD -j ACCEPT\n-A FORWARD -j secfw-fwd")
    assert parse_table(above, "ipv4").buried == {"FORWARD"}
    table = parse_table(above.replace("-A INPUT -j secfw-in",
                                      "-A INPUT -i lo -j ACCEPT\n-A INPUT -j secfw-in"), "ipv4")
    assert table.buried == {"FORWARD", "INPUT"}
    assert table.jumps == {("INPUT", "-j secfw-in"): 1, ("FORWARD", "-j secfw-fwd"): 1}


def test_buried_jump_moves_back_to_the_top_and_the_foreign_rule_stays() -> None:
    """One commit deletes secfw's jump and inserts it at position 1 (atomic: the
    chain is never without it); the foreign rule is not secfw's to delete."""
    state = render(small())
    v4 = state.tables["ipv4"]  # type: ignore[index]
    buried = IptState({**state.tables, "ipv4": replace(v4, buried=frozenset({"FORWARD"}))},
                      state.sets)
    p = plan(buried, state)
    t = p.tables["ipv4"]  # type: ignore[index]
    assert t.commit == ("-D FORWARD -j secfw-fwd", "-I FORWARD 1 -j secfw-fwd")
    assert not t.ensure_jumps and not t.created and not t.removed
    assert p.summary["chains"] == ["FORWARD"]
    assert plan(state, state).empty  # rendered: never buried


def test_duplicated_and_buried_jump_is_moved_once() -> None:
    state = render(small())
    v4 = state.tables["ipv4"]  # type: ignore[index]
    table = replace(v4, jumps={**v4.jumps, ("FORWARD", "-j secfw-fwd"): 2},
                    buried=frozenset({"FORWARD"}))
    t = plan(IptState({**state.tables, "ipv4": table}, state.sets), state).tables["ipv4"]  # type: ignore[index]
    assert t.commit == ("-D FORWARD -j secfw-fwd",) * 2 + ("-I FORWARD 1 -j secfw-fwd",)


def test_changed_set_header_or_most_members_means_swap() -> None:
    state = render(small())
    name = set_name(WEB_V4)
    s = state.sets[name]
    for new in (replace(s, maxelem=131072),
                replace(s, elements=tuple(f"10.1.{i}.1" for i in range(100)))):
        p = plan(state, IptState(state.tables, {**state.sets, name: new}))
        temp = "secfw-t-" + name.removeprefix("secfw-")
        assert p.ipset_before[:2] == (f"create {temp} {new.header()}", f"flush {temp}")
        assert p.ipset_after == (f"swap {temp} {name}", f"destroy {temp}")


# --------------------------------------------------------------------------- executor


class FakeRunner:
    """Records commands; answers from ``answers`` (argv substring → (rc, stdout))."""

    def __init__(self, answers: dict[str, tuple[int, str]] | None = None) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.answers = answers or {}

    def __call__(self, argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(argv), stdin))
        joined = " ".join(argv)
        for key, (rc, out) in self.answers.items():
            if key in joined:
                return subprocess.CompletedProcess(list(argv), rc, out, "" if rc == 0 else out)
        return subprocess.CompletedProcess(list(argv), 0, "", "")

    def commands(self) -> list[str]:
        return [" ".join(argv) for argv, _ in self.calls]


def test_executor_applies_phases_in_order_inside_the_namespace() -> None:
    runner = FakeRunner({"-C FORWARD": (1, ""), "-C INPUT": (0, "")})
    executor = IptablesExecutor("ns1", "legacy", runner)
    executor.apply(plan(None, render(small())))
    commands = runner.commands()
    assert all(c.startswith("ip netns exec ns1 ") for c in commands)
    tools = [c.split()[4] for c in commands]
    assert tools == ["ipset", "iptables-legacy", "iptables-legacy", "iptables-legacy-restore",
                     "ip6tables-legacy", "ip6tables-legacy", "ip6tables-legacy-restore"]
    restore = runner.calls[3][1]
    assert restore is not None and restore.startswith("*filter\n")
    assert restore.endswith("-I FORWARD 1 -j secfw-fwd\nCOMMIT\n")
    assert "-I INPUT" not in restore  # -C found it


def test_executor_sends_nothing_for_an_empty_plan() -> None:
    runner = FakeRunner()
    IptablesExecutor(None, "nft", runner).apply(IptPlan())
    assert runner.calls == []


def test_nft_variant_creates_big_tables_in_batches_then_commits_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor_module, "BATCH_RULES", 500)
    monkeypatch.setattr(executor_module, "BATCH_CHAINS", 20)
    runner = FakeRunner({" -C ": (1, "")})
    taps = [f"tap{i:011x}" for i in range(1200)]
    chain = GroupChain(WEB_IN, WEB, "ingress", (rule(protocol=6, ports=PortRange(1, 1)),))
    hf = HostFilter("h", tuple(port(t, (WEB_IN,), ipv4=(f"10.{i // 250}.{i % 250}.1",))
                               for i, t in enumerate(taps)), (chain,), ())
    p = plan(None, render(hf))
    IptablesExecutor(None, "nft", runner).apply(p)
    restores = [stdin for argv, stdin in runner.calls if argv[0] == "iptables-nft-restore"]
    assert len(restores) > 2
    assert all(s is not None and s.startswith("*filter\n:") for s in restores[:1])
    assert restores[-1] is not None and "-I FORWARD 1 -j secfw-fwd" in restores[-1]
    assert all(s is not None and "-I " not in s for s in restores[:-1])
    sent = [line for s in restores for line in (s or "").splitlines()]
    expected = p.tables["ipv4"].lines(["-I FORWARD 1 -j secfw-fwd",  # type: ignore[index]
                                       "-I INPUT 1 -j secfw-in"])
    assert sorted(line for line in sent if line not in ("*filter", "COMMIT")) == sorted(expected)


def test_batches_never_split_a_chain() -> None:
    chains_ = [(f"c{i}", ("r",) * (i % 7 + 1)) for i in range(100)]
    batches = list(batched(chains_, rules=20, count=5))
    assert [c for b in batches for c in b] == chains_
    assert all(len(b) <= 5 and (sum(len(r) for _, r in b) <= 20 or len(b) == 1)
               for b in batches)


def test_a_failing_tool_is_a_backend_error_with_its_reason() -> None:
    reason = "iptables-nft-restore v1.8.9 (nf_tables):\nline 2: RULE_APPEND failed\n"
    runner = FakeRunner({"restore": (4, reason), " -C ": (1, "")})
    with pytest.raises(BackendError, match="line 2: RULE_APPEND failed"):
        IptablesExecutor(None, "nft", runner).apply(plan(None, render(small())))
    done = subprocess.CompletedProcess(["x"], 1, "", "# Warning: x\nTry `x -h'\n")
    assert first_error(done) == "no error message"


def test_cleanup_removes_only_secfw_objects() -> None:
    state = render(small())
    runner = FakeRunner({"iptables-legacy-save": (0, save_text(state)),
                         "ip6tables-legacy-save": (0, save_text(state, "ipv6")),
                         "ipset list": (0, ipset_save(state))})
    IptablesExecutor(None, "legacy", runner).cleanup()
    restores = [stdin or "" for argv, stdin in runner.calls if argv[0].endswith("-restore")
                and argv[0] != "ipset"]
    v4 = restores[0].splitlines()
    assert v4[1:3] == ["-D INPUT -j secfw-in", "-D FORWARD -j secfw-fwd"]
    assert {line.split()[1] for line in v4[3:-1]} == set(state.tables["ipv4"].chains)  # type: ignore[index]
    assert "DOCKER" not in restores[0] and "ACCEPT" not in restores[0]
    ipset = [stdin for argv, stdin in runner.calls if argv[:3] == ["ipset", "-exist", "restore"]]
    assert ipset == ["".join(f"destroy {n}\n" for n in sorted(state.sets))]


@pytest.mark.parametrize("saves, version, expected", [
    ({"iptables-nft-save": ":secfw-fwd - [0:0]\n", "iptables-legacy-save": "-A X\n-A Y\n"},
     "(legacy)", "nft"),
    ({"iptables-legacy-save": "-A FORWARD -j DOCKER\n"}, "(nf_tables)", "legacy"),
    ({"ip6tables-nft-save": "-A FORWARD -j X\n"}, "(legacy)", "nft"),
    ({}, "iptables v1.8.9 (legacy)", "legacy"),
    ({}, "iptables v1.8.9 (nf_tables)", "nft"),
])
def test_variant_detection(saves: dict[str, str], version: str, expected: str) -> None:
    answers = {f"{tool} ": (0, out) for tool, out in saves.items()}
    answers = {**{k.rstrip(): v for k, v in answers.items()}, "iptables -V": (0, version)}
    runner = FakeRunner(answers)
    assert detect_variant(runner) == expected


def test_variant_and_namespace_are_checked() -> None:
    with pytest.raises(BackendError, match="variant"):
        IptablesExecutor(None, "xtables", FakeRunner())  # type: ignore[arg-type]
    for bad in ("../etc", ".", "a b"):
        with pytest.raises(BackendError):
            IptablesExecutor(bad, "nft", FakeRunner())
    with pytest.raises(BackendError, match="no network namespace"):
        IptablesExecutor("secfw-no-such-namespace", "nft")


# --------------------------------------------------------------------------- backend


def test_backend_is_registered_and_plans_like_the_functions() -> None:
    assert BACKENDS == ("nftables", "iptables")
    backend = get_backend("iptables", variant="legacy", runner=FakeRunner())
    assert isinstance(backend, IptablesBackend) and backend.name == "iptables"
    hf = small()
    assert backend.committed(hf) == render(hf)
    assert backend.plan(None, hf) == plan(None, render(hf))
    assert backend.plan(backend.committed(hf), hf).empty
    assert backend.describe(backend.plan(None, hf)) == {"replaced": True}
    many = HostFilter("h", tuple(port(f"tap{i:011x}", ipv4=(f"10.1.{i}.1",), same_net=(
        f"net-n{i}-v4",)) for i in range(30)), (), tuple(
            AddressSet(f"net-n{i}-v4", f"n{i}", "ipv4", (f"10.1.{i}.1/32",)) for i in range(30)))
    described = backend.describe(backend.plan(backend.committed(hf), many))
    assert described["replaced"] is False and described["chains_count"] > 20
    assert len(described["chains"]) == 21 and described["chains"][-1] == "…"
    assert backend.element_count(render(hf)) == 3 + 4  # web's set, the network's
    with pytest.raises(BackendError, match="cannot apply"):
        backend.apply(object())
    with pytest.raises(UnsupportedError):
        get_backend("iptables", variant="nft", strict=True, runner=FakeRunner()).plan(None, hf)


def test_compile_text_is_the_whole_script() -> None:
    text = compile_text(small())
    assert text.startswith("# ipset -exist restore\ncreate secfw-a-")
    assert text.count("*filter") == 2 and text.count("COMMIT") == 2
    assert "-I FORWARD 1 -j secfw-fwd" in text


# ------------------------------------------------------------ bridged hosts --


def test_bridged_dispatch_matches_bridge_ports_with_physdev() -> None:
    """On a bridge iptables sees the bridge as -i/-o: every tap match becomes an
    xt_physdev match; the output port only for bridged frames."""
    routed = render(small())
    bridged = render(small(), RenderOptions(topology="bridged"))
    v4 = bridged.tables["ipv4"].chains
    assert v4["secfw-fwd"] == (
        "-i tap+ -j DROP", "-o tap+ -j DROP",  # a tap that is no bridge port: closed
        "-m physdev --physdev-in tap+ -j secfw-egress",
        "-m physdev --physdev-out tap+ --physdev-is-bridged -j secfw-ingress",
        "-m physdev ! --physdev-is-bridged -j secfw-routed-in")
    assert v4["secfw-in"] == ("-i tap+ -j DROP", "-m physdev --physdev-in tap+ -j secfw-egress")
    text = to_text(bridged)
    # no interface match is left but the drops of taps seen as IP interfaces
    assert not re.search(r" -[io] tap(?!\+ -j DROP)", text)
    assert f"-m physdev --physdev-in {TAP_A} -m mac --mac-source" in text
    assert f"-m physdev --physdev-out {TAP_A} --physdev-is-bridged -g secfw-pi-" in text
    # the same chains otherwise: only the dispatch differs, and what the host
    # routes into a bridge is dispatched by destination address
    assert set(v4) == set(routed.tables["ipv4"].chains) | {"secfw-routed-in"}
    assert v4["secfw-routed-in"] == (
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-j MARK --set-xmark 0x0/0x1000000",
        *(f"-d {address}/32 -g secfw-pi-{_policy_hash(text, tap)}"
          for address, tap in (("10.0.0.5", TAP_A), ("10.0.0.6", TAP_B), ("10.0.1.7", TAP_C))))
    assert bridged.sets == routed.sets
    assert compile_text(small(), topology="bridged") == text


def _policy_hash(text: str, tap: str) -> str:
    found = re.search(rf"--physdev-out {tap} --physdev-is-bridged -g secfw-pi-(\S+)", text)
    assert found
    return found.group(1)


def test_bridged_routed_dispatch_drops_shared_and_returns_without_port_security() -> None:
    """An address two ports claim is dropped when routed; a port without port
    security is not filtered, routed or bridged; IPv6 has its own list."""
    hf = small()
    pair = (AddressPair("10.0.0.6/32", "fa:16:3e:00:00:01"),)
    ports = (replace(hf.ports[0], allowed_pairs=pair, ipv6=("2001:db8::5",)), hf.ports[1],
             replace(hf.ports[2], port_security=False))
    state = render(replace(hf, ports=ports), RenderOptions(topology="bridged"))
    v4, v6 = (state.tables[f].chains["secfw-routed-in"] for f in ("ipv4", "ipv6"))
    assert v4[2:] == ("-d 10.0.0.5/32 -g " + v4[2].split(" -g ")[1], "-d 10.0.0.6/32 -j DROP",
                      "-d 10.0.1.7/32 -j RETURN")
    assert v4[2].split(" -g ")[1].startswith("secfw-pi-")
    assert [r.split(" -g ")[0] for r in v6[2:]] == ["-d 2001:db8::5/128"]


def test_bridged_buckets_match_tap_prefixes_with_physdev() -> None:
    ports = tuple(port(f"tapab{i:02d}", mac=f"fa:16:3e:00:01:{i:02x}", ipv4=(f"10.0.2.{i + 2}",))
                  for i in range(8))
    hf = HostFilter("h", ports, (), ())
    chains = render(hf, RenderOptions(leaf_rules=4, topology="bridged")).tables["ipv4"].chains
    buckets = [r for r in chains[EGRESS] if "-g secfw-eb-" in r]
    assert buckets and all(r.startswith("-m physdev --physdev-in tapab") for r in buckets)
    assert chains[EGRESS][-1] == "-j DROP"


def test_unknown_topology_is_refused_by_the_iptables_backend() -> None:
    with pytest.raises(BackendError, match="unknown topology 'flat'"):
        RenderOptions(topology="flat")
    with pytest.raises(BackendError, match="unknown topology"):
        IptablesBackend(executor=IptablesExecutor(variant="nft", runner=lambda a, s: None),
                        topology="flat")


def test_bridged_port_without_port_security_with_a_bad_address_is_a_backend_error() -> None:
    hf = small()
    bad = replace(hf.ports[2], ipv4=("10.0.1.7/24",), port_security=False)
    with pytest.raises(BackendError, match="not a CIDR"):
        render(replace(hf, ports=(*hf.ports[:2], bad)), RenderOptions(topology="bridged"))
