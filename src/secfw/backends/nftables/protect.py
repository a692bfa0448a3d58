"""Port protection: anti-spoofing, DHCP/RA/ND protections and the ARP table.

Everything here is compiled per port **as data** (set and map elements keyed by
tap) behind a handful of fixed chains: the ruleset has no chain per port, so its
chain count (which libnftables 1.0.6 lists before every element change) does not
grow with the ports::

    table inet secfw
      set spoof4 / spoof6            tap . MAC . address     (hash: one lookup per packet)
      set spoof4_nets / spoof6_nets  tap . MAC . network     (interval: address pairs only)
      set nd_targets                 tap . NA target address (hash)
      set nd_target_nets             tap . NA target network (interval: address pairs only)
      chain egress-guard             source (tap, MAC, address) known? else drop
      chain egress-protect           DHCP/RA/ND protections, then conntrack state
    table arp secfw
      set arp_open                   taps without port security
      set arp_hosts / arp_nets       tap . frame MAC . sender MAC . sender address
      chain arp-input                hook arp input: known sender? else drop (taps only)

Why ``ether saddr`` works in the ``inet`` hooks: on the input and forward hooks
the packet still carries the link-layer header it arrived with, and nft loads
``ether saddr`` relative to it (nft(8), "ETHER HEADER EXPRESSION"; measured on
kernel 6.18: a frame from a tap with a foreign source MAC is dropped on both
hooks). ARP never reaches the ``inet`` hooks, hence the ``arp`` table.

The NA targets: nft 1.0.6 has no ``icmpv6 taddr``; the target is ``@th,64,128``,
a raw payload (a 128-bit integer), so its sets are declared with ``typeof``
(``typeof iifname . @th,64,128``), which native syntax loads. libnftables 1.0.6
JSON cannot *load* such a set (it lists it as ``["ifname", "integer"]`` but
rejects that type on input: "can not use variable sized data types (integer) in
concat expressions", measured), so ``secfw compile -f json`` prints these two
sets as the kernel lists them, and only the native form is applied. (The former
layout, one ``nd-<tap>`` chain per port, loaded from JSON too, but made every
element change O(ports): libnftables lists every chain first.)
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from functools import lru_cache

import netaddr

from secfw.backends.nftables.layout import (
    ARP_HOSTS,
    ARP_INPUT,
    ARP_INPUT_HOOK,
    ARP_NETS,
    ARP_OPEN,
    CT_STATE,
    EGRESS_GUARD,
    EGRESS_MARKS,
    EGRESS_PROTECT,
    FROM_TAP,
    FROM_TAP_HOOK,
    INGRESS_MARK_BIT,
    INGRESS_MARKS,
    ND_TARGET_NETS,
    ND_TARGETS,
    NEW_NOT_SYN,
    PORT_MACS,
    SPOOF,
    SPOOF_NETS,
    TAP_WILDCARD,
    TO_TAP,
    TO_TAP_HOOK,
    PortIdentity,
    canonical_cidr,
    check_mac,
    check_tap,
)
from secfw.backends.nftables.syntax import (
    ACCEPT,
    ARP_FAMILY,
    BRIDGE_FAMILY,
    DROP,
    Chain,
    Concat,
    Ct,
    Datum,
    Element,
    MapLookup,
    Masked,
    Match,
    Meta,
    NamedSet,
    Payload,
    RawPayload,
    Rule,
    SetMeta,
    SetRef,
    Statement,
    Symbol,
    SymbolSet,
    Verdict,
    hex_text,
    key_text,
    make_rule,
)
from secfw.compiler.ir import Family, PortPolicy
from secfw.compiler.sources import PORT_CACHE, UNSPECIFIED, nd_targets, port_sources
from secfw.constants import DHCP_CLIENT, DHCP_SERVER

_ADDRESS = {"ipv4": ("ip", "ipv4_addr"), "ipv6": ("ip6", "ipv6_addr")}
#: The target address of a neighbour advertisement: 8 bytes into the ICMPv6
#: header (RFC 4861 4.4), 128 bits.
ND_TARGET = RawPayload("th", 64, 128)
#: Its type as libnftables lists it (a raw payload is an integer).
ND_TARGET_TYPE = "integer"
_ICMPV6_TYPE = Payload("icmpv6", "type")
_ARP_KEY = Concat((Meta("iifname"), Payload("ether", "saddr"), Payload("arp", "saddr ether"),
                   Payload("arp", "saddr ip")))
_ARP_TYPE = ("ifname", "ether_addr", "ether_addr", "ipv4_addr")
_DROP_RULE = make_rule((DROP,))


# --------------------------------------------------------------------------- sets


def spoof_sets(ports: Iterable[PortPolicy], ident: PortIdentity) -> list[NamedSet]:
    """``spoof4``/``spoof6`` (hash) and ``spoof4_nets``/``spoof6_nets`` (interval):
    ``tap . MAC . address`` for every source of every protected port.

    Single addresses go to the hash sets (adding one costs nothing, measured);
    only address-pair networks need the interval (pipapo) sets, whose update cost
    grows with their size — they stay small.
    """
    per_port = [_port_elements(p, ident.egress(p.tap)) for p in sorted(ports, key=lambda p: p.tap)]
    found = []
    for index, family in enumerate(("ipv4", "ipv6")):
        key = (ident.key_type, "ether_addr", _ADDRESS[family][1])
        hosts = tuple(e for elements in per_port for e in elements[index])
        if ident.topology == "bridged":
            hosts = tuple(sorted(hosts))
        nets = [e for elements in per_port for e in elements[2 + index]]
        found.append(NamedSet(SPOOF[family], key, (), hosts))
        found.append(NamedSet(SPOOF_NETS[family], key, ("interval",), _without_overlaps(nets)))
    return found


_PortElements = tuple[tuple[Element, ...], ...]


@lru_cache(maxsize=PORT_CACHE)
def _port_elements(port: PortPolicy, egress_key: str) -> _PortElements:
    """The elements one port contributes, sorted (its sources are): IPv4 hosts, IPv6
    hosts, IPv4 networks, IPv6 networks (``egress_key . MAC . address``: the tap,
    or its egress mark on a bridged host), then ARP hosts and ARP networks
    (``tap . MAC . MAC . address``). Cached per policy: a big host re-renders ten
    thousand unchanged ports on every pass."""
    tap = check_tap(port.tap)
    for mac in (port.mac, *(p.mac for p in port.allowed_pairs)):
        check_mac(mac)
    sources = port_sources(port)  # canonical already: parsed and printed by ipaddress
    kinds: list[list[Element]] = [[], [], [], [], [], []]
    for source in sources:
        v6 = source.family == "ipv6"
        kinds[(0 if source.is_host else 2) + v6].append(
            Element((egress_key, source.mac, source.cidr)))
        if not v6:
            arp = Element((tap, source.mac, source.mac, source.cidr))
            kinds[4 if source.is_host else 5].append(arp)
    return tuple(tuple(k) for k in kinds)


def _without_overlaps(elements: Iterable[Element]) -> tuple[Element, ...]:
    """Interval elements with the same leading keys merged: an interval set
    rejects overlapping elements."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for element in elements:
        groups.setdefault(element.key[:-1], []).append(element.key[-1])
    merged = [
        Element((*head, canonical_cidr(str(net))))
        for head, cidrs in groups.items()
        for net in netaddr.cidr_merge(cidrs)
    ]
    return tuple(sorted(merged))


