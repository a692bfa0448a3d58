"""``secfw audit verify`` (nftables): each port's own elements compared as data.

verify answers a port without a probe when the ruleset's skeleton equals the
model's rendering and so do the elements keyed by the port's tap (or mark,
bridged): :mod:`secfw.audit.skeleton`. Each tampering below changes one or two
ports' own part only — the skeleton stays the model's — and must be reported
for exactly the ports it changes, each with a packet that, sent for real (or
its flow: TCP, UDP or ping to the external namespace for an egress
difference), fares as verify says the kernel treats it:

1. vm1's element of ``ingress_slot0`` deleted (web's chain no longer reached);
2. vm2's element of ``ingress_slot0`` pointed at ops' chain;
3. an extra element for vm1 in ``ingress_slot1`` (peer's second slot): ops;
4. a rule naming vm2's tap inserted in a base chain of its ingress path
   (routed ``forward-ingress``, bridged ``to-tap``): tcp 80 dropped;
5. vm1's and vm2's ``spoof4`` elements with their addresses swapped.

Last, ``inet secfw`` made dormant (``flags dormant``: none of its chains runs —
real packets the model drops now arrive): every port and direction is reported,
the kernel's verdict ``unknown`` (the evaluator does not guess what a flagged
table does); before, the listing read the same as an active table's and verify
found nothing (checked with nftkernel.py and skeleton.py of main).

Every step's outcome is collected and asserted at the end, so that a failure
lists every step that went wrong. Checked against a naive data path: with the
element comparison skipped (``skeleton._compare_sets`` not looking at
elements) steps 1, 2, 3 and 5 went unreported; with rules guarded by a tap not
attributed to its port (``_compare_chains`` ignoring them), step 4 did.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from test_audit_verify import run_verify

from secfw.audit.verify import Difference

pytestmark = [
    pytest.mark.netns,
    pytest.mark.backends("nftables"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]


def build(cloud: Any) -> None:
    """vm1, vm2 (web: tcp 80), peer (ops: tcp 5432, and web: a second slot)."""
    api = cloud.api
    api.net_create("p", "net-a", "10.1.0.0/24")
    api.secgroup_create("p", "web", "")
    api.secgroup_create("p", "ops", "")
    api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    api.secgroup_add_rule("p", "ops", "tcp", "5432", "5432", "0.0.0.0/0")
    cloud.boot("vm1", ["web"], "net-a")
    cloud.boot("vm2", ["web"], "net-a")
    cloud.boot("peer", ["ops", "web"], "net-a")
    cloud.configure(allow_same_net=False)
    cloud.sync()


def ingress_key(cloud: Any, name: str) -> str:
    """The element key naming ``name``'s port on the ingress side: its tap
    (routed) or its ingress mark (bridged, read from ``ingress_addrs4``)."""
    port = cloud.port(name)
    if cloud.topology == "routed":
        return f'"{port.tap}"'
    elements = cloud.set_elements("ingress_addrs4")
    return str(next(value for key, value in elements if key == port.ip))


def nft(cloud: Any, *words: str) -> None:
    cloud.tamper("nft", *words)


def confirmed(cloud: Any, difference: Difference) -> bool:
    """Whether real traffic fares as verify says the kernel treats the packet:
    ingress, the packet itself from its source; egress, the same protocol and
    port from the instance to the external namespace (the remote verify chose
    may be no lab address)."""
    p = difference.packet
    names = {cloud.ip(n): n for n in ("vm1", "vm2", "peer")}
    kind = {6: "tcp", 17: "udp", 1: "icmp"}.get(p.protocol)
    assert kind is not None, difference.row()
    if difference.direction == "ingress":
        from_ns = cloud.ns(names[p.src]) if p.src in names else cloud.lab.external_ns
        arrived = bool(cloud.arrives(names[p.dst], kind, p.dport, src_ip=p.src,
                                     from_ns=from_ns, icmp_type=p.icmp_type,
                                     icmp_code=p.icmp_code))
    else:
        source = names[p.src]
        arrived = {"tcp": lambda: cloud.tcp(source, "external", p.dport),
                   "udp": lambda: cloud.udp(source, "external", p.dport),
                   "icmp": lambda: cloud.ping(source, "external")}[kind]()
    return arrived == (difference.kernel == "accept")


def outcome(cloud: Any, step: str, expected: set[tuple[str, str]]) -> list[str]:
    """What is wrong with verify's answer after tampering ``step`` (empty: it
    names exactly ``expected`` (instance, direction), each with a packet real
    traffic confirms); then the agent's full pass repairs the kernel."""
    found, _ = run_verify(cloud)
    named = {(d.view.instance.name, d.direction) for d in found}
    problems = []
    if named != expected or len(found) != len(expected):
        problems.append(f"{step}: reported {sorted(named)}, expected {sorted(expected)}: "
                        f"{[d.row() for d in found]}")
    problems += [f"{step}: {d.row()} not confirmed by real traffic"
                 for d in found if not confirmed(cloud, d)]
    cloud.sync(full=True)
    clean, _ = run_verify(cloud)
    problems += [f"{step}: after the repair {d.row()}" for d in clean]
    return problems


