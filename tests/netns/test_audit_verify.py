"""``secfw audit verify``: the live kernel read back and evaluated against the model.

On every backend × topology: after one agent pass the host verifies clean; then the
kernel is altered behind the agent's back — a source-group set loses its element,
a group chain's rule is replaced by one on another port, a group chain is flushed —
and verify must name the port that changed and give a packet whose verdict the
kernel and the model disagree on. The packet is then *sent* (crafted, from the
external namespace or the peer's) and must be treated as the kernel said, not as the
model says: the difference is real, not an artefact of the evaluator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from secfw.audit.policy import CloudPolicy
from secfw.audit.verify import Difference, ipt_kernel, nft_kernel, nft_rule_points, verify

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]


def build(cloud: Any) -> None:
    """vm (group web: tcp 80 from anywhere, tcp 22 from group ops), peer (group ops)."""
    api = cloud.api
    api.net_create("p", "net-a", "10.1.0.0/24")
    api.secgroup_create("p", "web", "")
    api.secgroup_create("p", "ops", "")
    api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    api.secgroup_add_group_rule("p", "web", "ops", "tcp", "22", "22")
    cloud.boot("vm", ["web"], "net-a")
    cloud.boot("peer", ["ops"], "net-a")
    cloud.configure(allow_same_net=False)
    cloud.sync()


def run_verify(cloud: Any) -> tuple[list[Difference], int]:
    cp = CloudPolicy(cloud.api.snapshot(), allow_same_net=cloud.allow_same_net)
    if cloud.backend_name == "nftables":
        from secfw.backends.nftables.executor import NftablesExecutor

        listing = NftablesExecutor(cloud.lab.host_ns).read_json() or {"nftables": []}
        judge, addresses, ports = nft_kernel(listing, cloud.topology)
        pairs = nft_rule_points(listing)
    else:
        from secfw.audit.iptkernel import read_iptables, rule_points

        saves = read_iptables(cloud.lab.host_ns)
        judge, addresses, ports = ipt_kernel(saves, cloud.topology)
        pairs = rule_points(saves)
    return verify(cp, cloud.host, judge, addresses, ports, None, pairs)


def sent(cloud: Any, difference: Difference) -> bool:
    """Whether the difference's packet, sent for real, reaches its destination."""
    p = difference.packet
    names = {cloud.ip(n): n for n in ("vm", "peer")}
    kind = {6: "tcp", 17: "udp", 1: "icmp"}[p.protocol]
    from_ns = cloud.ns(names[p.src]) if p.src in names else cloud.lab.external_ns
    return bool(cloud.arrives(names[p.dst], kind, p.dport, src_ip=p.src, from_ns=from_ns,
                              icmp_type=p.icmp_type, icmp_code=p.icmp_code))


def only_vm_ingress(found: list[Difference]) -> Difference:
    assert [(d.view.instance.name, d.direction) for d in found] == [("vm", "ingress")], \
        [d.row() for d in found]
    return found[0]


def test_clean_host_then_tampered_kernel(cloud: Any) -> None:
    build(cloud)
    found, probes = run_verify(cloud)
    assert found == [] and probes > 0, [d.row() for d in found]
    peer = cloud.ip("peer")

    # 1. the source group's set loses peer's address: ssh from peer is now dropped
    if cloud.backend_name == "nftables":
        cloud.tamper("nft", "delete", "element", "inet", "secfw",
                     cloud.group_set("p", "ops"), f"{{ {peer} }}")
    else:
        from secfw.backends.iptables.render import set_name

        cloud.tamper("ipset", "del", set_name(cloud.group_set("p", "ops")), peer)
    diff = only_vm_ingress(run_verify(cloud)[0])
    assert (diff.packet.src, diff.packet.dport, diff.model, diff.kernel) == (
        peer, 22, "accept", "drop")
    assert not sent(cloud, diff)
    cloud.sync(full=True)
    assert run_verify(cloud)[0] == []

    # 2. the rule for tcp 80 is replaced by one for tcp 8080
    chain = cloud.group_chain("p", "web")
    if cloud.backend_name == "nftables":
        handle = rule_handle(cloud, chain, "dport 80 ")
        cloud.tamper("nft", "replace", "rule", "inet", "secfw", chain, "handle", handle,
                     "tcp", "dport", "8080", "accept")
    else:
        tool = f"iptables-{cloud.iptables_variant()}"
        lines = subprocess.run(["ip", "netns", "exec", cloud.lab.host_ns, tool, "-S", chain],
                               check=True, capture_output=True, text=True).stdout
        number = next(i for i, line in enumerate(lines.splitlines()[1:], 1)
                      if "--dport 80 " in line + " ")
        cloud.tamper("iptables", "-R", chain, str(number), "-p", "tcp", "-m", "tcp",
                     "--dport", "8080", "-j", "secfw-allow")
    diff = only_vm_ingress(run_verify(cloud)[0])
    assert diff.packet.dport in (80, 8080), diff.row()
    assert sent(cloud, diff) == (diff.kernel == "accept")
    cloud.sync(full=True)
    assert run_verify(cloud)[0] == []

    # 3. the group chain is flushed: nothing of web's is let in
    if cloud.backend_name == "nftables":
        cloud.tamper("nft", "flush", "chain", "inet", "secfw", chain)
    else:
        cloud.tamper("iptables", "-F", chain)
    diff = only_vm_ingress(run_verify(cloud)[0])
    assert (diff.model, diff.kernel) == ("accept", "drop")
    assert not sent(cloud, diff)