def nd_sets(ports: Iterable[PortPolicy], ident: PortIdentity) -> list[NamedSet]:
    """``nd_targets`` (hash) and ``nd_target_nets`` (interval): ``tap . target`` for
    every IPv6 address or address-pair network a protected port may advertise in
    a neighbour advertisement (keyed by egress mark on a bridged host).

    Single addresses go to the hash set, as in :func:`spoof_sets`: only pair
    networks need the interval (pipapo) set, whose update cost grows with its size.
    """
    hosts: list[Element] = []
    nets: list[Element] = []
    for port in sorted(ports, key=lambda p: p.tap):
        if port.port_security:
            port_hosts, port_nets = _nd_elements(port, ident.egress(port.tap))
            hosts += port_hosts
            nets += port_nets
    key = (ident.key_type, ND_TARGET_TYPE)
    declared = f"{key_text(ident.egress_key)} . {key_text(ND_TARGET)}"
    if ident.topology == "bridged":
        hosts.sort()
    return [NamedSet(ND_TARGETS, key, (), tuple(hosts), typeof=declared),
            NamedSet(ND_TARGET_NETS, key, ("interval",), tuple(sorted(nets)), typeof=declared)]


@lru_cache(maxsize=PORT_CACHE)
def _nd_elements(port: PortPolicy, egress_key: str) -> tuple[tuple[Element, ...],
                                                              tuple[Element, ...]]:
    """The (hosts, networks) elements of one port, networks merged (an interval set
    rejects overlaps). Cached per policy, as :func:`_port_elements`."""
    check_mac(port.mac)
    targets = nd_targets(port)  # canonical IPv6 CIDRs (compiler.sources)
    # A host's value is its 16 bytes in hex, as nd_target_value prints its integer:
    # inet_pton instead of ipaddress (10^4 parses were a sixth of a big host's
    # first render).
    hosts = tuple(Element((egress_key, "0x" + socket.inet_pton(socket.AF_INET6, t[:-4]).hex()))
                  for t in targets if t.endswith("/128"))
    merged = netaddr.cidr_merge([t for t in targets if not t.endswith("/128")])
    nets = tuple(Element((egress_key, nd_target_range(int(n.first), int(n.last))))
                 for n in merged)
    return hosts, nets


