"""``secfw audit verify`` against random tampering of random clouds.

The clouds are the differential harness's (:mod:`test_differential`: random
groups, rules, instances, address pairs, port security, same-net), applied by
one agent pass to a lab of each backend × topology. Then the kernel is altered
behind the agent's back, by one tampering drawn among:

* a source group's set loses a member's elements (every address of one
  instance: fixed addresses and address pairs, both families);
* a group chain loses a rule, or has one replaced — its port range widened,
  its remote CIDR changed — or gains an accept rule, or is flushed;
* the anti-spoofing state loses a port's fixed address (its egress of that
  family is then dropped).

Each tampering but the last is also a change of the *model* (made to an
in-memory copy of the store): the same rule deleted, replaced or added; the
member moved to a copy of the group, so it keeps its own filter but no longer
counts as a source of the group; a group that lost its last egress rule keeps
one that matches nobody, as its kernel chain still filters. Which ports' flow
spaces change is computed from the two models (:func:`changed`), and then:

* ``secfw audit verify -f json`` exits 12 and names exactly those ports,
  directions and families — or exits 0 with no difference when the tampering
  changed nothing (a rule another one covers, a member no rule of the host
  selects...): no false alarm;
* each difference's packet is judged by the oracle
  (:mod:`secfw.compiler.explain`, one end only: the port's own filter) as
  verify says the model judges it, and as the tampered model judges it for what
  verify says the kernel does; the kernel enforces the tampered model (verify of
  the tampered model finds nothing);
* the packet is SENT (crafted, from the uplink towards the port, or from the
  port's namespace outwards) and arrives exactly when verify said the kernel
  accepts it.

Cost: a few derandomized hypothesis examples per backend × topology, no
shrinking, probes bounded by :data:`test_differential.PROBE_TIMEOUT`.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import re
import select
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netaddr
import pytest
import test_differential as diff
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from secfw.api import Api
from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import egress_openers, ingress_openers
from secfw.audit.space import ICMP_OF, Region, difference, sweep
from secfw.audit.verify import ipt_kernel, nft_kernel, verify
from secfw.backends.iptables.render import group_chain_name
from secfw.backends.iptables.render import set_name as ipset_name
from secfw.cli.main import main
from secfw.cloud import CloudState
from secfw.compiler import explain
from secfw.compiler.build import chain_name, set_name
from secfw.compiler.explain import Flow
from secfw.compiler.ir import Family
from secfw.constants import ICMP_NEW_TYPES, ICMPV6_NEW_TYPES
from secfw.errors import ConflictError
from secfw.lab import netns_tools
from secfw.lab.hostlab import Lab
from secfw.model import Rule
from secfw.store.memory import MemoryStore

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

PROJECT, HOST = diff.PROJECT, diff.HOST
FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
#: The group that stands for a tampered one in the model, and the one nobody is in.
COPY, NOBODY = "tampered", "nobody"
VERIFY_DIFFERS = 12
#: Random clouds per backend × topology (each: a deploy, a tampering, two verify
#: runs and a few packets, ~6 s on a loaded 2-core VM).
EXAMPLES = 4


@pytest.fixture(scope="module", params=diff.COMBINATIONS,
                ids=["-".join(c) for c in diff.COMBINATIONS])
def tamper_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Lab, Path, str]]:
    """One lab (a unique host namespace) per backend × topology, always brought down."""
    backend, topology = request.param
    work = tmp_path_factory.mktemp("tamper")
    lab = Lab(f"tamper-{uuid.uuid4().hex[:8]}", work / "lab", topology=topology)
    try:
        yield lab, work, backend
    finally:
        lab.down()


# --------------------------------------------------------------------------- the kernel


@dataclass(frozen=True)
class Kernel:
    """secfw's ruleset in the lab's host namespace, read and altered with the
    tools an intruder (or a careless admin) would use."""

    ns: str
    backend: str
    variant: str  # iptables: "nft" or "legacy"

    def run(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["ip", "netns", "exec", self.ns, *args], capture_output=True,
                              text=True, timeout=30, check=False)
        assert done.returncode == 0 or not check, f"{' '.join(args)}: {done.stderr}"
        return done.stdout

    def tool(self, family: Family) -> str:
        return f"{'iptables' if family == 'ipv4' else 'ip6tables'}-{self.variant}"

    def nft_rules(self, chain: str) -> list[tuple[str, str]]:
        """(handle, rule text) of an inet chain, in order; [] when it is absent."""
        text = self.run("nft", "-a", "list", "chain", "inet", "secfw", chain, check=False)
        found = []
        for line in text.splitlines():
            body, _, handle = line.strip().rpartition(" # handle ")
            if body and not body.startswith(("chain ", "type ")):
                found.append((handle, body))
        return found

    def ipt_rules(self, chain: str, family: Family) -> list[str]:
        """The ``-A chain …`` lines of a chain, in order (rule n is line n-1)."""
        text = self.run(self.tool(family), "-S", chain, check=False)
        return [line for line in text.splitlines() if line.startswith("-A ")]

    def ipt_chain(self, chain: str, family: Family) -> bool:
        """Whether the chain exists in the family's filter table."""
        return bool(self.run(self.tool(family), "-S", chain, check=False))

    def nft_elements(self, name: str, family: str = "inet") -> list[Any]:
        """The elements of a set as nft's JSON gives them ([] when absent)."""
        text = self.run("nft", "-j", "list", "set", family, "secfw", name, check=False)
        for obj in json.loads(text or '{"nftables": []}')["nftables"]:
            if "set" in obj:
                elements: list[Any] = obj["set"].get("elem", [])
                return elements
        return []

    def ipset_elements(self, name: str) -> list[str]:
        text = self.run("ipset", "list", name, "-o", "save", check=False)
        return [line.split()[2] for line in text.splitlines() if line.startswith("add ")]