def rule_handle(cloud: Any, chain: str, needle: str) -> str:
    text = cloud.nft("-a", "list", "chain", "inet", "secfw", chain)
    line = next(line for line in text.splitlines() if needle in line)
    return line.rsplit("# handle ", 1)[1].strip()


def test_a_varied_host_verifies_clean(cloud: Any) -> None:
    """IPv4 and IPv6, same-net on, a source group, egress rules, an ICMP type, an
    address pair and a port without port security: no false difference."""
    api = cloud.api
    api.net_create("p", "net-b", "10.2.0.0/24", cidr6="2001:db8:2::/64")
    api.secgroup_create("p", "app", "")
    api.secgroup_create("p", "client", "")
    api.secgroup_add_rule("p", "app", "tcp", "8000", "8010", "198.51.100.0/24")
    api.secgroup_add_rule("p", "app", "icmp", "8", "-1", "0.0.0.0/0")
    api.secgroup_add_group_rule("p", "app", "client", "udp", "53", "53")
    api.rule_create("p", "app", "ingress", "IPv6", "tcp", dst_port="443",
                    remote_ip="2001:db8:ff::/48")
    api.rule_create("p", "client", "egress", "IPv4", "tcp", dst_port="8000:8010",
                    remote_ip="10.2.0.0/24")
    cloud.boot("server", ["app"], "net-b")
    client = cloud.boot("client", ["client"], "net-b")
    cloud.boot("open", ["app"], "net-b")
    api.port_update("p", cloud.port("server").tap, allowed_address_pairs=["10.2.0.128/28"])
    api.port_update("p", cloud.port("open").tap, port_security=False)
    assert client is not None
    cloud.sync()
    found, probes = run_verify(cloud)
    assert found == [] and probes > 0, "\n".join(
        f"{d.view.instance.name} {d.direction} {d.packet} model {d.model} kernel {d.kernel}"
        for d in found)
    # the command line, run on the host as an auditor would: clean, then tampered
    out = cli_verify(cloud, 0)
    assert out["differences"] == [] and out["probes"] == probes
    chain = cloud.group_chain("p", "app")
    if cloud.backend_name == "nftables":
        cloud.tamper("nft", "flush", "chain", "inet", "secfw", chain)
    else:
        cloud.tamper("iptables", "-F", chain)
    rows = cli_verify(cloud, 12)["differences"]
    assert {r["instance"] for r in rows} == {"server"}, rows
    assert all(r["model"] == "accept" and r["kernel"] == "drop" for r in rows)


def cli_verify(cloud: Any, status: int) -> Any:
    """``secfw audit verify`` in the host's namespace, its JSON; exit ``status``.
    (Without --topology for nftables: a routed host's bridge table holds guard
    chains, so "has bridge chains" would misread it as bridged — it did once.)"""
    done = subprocess.run(
        ["ip", "netns", "exec", cloud.lab.host_ns, str(Path(sys.executable).parent / "secfw"),
         "--store", cloud.store_url, "-f", "json", "audit", "verify", "--host", cloud.host,
         "--backend", cloud.backend_name]  # nftables: the topology read from the tables
        + ([] if cloud.backend_name == "nftables" else ["--topology", cloud.topology]),
        capture_output=True, text=True, check=False)
    assert done.returncode == status, (done.stdout, done.stderr)
    return json.loads(done.stdout)