def nd_target_value(address: int) -> str:
    """A target address as an element component of the ``typeof … @th,64,128``
    sets: ``0x`` and 32 hex digits (what :func:`.syntax.hex_text` prints)."""
    return hex_text(address, 128)


def nd_target_range(low: int, high: int) -> str:
    """A target network as an element component: ``0x…-0x…`` (nft's range syntax)."""
    return f"{hex_text(low, 128)}-{hex_text(high, 128)}"


# --------------------------------------------------------------------------- chains


def egress_guard(ident: PortIdentity) -> Chain:
    """Anti-spoofing: a packet whose (tap, source MAC, source address) is a source
    of the port goes on to :func:`egress_protect`; anything else is dropped.

    On a bridged host the inet hooks still see the frame's Ethernet header
    (br_netfilter keeps it; measured on kernel 6.18: ``ether saddr`` matches in the
    forward hook), so the same check works keyed by the egress mark."""
    rules = [
        make_rule((Match(_spoof_key(family, ident.egress_key), SetRef(name)),
                   Verdict("goto", EGRESS_PROTECT)))
        for family in ("ipv4", "ipv6")
        for name in (SPOOF[family], SPOOF_NETS[family])
    ]
    return Chain(EGRESS_GUARD, None, (*rules, make_rule((DROP,))))


def established_fast_path(ident: PortIdentity) -> list[Rule]:
    """For a base chain of the egress side, before its dispatch: accept a packet of
    an *established* TCP or UDP flow whose (port, source MAC, source address) is in
    ``spoof4``/``spoof6`` and whose source port is not a DHCP(v6) server's.

    That is exactly the path such a packet takes today through the dispatch —
    ``egress-open``/``egress-filter`` → ``egress-guard`` (the same lookup, which
    only protected ports' sources are in) → the first rule of ``egress-protect``
    (the same three tests) → accept — in one rule, without the verdict-map lookup
    and the three chain changes. A spoofed packet (another port's address or MAC)
    misses the lookup like it misses ``egress-guard``'s, so it never rides an
    established flow's conntrack entry; it goes on to the dispatch and is dropped
    there. Address-pair networks (``spoof*_nets``) are not looked up here: their
    packets take the longer path, with the same outcome. ``ct state`` comes first:
    a new packet fails it at once (no lookup), and those are the packets whose
    whole walk matters for the connection rate."""
    return [
        make_rule((Match(Ct("state"), Symbol("established")), *_ESTABLISHED_FAST_PATH[:2],
                   Match(_spoof_key(family, ident.egress_key), SetRef(SPOOF[family])), ACCEPT))
        for family in ("ipv4", "ipv6")
    ]


