"""``secfw audit verify`` checks each group chain once, then each port's own parts.

Two ports share group ``web``'s chain; a third is in ``ops``. On every backend ×
topology, after one agent pass:

* web's chain flushed behind the agent's back: the chain is compared once, and
  the difference is reported for *every* port that uses it (vm1 and vm2), each
  with a packet that, sent for real, is dropped although the model admits it;
* vm2's dispatch pointed at ops' chain instead of web's (the slot map's element
  for nftables, the port's ingress chain's jump for iptables), every chain equal
  to the model: only vm2 is reported (iptables: and vm1, when the two share
  their ingress chain, as ports of the same groups do) — the dispatch, not the
  chains, differs — with a packet that fares as verify says the kernel treats it.

Both fail when verify skips what they exercise: the flush if a differing chain
were reported for its first port only, the swap if the per-port dispatch probe
were left out (checked by editing chainverify.PortCheck._suspect_chains to
return []: the swap went unreported).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import pytest
from test_audit_verify import run_verify

from secfw.audit.verify import Difference

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]


def build(cloud: Any) -> None:
    """vm1, vm2 (group web: tcp 80 from anywhere), peer (group ops: tcp 5432)."""
    api = cloud.api
    api.net_create("p", "net-a", "10.1.0.0/24")
    api.secgroup_create("p", "web", "")
    api.secgroup_create("p", "ops", "")
    api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    api.secgroup_add_rule("p", "ops", "tcp", "5432", "5432", "0.0.0.0/0")
    cloud.boot("vm1", ["web"], "net-a")
    cloud.boot("vm2", ["web"], "net-a")
    cloud.boot("peer", ["ops"], "net-a")
    cloud.configure(allow_same_net=False)
    cloud.sync()


def sent(cloud: Any, difference: Difference) -> bool:
    """Whether the difference's packet, sent for real, reaches its destination."""
    p = difference.packet
    names = {cloud.ip(n): n for n in ("vm1", "vm2", "peer")}
    kind = {6: "tcp", 17: "udp", 1: "icmp"}[p.protocol]
    from_ns = cloud.ns(names[p.src]) if p.src in names else cloud.lab.external_ns
    return bool(cloud.arrives(names[p.dst], kind, p.dport, src_ip=p.src, from_ns=from_ns,
                              icmp_type=p.icmp_type, icmp_code=p.icmp_code))


def flush_chain(cloud: Any, chain: str) -> None:
    if cloud.backend_name == "nftables":
        cloud.tamper("nft", "flush", "chain", "inet", "secfw", chain)
    else:
        cloud.tamper("iptables", "-F", chain)


def swap_dispatch(cloud: Any, tap: str, address: str, old: str, new: str) -> set[str]:
    """Make ``tap``'s ingress reach chain ``new`` where it reached ``old``; the
    taps whose ingress this changes (iptables: the ports of the same groups
    share their ingress chain, backends/iptables/render.py)."""
    if cloud.backend_name == "nftables":
        key = f'"{tap}"' if cloud.topology == "routed" else _nft_mark(cloud, address)
        cloud.tamper("nft", "delete", "element", "inet", "secfw", "ingress_slot0",
                     f"{{ {key} }}")
        cloud.tamper("nft", "add", "element", "inet", "secfw", "ingress_slot0",
                     f"{{ {key} : jump {new} }}")
        return {tap}
    tool = f"iptables-{cloud.iptables_variant()}"
    listing = subprocess.run(["ip", "netns", "exec", cloud.lab.host_ns, tool, "-S"],
                             check=True, capture_output=True, text=True).stdout.splitlines()
    dispatch = {match.group(2): match.group(3) for line in listing
                if line.startswith("-A secfw-ingress ") and (match := re.search(
                    r"(-o|--physdev-out) (\S+) .*-g (\S+)", line))}
    port_chain = dispatch[tap]
    rules = [line for line in listing if line.startswith(f"-A {port_chain} ")]
    number = next(i for i, line in enumerate(rules, 1) if line.endswith(f"-j {old}"))
    cloud.tamper("iptables", "-R", port_chain, str(number), "-j", new)
    return {t for t, chain in dispatch.items() if chain == port_chain}


def _nft_mark(cloud: Any, address: str) -> str:
    """A bridged host's mark for the port of ``address`` (its ``ingress_addrs4``)."""
    listing = json.loads(cloud.nft("-j", "list", "map", "inet", "secfw", "ingress_addrs4"))
    body = next(o["map"] for o in listing["nftables"] if "map" in o)
    return str(next(value for key, value in body["elem"] if key == address))


def test_a_shared_chain_and_a_port_dispatch(cloud: Any) -> None:
    build(cloud)
    found, _ = run_verify(cloud)
    assert found == [], [d.row() for d in found]
    web, ops = cloud.group_chain("p", "web"), cloud.group_chain("p", "ops")

    flush_chain(cloud, web)
    found, _ = run_verify(cloud)
    assert sorted((d.view.instance.name, d.direction) for d in found) == [
        ("vm1", "ingress"), ("vm2", "ingress")], [d.row() for d in found]
    for difference in found:
        assert (difference.model, difference.kernel) == ("accept", "drop")
        assert not sent(cloud, difference)
    cloud.sync(full=True)
    assert run_verify(cloud)[0] == []

    vm2 = cloud.port("vm2")
    changed = swap_dispatch(cloud, vm2.tap, vm2.ip, web, ops)
    assert vm2.tap in changed and cloud.port("peer").tap not in changed
    found, _ = run_verify(cloud)
    assert sorted((d.view.port.tap, d.direction) for d in found) == sorted(
        (tap, "ingress") for tap in changed), [d.row() for d in found]
    for difference in found:
        assert difference.packet.dport in (80, 5432), difference.row()
        assert sent(cloud, difference) == (difference.kernel == "accept")