def element_text(element: Any) -> str:
    """An nft JSON set element as nft's input syntax."""
    if isinstance(element, dict) and "elem" in element:
        return element_text(element["elem"]["val"])
    if isinstance(element, dict) and "prefix" in element:
        return f"{element['prefix']['addr']}/{element['prefix']['len']}"
    if isinstance(element, dict) and "range" in element:
        return "-".join(element_text(v) for v in element["range"])
    if isinstance(element, dict) and "concat" in element:
        return " . ".join(element_text(v) for v in element["concat"])
    if isinstance(element, str) and element.startswith("tap"):
        return f'"{element}"'
    return str(element)


# --------------------------------------------------------------------------- tamperings


@dataclass(frozen=True)
class Tampering:
    """Commands run in the host namespace, and the same change made to the model
    (``change``; None: no model form, see ``closes``)."""

    what: str
    commands: tuple[tuple[str, ...], ...]
    change: Callable[[Api, CloudState], None] | None
    #: anti-spoofing: the (tap, family) whose egress the tampering drops entirely
    closes: tuple[str, Family] | None = None


def rule_family(rule: Rule) -> Family:
    return "ipv4" if rule.ethertype == "IPv4" else "ipv6"


def host_groups(state: CloudState) -> list[str]:
    """The ids of the groups of the host's instances, by name."""
    ids = {g for i in state.instances.values() for g in i.security_groups}
    return sorted(ids, key=lambda g: state.groups[g].name)


def group_rules(state: CloudState, group_id: str, direction: str | None = None) -> list[Rule]:
    """A group's rules (of ``direction``), in an order independent of their ids."""
    rules = [r for r in state.rules_by_group.get(group_id, {}).values()
             if direction in (None, r.direction)]
    return sorted(rules, key=lambda r: diff.rule_key(state, r))


def locate(kernel: Kernel, rule: Rule) -> tuple[str, str, str] | None:
    """(chain, handle or rule number, text) of a model rule in the kernel."""
    ir_chain = chain_name(rule.group_id, "ingress" if rule.direction == "ingress" else "egress")
    if kernel.backend == "nftables":
        for handle, text in kernel.nft_rules(ir_chain):
            if f'comment "{rule.id[:8]}:' in text:
                return ir_chain, handle, text
        return None
    chain = group_chain_name(ir_chain)
    for number, line in enumerate(kernel.ipt_rules(chain, rule_family(rule)), 1):
        if f"--comment r-{rule.id[:8]}" in line:
            return chain, str(number), line
    return None


def replace_command(kernel: Kernel, rule: Rule, where: tuple[str, str, str],
                    text: str) -> tuple[str, ...]:
    chain, handle, _ = where
    if kernel.backend == "nftables":
        return ("nft", f"replace rule inet secfw {chain} handle {handle} {text}")
    args = text.split()[2:]  # "-A chain" dropped
    return (kernel.tool(rule_family(rule)), "-R", chain, handle, *args)


def delete_command(kernel: Kernel, rule: Rule, where: tuple[str, str, str]) -> tuple[str, ...]:
    chain, handle, _ = where
    if kernel.backend == "nftables":
        return ("nft", "delete", "rule", "inet", "secfw", chain, "handle", handle)
    return (kernel.tool(rule_family(rule)), "-D", chain, handle)


def recreate(api: Api, state: CloudState, rule: Rule, group: str | None = None,
             ports: tuple[int, int] | None = None, cidr: str | None = None) -> None:
    """``rule`` created again (in ``group``, with other ``ports`` or remote
    ``cidr``); a duplicate of an existing rule is skipped."""
    dst_port = icmp_type = icmp_code = None
    if rule.protocol in ("tcp", "udp") and rule.port_min is not None:
        low, high = ports or (rule.port_min, rule.port_max or rule.port_min)
        dst_port = f"{low}:{high}"
    elif rule.protocol in ("icmp", "icmpv6"):
        icmp_type, icmp_code = rule.port_min, rule.port_max
    remote_group = None if rule.remote_group_id is None else \
        state.groups[rule.remote_group_id].name
    with contextlib.suppress(ConflictError):
        api.rule_create(PROJECT, group or state.groups[rule.group_id].name, rule.direction,
                        rule.ethertype, rule.protocol, dst_port, icmp_type, icmp_code,
                        cidr or (None if remote_group else rule.remote_cidr), remote_group)


def keep_filtering(api: Api, before: CloudState) -> None:
    """A group that had egress rules and has none now gets one that matches
    nobody: its ports' egress stays filtered, as the kernel's flushed or emptied
    chain still filters it (docs/semantics.md: no egress rule at all means open)."""
    after = api.snapshot()
    for group_id in host_groups(before):
        if group_rules(before, group_id, "egress") and not group_rules(after, group_id,
                                                                        "egress"):
            if (PROJECT, NOBODY) not in after.group_by_name:
                api.secgroup_create(PROJECT, NOBODY, "has no member")
            api.rule_create(PROJECT, before.groups[group_id].name, "egress",
                            remote_group=NOBODY)
            after = api.snapshot()


def rule_tamperings(kernel: Kernel, state: CloudState) -> list[Tampering]:
    """Delete, widen, re-source one rule of a group chain; flush a chain; add a
    rule (a placeholder: :func:`materialise` draws it)."""
    found: list[Tampering] = []
    for group_id in host_groups(state):
        name = state.groups[group_id].name
        for direction in ("ingress", "egress"):
            rules = group_rules(state, group_id, direction)
            located = [(r, w) for r in rules if (w := locate(kernel, r)) is not None]
            for rule, where in located:
                found += rule_changes(kernel, state, rule, where)
            if located or (direction == "ingress" and kernel.backend == "nftables"):
                found.append(flush(kernel, group_id, direction, rules))
            chain = group_chain_name(chain_name(group_id, direction))
            exists = kernel.backend == "nftables" or any(kernel.ipt_chain(chain, f)
                                                         for f in FAMILIES)
            if (direction == "ingress" or rules) and exists:
                found.append(Tampering(f"add to {name} {direction}",
                                       (("add", group_id, direction),), None))
    return found