def _spoof_key(family: Family, port_key: Meta) -> Concat:
    keyword = _ADDRESS[family][0]
    return Concat((port_key, Payload("ether", "saddr"), Payload(keyword, "saddr")))


def egress_protect(ident: PortIdentity) -> Chain:
    """What no security-group rule can open or close, then conntrack state.

    Falling off its end returns to the chain that jumped to the guard
    (``egress-open`` accepts, ``egress-filter`` applies the egress rules).
    """
    rules: list[tuple[Statement, ...]] = [
        _ESTABLISHED_FAST_PATH,
        *_unspecified_source(),
        (*_udp(*DHCP_SERVER[4]), DROP),  # a DHCP server on an instance (RFC 2131)
        (*_udp(*DHCP_SERVER[6]), DROP),  # a DHCPv6 server or relay (RFC 8415)
        (Match(_ICMPV6_TYPE, SymbolSet(("nd-router-advert", "nd-redirect"))), DROP),
        *_neighbour_advertisement(ident),
        (*_udp(*DHCP_CLIENT[4]), ACCEPT),  # DHCP client
        (*_udp(*DHCP_CLIENT[6]), ACCEPT),  # DHCPv6 client
        (Match(_ICMPV6_TYPE, SymbolSet((
            "nd-router-solicit", "nd-neighbor-solicit", "mld-listener-report",
            "mld-listener-done", "mld2-listener-report"))), ACCEPT),
        (CT_STATE,),
        (NEW_NOT_SYN, DROP),
    ]
    return Chain(EGRESS_PROTECT, None, tuple(make_rule(r) for r in rules))


#: Most packets belong to an established TCP or UDP flow: accept them before the
#: ~12 rules below, which cannot decide otherwise for them — a flow from an
#: unspecified source never got past its first packet, and the ICMPv6 rules do not
#: match TCP or UDP — except that a DHCP(v6) server's replies stay dropped even when
#: established (as in Neutron's iptables driver), hence the source ports excluded
#: (docs/protection.md, "DHCP, RA, ND").
_ESTABLISHED_FAST_PATH: tuple[Statement, ...] = (
    Match(Meta("l4proto"), SymbolSet(("tcp", "udp"))),
    Match(Payload("th", "sport"), SymbolSet((str(DHCP_SERVER[4][0]), str(DHCP_SERVER[6][0]))),
          "!="),
    Match(Ct("state"), Symbol("established")),
    ACCEPT,
)


def _neighbour_advertisement(ident: PortIdentity) -> list[tuple[Statement, ...]]:
    """An NA whose (port, target) is in ``nd_targets`` or ``nd_target_nets`` is
    accepted, any other NA dropped: RFC 4861 7.2.4 lets a node advertise only its
    own addresses. One hash lookup (and one interval lookup) per NA, whatever the
    number of ports. A packet too short for the target fails the load: no match,
    so it meets the drop."""
    na = Match(_ICMPV6_TYPE, Symbol("nd-neighbor-advert"))
    key = Concat((ident.egress_key, ND_TARGET))
    return [(na, Match(key, SetRef(ND_TARGETS)), ACCEPT),
            (na, Match(key, SetRef(ND_TARGET_NETS)), ACCEPT),
            (na, DROP)]


def _unspecified_source() -> list[tuple[Statement, ...]]:
    """From ``0.0.0.0`` only DHCP discovery; from ``::`` only duplicate address
    detection (a neighbour solicitation) and the MLD report that goes with it."""
    v4 = Match(Payload("ip", "saddr"), Symbol(UNSPECIFIED["ipv4"].split("/")[0]))
    v6 = Match(Payload("ip6", "saddr"), Symbol("::"))
    dad = SymbolSet(("nd-neighbor-solicit", "mld2-listener-report"))
    return [
        (v4, *_udp(*DHCP_CLIENT[4]), ACCEPT),
        (v4, DROP),
        (v6, Match(_ICMPV6_TYPE, dad), ACCEPT),
        (v6, DROP),
    ]


def _udp(sport: int, dport: int) -> tuple[Match, Match]:
    return Match(Payload("udp", "sport"), sport), Match(Payload("udp", "dport"), dport)