def test_a_port_elements_tampered(cloud: Any) -> None:
    build(cloud)
    assert run_verify(cloud)[0] == []
    assert cloud.ping("vm1", "external") and cloud.ping("vm2", "external")
    ops = cloud.group_chain("p", "ops")
    problems: list[str] = []

    nft(cloud, "delete", "element", "inet", "secfw", "ingress_slot0",
        f"{{ {ingress_key(cloud, 'vm1')} }}")
    problems += outcome(cloud, "slot element deleted", {("vm1", "ingress")})

    key = ingress_key(cloud, "vm2")
    nft(cloud, "delete", "element", "inet", "secfw", "ingress_slot0", f"{{ {key} }}")
    nft(cloud, "add", "element", "inet", "secfw", "ingress_slot0", f"{{ {key} : jump {ops} }}")
    problems += outcome(cloud, "slot element to another chain", {("vm2", "ingress")})

    nft(cloud, "add", "element", "inet", "secfw", "ingress_slot1",
        f"{{ {ingress_key(cloud, 'vm1')} : jump {ops} }}")
    problems += outcome(cloud, "extra element", {("vm1", "ingress")})

    tap = cloud.port("vm2").tap
    table, chain = ("inet", "forward-ingress") if cloud.topology == "routed" else \
        ("bridge", "to-tap")
    nft(cloud, "insert", "rule", table, "secfw", chain, "oifname", f'"{tap}"', "tcp",
        "dport", "80", "drop")
    problems += outcome(cloud, "base-chain rule naming a tap", {("vm2", "ingress")})

    swap_spoof(cloud, "vm1", "vm2")
    problems += outcome(cloud, "spoof elements swapped",
                        {("vm1", "egress"), ("vm2", "egress")})
    assert not problems, "\n".join(problems)

    assert not cloud.arrives("vm1", "tcp", 5432)
    nft(cloud, "add", "table", "inet", "secfw", "{ flags dormant; }")
    assert cloud.arrives("vm1", "tcp", 5432)  # the table is off
    found, _ = run_verify(cloud)
    assert {(d.view.instance.name, d.direction) for d in found} == {
        (n, d) for n in ("vm1", "vm2", "peer") for d in ("ingress", "egress")}, \
        [d.row() for d in found]
    assert all(d.kernel.startswith("unknown") and "dormant" in d.kernel for d in found)


def swap_spoof(cloud: Any, first: str, second: str) -> None:
    """``spoof4``: each port's element for its fixed address gets the other's."""
    addresses = {cloud.port(n).ip for n in (first, second)}
    elements = [e["concat"] for e in cloud.set_elements("spoof4")
                if isinstance(e, dict) and e.get("concat", [None] * 3)[2] in addresses]
    assert len(elements) == 2, elements
    (a, b) = elements
    texts = [" . ".join(json.dumps(part) if isinstance(part, str) and part.startswith("tap")
                        else str(part) for part in element) for element in elements]
    nft(cloud, "delete", "element", "inet", "secfw", "spoof4", "{ " + ", ".join(texts) + " }")
    swapped = [[a[0], a[1], b[2]], [b[0], b[1], a[2]]]
    texts = [" . ".join(json.dumps(part) if isinstance(part, str) and part.startswith("tap")
                        else str(part) for part in element) for element in swapped]
    nft(cloud, "add", "element", "inet", "secfw", "spoof4", "{ " + ", ".join(texts) + " }")