def rule_changes(kernel: Kernel, state: CloudState, rule: Rule,
                 where: tuple[str, str, str]) -> list[Tampering]:
    described = explain.describe_rule(state, rule)
    found = [Tampering(f"delete {described} of {state.groups[rule.group_id].name}",
                       (delete_command(kernel, rule, where),),
                       replaced(rule))]
    text = where[2]
    if rule.protocol in ("tcp", "udp") and rule.port_min is not None:
        low, high = rule.port_min, rule.port_max or rule.port_min
        wide = (max(1, low - 2), min(65535, high + 2))
        pattern = r"dport \d+(?:[-:]\d+)?" if kernel.backend == "nftables" else \
            r"--dport \d+(?::\d+)?"
        new = (f"dport {wide[0]}-{wide[1]}" if kernel.backend == "nftables"
               else f"--dport {wide[0]}:{wide[1]}")
        if wide != (low, high) and re.search(pattern, text):
            found.append(Tampering(
                f"widen {described} to {wide}",
                (replace_command(kernel, rule, where, re.sub(pattern, new, text, count=1)),),
                replaced(rule, ports=wide)))
    if rule.remote_cidr is not None:
        family = 4 if rule.ethertype == "IPv4" else 6
        others = [c for c in diff.CIDR_POOL[family]
                  if ipaddress.ip_network(c).prefixlen > 0 and c != rule.remote_cidr]
        cidr = others[int(rule.id[:8], 16) % len(others)]  # any other: a fixed choice
        pattern = (r"(ip6? [sd]addr )[0-9a-f.:/]+" if kernel.backend == "nftables"
                   else r"(-[sd] )[0-9a-f.:/]+")
        if re.search(pattern, text):
            found.append(Tampering(
                f"re-source {described} to {cidr}",
                (replace_command(kernel, rule, where,
                                 re.sub(pattern, rf"\g<1>{cidr}", text, count=1)),),
                replaced(rule, cidr=cidr)))
    return found


def replaced(rule: Rule, ports: tuple[int, int] | None = None,
             cidr: str | None = None) -> Callable[[Api, CloudState], None]:
    """The model change: ``rule`` deleted, and created again with other
    ``ports`` or remote ``cidr`` when one is given."""
    def change(api: Api, state: CloudState) -> None:
        api.rule_delete(PROJECT, rule.id)
        if ports is not None or cidr is not None:
            recreate(api, state, rule, ports=ports, cidr=cidr)

    return change


def flush(kernel: Kernel, group_id: str, direction: str, rules: list[Rule]) -> Tampering:
    ir_chain = chain_name(group_id, "ingress" if direction == "ingress" else "egress")
    if kernel.backend == "nftables":
        commands: tuple[tuple[str, ...], ...] = (("nft", "flush", "chain", "inet", "secfw",
                                                  ir_chain),)
    else:
        commands = tuple((kernel.tool(f), "-F", group_chain_name(ir_chain)) for f in FAMILIES
                         if kernel.ipt_rules(group_chain_name(ir_chain), f))

    def change(api: Api, _state: CloudState) -> None:
        for rule in rules:
            api.rule_delete(PROJECT, rule.id)

    return Tampering(f"flush {direction} chain of group {group_id[:8]}", commands, change)


def materialise(kernel: Kernel, data: st.DataObject, state: CloudState,
                tampering: Tampering) -> Tampering:
    """The added rule of an ``add`` tampering, drawn: its commands and change."""
    if tampering.commands[0][0] != "add":
        return tampering
    _, group_id, direction = tampering.commands[0]
    ir_chain = chain_name(group_id, "ingress" if direction == "ingress" else "egress")
    families = [v for v, f in ((4, "ipv4"), (6, "ipv6")) if kernel.backend == "nftables"
                or kernel.ipt_chain(group_chain_name(ir_chain), f)]
    family = data.draw(st.sampled_from(families), label="added rule's family")
    proto = data.draw(st.sampled_from(("tcp", "udp")), label="added rule's protocol")
    low = data.draw(st.sampled_from(diff.PORT_EDGES), label="added rule's first port")
    high = data.draw(st.sampled_from([p for p in diff.PORT_EDGES if p >= low]),
                     label="added rule's last port")
    cidr = data.draw(st.sampled_from(diff.CIDR_POOL[family]), label="added rule's remote")
    number = 6 if proto == "tcp" else 17
    if kernel.backend == "nftables":
        ip = "ip" if family == 4 else "ip6"
        way = "saddr" if direction == "ingress" else "daddr"
        remote = "" if cidr in ("0.0.0.0/0", "::/0") else f"{ip} {way} {cidr} "
        nfproto = "ipv4" if family == 4 else "ipv6"
        command: tuple[str, ...] = (
            "nft", f"add rule inet secfw {ir_chain} meta nfproto {nfproto} {remote}"
                   f"meta l4proto {number} th dport {low}-{high} accept")
    else:
        chain = group_chain_name(ir_chain)
        way = "-s" if direction == "ingress" else "-d"
        command = (kernel.tool("ipv4" if family == 4 else "ipv6"), "-A", chain, way, cidr,
                   "-p", str(number), "-m", proto, "--dport", f"{low}:{high}",
                   "-g", "secfw-allow")
    name = state.groups[group_id].name

    def change(api: Api, _state: CloudState) -> None:
        with contextlib.suppress(ConflictError):
            api.rule_create(PROJECT, name, direction, f"IPv{family}", proto, f"{low}:{high}",
                            remote_ip=cidr)

    return Tampering(f"add to {name} {direction}: {proto} {low}-{high} {cidr}", (command,),
                     change)