def neighbour_discovery_in() -> tuple[Statement, ...]:
    """Neighbour discovery to a port works without rules (router advertisements,
    solicitations, advertisements, MLD queries), as in Neutron."""
    kinds = ("nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert",
             "mld-listener-query")
    return Match(_ICMPV6_TYPE, SymbolSet(kinds)), ACCEPT


# --------------------------------------------------------------------------- table arp secfw


def layer2_sets(ports: Sequence[PortPolicy], ident: PortIdentity) -> list[NamedSet]:
    """The sets of the layer-2 table: ``arp secfw`` on a routed host, ``bridge
    secfw`` on a bridged one (:func:`arp_sets` + :func:`bridge_sets`)."""
    if ident.topology == "bridged":
        return [*arp_sets(ports, ident, BRIDGE_FAMILY), *bridge_sets(ports, ident)]
    return arp_sets(ports, ident, ARP_FAMILY)


def layer2_chains(ident: PortIdentity) -> list[Chain]:
    """The chains of the layer-2 tables (see :func:`layer2_sets`); a routed host
    also gets :func:`bridged_taps_closed`."""
    if ident.topology == "bridged":
        return bridge_chains()
    return [arp_input(), *bridged_taps_closed()]


def bridged_taps_closed() -> list[Chain]:
    """On a routed host, a ``bridge secfw`` table that drops every frame from or to
    a tap that is a bridge port.

    Routed taps are never bridge ports, so this touches none of their traffic;
    it makes the routed layout fail *closed* on a tap that is (a wrong topology,
    a host half converted): bridged IP reaches the inet hooks with the bridge as
    its interface, where the routed layout's ``iifname != "tap*" accept`` would
    let it through. The agent refuses such a host too (secfw.agent.topology);
    this holds in the kernel while it does.
    """
    iifname, oifname = Meta("iifname"), Meta("oifname")
    return [Chain(FROM_TAP, FROM_TAP_HOOK, (make_rule((Match(iifname, TAP_WILDCARD), DROP)),),
                  family=BRIDGE_FAMILY),
            Chain(TO_TAP, TO_TAP_HOOK, (make_rule((Match(oifname, TAP_WILDCARD), DROP)),),
                  family=BRIDGE_FAMILY)]


def arp_sets(ports: Sequence[PortPolicy], ident: PortIdentity, family: str) -> list[NamedSet]:
    """``arp_open`` (taps without port security) and ``arp_hosts``/``arp_nets``:
    ``tap . MAC . MAC . IPv4`` — the frame's source MAC and the ARP sender MAC must
    both be a MAC the port may use, with a sender address it may use."""
    ordered = sorted(ports, key=lambda p: p.tap)
    per_port = [_port_elements(p, ident.egress(p.tap)) for p in ordered]
    hosts = tuple(e for elements in per_port for e in elements[4])
    nets = [e for elements in per_port for e in elements[5]]
    open_taps = tuple(Element((p.tap,)) for p in ordered if not p.port_security)
    return [
        NamedSet(ARP_OPEN, ("ifname",), (), open_taps, family=family),
        NamedSet(ARP_HOSTS, _ARP_TYPE, (), hosts, family=family),
        NamedSet(ARP_NETS, _ARP_TYPE, ("interval",), _without_overlaps(nets), family=family),
    ]


def bridge_sets(ports: Sequence[PortPolicy], ident: PortIdentity) -> list[NamedSet]:
    """``egress_marks``/``ingress_marks`` (tap → mark, every port) and
    ``port_macs`` (tap . MAC for every MAC a protected port may use)."""
    ordered = sorted(ports, key=lambda p: p.tap)
    macs = sorted({
        Element((check_tap(p.tap), check_mac(mac)))
        for p in ordered if p.port_security
        for mac in (p.mac, *(pair.mac for pair in p.allowed_pairs))
    })
    return [
        NamedSet(EGRESS_MARKS, ("ifname",), (),
                 tuple(Element((p.tap,), Datum(ident.egress(p.tap))) for p in ordered),
                 is_map=True, family=BRIDGE_FAMILY, data_type="mark"),
        NamedSet(INGRESS_MARKS, ("ifname",), (),
                 tuple(Element((p.tap,), Datum(ident.ingress(p.tap))) for p in ordered),
                 is_map=True, family=BRIDGE_FAMILY, data_type="mark"),
        NamedSet(PORT_MACS, ("ifname", "ether_addr"), (), tuple(macs), family=BRIDGE_FAMILY),
    ]


