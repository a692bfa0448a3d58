"""HostFilter IR → secfw's chains in the ``filter`` tables and its ipsets. Pure: no I/O.

:func:`render` builds an :class:`IptState` — per family (``iptables`` /
``ip6tables``) the rules of every ``secfw-…`` chain and the jumps from the
built-in chains, plus the ipsets — in exactly the normal form :mod:`.state`
reads back, so "nothing changed" is plain equality. :func:`to_text` prints it
for ``ipset restore`` and ``iptables-restore``.

Layout, per family (``docs/iptables.md`` says why)::

    FORWARD  -j secfw-fwd   (inserted at position 1, once)
    INPUT    -j secfw-in
    secfw-fwd      -i tap+ -j secfw-egress ; -o tap+ -j secfw-ingress
    secfw-in       -i tap+ -j secfw-egress
    secfw-egress   clear mark; dispatch by -i: port security off returns;
                   else each (source, MAC) the port may send from goes on to
                   secfw-egress-open or its secfw-pe-… chain, the rest is
                   dropped; drop
    secfw-ingress  ESTABLISHED,RELATED return; clear mark; dispatch by -o:
                   port security off returns, else the port's secfw-pi-…
                   chain; drop
    secfw-eb-… / secfw-ib-…   dispatch buckets (tap-name prefixes)
    secfw-egress-open  shared: the protections (the nftables backend's
                   egress-protect: unspecified source, DHCP/DHCPv6 servers,
                   RA/redirect, DHCP/ND clients, conntrack state, TCP not SYN),
                   then the rest returns (allowed)
    secfw-egress-base  shared start of closed egress: the same protections
    secfw-pe-<hash> closed egress: the base, then a list of egress groups
    secfw-pi-<hash> secfw-ingress-base (INVALID, TCP not SYN dropped; IPv6
                   neighbour discovery allowed), sources in the port's
                   same-net ipset, a list of ingress groups (policy chains,
                   named by their content: shared by every port with the
                   same groups and network)
    secfw-g-<hash> one per GroupChain and family, shared by its ports
    secfw-allow / secfw-pass  set / clear the "allowed" mark bit
    ipsets secfw-a-<hash> (hash:net), one per AddressSet (source groups and
                   same-net sets: a network's port addresses)

**Dispatch is a scan, not a lookup.** iptables has no verdict maps: the port of
a packet is found by matching ``-i``/``-o`` rule after rule (iptables(8),
"-i, --in-interface"; a trailing ``+`` matches a prefix). This is the
documented fallback of the nftables design (verdict-map dispatch): the
per-packet cost grows with the number of ports. It is softened, never made
weaker, by splitting the list into buckets by tap-name prefix (``-i tapab+ -g
secfw-eb-ab``) once it holds more than :data:`LEAF_RULES` rules, so a packet
crosses a few short lists instead of one per port, and adding a port rewrites
one bucket. Every dispatch chain ends in DROP: a tap secfw does not know gets
nothing (fail closed).

**No chain per port.** A port's anti-spoofing pairs are rules of the egress
dispatch list; its same-net set and list of groups are a policy chain
named by a hash of them, shared by every port with the same groups on the same
network (at worst one per port); what every port shares lives in shared
chains. Chains are what makes iptables-nft slow (its restore does a linear
search per rule over the chains a batch touches: 200k rules in 2.5k chains
3.3 s, in 20k chains 14.6 s, measured). An ipset ``hash:net,iface`` of (address, tap) would make the
per-port lookups O(1), but it does not hash the interface: every tap's copy of
one network lands in one bucket and ipset refuses more ("Hash is full").

**Anti-spoofing comes before conntrack on egress**: a packet with a source its
tap may not use never reaches the ESTABLISHED shortcut, so it cannot ride
another instance's connection. Replies to an instance (ingress) are accepted
before the dispatch.

**Verdicts.** secfw never ACCEPTs. An ACCEPT would end the whole built-in chain
— the host's own FORWARD rules after secfw's jump and, for traffic between two
taps, the receiver's ingress check after the sender's egress check. "Allowed"
is therefore RETURN to the built-in chain (the host's rules still decide, as
with the nftables backend, whose ``accept`` ends only its own base chain), and
"denied" is DROP. Policy and dispatch chains are entered with ``-g`` (goto), so a
RETURN there returns to ``secfw-fwd``/``secfw-in`` at once (iptables(8),
"-g, --goto": return continues in the chain that called us via --jump).

**Shared group chains need a mark.** A group chain is jumped to by every port
that uses it; a rule that matches must tell the policy chain "allowed" and a
group that matches nothing must let the next group try (groups add up). A
RETURN cannot say which, so a matching rule goes to ``secfw-allow``, which sets
one bit of the packet mark (``MARK --set-xmark``, iptables-extensions(8)); the
dispatch chains clear that bit first, and after its last group a policy chain
hands a marked packet to ``secfw-pass`` (which clears the bit again and
returns: allowed) and drops the rest. Each group chain first returns at once
for a packet an earlier group allowed. The bit is :data:`DEFAULT_MARK`,
configurable; nothing else on the host may use it.

**What iptables cannot express** (the nftables backend can):

* ARP anti-spoofing. iptables sees IPv4 and IPv6 only (ARP is not an IP
  packet); arptables is out of scope.
* The target address of a neighbour advertisement. ip6tables has no match for
  ICMPv6 payload (u32 is IPv4 only), so a port's NAs are allowed whatever
  address they advertise (as Neutron's iptables driver does).

Rendering with ``strict=True`` raises :class:`UnsupportedError` for any port
with port security (both gaps concern exactly those ports); by default the
gaps are documented (docs/iptables.md), never hidden.

Only identifiers secfw generates (hashes of IR names, tap names checked
against a strict pattern), addresses re-printed from their parsed form, MACs
checked and lower-cased, and integers reach the output.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import NamedTuple, TypeVar

from secfw.backends import TOPOLOGIES
from secfw.backends.iptables import metadata
from secfw.compiler.ir import (
    AddressSet,
    Family,
    GroupChain,
    HostFilter,
    IRRule,
    MetadataRedirect,
    PortPolicy,
)
from secfw.compiler.sources import address_owners, port_sources
from secfw.constants import (
    DHCP_CLIENT,
    DHCP_SERVER,
    ICMP_PROTOCOL,
    ICMPV6,
    ND_DROPPED_FROM_INSTANCE,
    ND_FROM_INSTANCE,
    ND_FROM_UNSPECIFIED,
    ND_REDIRECT,
    ND_TO_INSTANCE,
    UDP,
)
from secfw.errors import BackendError, UnsupportedError
from secfw.model import TAP_PREFIX

_T = TypeVar("_T")
_NameOf = Callable[[str], str]

FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
PREFIX = "secfw-"
FORWARD, INPUT = "secfw-fwd", "secfw-in"
EGRESS, INGRESS = "secfw-egress", "secfw-ingress"
ROUTED_INGRESS = "secfw-routed-in"  # bridged: what the host routes to a port's address
EGRESS_OPEN, EGRESS_BASE = "secfw-egress-open", "secfw-egress-base"
INGRESS_BASE = "secfw-ingress-base"
ALLOW, PASS = "secfw-allow", "secfw-pass"
#: The built-in chains secfw hooks into, and the chain each one jumps to.
JUMPS: tuple[tuple[str, str], ...] = (("FORWARD", f"-j {FORWARD}"), ("INPUT", f"-j {INPUT}"))
BUILTIN_CHAINS = frozenset({"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"})
#: Floating IPs: secfw's chains in the IPv4 ``nat`` table and the jumps to them
#: (nat chains see only a connection's first packet; conntrack does the rest).
FLOAT_DNAT, FLOAT_SNAT = "secfw-float-dnat", "secfw-float-snat"
NAT_JUMPS: tuple[tuple[str, str], ...] = (
    ("PREROUTING", f"-j {FLOAT_DNAT}"), ("POSTROUTING", f"-j {FLOAT_SNAT}"))

#: The packet-mark bit that carries "a group allowed it" from a group chain back
#: to the policy chain (bit 24: clear of kube-proxy's 0x4000/0x8000 and of the low
#: bits Docker, Cilium and policy routing use).
DEFAULT_MARK = 0x1000000
#: A dispatch list of more rules than this is split into buckets by tap-name
#: prefix. Measured (routed lab, 64-byte UDP, iptables-nft): a packet whose tap
#: came after ~190 rules passed at 60 kpps, after ~70 at 105 kpps.
LEAF_RULES = 128
#: iptables chain names: XT_EXTENSION_MAXNAMELEN is 29 bytes with the NUL.
MAX_CHAIN = 28
#: ipset names: IPSET_MAXNAMELEN is 32 bytes with the NUL.
MAX_SET = 31
#: ipset's default maxelem (ipset(8), "maxelem"); bigger sets get more room.
DEFAULT_MAXELEM = 65536

_TAP = re.compile(re.escape(TAP_PREFIX) + r"[A-Za-z0-9_.-]{1,12}")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_RULE_ID = re.compile(r"[A-Za-z0-9-]+")
_HASH_CHARS = 10
IPSET_FAMILY: dict[Family, str] = {"ipv4": "inet", "ipv6": "inet6"}
#: Port matches by protocol: tcp and udp (xt_tcpudp), sctp (xt_sctp); udplite
#: has no port match of its own, multiport covers it (iptables-extensions(8)).
PORT_MATCH: dict[int, str] = {
    6: "-m tcp --dport", 17: "-m udp --dport", 132: "-m sctp --dport",
    136: "-m multiport --dports",
}

#: Bridged hosts: a packet the host routes, not one the bridge forwards
#: (iptables-extensions(8), "physdev": --physdev-is-bridged).
ROUTED = "-m physdev ! --physdev-is-bridged"
CT_ESTABLISHED = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
CT_INVALID = "-m conntrack --ctstate INVALID -j DROP"
#: A TCP packet that is not a SYN (``--syn`` is SYN set and FIN, RST, ACK clear,
#: iptables-extensions(8) "tcp"): after the ESTABLISHED/INVALID rules only new
#: packets are left, and a new connection must start with a SYN.
NEW_NOT_SYN = "-p 6 -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -j DROP"
DROP = "-j DROP"
RETURN = "-j RETURN"
#: ICMPv6 an instance may send from ``::`` (before it has an address): neighbour
#: solicitation for duplicate address detection (135) and the MLDv2 report that
#: goes with it (143), RFC 4862 5.4.2.
ND_UNSPECIFIED = tuple(sorted(ND_FROM_UNSPECIFIED))
#: Neighbour discovery and MLD an instance may always send (RFC 4861, RFC 3810):
#: MLD report/done 131/132, router solicitation 133, neighbour solicitation 135,
#: neighbour advertisement 136 (see the module docstring: its target address is
#: not checked), MLDv2 report 143.
ND_TYPES = tuple(sorted(ND_FROM_INSTANCE))
#: What only a router sends: router advertisements (134) and redirects (137).
ND_DROPPED = (*sorted(ND_DROPPED_FROM_INSTANCE), ND_REDIRECT)
#: Neighbour discovery an instance receives without rules: MLD query 130, router
#: advertisement 134, neighbour solicitation 135 and advertisement 136.
ND_INGRESS = tuple(sorted(ND_TO_INSTANCE))


@dataclass(frozen=True)
class IpSet:
    """One ipset of type ``hash:net``.

    ``elements`` are in the form ``ipset list -o save`` prints them: a single
    host without its ``/32`` or ``/128``, a network as ``addr/len``; sorted.
    """

    name: str
    family: Family
    elements: tuple[str, ...]
    maxelem: int = DEFAULT_MAXELEM
    kind: str = "hash:net"

    def header(self) -> str:
        """The ``create`` arguments after the name."""
        return f"{self.kind} family {IPSET_FAMILY[self.family]} maxelem {self.maxelem}"


@dataclass(frozen=True)
class Table:
    """secfw's part of one family's ``filter`` table.

    ``chains`` maps each ``secfw-…`` chain to its rules (the text after ``-A
    NAME``, as :mod:`.state` normalises ``iptables-save`` output); ``jumps``
    maps (built-in chain, rule) to how often that rule is there; ``buried`` are
    the built-in chains where a rule that is not one of secfw's jumps comes
    before one of them (read back; secfw's jumps must come first, or a foreign
    ``-j ACCEPT`` above them bypasses every security group).
    """

    family: Family
    chains: Mapping[str, tuple[str, ...]]
    jumps: Mapping[tuple[str, str], int] = field(
        default_factory=lambda: {jump: 1 for jump in JUMPS})
    buried: frozenset[str] = frozenset()


@dataclass(frozen=True)
class IptState:
    """Everything secfw owns: both tables and the ipsets (what render gives and
    what read-back returns, in the same normal form); ``nat``: secfw's part of
    the IPv4 ``nat`` table (floating IPs; empty without any)."""

    tables: Mapping[Family, Table]
    sets: Mapping[str, IpSet]
    nat: Table = field(default_factory=lambda: Table("ipv4", {}, {}))


@dataclass(frozen=True)
class RenderOptions:
    """``mark``: the mark bit (one bit); ``strict``: raise UnsupportedError for
    what iptables cannot enforce (ARP anti-spoofing) instead of documenting it;
    ``leaf_rules``: the longest dispatch list (in rules) before it is split;
    ``topology``: ``routed`` (taps are the interfaces iptables sees) or
    ``bridged`` (taps are bridge ports: matched with xt_physdev)."""

    mark: int = DEFAULT_MARK
    strict: bool = False
    leaf_rules: int = LEAF_RULES
    topology: str = "routed"

    def __post_init__(self) -> None:
        if self.mark <= 0 or self.mark >= 1 << 32 or self.mark & (self.mark - 1):
            raise BackendError(f"iptables: mark {self.mark:#x} is not one bit of 32")
        if self.leaf_rules < 2:
            raise BackendError("iptables: leaf_rules must be at least 2")
        if self.topology not in TOPOLOGIES:
            raise BackendError(f"iptables: unknown topology {self.topology!r} "
                               f"(known: {', '.join(TOPOLOGIES)})")

    def from_port(self, name: str) -> str:
        """The match for packets a tap (or ``tap…+`` prefix) sent.

        On a bridge iptables sees the bridge as ``-i``; xt_physdev matches the
        bridge port the frame came in by (iptables-extensions(8), "physdev"),
        bridged or then routed by the host."""
        if self.topology == "bridged":
            return f"-m physdev --physdev-in {name}"
        return f"-i {name}"

    def to_port(self, name: str) -> str:
        """The match for packets going to a tap (or ``tap…+`` prefix).

        On a bridge the output port is known in FORWARD only for bridged frames
        (``--physdev-is-bridged``): what the host itself routes into a bridge is
        dispatched by destination address instead (:func:`_routed_dispatch`)."""
        if self.topology == "bridged":
            return f"-m physdev --physdev-out {name} --physdev-is-bridged"
        return f"-o {name}"


# --------------------------------------------------------------------------- #
# Names and canonical forms.
# --------------------------------------------------------------------------- #


def short_hash(name: str) -> str:
    """The first hex digits of the SHA-256 of an IR name (40 bits: a collision
    among one host's few hundred names is checked for, and practically never)."""
    return hashlib.sha256(name.encode()).hexdigest()[:_HASH_CHARS]


def group_chain_name(ir_name: str) -> str:
    """``secfw-g-<hash>`` for IR chain ``ir_name`` (same name for both families)."""
    return f"{PREFIX}g-{short_hash(ir_name)}"


def set_name(ir_name: str) -> str:
    """``secfw-a-<hash>`` for IR address set ``ir_name``."""
    return f"{PREFIX}a-{short_hash(ir_name)}"


def temp_set_name(name: str) -> str:
    """The scratch set a replacement is built in before ``ipset swap``."""
    return f"{PREFIX}t-{name.removeprefix(PREFIX)}"


def policy_chain(direction: str, groups: Sequence[str], same_net: Sequence[str] = ()) -> str:
    """``secfw-pi-<hash>`` / ``secfw-pe-<hash>``: the chain that tries ``groups``
    (secfw group chain names, in order) for ingress / egress, after the
    ``same_net`` networks (ingress). Named by its content, so every port with
    the same groups (and network) shares one chain."""
    kind = "pi" if direction == "ingress" else "pe"
    return f"{PREFIX}{kind}-{short_hash(' '.join(groups) + '|' + ' '.join(same_net))}"


def check_tap(tap: str) -> str:
    """``tap`` if it is a valid tap interface name; BackendError otherwise."""
    if not _TAP.fullmatch(tap):
        raise BackendError(f"iptables: {tap!r} is not a valid tap name")
    return tap


def check_mac(mac: str) -> str:
    """``mac`` lower-cased (iptables-save prints MACs in lower case, the Neutron
    non-converging diff came from comparing cases); BackendError if it is not a
    unicast MAC address."""
    lower = mac.lower()
    if not _MAC.fullmatch(lower) or int(lower[:2], 16) & 1:
        raise BackendError(f"iptables: {mac!r} is not a unicast MAC address")
    return lower


@lru_cache(maxsize=1 << 16)
def canonical_cidr(text: str) -> str:
    """``text`` as a canonical CIDR with its prefix length (iptables-save prints
    ``-s 10.0.0.1/32``); BackendError if it is not an address or network."""
    try:
        return ipaddress.ip_network(text).with_prefixlen
    except ValueError as exc:
        raise BackendError(f"iptables: {text!r} is not a CIDR: {exc}") from exc


def cidr_family(cidr: str) -> Family:
    return "ipv6" if ":" in cidr else "ipv4"


def address_option(flag: str, cidr: str) -> list[str]:
    """``[flag, cidr]``, or nothing for ``/0`` (iptables-save omits "anywhere")."""
    return [] if cidr.endswith("/0") else [flag, cidr]


@lru_cache(maxsize=1 << 16)
def set_elements(cidr: str) -> tuple[str, ...]:
    """One IR CIDR as ipset ``hash:net`` elements, in ``ipset save`` form.

    A host loses its ``/32``/``/128``; ``/0`` becomes its two halves, because
    hash:net cannot store a zero prefix (ipset(8), "hash:net").
    """
    network = ipaddress.ip_network(canonical_cidr(cidr))
    if network.prefixlen == network.max_prefixlen:
        return (str(network.network_address),)
    if network.prefixlen == 0:
        return tuple(n.with_prefixlen for n in network.subnets())
    return (network.with_prefixlen,)


def maxelem_for(count: int) -> int:
    """ipset's default maxelem, or the next power of two with room to double."""
    if count * 2 <= DEFAULT_MAXELEM:
        return DEFAULT_MAXELEM
    return 1 << (count * 2 - 1).bit_length()


def mark_text(value: int, mask: int) -> str:
    return f"{value:#x}/{mask:#x}"


# --------------------------------------------------------------------------- #
# IR → IptState.
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Context:
    """What every chain renderer needs: options and the IR, indexed and checked."""

    options: RenderOptions
    groups: Mapping[str, GroupChain]
    group_names: Mapping[str, str]
    sets: Mapping[str, AddressSet]
    set_names: Mapping[str, str]
    families: Mapping[str, frozenset[str]]  # IR chain → families it has rules for
    _lists: dict[tuple[tuple[str, ...], Family], list[str]] = field(default_factory=dict)

    def groups_of(self, names: tuple[str, ...], family: Family) -> list[str]:
        """The secfw chains of IR chains ``names`` that have ``family`` rules, in
        order (remembered: each port's list is asked for twice per family)."""
        key = (names, family)
        found = self._lists.get(key)
        if found is None:
            found = [self.group_names[n] for n in dict.fromkeys(names)
                     if family in self.families[n]]
            self._lists[key] = found
        return found


def render(hf: HostFilter, options: RenderOptions | None = None) -> IptState:
    """The chains and sets that enforce ``hf``. Deterministic: equal IR, equal state.

    Raises BackendError when the IR is inconsistent (unknown chain or set, a bad
    tap, MAC or address, a tap used twice, a hash collision) and UnsupportedError
    when it asks for something iptables cannot express.
    """
    ctx = _context(hf, options or RenderOptions())
    _check_ports(hf.ports, ctx)
    tables = {family: Table(family, _chains(hf, family, ctx)) for family in FAMILIES}
    sets = {ctx.set_names[s.name]: _ipset(ctx.set_names[s.name], s) for s in hf.sets}
    nat = nat_table(hf)
    if hf.metadata is not None:
        tables["ipv4"], nat = _with_metadata(tables["ipv4"], nat, hf.metadata, ctx.options)
    return IptState(tables, dict(sorted(sets.items())), nat)


def nat_table(hf: HostFilter) -> Table:
    """The floating IPs' 1:1 NAT: one DNAT rule per floating address in
    ``secfw-float-dnat`` (PREROUTING), and in ``secfw-float-snat`` (POSTROUTING)
    first an SNAT per fixed address for its own hairpin (an instance reaching its
    own floating address would drop its own source coming back), then a RETURN
    per instance network (no SNAT between instances), then one SNAT rule per
    fixed address. DNAT before the filter's FORWARD chains: the groups
    see the original source. Empty (no chains, no jumps) without floating IPs."""
    if not hf.floating:
        return Table("ipv4", {}, {})
    for nat in hf.floating:
        for address in (nat.floating, nat.fixed):
            _check_ipv4(address)
    dnat = tuple(f"-d {n.floating}/32 -j DNAT --to-destination {n.fixed}" for n in hf.floating)
    snat = (*(f"-s {n.fixed}/32 -d {n.fixed}/32 -j SNAT --to-source {n.floating}"
              for n in hf.floating),
            *(f"-d {canonical_cidr(c)} -j RETURN" for c in hf.internal),
            *(f"-s {n.fixed}/32 -j SNAT --to-source {n.floating}" for n in hf.floating))
    return Table("ipv4", {FLOAT_DNAT: dnat, FLOAT_SNAT: snat}, {jump: 1 for jump in NAT_JUMPS})


def _with_metadata(table: Table, nat: Table, md: MetadataRedirect, opts: RenderOptions
                   ) -> tuple[Table, Table]:
    """The IPv4 filter and nat tables with the metadata redirect's rules added
    (:mod:`.metadata`)."""
    from_port = {p.tap: opts.from_port(check_tap(p.tap)) for p in md.ports}
    for p in md.ports:
        canonical_cidr(p.address)
    chains = dict(table.chains)
    chains[INPUT] = (metadata.to_server_rule(md, opts.from_port(f"{TAP_PREFIX}+")),
                     *chains[INPUT])
    chains[metadata.IN_CHAIN] = metadata.in_chain(md, from_port)
    nat = Table("ipv4", {**nat.chains, metadata.NAT_CHAIN: metadata.nat_chain(md, from_port)},
                {**nat.jumps, metadata.NAT_JUMP: 1})
    return replace(table, chains=chains), nat


def _context(hf: HostFilter, options: RenderOptions) -> _Context:
    groups = _unique({c.name: c for c in hf.chains}, len(hf.chains), "chain")
    sets = _unique({s.name: s for s in hf.sets}, len(hf.sets), "set")
    group_names = _hashed(groups, group_chain_name)
    set_names = _hashed(sets, set_name)
    families = {name: frozenset(r.family for r in chain.rules) for name, chain in groups.items()}
    return _Context(options, groups, group_names, sets, set_names, families)


def _unique(index: dict[str, _T], count: int, what: str) -> dict[str, _T]:
    if len(index) != count:
        raise BackendError(f"iptables: an IR {what} name is used twice")
    return index


def _hashed(index: Mapping[str, object], name_of: _NameOf) -> dict[str, str]:
    names = {name: name_of(name) for name in index}
    if len(set(names.values())) != len(names):
        raise BackendError("iptables: two IR names hash to the same secfw name")
    return names


def _check_ports(ports: Sequence[PortPolicy], ctx: _Context) -> None:
    """Taps are valid and unique; every chain a port names exists in its direction."""
    seen: set[str] = set()
    for port in ports:
        if check_tap(port.tap) in seen:
            raise BackendError(f"iptables: tap {port.tap!r} belongs to two ports")
        seen.add(port.tap)
        for names, direction in ((port.ingress_chains, "ingress"),
                                 (port.egress_chains, "egress")):
            for name in names:
                chain = ctx.groups.get(name)
                if chain is None or chain.direction != direction:
                    raise BackendError(f"iptables: port {port.tap} uses unknown {direction} "
                                       f"chain {name!r}")
        if port.port_security and ctx.options.strict:
            raise UnsupportedError(f"iptables: port {port.tap} needs ARP anti-spoofing and "
                                   "neighbour-advertisement target checks, which iptables "
                                   "cannot express (use the nftables backend)")


def _ipset(name: str, address_set: AddressSet) -> IpSet:
    elements: set[str] = set()
    for cidr in address_set.elements:
        if cidr_family(canonical_cidr(cidr)) != address_set.family:
            raise BackendError(f"iptables: {cidr} in set {address_set.name} is not "
                               f"{address_set.family}")
        elements.update(set_elements(cidr))
    ordered = tuple(sorted(elements, key=element_key))
    return IpSet(name, address_set.family, ordered, maxelem_for(len(ordered)))


@lru_cache(maxsize=1 << 16)
def element_key(element: str) -> tuple[int, int, str]:
    """Numeric order of ipset elements (``addr[/len][,iface]``), for render and
    read-back alike; what is not an address sorts after the addresses."""
    head = element.split(" ", 1)[0]
    address, _, iface = head.partition(",")
    try:
        network = ipaddress.ip_network(address)
    except ValueError:
        return (1 << 129, 0, element)
    return int(network.network_address), network.prefixlen, iface or element


def _ip_taps_dropped(taps: str, sides: tuple[str, ...]) -> tuple[str, ...]:
    """Bridged hosts: drop packets entering (``-i``) or leaving (``-o``) by a tap
    as an IP interface. Bridged frames show the *bridge* there (br_netfilter), so
    only a tap that is not a bridge port — not plugged yet, or a routed tap on a
    host wrongly run as bridged — matches: closed, where the physdev rules below
    would never see it."""
    return tuple(f"{side} {taps} -j DROP" for side in sides)


def _chains(hf: HostFilter, family: Family, ctx: _Context) -> dict[str, tuple[str, ...]]:
    """Every secfw chain of ``family``: fixed ones, dispatch, groups, then ports."""
    ports = sorted(hf.ports, key=lambda p: p.tap)
    mark, clear = mark_text(ctx.options.mark, ctx.options.mark), mark_text(0, ctx.options.mark)
    taps, opts = f"{TAP_PREFIX}+", ctx.options
    chains: dict[str, tuple[str, ...]] = {
        FORWARD: (f"{opts.from_port(taps)} -j {EGRESS}", f"{opts.to_port(taps)} -j {INGRESS}"),
        INPUT: (f"{opts.from_port(taps)} -j {EGRESS}",),
        ALLOW: (f"-j MARK --set-xmark {mark}",),
        PASS: (f"-j MARK --set-xmark {clear}",),
        EGRESS_OPEN: _egress_open(family),
        EGRESS_BASE: _egress_base(family),
        INGRESS_BASE: _ingress_base(family),
    }
    egress_head = (f"-j MARK --set-xmark {clear}",)
    ingress_head = (CT_ESTABLISHED, f"-j MARK --set-xmark {clear}")
    policies = {p.tap: _policy_chains(p, family, ctx) for p in ports if p.port_security}
    egress = {p.tap: _egress_dispatch(p, family, policies.get(p.tap), opts) for p in ports}
    ingress = {p.tap: _ingress_dispatch(p, policies.get(p.tap), opts) for p in ports}
    chains |= _dispatch(EGRESS, "eb", egress_head, egress, ctx)
    chains |= _dispatch(INGRESS, "ib", ingress_head, ingress, ctx)
    if opts.topology == "bridged":
        chains[FORWARD] = (*_ip_taps_dropped(taps, ("-i", "-o")), *chains[FORWARD],
                           f"{ROUTED} -j {ROUTED_INGRESS}")
        chains[INPUT] = (*_ip_taps_dropped(taps, ("-i",)), *chains[INPUT])
        chains[ROUTED_INGRESS] = (*ingress_head, *_routed_dispatch(ports, family, policies))
    for chain in sorted(hf.chains, key=lambda c: ctx.group_names[c.name]):
        rules = [r for r in chain.rules if r.family == family]
        if rules:
            chains[ctx.group_names[chain.name]] = _group_chain(chain, rules, ctx)
    for policy in policies.values():
        chains |= policy.chains
    return chains


# --------------------------------------------------------------------------- #
# Dispatch: tap → what applies to it, as lists split by tap-name prefix.
# --------------------------------------------------------------------------- #


def _egress_dispatch(port: PortPolicy, family: Family, policy: _Policy | None,
                     opts: RenderOptions) -> tuple[str, ...]:
    """The egress dispatch rules of one port: with port security off, allowed;
    else each (source, MAC) the port may send from goes on to its egress (the
    shared open tail, or its policy chain when closed), anything else is dropped.

    The sources are :func:`secfw.compiler.sources.port_sources`, the view the
    nftables backend and conntrack revocation share: own addresses with the
    port's MAC, address pairs with theirs, the EUI-64 link-local address of each
    MAC, and the unspecified address with the port's MAC (DHCP/ND before it has
    an address; the protections restrict what it may send)."""
    match = opts.from_port(port.tap)
    if policy is None:  # port security off
        return (f"{match} {RETURN}",)
    target = policy.egress
    # iptables-save prints -s before -i and before -m physdev (read-back compares
    # text: keep its order)
    rules = [" ".join([*address_option("-s", cidr), match, "-m mac --mac-source", mac,
                       "-g", target]) for cidr, mac in sources(port, family)]
    return (*rules, f"{match} {DROP}")


def sources(port: PortPolicy, family: Family) -> list[tuple[str, str]]:
    """(CIDR, MAC) pairs ``port`` may send from in ``family``, in the order of
    :func:`~secfw.compiler.sources.port_sources`; its MACs and addresses are
    checked first (BackendError), as that function trusts the IR."""
    for mac in (port.mac, *(p.mac for p in port.allowed_pairs)):
        check_mac(mac)
    for cidr in (*port.ipv4, *port.ipv6, *(p.cidr for p in port.allowed_pairs)):
        canonical_cidr(cidr)
    return [(canonical_cidr(s.cidr), s.mac) for s in port_sources(port) if s.family == family]


def _ingress_dispatch(port: PortPolicy, policy: _Policy | None,
                      opts: RenderOptions) -> tuple[str, ...]:
    """The ingress dispatch rule of one port: port security off (no policy),
    allowed; else its ingress policy chain."""
    match = opts.to_port(port.tap)
    if policy is None:
        return (f"{match} {RETURN}",)
    return (f"{match} -g {policy.ingress}",)


def _routed_dispatch(ports: Sequence[PortPolicy], family: Family,
                     policies: Mapping[str, _Policy]) -> tuple[str, ...]:
    """Bridged hosts: what the host's own IP stack routes into a bridge (a gateway
    on the bridge) is not bridged, so ``--physdev-out`` does not know its port in
    FORWARD, and br_netfilter does not call FORWARD again when the bridge sends it
    on. It is dispatched by destination address instead (instance addresses are
    anti-spoofed, so an address names its port), as nova-network did: the port's
    ingress policy chain, RETURN with port security off, DROP for an address
    several ports claim (:func:`~secfw.compiler.sources.address_owners`). Any
    other destination is not an instance's: the chain runs off its end (it is
    entered with -j) and the packet goes on."""
    try:
        owners = address_owners(ports, family)
    except ValueError as exc:
        raise BackendError(f"iptables: a port address is not a CIDR: {exc}") from exc
    rules = []
    for cidr, tap in owners.items():
        policy = None if tap is None else policies.get(tap)
        target = DROP if tap is None else RETURN if policy is None else f"-g {policy.ingress}"
        rules.append(" ".join([*address_option("-d", canonical_cidr(cidr)), target]))
    return tuple(rules)


def _ingress_policy(port: PortPolicy, family: Family, ctx: _Context
                    ) -> tuple[str, tuple[str, ...]]:
    """(name, rules) of the ingress policy chain of a protected port: the shared
    base (conntrack, TCP not SYN, neighbour discovery), sources in its same-net
    ipsets of ``family`` (the addresses of its network's ports), the port's
    groups with rules in ``family``, then drop — the nftables backend's
    ``ingress-filter`` order."""
    same_net = _same_net_sets(port, family, ctx)
    groups = ctx.groups_of(port.ingress_chains, family)
    rules = (f"-j {INGRESS_BASE}",
             *(f"-m set --match-set {name} src -g {PASS}" for name in same_net),
             *_groups(groups, ctx))
    return policy_chain("ingress", groups, same_net), rules


def _same_net_sets(port: PortPolicy, family: Family, ctx: _Context) -> list[str]:
    """The ipsets of the port's same-net sets of ``family`` (BackendError for an
    unknown one)."""
    found = []
    for name in dict.fromkeys(port.same_net_sets):
        address_set = ctx.sets.get(name)
        if address_set is None:
            raise BackendError(f"iptables: port {port.tap} uses unknown same-net set {name!r}")
        if address_set.family == family:
            found.append(ctx.set_names[name])
    return found


def _dispatch(top: str, bucket: str, head: tuple[str, ...],
              rules_of: Mapping[str, tuple[str, ...]], ctx: _Context
              ) -> dict[str, tuple[str, ...]]:
    """The dispatch chain ``top`` (``head`` rules first) and its buckets.

    Each chain holds the rules of its taps and, for a prefix shared by taps
    with more than ``leaf_rules`` rules, a ``-g`` to the bucket of that prefix.
    Each ends in DROP: a chain entered with -g that ran off its end would
    return "allowed".
    """
    opts = ctx.options
    flag = opts.from_port if bucket == "eb" else opts.to_port
    chains: dict[str, tuple[str, ...]] = {}
    rules = list(_bucket(TAP_PREFIX, sorted(rules_of), flag, bucket, rules_of, ctx, chains))
    return {top: (*head, *rules, DROP), **dict(sorted(chains.items()))}


def common_prefix(first: str, last: str) -> str:
    """The longest common prefix of two strings (of a sorted list: of all of it)."""
    length = 0
    for a, b in zip(first, last, strict=False):
        if a != b:
            break
        length += 1
    return first[:length]


def _bucket(prefix: str, taps: list[str], flag: Callable[[str], str], bucket: str,
            rules_of: Mapping[str, tuple[str, ...]], ctx: _Context,
            chains: dict[str, tuple[str, ...]]) -> Iterator[str]:
    """The dispatch rules for ``taps`` (sorted, all starting with ``prefix``),
    adding the bucket chains they need to ``chains``."""
    if sum(len(rules_of[tap]) for tap in taps) <= ctx.options.leaf_rules:
        for tap in taps:
            yield from rules_of[tap]
        return
    by_next: dict[str, list[str]] = {}
    for tap in taps:
        if tap == prefix:  # before any wildcard on the same prefix
            yield from rules_of[tap]
        else:
            by_next.setdefault(tap[len(prefix)], []).append(tap)
    for group in by_next.values():
        if len(group) == 1:
            yield from rules_of[group[0]]
            continue
        child = common_prefix(group[0], group[-1])
        name = f"{PREFIX}{bucket}-{child.removeprefix(TAP_PREFIX)}"
        rules = tuple(_bucket(child, group, flag, bucket, rules_of, ctx, chains))
        chains[name] = (*rules, DROP)
        yield f"{flag(child + '+')} -g {name}"


# --------------------------------------------------------------------------- #
# Group chains.
# --------------------------------------------------------------------------- #


def _group_chain(chain: GroupChain, rules: list[IRRule], ctx: _Context) -> tuple[str, ...]:
    """A packet an earlier group allowed returns at once; a rule that matches goes
    to ``secfw-allow`` (mark set, back to the policy chain)."""
    mark = mark_text(ctx.options.mark, ctx.options.mark)
    ingress = chain.direction == "ingress"
    return (f"-m mark --mark {mark} {RETURN}",
            *(group_rule(r, ingress, ctx.sets, ctx.set_names) for r in rules))


def group_rule(rule: IRRule, ingress: bool, sets: Mapping[str, AddressSet],
               set_names: Mapping[str, str]) -> str:
    """One IR rule: remote (source on ingress, destination on egress), protocol,
    ports or ICMP type/code, an audit comment, then ``-g secfw-allow``."""
    if not _RULE_ID.fullmatch(rule.rule_id):
        raise BackendError(f"iptables: {rule.rule_id!r} is not a valid rule id")
    if rule.remote_cidr is not None and rule.remote_set is not None:
        raise UnsupportedError(f"iptables: rule {rule.rule_id} has two remotes")
    base: list[str] = []
    matches: list[str] = []
    if rule.remote_set is not None:
        matches.append(_set_match(rule, ingress, sets, set_names))
    elif rule.remote_cidr is not None:
        cidr = canonical_cidr(rule.remote_cidr)
        if cidr_family(cidr) != rule.family:
            raise UnsupportedError(f"iptables: {cidr} is not an {rule.family} network")
        base += address_option("-s" if ingress else "-d", cidr)
    if rule.protocol is not None:
        base += ["-p", str(_protocol(rule))]
        matches += _protocol_matches(rule)
    elif rule.ports is not None or rule.icmp is not None:
        raise UnsupportedError(f"iptables: rule {rule.rule_id} has ports but no protocol")
    matches.append(f"-m comment --comment r-{rule.rule_id[:8]}")
    return " ".join([*base, *matches, "-g", ALLOW])


def _set_match(rule: IRRule, ingress: bool, sets: Mapping[str, AddressSet],
               set_names: Mapping[str, str]) -> str:
    assert rule.remote_set is not None
    address_set = sets.get(rule.remote_set)
    if address_set is None or address_set.family != rule.family:
        raise BackendError(f"iptables: rule {rule.rule_id} uses unknown {rule.family} "
                           f"set {rule.remote_set!r}")
    direction = "src" if ingress else "dst"
    return f"-m set --match-set {set_names[rule.remote_set]} {direction}"


def _protocol(rule: IRRule) -> int:
    proto = rule.protocol
    assert proto is not None
    if not 0 <= proto <= 255:
        raise UnsupportedError(f"iptables: rule {rule.rule_id}: no IP protocol {proto}")
    if proto == 0:  # "-p 0" means every protocol to iptables (iptables(8), "-p")
        raise UnsupportedError(f"iptables: rule {rule.rule_id}: protocol 0 cannot be "
                               "matched (iptables reads -p 0 as any protocol)")
    return proto


def _protocol_matches(rule: IRRule) -> list[str]:
    if rule.ports is not None and rule.icmp is not None:
        raise UnsupportedError(f"iptables: rule {rule.rule_id} has ports and ICMP type")
    if rule.ports is not None:
        return [_ports(rule)]
    if rule.icmp is not None:
        return [_icmp(rule)]
    return []


def _ports(rule: IRRule) -> str:
    assert rule.ports is not None and rule.protocol is not None
    low, high = rule.ports.low, rule.ports.high
    match = PORT_MATCH.get(rule.protocol)
    if match is None:
        raise UnsupportedError(f"iptables: rule {rule.rule_id}: protocol {rule.protocol} "
                               "has no ports")
    if not 0 <= low <= high <= 65535:
        raise UnsupportedError(f"iptables: rule {rule.rule_id}: bad port range {low}-{high}")
    return f"{match} {low}" if low == high else f"{match} {low}:{high}"


def _icmp(rule: IRRule) -> str:
    assert rule.icmp is not None
    if rule.protocol != ICMP_PROTOCOL[rule.family]:
        raise UnsupportedError(f"iptables: rule {rule.rule_id}: ICMP type with protocol "
                               f"{rule.protocol} over {rule.family}")
    icmp = rule.icmp
    if any(not 0 <= v <= 255 for v in (icmp.type, icmp.code or 0)):
        raise UnsupportedError(f"iptables: rule {rule.rule_id}: bad ICMP type/code")
    if rule.family == "ipv4" and icmp.type == 255:  # xt_icmp reads type 255 as "any"
        raise UnsupportedError(f"iptables: rule {rule.rule_id}: ICMP type 255 cannot be "
                               "matched (iptables reads it as any type)")
    value = str(icmp.type) if icmp.code is None else f"{icmp.type}/{icmp.code}"
    if rule.family == "ipv4":
        return f"-m icmp --icmp-type {value}"
    return f"-m icmp6 --icmpv6-type {value}"


# --------------------------------------------------------------------------- #
# Egress protections (shared) and policy chains.
# --------------------------------------------------------------------------- #


def _ingress_base(family: Family) -> tuple[str, ...]:
    """The shared start of every ingress policy chain (replies returned before
    the dispatch): invalid packets and new TCP connections that do not start
    with a SYN dropped; neighbour discovery to an instance allowed (marked)
    without rules — router advertisements, neighbour solicitations and
    advertisements, MLD queries, as in Neutron. (In the routed topology none of
    these is ever forwarded: they are link-local; they matter for bridged ports.)"""
    nd = [] if family == "ipv4" else [
        f"-p 58 -m icmp6 --icmpv6-type {t} -g {ALLOW}" for t in ND_INGRESS]
    return (CT_INVALID, NEW_NOT_SYN, *nd)


def _egress_open(family: Family) -> tuple[str, ...]:
    """The shared tail of open egress, after anti-spoofing: the protections
    (:func:`_protections`), the rest allowed."""
    return (*_protections(family, RETURN), RETURN)


def _egress_base(family: Family) -> tuple[str, ...]:
    """The shared start of closed egress, jumped to by every egress policy
    chain: the same protections, with what they allow marked (the policy chain
    passes it); what they neither allow nor drop returns to the groups."""
    return _protections(family, f"-g {ALLOW}")


def _protections(family: Family, allow: str) -> tuple[str, ...]:
    """What no security-group rule opens or closes, in the nftables backend's
    order (``egress-protect``): from the unspecified address only DHCP discovery
    (RFC 2131 4.1) or duplicate address detection and its MLD report (RFC 4862
    5.4.2); DHCP and DHCPv6 servers, router advertisements and redirects
    dropped; DHCP, DHCPv6 and neighbour discovery clients allowed (``allow``);
    replies allowed, invalid packets dropped; a new TCP connection must start
    with a SYN (with conntrack's loose pick-up, a mid-stream segment of a
    revoked connection would otherwise open it again)."""
    client, server = _dhcp_match(DHCP_CLIENT, family), _dhcp_match(DHCP_SERVER, family)
    if family == "ipv4":
        rules = [f"-s 0.0.0.0/32 {client} {allow}",
                 f"-s 0.0.0.0/32 {DROP}",
                 f"{server} {DROP}",
                 f"{client} {allow}"]
    else:
        icmp6 = f"-p {ICMPV6} -m icmp6 --icmpv6-type"
        rules = [*(f"-s ::/128 {icmp6} {t} {allow}" for t in ND_UNSPECIFIED),
                 f"-s ::/128 {DROP}",
                 f"{server} {DROP}",
                 *(f"{icmp6} {t} {DROP}" for t in ND_DROPPED),
                 f"{client} {allow}",
                 *(f"{icmp6} {t} {allow}" for t in ND_TYPES)]
    return (*rules, CT_ESTABLISHED.replace(RETURN, allow), CT_INVALID, NEW_NOT_SYN)


def _dhcp_match(ports: Mapping[int, tuple[int, int]], family: Family) -> str:
    sport, dport = ports[4 if family == "ipv4" else 6]
    return f"-p {UDP} -m udp --sport {sport} --dport {dport}"


class _Policy(NamedTuple):
    """Where one protected port's traffic goes: its ingress policy chain, its
    egress target (the shared open tail or its egress policy chain), and the
    policy chains themselves (shared with every port with the same content)."""

    ingress: str
    egress: str
    chains: dict[str, tuple[str, ...]]


def _policy_chains(port: PortPolicy, family: Family, ctx: _Context) -> _Policy:
    """The policy of a port with port security in ``family``: ingress, and
    egress when its egress is closed (the shared base first)."""
    ingress, rules = _ingress_policy(port, family, ctx)
    chains = {ingress: rules}
    egress = EGRESS_OPEN
    if not port.egress_open:
        groups = ctx.groups_of(port.egress_chains, family)
        egress = policy_chain("egress", groups)
        chains[egress] = (f"-j {EGRESS_BASE}", *_groups(groups, ctx))
    return _Policy(ingress, egress, chains)


def _groups(chains: list[str], ctx: _Context) -> tuple[str, ...]:
    """Try every group (each returns at once once one allowed), pass what one of
    them (or the shared egress base) allowed, drop the rest (module docstring,
    "Shared group chains need a mark"; the bit was cleared before dispatch)."""
    mark = ctx.options.mark
    return (*(f"-j {chain}" for chain in chains),
            f"-m mark --mark {mark_text(mark, mark)} -g {PASS}", DROP)


# --------------------------------------------------------------------------- #
# Text for the tools.
# --------------------------------------------------------------------------- #


def _check_ipv4(address: str) -> None:
    """An address printed into a NAT rule must be exactly one IPv4 address, in
    :mod:`ipaddress`'s own text (nothing else can reach the rule as syntax)."""
    try:
        canonical = str(ipaddress.IPv4Address(address))
    except ValueError:
        canonical = None
    if canonical != address:
        raise BackendError(f"iptables: floating IP address {address!r} is not IPv4")


def restore_text(lines: Iterable[str], table: str = "filter") -> str:
    """An ``iptables-restore --noflush`` input for ``table``: ``lines`` between
    ``*TABLE`` and ``COMMIT`` (the whole block is one atomic commit)."""
    return f"*{table}\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"


def table_lines(table: Table) -> Iterator[str]:
    """Every chain of ``table`` declared (which also flushes it in --noflush
    mode, measured), flushed, filled; then the jumps from the built-in chains."""
    for name in table.chains:
        yield f":{name} - [0:0]"
    for name, rules in table.chains.items():
        yield f"-F {name}"
        yield from (f"-A {name} {rule}" for rule in rules)
    for (builtin, rule), count in table.jumps.items():
        yield from (f"-I {builtin} 1 {rule}" for _ in range(count))


def ipset_lines(sets: Iterable[IpSet]) -> Iterator[str]:
    """``ipset -exist restore`` input creating (or emptying) and filling ``sets``."""
    for ipset in sets:
        yield f"create {ipset.name} {ipset.header()}"
        yield f"flush {ipset.name}"
        yield from (f"add {ipset.name} {element}" for element in ipset.elements)


def ipset_text(state: IptState) -> str:
    return "".join(f"{line}\n" for line in ipset_lines(state.sets.values()))


def to_text(state: IptState) -> str:
    """The whole state as one readable script: the ipset input, then each
    family's iptables-restore input (what ``secfw compile --backend iptables``
    prints; applying it by hand to a host without secfw's objects works)."""
    parts = ["# ipset -exist restore\n", ipset_text(state)]
    for family in FAMILIES:
        tool = "iptables" if family == "ipv4" else "ip6tables"
        parts += [f"# {tool}-restore --noflush\n", restore_text(table_lines(state.tables[family]))]
        if family == "ipv4" and state.nat.chains:
            parts.append(restore_text(table_lines(state.nat), "nat"))
    return "".join(parts)


def compile_text(hf: HostFilter, options: RenderOptions | None = None, *,
                 topology: str | None = None) -> str:
    """:func:`to_text` of :func:`render`: the entry point for ``secfw compile``;
    ``topology`` overrides the options' one."""
    options = options or RenderOptions()
    if topology is not None:
        options = replace(options, topology=topology)
    return to_text(render(hf, options))