def member_tamperings(kernel: Kernel, state: CloudState) -> list[Tampering]:
    """A member's elements deleted from a source group's sets (both families)."""
    sources = sorted({r.remote_group_id for r in state.rules.values() if r.remote_group_id},
                     key=lambda g: state.groups[g].name)
    found = []
    for group_id in sources:
        for member in sorted(state.group_members(group_id), key=lambda i: i.name):
            commands = member_commands(kernel, state, group_id, member.id)
            if commands:
                found.append(Tampering(
                    f"{member.name}'s elements deleted from {state.groups[group_id].name}'s sets",
                    commands, functools.partial(moved, group=group_id, member=member.name)))
    return found


def member_commands(kernel: Kernel, state: CloudState, group_id: str,
                    instance_id: str) -> tuple[tuple[str, ...], ...] | None:
    """The commands deleting every element of the instance's addresses from the
    group's sets; None when an element mixes them with another member's (a
    merged range: no single member's deletion) or there is none."""
    mine = [ipaddress.ip_network(a) for p in state.ports_of(instance_id)
            for a in (*explain.member_addresses(p), *(c for c, _ in p.address_pairs()))]
    commands: list[tuple[str, ...]] = []
    for family in FAMILIES:
        name = set_name(group_id, family)
        if kernel.backend == "nftables":
            elements = [element_text(e) for e in kernel.nft_elements(name)]
        else:
            elements = kernel.ipset_elements(ipset_name(name))
        hit = []
        for text in elements:
            element = ipaddress.ip_network(text.partition("-")[0], strict=False)
            inside = any(element.version == m.version and element.subnet_of(m)
                         for m in mine)
            overlaps = any(element.version == m.version and element.overlaps(m)
                           for m in mine)
            if overlaps and (not inside or "-" in text):
                return None
            if inside:
                hit.append(text)
        if hit and kernel.backend == "nftables":
            commands.append(("nft", f"delete element inet secfw {name} {{ {', '.join(hit)} }}"))
        commands += [("ipset", "del", ipset_name(name), e) for e in hit
                     if kernel.backend != "nftables"]
    return tuple(commands) or None


def moved(api: Api, state: CloudState, group: str, member: str) -> None:
    """The model form of a member's elements deleted: the member trades the group
    for a copy of it (same rules: its own filter is unchanged), so it is no
    longer a source the group selects."""
    api.secgroup_create(PROJECT, COPY, "a copy")
    for rule in group_rules(state, group):
        recreate(api, state, rule, group=COPY)
    api.add_secgroup(PROJECT, member, COPY)
    api.remove_secgroup(PROJECT, member, state.groups[group].name)


def spoof_tamperings(kernel: Kernel, state: CloudState) -> list[Tampering]:
    """A port's fixed address deleted from the anti-spoofing state."""
    found = []
    for port in sorted(state.ports.values(), key=lambda p: p.tap):
        if not port.port_security:
            continue
        for family, address in (("ipv4", port.ip), ("ipv6", port.ip6)):
            if address is None:
                continue
            command = spoof_command(kernel, port.tap, port.mac, address, family)
            if command is not None:
                found.append(Tampering(f"{port.tap}'s {address} deleted from anti-spoofing",
                                       (command,), None, (port.tap, family)))
    return found


def spoof_command(kernel: Kernel, tap: str, mac: str, address: str,
                  family: Family) -> tuple[str, ...] | None:
    if kernel.backend == "nftables":
        name = "spoof4" if family == "ipv4" else "spoof6"
        for element in kernel.nft_elements(name):
            text = element_text(element)
            parts = text.split(" . ")
            if parts[1:] == [mac, address] and (
                    parts[0] == f'"{tap}"' or mark_of(kernel, tap) == parts[0]):
                return ("nft", f"delete element inet secfw {name} {{ {text} }}")
        return None
    suffix = "/32" if family == "ipv4" else "/128"
    for number, line in enumerate(kernel.ipt_rules("secfw-egress", family), 1):
        if f"-s {address}{suffix} " in line and f"{tap} " in line:
            return (kernel.tool(family), "-D", "secfw-egress", str(number))
    return None


def mark_of(kernel: Kernel, tap: str) -> str | None:
    """The mark a bridged host's ``from-tap`` chain gives ``tap``'s frames (its
    anti-spoofing elements are keyed on it), as nft prints it."""
    text = kernel.run("nft", "list", "table", "bridge", "secfw", check=False)
    match = re.search(rf'"{re.escape(tap)}" : (0x[0-9a-f]+)', text) or re.search(
        rf'iifname "{re.escape(tap)}" meta mark set (0x[0-9a-f]+)', text)
    return None if match is None else str(int(match.group(1), 16))


# --------------------------------------------------------------------------- the model


def tampered_model(store: Any, state: CloudState, tampering: Tampering) -> CloudState:
    """The model with the tampering's change made (an in-memory copy of ``store``)."""
    assert tampering.change is not None
    api = Api(MemoryStore(store.load()))
    tampering.change(api, state)
    keep_filtering(api, state)
    return api.snapshot()


Key = tuple[str, str, str]  # instance name, direction, ethertype ("IPv4"/"IPv6")


def space(cp: CloudPolicy, view: PortView, direction: str, family: Family) -> list[Any]:
    openers = ingress_openers(cp, view, family) if direction == "ingress" else \
        egress_openers(cp, view, family)
    return sweep(family, openers)


def own_addresses(view: PortView) -> netaddr.IPSet:
    """A port's fixed addresses and allowed address pairs: what its instance holds."""
    return netaddr.IPSet([a for a in (view.port.ip, view.port.ip6) if a]
                         + [c for c, _ in view.port.address_pairs()])


