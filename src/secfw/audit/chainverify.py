"""``secfw audit verify``, shared: each group chain checked once, then each port's own parts.

A host's ports share their groups' chains (one kernel chain per group and
direction, docs/nftables.md, docs/iptables.md), so verify does not sample every
port's whole flow space through the whole path (a 10k-port host of the bench
was ~1M probes per port). It splits the comparison where the ruleset splits:

1. **Each group chain, once** (per family): the kernel's chain *alone* — what it
   does with a probe: ``accept``, ``continue`` (the next chain decides), or
   anything else — against the IR chain's rules (:class:`MemoIndex`), at the
   boundary points of that chain's own flow space (its rules' regions, their
   corners, the members of the sets they name, the points just outside) and at
   the values the kernel chain and its sets name. A chain whose rules could
   treat two ports otherwise (it reads an interface, a MAC, a mark, conntrack,
   the local address, or jumps elsewhere: :meth:`SharedKernel.port_dependent`;
   the agent writes none of these) is not shared: it is probed per port.
2. **Each same-net set, once**: the kernel's set against the IR's, at every
   element's edges and the addresses just outside them, both sides' elements.
3. **Each port**, each direction and family, only its own parts — as *data*
   first: when the backend can (nftables, :meth:`SharedKernel.port_data`,
   :mod:`secfw.audit.skeleton`), the ruleset's fixed skeleton (base chains,
   ``ingress-filter``, ``egress-*``, guard and protection chains, every set
   declaration, the sets no port keys) is compared once, in normal form, with
   the backend's own rendering of the model, and each port's elements (those
   whose first key is its tap, or its mark on a bridged host: dispatch and slot
   maps, ``<N>-ports``, spoof, ND and ARP sets, its marks, its metadata
   element) with the rendering's. A port is then answered without a probe when
   the skeleton and its elements are equal, every group chain it uses was found
   equal in step 1 and every same-net set it accepts from in step 2: the
   evaluator reads nothing else of the ruleset for that port's packets (the
   argument is skeleton.py's docstring), and the renderer's output is the
   model's meaning (its own tests: golden files, real packets in the
   differential tests). Any other port — its elements or a rule naming its tap
   differ, a chain or set of its differs, or the skeleton does (then every
   port, slow but complete), or the backend has no such comparison (iptables) —
   is *probed*: its probes through the real hook path with the chains found
   equal in step 1 *stubbed* by the model's answer (so what remains to differ
   is the port's dispatch, anti-spoofing, port security, same-net lookups,
   NAT): the base services from an ordinary outside address, a member of each
   of its same-net sets and the addresses beside them, the values named by the
   rules outside group chains (:data:`OTHER_VALUES` at most), its floating and
   metadata probes; and one *dispatch* probe whose path records which group
   chains it reaches: they must be the port's chains for that direction. So a
   reported difference always carries a packet.

Where a chain or set differs (step 1 or 2), or the dispatch does (step 3), the
points showing it are tried on every port concerned through the *real* path
(no stub), and a port is reported only where one of them changes its verdict:
a difference that another group of the port covers (or same-net, or port
security off) is no difference of that port, as before. Every reported verdict
is the real path's. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import netaddr

from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.skeleton import PortData
from secfw.audit.space import ICMP_OF, PROTO_MAX, SEL_MAX, Opener, Region, rule_box, sweep
from secfw.audit.verify import (
    CLIENT_PORT,
    BoxKey,
    Difference,
    HostNat,
    NamedValues,
    Point,
    SharedKernel,
    _clean,
    _judged,
    _members_in,
    _own_ranges,
    _sendable,
    _sendable_instead,
    cidr_span,
    merged_spans,
    network_edges,
    probe_packet,
)
from secfw.compiler.evaluate import Packet, PolicyIndex
from secfw.compiler.ir import Family, HostFilter
from secfw.gcpause import collector_paused

#: An ordinary remote outside any cloud (TEST-NET-2, RFC 5737; RFC 3849's
#: documentation prefix): the port probes' other end, a packet one can send.
OUTSIDE = {"ipv4": int(ipaddress.ip_address("198.51.100.77")),
           "ipv6": int(ipaddress.ip_address("2001:db8:ffff::77"))}
#: Values named outside group chains probed per port, at most (per family).
OTHER_VALUES = 32
#: Services a chain's named values are probed at (protocol, selector); ICMP
#: added per family (:func:`_services`).
BASE_SERVICES = ((6, 22), (6, 80), (6, CLIENT_PORT + 1), (17, 53), (47, 0))
#: Services each port is probed at from :data:`OUTSIDE` (its chains' own are
#: checked once, step 1: these reach the dispatch and the protections).
PORT_SERVICES = ((6, CLIENT_PORT + 1), (17, 53), (47, 0))
#: The service a same-net member is probed at: GRE, which group rules rarely open,
#: so that the probe shows the same-net lookup itself (it admits every protocol).
SAME_NET_SERVICES = ((47, 0),)
Key = tuple[str, str, Family]  # (IR chain, direction, family)


class MemoIndex(PolicyIndex):
    """The host's evaluator with each group chain's answer memoised per (chain,
    remote, service): an IR rule reads only the packet's family, protocol,
    destination port or ICMP type/code and its remote end
    (:meth:`PolicyIndex.rule_matches`), and the ports of a host share chains."""

    def __init__(self, hf: HostFilter) -> None:
        super().__init__(hf)
        self._memo: dict[tuple[object, ...], bool] = {}
        #: The host's address sets by name (their texts: verify's step 2 reads
        #: them as integer intervals without parsing networks).
        self.hf_sets = {s.name: s for s in hf.sets}

    def chain_accepts(self, name: str, packet: Packet, remote: str) -> bool:
        """Whether a rule of IR chain ``name`` admits ``packet`` (remote end ``remote``)."""
        key = (name, remote, packet.protocol, packet.dport, packet.icmp_type,
               packet.icmp_code)
        found = self._memo.get(key)
        if found is None:
            chain = self.chains.get(name)
            found = chain is not None and any(
                self.rule_matches(rule, packet, remote) for rule in chain.rules)
            self._memo[key] = found
        return found

    def _any_rule(self, chains: Iterable[str], packet: Packet, remote: str) -> bool:
        return any(self.chain_accepts(name, packet, remote) for name in chains)


@dataclass
class SharedCheck:
    """Steps 1 and 2 of the module docstring, and the stubs step 3 uses."""

    cp: CloudPolicy
    kernel: SharedKernel
    index: MemoIndex
    probes: int = 0
    differing: dict[Key, list[Point]] = field(default_factory=dict)
    dependent: set[str] = field(default_factory=set)
    set_differing: dict[str, list[int]] = field(default_factory=dict)
    _points: dict[Key, list[Point]] = field(default_factory=dict)
    _values: dict[str, NamedValues] = field(default_factory=dict)
    _ends: dict[str, set[int]] = field(default_factory=dict)
    _normal: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    _equal: set[Key] = field(default_factory=set)

    def remote_of(self, name: str, packet: Packet) -> str:
        chain = self.index.chains.get(name)
        ingress = chain.direction == "ingress" if chain else name.endswith("-in")
        return packet.src if ingress else packet.dst

    def points(self, name: str, direction: str, family: Family, view: PortView) -> list[Point]:
        """The boundary points of IR chain ``name``'s own space and the values its
        kernel chain names (module docstring, step 1), sorted; ``view``: a port
        of the host (the remote sets are the host's)."""
        key = (name, direction, family)
        found = self._points.get(key)
        if found is None:
            found = self._points[key] = sorted(self._chain_points(name, family, view))
        return found

    def _chain_points(self, name: str, family: Family, view: PortView) -> set[Point]:
        chain = self.index.chains.get(name)
        rules = [r for r in chain.rules if r.family == family] if chain else []
        openers = [Opener(self.cp.remote_set(view, r), rule_box(r), {}) for r in rules]
        version = 4 if family == "ipv4" else 6
        top = 2 ** (32 if version == 4 else 128) - 1
        # a set's every member was compared in step 2: its ends (whether the
        # rule looks the right set up) and the addresses found apart suffice
        members = sorted({a for r in rules if r.remote_set is not None
                          for a in (*self.set_ends(r.remote_set),
                                    *self.set_differing.get(r.remote_set, ()))})
        points: set[Point] = set()
        for region in sweep(family, openers) if openers else []:
            points |= _chain_region_points(region, members, top, version)
        values = self._values.get(name)
        if values is None:
            values = self._values[name] = self.kernel.chain_values(name)
        points |= named_points(values, family, _services(family))
        return {_clean(p) for p in points if 0 <= p[0] <= top}

    def compare_chain(self, name: str, direction: str, family: Family, view: PortView) -> None:
        """Step 1 for one chain and family, its probes built on ``view``."""
        if self.kernel.port_dependent(name, direction):
            self.dependent.add(name)
            return
        normal = self.kernel.chain_normal(name, direction, family)
        if normal is not None and normal == self.normal_form(name, family):
            self._equal.add((name, direction, family))  # equal: nothing to probe
            self.probes += 1
            return
        local = view.address(family)
        assert local is not None
        differing = []
        for point in self.points(name, direction, family, view):
            packet = probe_packet(point, local, direction, family)
            model = "accept" if self.index.chain_accepts(
                name, packet, self.remote_of(name, packet)) else "continue"
            if self.kernel.chain(name, view, direction, packet) != model:
                differing.append(point)
        self.probes += len(self._points[(name, direction, family)])
        if differing:
            self.differing[(name, direction, family)] = differing

    def compare_set(self, name: str) -> None:
        """Step 2 for one address set: the kernel's elements against the IR's, in
        normal form (merged intervals); where they differ, the first and last
        address of each interval one holds and the other does not."""
        kernel = self.kernel.set_spans(name)
        model = self._spans(name)
        self.probes += 1
        if kernel == model:
            return
        version = 6 if name.endswith("-v6") else 4
        top = 2 ** (32 if version == 4 else 128) - 1
        apart = _difference(kernel or [], model) + _difference(model, kernel or [])
        if kernel is None:  # no such set: every lookup in it fails
            apart = model or [(0, top)]
        self.set_differing[name] = sorted({a for first, last in apart for a in (first, last)})

    def normal_form(self, name: str, family: Family) -> frozenset[BoxKey]:
        """IR chain ``name``'s rules of ``family`` as boxes (:data:`BoxKey`)."""
        chain = self.index.chains[name]
        top = 2 ** (32 if family == "ipv4" else 128) - 1
        keys: set[BoxKey] = set()
        for rule in chain.rules:
            if rule.family != family:
                continue
            if rule.remote_set is not None:
                spans = tuple(self._spans(rule.remote_set))
            elif rule.remote_cidr is not None:
                block = ipaddress.ip_network(rule.remote_cidr, strict=False)
                spans = ((int(block[0]), int(block[-1])),)
            else:
                spans = ((0, top),)
            ports = (rule.ports.low, rule.ports.high) if rule.ports else None
            icmp = (rule.icmp.type, rule.icmp.code) if rule.icmp else None
            keys.add((rule.protocol, ports, icmp, spans))
        return frozenset(keys)

    def set_ends(self, name: str) -> set[int]:
        """The first and last address of IR set ``name`` (memoised: every port of
        a network probes its set's ends; the chains' probes step outside them)."""
        found = self._ends.get(name)
        if found is None:
            spans = self._spans(name)
            found = self._ends[name] = {a for first, last in spans[:1] + spans[-1:]
                                        for a in (first, last)}
        return found

    def _spans(self, name: str) -> list[tuple[int, int]]:
        """IR set ``name`` in normal form (as :meth:`SharedKernel.set_spans`)."""
        found = self._normal.get(name)
        if found is None:
            ir = self.index.hf_sets.get(name)
            found = self._normal[name] = merged_spans(
                cidr_span(text) for text in (ir.elements if ir is not None else ()))
        return found

    def verified(self, name: str, family: Family) -> bool:
        """Whether the kernel chain of ``name`` was found equal to the IR's (step 1)."""
        if name in self.dependent:
            return False
        direction = "ingress" if name.endswith("-in") else "egress"
        key = (name, direction, family)
        return key in self._equal or (key in self._points and key not in self.differing)

    def stub(self, family: Family, model: bool, reached: list[str]
             ) -> Callable[[str, Packet], str | None]:
        """Step 3's stand-in for chains: each chain reached is appended to
        ``reached``; a verified one answers as the IR (``model``) or lets the next
        chain decide (not ``model``: the dispatch probe sees every chain)."""
        def answer(name: str, packet: Packet) -> str | None:
            reached.append(name)
            if not self.verified(name, family):
                return None
            if model and self.index.chain_accepts(name, packet, self.remote_of(name, packet)):
                return "accept"
            return "continue"
        return answer


#: A region's address intervals whose ends a chain check probes, from each end.
CHAIN_EDGES = 2


def _chain_region_points(region: Region, members: Sequence[int], top: int,
                         version: int) -> set[Point]:
    """A region's boundary points for a chain check: its first address at every
    corner of its box, the ends of its first and last intervals and the
    ``members`` it holds at the lowest and highest corner, and the points just
    outside it (address, protocol, selector)."""
    box = region.box
    cidrs = list(region.addresses.iter_cidrs())
    edges = cidrs[:CHAIN_EDGES] + cidrs[-CHAIN_EDGES:]
    inside = {v for c in edges for v in (c.first, c.last)}
    inside |= _members_in(members, region.addresses)
    low, high = (box.proto_lo, box.sel_lo), (box.proto_hi, box.sel_hi)
    points = {(a, p, s, version) for a in inside for p, s in (low, high)}
    first = cidrs[0].first
    points |= {(first, p, s, version) for p in (box.proto_lo, box.proto_hi)
               for s in (box.sel_lo, box.sel_hi)}
    points |= {(v, *low, version) for c in edges for v in (c.first - 1, c.last + 1)
               if 0 <= v <= top}
    points |= {(first, p, box.sel_lo, version)
               for p in (box.proto_lo - 1, box.proto_hi + 1) if 0 <= p <= PROTO_MAX}
    points |= {(first, box.proto_lo, s, version)
               for s in (box.sel_lo - 1, box.sel_hi + 1) if 0 <= s <= SEL_MAX}
    return points


def _difference(spans: list[tuple[int, int]], other: list[tuple[int, int]]
                ) -> list[tuple[int, int]]:
    """The intervals of ``spans`` outside ``other`` (both merged and sorted)."""
    found = []
    for first, last in spans:
        start = first
        for low, high in other:
            if high < start or low > last:
                continue
            if low > start:
                found.append((start, low - 1))
            start = high + 1
            if start > last:
                break
        if start <= last:
            found.append((start, last))
    return found


def named_points(values: NamedValues, family: Family,
                 services: Sequence[tuple[int, int]], limit: int | None = None) -> set[Point]:
    """Probes at the values a part of the ruleset names: each address at
    ``services``, each port from :data:`OUTSIDE` (TCP and UDP), each named
    (address, protocol, port) as it is; ``limit``: addresses and ports, at most."""
    version = 4 if family == "ipv4" else 6
    addresses = [int(a) for a in map(ipaddress.ip_address, values.addresses)
                 if a.version == version][:limit]
    points = {(a, p, s, version) for a in addresses for p, s in services}
    points |= {(OUTSIDE[family], p, port, version) for port in values.ports[:limit]
               for p in (6, 17)}
    points |= {(int(a), proto, port, version) for text, proto, port in values.pairs[:limit]
               if (a := ipaddress.ip_address(text)).version == version}
    return points


def _services(family: Family) -> list[tuple[int, int]]:
    """:data:`BASE_SERVICES` and ICMP: an echo request (opens a connection) and
    an echo reply (conntrack: invalid)."""
    icmp = ICMP_OF[family]
    request, reply = (8, 0) if family == "ipv4" else (128, 129)
    return [*BASE_SERVICES, (icmp, request * 256), (icmp, reply * 256)]


def verify_shared(cp: CloudPolicy, on_host: Sequence[PortView], views: Sequence[PortView],
                  kernel: SharedKernel, nat: HostNat) -> tuple[list[Difference], int]:
    """The differences of ``views`` (ports of one host, ``on_host`` all of them)
    and the number of probes compared (module docstring)."""
    if not views:
        return [], 0
    with collector_paused():  # ~10^6 acyclic objects at 10k ports (secfw.gcpause)
        return _verify_shared(cp, on_host, views, kernel, nat)


def _verify_shared(cp: CloudPolicy, on_host: Sequence[PortView], views: Sequence[PortView],
                   kernel: SharedKernel, nat: HostNat) -> tuple[list[Difference], int]:
    index = MemoIndex(on_host[0].index.hf)
    kernel.name_chains(index.chains)
    check = SharedCheck(cp, kernel, index)
    _compare_shared(cp, check, views)
    other = _other_values(cp, kernel)
    edges = network_edges(cp)
    found: list[Difference] = []
    probes = check.probes
    data = kernel.port_data(replace(index.hf, metadata=nat.metadata))
    for view in views:
        if data is not None and _answered(cp, check, data, view):
            # step 3 as data (module docstring): one comparison per direction and
            # family, counted as one probe (as a chain or set in normal form is)
            probes += 2 * sum(view.address(f) is not None for f in ("ipv4", "ipv6"))
            continue
        for direction in ("ingress", "egress"):
            for family in ("ipv4", "ipv6"):
                if view.address(family) is None:
                    continue
                port = PortCheck(cp, check, view, direction, family, nat)
                difference = port.difference(other, edges)
                probes += port.probes
                if difference is not None:
                    found.append(difference)
    return found, probes


def _answered(cp: CloudPolicy, check: SharedCheck, data: PortData, view: PortView) -> bool:
    """Whether the port's verdicts are the model's without a probe: its elements
    and the skeleton are the model's rendering (``data``), every group chain it
    uses was found equal (step 1) and every same-net set it accepts from (step 2)."""
    if not data.answers(view.port.tap):
        return False
    for family in ("ipv4", "ipv6"):
        if view.address(family) is None:
            continue
        for direction in ("ingress", "egress"):
            if not all(check.verified(c.name, family) for c in cp.chains(view, direction)):
                return False
    return not (view.policy.port_security
                and any(n in check.set_differing for n in view.policy.same_net_sets))


def _compare_shared(cp: CloudPolicy, check: SharedCheck, views: Sequence[PortView]) -> None:
    """Steps 1 and 2 over the chains and same-net sets ``views`` use."""
    users: dict[Key, PortView] = {}
    same_net: set[str] = set()
    for view in views:
        for family in ("ipv4", "ipv6"):
            if view.address(family) is None:
                continue
            for direction in ("ingress", "egress"):
                for chain in cp.chains(view, direction):
                    users.setdefault((chain.name, direction, family), view)
        if view.policy.port_security:
            same_net.update(view.policy.same_net_sets)
    referenced = {r.remote_set for name, _, _ in users
                  for r in check.index.chains[name].rules if r.remote_set is not None}
    for name in sorted(same_net | referenced):
        check.compare_set(name)
    for (name, direction, family), view in sorted(users.items(), key=lambda kv: kv[0]):
        check.compare_chain(name, direction, family, view)


def _other_values(cp: CloudPolicy, kernel: SharedKernel) -> NamedValues:
    """The values rules outside group chains name, less the ports' own addresses
    (the anti-spoofing rules name every port's: what a port sends from its own
    address is what every egress probe does)."""
    values = kernel.other_values()
    addresses = tuple(a for a in values.addresses if cp.owner(a) is None)
    pairs = tuple(p for p in values.pairs if cp.owner(p[0]) is None)
    return NamedValues(addresses, values.ports, pairs)


@dataclass
class PortCheck:
    """Step 3 for one port, direction and family (module docstring)."""

    cp: CloudPolicy
    check: SharedCheck
    view: PortView
    direction: str
    family: Family
    nat: HostNat
    probes: int = 0

    def difference(self, other: NamedValues, edges: tuple[netaddr.IPSet, netaddr.IPSet]
                   ) -> Difference | None:
        """The port's difference, a sendable packet preferred; None: it has none."""
        sendable = _sendable(self.cp, self.view, self.direction, edges)
        found = self._first(self._own_points(other), stubbed=True, sendable=sendable)
        if found is None or not sendable(found.packet):
            for name in self._suspect_chains():
                also = self._first(self._witnesses(name), stubbed=False, sendable=sendable)
                found = found or also
                if found is not None and sendable(found.packet):
                    break
        if found is not None and not sendable(found.packet):
            found, extra = _sendable_instead(
                self.cp, found, self.family, set(), self.nat, self.check.kernel,
                (sendable, edges[0]))
            self.probes += extra
        return found

    def _first(self, points: Iterable[Point], stubbed: bool,
               sendable: Callable[[Packet], bool]) -> Difference | None:
        """The first probe at ``points`` whose real verdict differs from the
        model's (a sendable one preferred): through the path with the verified
        chains stubbed first when ``stubbed`` (the real path only confirms)."""
        kernel, index = self.check.kernel, self.check.index
        stub = self.check.stub(self.family, True, []) if stubbed else None
        first: Difference | None = None
        pairs = _judged(self.view, self.direction, self.family, sorted(points), self.nat,
                        index)
        for packet, model in pairs:
            if model is None:
                continue
            self.probes += 1
            verdict = kernel.judge(self.view, self.direction, packet, stub)
            if verdict != model and stubbed:
                self.probes += 1
                verdict = kernel(self.view, self.direction, packet)
            if verdict != model:
                found = Difference(self.view, self.direction, packet, model, verdict)
                if sendable(packet):
                    return found
                first = first or found
        return first

    def _own_points(self, other: NamedValues) -> set[Point]:
        """The port's own probes (module docstring, step 3), less its own addresses."""
        family, version = self.family, 4 if self.family == "ipv4" else 6
        icmp = [s for s in _services(family) if s[0] == ICMP_OF[family]]
        services = [*PORT_SERVICES, *icmp]
        points = {(OUTSIDE[family], p, s, version) for p, s in services}
        if self.direction == "ingress" and self.view.policy.port_security:
            for name in self._same_net_sets():
                edges = self.check.set_ends(name) | set(self.check.set_differing.get(name, ()))
                points |= {(a, p, s, version) for a in edges for p, s in SAME_NET_SERVICES}
        points |= named_points(other, family, services[:1], OTHER_VALUES)
        top = 2 ** (32 if version == 4 else 128) - 1
        own = _own_ranges(self.view, family)
        return {_clean(p) for p in points if 0 <= p[0] <= top
                and not any(low <= p[0] <= high for low, high in own)}

    def _same_net_sets(self) -> list[str]:
        suffix = "-v4" if self.family == "ipv4" else "-v6"
        return [n for n in self.view.policy.same_net_sets if n.endswith(suffix)]

    def expected(self) -> set[str]:
        """The group chains the port's path must reach in this direction."""
        policy = self.view.policy
        if not policy.port_security or (self.direction == "egress" and policy.egress_open):
            return set()
        return {c.name for c in self.cp.chains(self.view, self.direction)}

    def _suspect_chains(self) -> list[str]:
        """Chains whose points must be tried on the real path: the port's chains
        that differ or are port-dependent, and those its dispatch probe reached
        or missed against the model."""
        expected = self.expected()
        reached: list[str] = []
        version = 4 if self.family == "ipv4" else 6
        point = (OUTSIDE[self.family], 6, CLIENT_PORT + 1, version)
        local = self.view.address(self.family)
        assert local is not None
        packet = probe_packet(point, local, self.direction, self.family)
        self.check.kernel.judge(self.view, self.direction, packet,
                                self.check.stub(self.family, False, reached))
        self.probes += 1
        suspects = set(reached) ^ expected
        suspects |= {n for n in expected if not self.check.verified(n, self.family)}
        return sorted(suspects)

    def _witnesses(self, name: str) -> list[Point]:
        """Points that may show chain ``name``'s difference on this port: where
        its kernel chain differs, else all its boundary points."""
        key = (name, "ingress" if name.endswith("-in") else "egress", self.family)
        if key in self.check.differing:
            return self.check.differing[key]
        # a chain the dispatch reaches or misses, equal to the IR's (in normal
        # form, or probed): its own boundary points show what the port gains or loses
        if name not in self.check.index.chains:  # a chain the model does not know
            return sorted(named_points(self.check.kernel.chain_values(name), self.family,
                                       _services(self.family)))
        return self.check.points(key[0], key[1], self.family, self.view)
