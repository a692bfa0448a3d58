"""Drift found by content, with real packets (issue #12, item 4).

A full pass compares what the kernel holds — rule expressions, set elements,
base-chain hook/priority/policy, and for iptables where secfw's jumps sit in the
built-in chains — with what it should hold, repairs any difference and reports it
as drift; the next full pass plans nothing. Each test tampers the way an intruder
or a careless operator would, shows the tampering opened tcp/22 on an instance
whose only group allows tcp/80, and shows one full pass closing it again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

EXT = "external"
NFT_ONLY = pytest.mark.backends("nftables", reason="nft's rules and chains")
IPT_ONLY = pytest.mark.backends("iptables", reason="iptables' built-in chains and rules")


def web80(cloud: Any) -> None:
    """One instance whose only group allows tcp/80 from anywhere; synced and checked."""
    cloud.api.net_create("p", "net", "10.1.0.0/24")
    cloud.api.secgroup_create("p", "web80", "http only")
    cloud.api.secgroup_add_rule("p", "web80", "tcp", "80", "80", "0.0.0.0/0")
    cloud.boot("web", ["web80"], "net")
    cloud.sync()
    assert cloud.tcp(EXT, "web", 80)
    assert not cloud.tcp(EXT, "web", 22)


def assert_repaired(cloud: Any, result: Any, names: str) -> None:
    """``result`` (a full pass after tampering) reported drift naming ``names``;
    filtering is as before; a second full pass plans nothing."""
    assert result.drift is not None, "tampering not reported as drift"
    assert names in str(result.drift), result.drift
    assert not cloud.tcp(EXT, "web", 22)
    assert cloud.tcp(EXT, "web", 80)
    again = cloud.sync(full=True)
    assert again.commands == 0 and again.drift is None, again


# --------------------------------------------------------------------------- nftables


def nft_rules(cloud: Any, family: str, chain: str) -> list[dict[str, Any]]:
    """The rules of one of secfw's chains with their handles (``nft -a -j``)."""
    listing = json.loads(cloud.nft("-a", "-j", "list", "chain", family, "secfw", chain))
    return [obj["rule"] for obj in listing["nftables"] if "rule" in obj]


def replace_keeping_comment(cloud: Any, chain: str, pick: Any) -> str:
    """``nft replace rule`` the first rule of ``inet secfw CHAIN`` that ``pick``
    selects by ``accept`` under the very same comment; returns that comment."""
    rule = next(r for r in nft_rules(cloud, "inet", chain) if pick(r))
    comment = rule["comment"]
    cloud.tamper("nft", f'replace rule inet secfw {chain} handle {rule["handle"]} '
                        f'accept comment "{comment}"')
    return str(comment)


def _dport_80(rule: dict[str, Any]) -> bool:
    return '"dport"' in json.dumps(rule["expr"]) and "80" in json.dumps(rule["expr"])


def _drop_only(rule: dict[str, Any]) -> bool:
    return rule["expr"] == [{"drop": None}]


@NFT_ONLY
@pytest.mark.parametrize(("where", "pick"), [("group", _dport_80), ("ingress-filter", _drop_only)])
def test_nft_rule_replaced_under_its_own_comment_is_repaired(cloud, where, pick):
    """``nft replace rule … accept comment "<same digest>"`` on the group chain's
    tcp/80 rule (or ingress-filter's final drop) opens tcp/22; a full pass
    reports the chain as drift and rewrites it; a second full pass sends nothing."""
    web80(cloud)
    chain = cloud.group_chain("p", "web80") if where == "group" else "ingress-filter"
    comment = replace_keeping_comment(cloud, chain, pick)
    assert comment in cloud.nft("list", "chain", "inet", "secfw", chain)
    assert cloud.tcp(EXT, "web", 22), "the tampering did not open tcp/22"
    assert_repaired(cloud, cloud.sync(full=True), chain)


@NFT_ONLY
def test_nft_tampered_rule_is_repaired_by_a_new_agent(cloud):
    """The same tampering met by a freshly started agent (nothing remembered):
    its first pass reads the kernel back and rewrites the chain by content."""
    web80(cloud)
    chain = cloud.group_chain("p", "web80")
    replace_keeping_comment(cloud, chain, _dport_80)
    assert cloud.tcp(EXT, "web", 22)
    cloud.configure(cloud.allow_same_net)  # a new agent process
    first = cloud.sync()
    assert first.full and first.commands > 0
    assert not cloud.tcp(EXT, "web", 22)
    assert cloud.tcp(EXT, "web", 80)
    assert cloud.sync(full=True).commands == 0