def bridge_chains() -> list[Chain]:
    """``from-tap`` (bridge prerouting) and ``to-tap`` (bridge postrouting).

    ``from-tap`` runs before the bridge learns the frame's source MAC
    (br_handle_frame_finish comes after the prerouting hook), so a protected tap
    cannot claim another port's MAC in the forwarding database even with a frame
    the inet table would drop. Then: taps without port security pass (unmarked:
    the inet maps have nothing to check for them); a protected tap's ARP must come
    from a known (tap, MAC, sender MAC, sender IPv4) — ARP is bridged here and never
    reaches the host's ARP hook; only IPv4, IPv6 and ARP frames are bridged for it
    (no VLAN tags, no other ethertypes); its IP frames get its egress mark; a tap
    secfw does not know is dropped (fail closed). ``to-tap`` gives frames that
    leave by a tap that tap's ingress mark (drop for an unknown tap); a frame that
    leaves by another port (a router's, the uplink) loses the ingress mark the
    inet forward hook gave it by destination address, so that the IP postrouting
    hook br_netfilter calls next does not filter it as traffic to that port.
    """
    iifname, oifname = Meta("iifname"), Meta("oifname")
    ether_type = Payload("ether", "type")
    arp = Match(ether_type, Symbol("arp"))
    from_tap = (
        make_rule((Match(iifname, TAP_WILDCARD, "!="), ACCEPT)),
        make_rule((Match(iifname, SetRef(ARP_OPEN)), ACCEPT)),
        make_rule((Match(Concat((iifname, Payload("ether", "saddr"))), SetRef(PORT_MACS), "!="),
                   DROP)),
        make_rule((arp, Match(_ARP_KEY, SetRef(ARP_HOSTS)), ACCEPT)),
        make_rule((arp, Match(_ARP_KEY, SetRef(ARP_NETS)), ACCEPT)),
        make_rule((Match(ether_type, SymbolSet(("ip", "ip6")), "!="), DROP)),
        make_rule((SetMeta("mark", MapLookup(iifname, SetRef(EGRESS_MARKS))), ACCEPT)),
        _DROP_RULE,
    )
    ingress_marked = Match(Masked(Meta("mark"), INGRESS_MARK_BIT), INGRESS_MARK_BIT)
    to_tap = (
        make_rule((ingress_marked, Match(oifname, TAP_WILDCARD, "!="), SetMeta("mark", 0),
                   ACCEPT)),
        make_rule((Match(oifname, TAP_WILDCARD, "!="), ACCEPT)),
        make_rule((SetMeta("mark", MapLookup(oifname, SetRef(INGRESS_MARKS))), ACCEPT)),
        _DROP_RULE,
    )
    return [Chain(FROM_TAP, FROM_TAP_HOOK, from_tap, family=BRIDGE_FAMILY),
            Chain(TO_TAP, TO_TAP_HOOK, to_tap, family=BRIDGE_FAMILY)]


def arp_input() -> Chain:
    """The ``arp`` input hook: non-tap ARP untouched; taps without port security
    accepted; a known (tap, MAC, sender) accepted; any other tap's ARP dropped —
    including an unknown tap's (fail closed)."""
    iifname = Meta("iifname")
    rules = (
        make_rule((Match(iifname, TAP_WILDCARD, "!="), ACCEPT)),
        make_rule((Match(iifname, SetRef(ARP_OPEN)), ACCEPT)),
        make_rule((Match(_ARP_KEY, SetRef(ARP_HOSTS)), ACCEPT)),
        make_rule((Match(_ARP_KEY, SetRef(ARP_NETS)), ACCEPT)),
        make_rule((Match(iifname, TAP_WILDCARD), DROP)),
    )
    return Chain(ARP_INPUT, ARP_INPUT_HOOK, rules, family=ARP_FAMILY)