def compared(family: Family, region: Region, own: netaddr.IPSet) -> bool:
    """Whether ``region`` holds a first packet verify compares (its module
    docstring): any but ICMP types that open no connection — invalid, dropped
    by model and kernel alike — the untracked ICMPv6 left to the protection
    tests, and those with one of the port's ``own`` addresses as the remote."""
    if not region.addresses - own:
        return False
    icmp = ICMP_OF[family]
    box = region.box
    if box.proto_lo != icmp or box.proto_hi != icmp:
        return True
    new = ICMP_NEW_TYPES if family == "ipv4" else ICMPV6_NEW_TYPES
    return any(t in new for t in range(box.sel_lo // 256, box.sel_hi // 256 + 1))


def changed(before: CloudPolicy, after: CloudPolicy) -> set[Key]:
    """The host ports, directions and families whose own filter admits other
    flows in ``after`` than in ``before`` (exact: the two spaces' differences)."""
    found = set()
    for port_id, view in before.ports.items():
        other = after.ports[port_id]
        for direction in ("ingress", "egress"):
            for family in FAMILIES:
                if view.address(family) is None:
                    continue
                old, new = (space(cp, v, direction, family)
                            for cp, v in ((before, view), (after, other)))
                gone, new_ones = difference(family, old, new), difference(family, new, old)
                own = own_addresses(view)
                if any(compared(family, r, own) for r in (*gone, *new_ones)):
                    found.add((view.instance.name, direction,
                               "IPv4" if family == "ipv4" else "IPv6"))
    return found


def closed(cp: CloudPolicy, tap: str, family: Family) -> set[Key]:
    """What deleting a port's anti-spoofing element changes: its egress of that
    family, when it lets anything out."""
    view = next(v for v in cp.ports.values() if v.port.tap == tap)
    own = own_addresses(view)
    if not any(compared(family, r, own) for r in space(cp, view, "egress", family)):
        return set()
    return {(view.instance.name, "egress", "IPv4" if family == "ipv4" else "IPv6")}


def oracle_end(state: CloudState, allow_same_net: bool, tap: str, direction: str,
               packet: dict[str, Any]) -> str:
    """The oracle's verdict of one end — the port's own filter, as verify
    compares it — on a difference's packet."""
    port = next(p for p in state.ports.values() if p.tap == tap)
    flow = Flow(packet["src"], packet["dst"], packet["protocol"], packet["dport"],
                packet["icmp_type"], packet["icmp_code"], packet["sport"])
    stateless = explain._conntrack_verdict(flow) if port.port_security else None
    if stateless is not None:
        return "drop"
    decision = (explain._ingress(state, port, flow, allow_same_net) if direction == "ingress"
                else explain._egress(state, port, flow))
    return "accept" if decision.allowed else "drop"


# --------------------------------------------------------------------------- the packets


def l3l4(packet: dict[str, Any], token: bytes) -> bytes | None:
    """The difference's packet with ``token`` as payload; None when it cannot be
    sent as is (a protocol whose header the payload would be misread as)."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6Unknown, IPv6
    from scapy.packet import Raw

    v6 = ipaddress.ip_address(packet["src"]).version == 6
    proto = packet["protocol"]
    l3: Any = IPv6(src=packet["src"], dst=packet["dst"]) if v6 else \
        IP(src=packet["src"], dst=packet["dst"])
    if proto == 6:
        l4: Any = TCP(sport=packet["sport"], dport=packet["dport"], flags="S")
    elif proto == 17:
        l4 = UDP(sport=packet["sport"], dport=packet["dport"])
    elif proto == 1 and not v6:
        l4 = ICMP(type=packet["icmp_type"], code=packet["icmp_code"], id=7)
    elif proto == 58 and v6:
        l4 = (ICMPv6EchoRequest(code=packet["icmp_code"], id=7) if packet["icmp_type"] == 128
              else ICMPv6Unknown(type=packet["icmp_type"], code=packet["icmp_code"],
                                 msgbody=bytes(4)))
    elif v6 and proto in (0, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254):
        return None  # extension headers: the payload would be parsed as one
    else:
        if v6:
            l3.nh = proto
        else:
            l3.proto = proto
        return bytes(l3 / Raw(token))
    return bytes(l3 / l4 / Raw(token))


@contextlib.contextmanager
def host_capture(ns: str) -> Iterator[socket.socket]:
    """A packet socket on every interface of the host namespace."""
    sock = netns_tools.socket_in_netns(ns, socket.AF_PACKET, socket.SOCK_RAW,
                                       socket.htons(netns_tools.ETH_P_ALL))
    try:
        while select.select([sock], [], [], 0)[0]:
            sock.recv(65535)
        yield sock
    finally:
        sock.close()


def left_host(sock: socket.socket, token: bytes, tap: str) -> bool:
    """Whether a frame carrying ``token`` leaves the host by an interface other
    than ``tap`` (the port it came from) within the probe timeout."""
    deadline = time.monotonic() + diff.PROBE_TIMEOUT
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], remaining)[0]:
            return False
        data, address = sock.recvfrom(65535)
        if address[2] == netns_tools.PACKET_OUTGOING and address[0] != tap and token in data:
            return True
    return False


def route_everywhere(lab: Lab) -> None:
    """A routed lab host knows only its instances and the external subnets: a
    packet an instance sends elsewhere (to 10.0.0.0 of a 10.0.0.0/8 rule) would
    die unrouted before the firewall judges it. A default route towards the
    external namespace lets it leave, where :func:`sent` sees it. (A bridged
    host only bridges: its frames leave for the router whatever their address.)"""
    if lab.topology != "routed":
        return
    for family, via in (("-4", diff.EXT_REAL), ("-6", diff.EXT6_REAL)):
        subprocess.run(["ip", "-n", lab.host_ns, family, "route", "replace", "default", "via",
                        via], capture_output=True, timeout=30, check=True)


def pin_neighbours(lab: Lab, state: CloudState) -> None:
    """Every instance learns its neighbours (gateway, peers) while the kernel is
    intact, and keeps them (``nud permanent``): a tampered anti-spoofing set
    drops an instance's neighbour solicitations too, and a resolution still
    pending when the kernel is repaired would hold the repaired probe back for
    the second-long retransmission timer (RFC 4861 section 7.2.2)."""
    targets = [a for p in state.ports.values() for a in (p.ip, p.ip6) if a]
    targets += [diff.EXT_REAL, diff.EXT6_REAL, "192.0.2.1", "2001:db8:dead::1"]
    namespaces = [lab.instance_ns(p.tap) for p in state.ports.values()]
    for ns in namespaces:
        for target in targets:
            family = socket.AF_INET6 if ":" in target else socket.AF_INET
            with netns_tools.socket_in_netns(ns, family, socket.SOCK_DGRAM) as sock, \
                    contextlib.suppress(OSError):
                sock.sendto(b"resolve", (target, 9))
    for ns in namespaces:
        entries: list[dict[str, Any]] = []
        for _ in range(40):  # bounded: 2 s for the solicitations to be answered
            entries = json.loads(subprocess.run(
                ["ip", "-j", "-n", ns, "neigh", "show"], capture_output=True, text=True,
                timeout=30, check=True).stdout or "[]")
            if not any("INCOMPLETE" in e.get("state", []) for e in entries):
                break
            time.sleep(0.05)
        for entry in entries:
            if "lladdr" in entry:
                subprocess.run(["ip", "-n", ns, "neigh", "replace", entry["dst"], "dev",
                                entry["dev"], "lladdr", entry["lladdr"], "nud", "permanent"],
                               capture_output=True, timeout=30, check=True)


def lab_local(lab: Lab, address: str) -> bool:
    """Whether ``address`` is one of the lab's own routers' (the host namespace's,
    the bridged router's): a packet to it is delivered there, one from it is a
    martian there — neither shows a port's filter."""
    for ns in (lab.host_ns, *diff.router_ns(lab)):
        route = json.loads(subprocess.run(["ip", "-j", "-n", ns, "route", "get", address],
                                          capture_output=True, text=True, timeout=30,
                                          check=False).stdout or "[{}]")
        if route and route[0].get("type") == "local":
            return True
    return False


def resolvable(lab: Lab, address: str) -> None:
    """On a routed lab host, an address of the external subnets that nobody
    holds gets a neighbour entry (the external namespace's MAC): else the host
    would hold the packet for address resolution that never succeeds, and it
    would never leave — whatever the firewall said."""
    if lab.topology != "routed":
        return
    route = json.loads(subprocess.run(["ip", "-j", "-n", lab.host_ns, "route", "get", address],
                                      capture_output=True, text=True, timeout=30,
                                      check=True).stdout)[0]
    if "gateway" in route or route["dev"].startswith("tap"):
        return
    link = json.loads(subprocess.run(["ip", "-j", "-n", lab.external_ns, "link", "show", "eth0"],
                                     capture_output=True, text=True, timeout=30,
                                     check=True).stdout)[0]
    subprocess.run(["ip", "-n", lab.host_ns, "neigh", "replace", address, "dev", route["dev"],
                    "lladdr", link["address"], "nud", "permanent"], capture_output=True,
                   timeout=30, check=True)


def sent(lab: Lab, row: dict[str, Any]) -> bool | None:
    """The difference's packet sent for real: towards the port from the uplink
    (ingress: seen on the instance's eth0), or from the port's namespace (egress:
    seen leaving the host by another interface). None: it cannot be sent here
    (its remote is one of the lab's routers, or an IPv6 extension header)."""
    # a packet sent before (the same flow) must not count as established
    subprocess.run(["ip", "netns", "exec", lab.host_ns, "conntrack", "-F"], capture_output=True,
                   timeout=30, check=True)
    token = b"secfw-tamper-" + uuid.uuid4().hex.encode()
    raw = l3l4(row["packet"], token)
    remote = row["packet"]["src" if row["direction"] == "ingress" else "dst"]
    if raw is None or lab_local(lab, remote):
        return None
    family = socket.AF_INET6 if ":" in row["packet"]["src"] else socket.AF_INET
    me = lab.instance_ns(row["port"])
    if row["direction"] == "egress":
        resolvable(lab, row["packet"]["dst"])
    sender_ns = lab.external_ns if row["direction"] == "ingress" else me
    catcher = diff.capture(me) if row["direction"] == "ingress" else host_capture(lab.host_ns)
    with catcher as sock, netns_tools.socket_in_netns(sender_ns, family, socket.SOCK_RAW,
                                                      socket.IPPROTO_RAW) as sender:
        try:
            sender.sendto(raw, (row["packet"]["dst"], 0))
        except OSError:
            return None
        if row["direction"] == "ingress":
            return diff.arrived(sock, token)
        return left_host(sock, token, row["port"])


# --------------------------------------------------------------------------- the test


def run_verify(cloud: diff.Deployed) -> tuple[int, list[dict[str, Any]]]:
    result = CliRunner().invoke(main, [
        "--store", cloud.url, "--project", PROJECT, "audit", "verify", "--host", HOST,
        "--netns", cloud.lab.host_ns, "--backend", cloud.backend,
        "--topology", cloud.lab.topology, "--config", str(cloud.config), "-f", "json"],
        env=diff.AUDIT_ENV)
    assert result.exit_code in (0, VERIFY_DIFFERS), (result.output, result.exception)
    return result.exit_code, json.loads(result.stdout)["differences"]


def kernel_judge(cloud: diff.Deployed) -> tuple[Any, list[str], list[int], list[Any]]:
    """What ``secfw audit verify`` reads: the kernel's verdict, named values, pairs."""
    if cloud.backend == "nftables":
        from secfw.audit.verify import nft_rule_points
        from secfw.backends.nftables.executor import NftablesExecutor

        listing = NftablesExecutor(cloud.lab.host_ns).read_json() or {"nftables": []}
        return (*nft_kernel(listing, cloud.lab.topology), nft_rule_points(listing))
    from secfw.audit.iptkernel import read_iptables, rule_points

    saves = read_iptables(cloud.lab.host_ns)
    return (*ipt_kernel(saves, cloud.lab.topology), rule_points(saves))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=diff.cloud_specs(), data=st.data())
def test_verify_catches_random_tampering(
    tamper_lab: tuple[Lab, Path, str], spec: diff.CloudSpec, data: st.DataObject
) -> None:
    """After the agent's pass on a random cloud, a random tampering of the kernel
    (module docstring): verify names exactly the ports, directions and families
    whose verdicts it changed — none when it changed none — each with a packet
    the oracle judges as verify says the model and the tampered kernel do, and
    which, sent for real, fares as verify says the kernel treats it."""
    lab, _work, backend = tamper_lab
    with diff.deployed(tamper_lab, spec) as cloud:
        variant = "" if backend == "nftables" else iptables_variant(lab)
        kernel = Kernel(lab.host_ns, backend, variant)
        state = cloud.state
        kinds = {"rule": rule_tamperings(kernel, state),
                 "member": member_tamperings(kernel, state),
                 "anti-spoofing": spoof_tamperings(kernel, state)}
        kind = data.draw(st.sampled_from(sorted(k for k, v in kinds.items() if v)),
                         label="kind of tampering")
        chosen = data.draw(st.sampled_from(kinds[kind]), label="tampering")
        tampering = materialise(kernel, data, state, chosen)
        note(f"cloud:\n{spec}\ntampering: {tampering.what}: {tampering.commands}")
        before = CloudPolicy(state, spec.allow_same_net)
        if tampering.closes is None:
            after_state = tampered_model(cloud.api.store, state, tampering)
            expected = changed(before, CloudPolicy(after_state, spec.allow_same_net))
        else:
            after_state = state
            expected = closed(before, *tampering.closes)
        route_everywhere(lab)
        pin_neighbours(lab, state)
        for command in tampering.commands:
            kernel.run(*command)  # nft takes one argument as a whole command
        status, rows = run_verify(cloud)
        note(f"expected: {sorted(expected)}\nverify: {rows}")
        assert status == (VERIFY_DIFFERS if expected else 0)
        named = {(r["instance"], r["direction"],
                  "IPv6" if ":" in r["packet"]["src"] else "IPv4") for r in rows}
        assert named == expected
        if tampering.closes is None:  # the kernel enforces the tampered model
            judge, addresses, ports, pairs = kernel_judge(cloud)
            found, _ = verify(CloudPolicy(after_state, spec.allow_same_net), HOST, judge,
                              addresses, ports, None, pairs)
            assert [d.row() for d in found] == []
        for row in rows:
            packet, tap, direction = row["packet"], row["port"], row["direction"]
            assert oracle_end(state, spec.allow_same_net, tap, direction, packet) == \
                row["model"], row
            kernel_says = "drop" if tampering.closes else oracle_end(
                after_state, spec.allow_same_net, tap, direction, packet)
            assert kernel_says == row["kernel"], row
        # the packets, sent: as verify says the kernel treats them; once the agent
        # has repaired the kernel, as the model says
        kernel_state = state if tampering.closes else after_state
        arrived = {i: sent(lab, row) for i, row in enumerate(rows)}
        cloud.reconciler.reconcile(full=True)
        repaired = {i: sent(lab, row) for i, row in enumerate(rows)}
        for i, row in enumerate(rows):
            note(f"sent {row['packet']}: {arrived[i]}, after the repair {repaired[i]}")
            if arrived[i] is None:  # an address of the lab's own routers
                continue
            assert (arrived[i], repaired[i]) == (
                arrives(kernel_state, spec.allow_same_net, row, row["kernel"]),
                arrives(state, spec.allow_same_net, row, row["model"])), row


def arrives(state: CloudState, allow_same_net: bool, row: dict[str, Any], verdict: str) -> bool:
    """Whether a difference's packet gets where :func:`sent` looks for it when
    its port's filter says ``verdict``: an egress packet to another port's fixed
    address meets that port's ingress too (as ``state`` says); to anything else
    it leaves the host."""
    if verdict != "accept":
        return False
    packet = row["packet"]
    # the lab routes a port's fixed addresses to its tap, not its address pairs
    other = next((p for p in state.ports.values() if packet["dst"] in (p.ip, p.ip6)), None)
    if row["direction"] == "ingress" or other is None:
        return True
    return oracle_end(state, allow_same_net, other.tap, "ingress", packet) == "accept"


def iptables_variant(lab: Lab) -> str:
    """The iptables variant holding secfw's chains in the lab's host namespace."""
    for variant in ("nft", "legacy"):
        done = subprocess.run(["ip", "netns", "exec", lab.host_ns, f"iptables-{variant}-save",
                               "-t", "filter"], capture_output=True, text=True, timeout=30,
                              check=False)
        if ":secfw-" in done.stdout:
            return variant
    raise AssertionError("no secfw chains in either iptables variant")


# --------------------------------------------------------------------------- fixed cases


def cli_verify(cloud: Any) -> tuple[int, list[dict[str, Any]]]:
    """``secfw audit verify -f json`` of the ``cloud`` fixture's host (in-process)."""
    config = cloud.work_dir / "verify.conf"
    config.write_text("[DEFAULT]\nallow_same_net_traffic = "
                      f"{str(cloud.allow_same_net).lower()}\n")
    result = CliRunner().invoke(main, [
        "--store", cloud.store_url, "-f", "json", "audit", "verify", "--host", cloud.host,
        "--netns", cloud.lab.host_ns, "--backend", cloud.backend_name,
        "--topology", cloud.topology, "--config", str(config)], env=diff.AUDIT_ENV)
    assert result.exit_code in (0, VERIFY_DIFFERS), (result.output, result.exception)
    return result.exit_code, json.loads(result.stdout)["differences"]


def add_accept_rule(cloud: Any, chain: str, cidr: str, protocol: str, first: int,
                    last: int) -> None:
    """Behind the agent's back: append to group ``chain`` an IPv4 rule accepting
    ``protocol`` (tcp or udp) ports ``first``-``last`` from ``cidr``."""
    number = {"tcp": 6, "udp": 17}[protocol]
    if cloud.backend_name == "nftables":
        ports = str(first) if first == last else f"{first}-{last}"
        cloud.tamper("nft", f"add rule inet secfw {chain} meta nfproto ipv4 ip saddr {cidr} "
                            f"meta l4proto {number} th dport {ports} accept")
    else:
        ports = str(first) if first == last else f"{first}:{last}"
        cloud.tamper("iptables", "-A", chain, "-s", cidr, "-p", str(number), "-m", protocol,
                     "--dport", ports, "-g", "secfw-allow")


def test_verify_findings_one_can_replay(cloud: Any) -> None:
    """A tampering that changes nothing is no difference; three the random
    clouds met, each fixed in verify (README, Auditing), on every backend ×
    topology:

    1. a rule added for 192.0.2.0/24 udp 443-65534: verify probed the kernel's
       addresses at the base services and its ports at other addresses, and
       found nothing — now a rule's addresses and ports are probed together;
    2. a member deleted from a source group's set: its own filter differs only
       for packets to and from itself, which never leave the instance — no
       longer reported (only its peer is);
    3. an anti-spoofing element deleted from a port whose egress is open: the
       packet given went to 0.0.0.0 — now an ordinary unicast remote, which
       sent for real leaves the host only once the agent has repaired it.
    """
    api = cloud.api
    api.net_create("p", "net-a", "10.1.0.0/24")
    api.secgroup_create("p", "web", "")
    api.secgroup_create("p", "peers", "")
    api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    api.rule_create("p", "peers", "egress", "IPv4", "tcp", "21:21", remote_group="peers")
    api.rule_create("p", "peers", "ingress", "IPv4", "tcp", "21:21", remote_group="peers")
    # (so that a packet from a to a peer shows a's egress: the peer lets it in)
    api.rule_create("p", "peers", "ingress", "IPv4", "icmp", remote_ip="10.1.0.0/24")
    cloud.boot("a", ["web"], "net-a")
    cloud.boot("p1", ["peers"], "net-a")
    cloud.boot("p2", ["peers"], "net-a")
    cloud.configure(allow_same_net=False)
    cloud.sync()
    assert cli_verify(cloud) == (0, [])
    route_everywhere(cloud.lab)
    pin_neighbours(cloud.lab, api.snapshot())
    kernel = Kernel(cloud.lab.host_ns, cloud.backend_name,
                    "" if cloud.backend_name == "nftables" else cloud.iptables_variant())

    # 0. a rule that another one covers (tcp 80 from anywhere): no false alarm
    chain = cloud.group_chain("p", "web")
    add_accept_rule(cloud, chain, "203.0.113.0/24", "tcp", 80, 80)
    assert cli_verify(cloud) == (0, [])

    # 1. an accept rule for other addresses and ports
    add_accept_rule(cloud, chain, "192.0.2.0/24", "udp", 443, 65534)
    status, rows = cli_verify(cloud)
    assert [(r["instance"], r["direction"]) for r in rows] == [("a", "ingress")], rows
    packet = rows[0]["packet"]
    assert ipaddress.ip_address(packet["src"]) in ipaddress.ip_network("192.0.2.0/24")
    assert (packet["protocol"], rows[0]["model"], rows[0]["kernel"]) == (17, "drop", "accept")
    assert 443 <= packet["dport"] <= 65534 and status == VERIFY_DIFFERS
    assert sent(cloud.lab, rows[0]) is True
    cloud.sync(full=True)
    assert sent(cloud.lab, rows[0]) is False

    # 2. p1's address deleted from the peers' set: p2's filter differs, not p1's
    p1, p2 = cloud.ip("p1"), cloud.ip("p2")
    if cloud.backend_name == "nftables":
        cloud.tamper("nft", "delete", "element", "inet", "secfw", cloud.group_set("p", "peers"),
                     f"{{ {p1} }}")
    else:
        cloud.tamper("ipset", "del", ipset_name(cloud.group_set("p", "peers")), p1)
    status, rows = cli_verify(cloud)
    assert sorted((r["instance"], r["direction"]) for r in rows) == [
        ("p2", "egress"), ("p2", "ingress")], rows
    ingress = next(r for r in rows if r["direction"] == "ingress")
    assert (ingress["packet"]["src"], ingress["packet"]["dst"]) == (p1, p2)
    assert sent(cloud.lab, ingress) is False
    cloud.sync(full=True)
    assert sent(cloud.lab, ingress) is True

    # 3. a's anti-spoofing element: its open egress is dropped, shown to a real address
    port = cloud.port("a")
    command = spoof_command(kernel, port.tap, port.mac, port.ip, "ipv4")
    assert command is not None
    kernel.run(*command)
    status, rows = cli_verify(cloud)
    assert [(r["instance"], r["direction"]) for r in rows] == [("a", "egress")], rows
    destination = ipaddress.ip_address(rows[0]["packet"]["dst"])
    assert destination.is_global or destination.is_private, rows[0]
    assert not destination.is_unspecified and not destination.is_multicast, rows[0]
    assert sent(cloud.lab, rows[0]) is False, rows[0]
    cloud.sync(full=True)
    assert sent(cloud.lab, rows[0]) is True, rows[0]["packet"]