def ingress_base_chain(cloud: Any) -> str:
    """The base chain that hands traffic towards taps to ingress-filter."""
    return "postrouting-ingress" if cloud.topology == "bridged" else "forward-ingress"


@NFT_ONLY
def test_nft_base_chain_recreated_at_another_priority_is_repaired(cloud):
    """The ingress base chain deleted and re-created empty at another priority
    (so it filters nothing: tcp/22 passes) is drift: rewritten with its hook,
    priority and rules."""
    web80(cloud)
    chain = ingress_base_chain(cloud)
    hook = "postrouting" if cloud.topology == "bridged" else "forward"
    cloud.tamper("nft", f"delete chain inet secfw {chain}")
    cloud.tamper("nft", f"add chain inet secfw {chain} "
                        f"{{ type filter hook {hook} priority 50; policy accept; }}")
    assert cloud.tcp(EXT, "web", 22)
    assert_repaired(cloud, cloud.sync(full=True), "replaced")
    listing = cloud.nft("list", "chain", "inet", "secfw", chain)
    assert "priority 50" not in listing and "vmap" in listing


@NFT_ONLY
def test_nft_base_chain_policy_changed_is_repaired(cloud):
    """A base chain's policy flipped (``policy drop`` on the egress base chain:
    the instance's own traffic out is cut) is drift and repaired."""
    web80(cloud)
    egress = "forward-egress"  # both topologies (docs/nftables.md)
    assert "policy accept" in cloud.nft("list", "chain", "inet", "secfw", egress)
    cloud.tamper("nft", f"chain inet secfw {egress} {{ policy drop ; }}")
    assert "policy drop" in cloud.nft("list", "chain", "inet", "secfw", egress)
    result = cloud.sync(full=True)
    assert "policy accept" in cloud.nft("list", "chain", "inet", "secfw", egress)
    assert_repaired(cloud, result, "replaced")


# --------------------------------------------------------------------------- iptables


def ipt_rules(cloud: Any, chain: str) -> list[str]:
    """The rules of ``chain`` (IPv4, secfw's variant) in order, as ``-S`` prints them."""
    out = subprocess.run(
        ["ip", "netns", "exec", cloud.lab.host_ns, f"iptables-{cloud.iptables_variant()}",
         "-w", "-S", chain], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.startswith("-A ")]


@IPT_ONLY
def test_ipt_foreign_accept_above_secfw_jump_is_moved_below(cloud):
    """``iptables -I FORWARD 1 -j ACCEPT`` bypasses every group (tcp/22 passes). A
    full pass reports drift, puts secfw's jump first again and leaves the foreign
    rule in place (secfw does not own it), below; tcp/22 is dropped again."""
    web80(cloud)
    cloud.tamper("iptables", "-w", "-I", "FORWARD", "1", "-j", "ACCEPT")
    assert ipt_rules(cloud, "FORWARD")[0] == "-A FORWARD -j ACCEPT"
    assert cloud.tcp(EXT, "web", 22), "the foreign ACCEPT did not open tcp/22"
    assert_repaired(cloud, cloud.sync(full=True), "FORWARD")
    rules = ipt_rules(cloud, "FORWARD")
    assert rules[0].startswith("-A FORWARD -j secfw-"), rules
    assert rules.count("-A FORWARD -j ACCEPT") == 1, rules


@IPT_ONLY
def test_ipt_rule_rewritten_in_secfw_chain_is_repaired(cloud):
    """``iptables -R`` of the group chain's tcp/80 rule by one without the port
    (same comment) opens tcp/22; a full pass rewrites the chain."""
    web80(cloud)
    chain = cloud.group_chain("p", "web80")
    rules = ipt_rules(cloud, chain)
    index, rule = next((i, r) for i, r in enumerate(rules, start=1) if "--dport 80" in r)
    comment = re.search(r"--comment (\S+)", rule)
    assert comment is not None, rule
    cloud.tamper("iptables", "-w", "-R", chain, str(index), "-p", "tcp", "-m", "comment",
                 "--comment", comment.group(1), "-g", "secfw-allow")
    assert cloud.tcp(EXT, "web", 22), "the rewritten rule did not open tcp/22"
    assert_repaired(cloud, cloud.sync(full=True), chain)
