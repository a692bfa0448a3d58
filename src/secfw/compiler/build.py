"""Model → IR: the filter of one compute host. Pure: no I/O, no clock, no randomness.

``compile_host(state, host, allow_same_net)`` reads the ports of the instances on
``host`` and produces a :class:`~secfw.compiler.ir.HostFilter`:

* a :class:`PortPolicy` per port: its MAC and addresses (IPv4, IPv6, allowed
  address pairs — what anti-spoofing lets it send from), its port-security
  switch, the same-net sets it accepts sources from, and the group chains of
  its instance's security groups in the instance's order;
* one :class:`GroupChain` per (group, direction) used by a port on this host,
  shared by all of them — compiled size grows with ports + rules, never with
  ports × rules. Every group used here has an ingress chain; only groups with
  at least one egress rule have an egress chain;
* one :class:`AddressSet` per (source group, family) referenced by those chains,
  holding the addresses of every port (on any host) of the group's members,
  their allowed address pairs of that family included (as Neutron does), less
  the addresses a port of an overlapping network also has (:func:`member_addresses`);
* with ``allow_same_net``, one *same-net* :class:`AddressSet` per (network,
  family) of a protected port here: the addresses of every port of the network,
  on any host, pairs included, clipped to the network's subnet;
* a :class:`FloatingNat` per floating IP associated with a port here, and then
  the instance networks' IPv4 CIDRs (``internal``: never SNATed towards).

Same-net means "from the network's ports", not "from the network's CIDR"
(README, "Semantics"): a port's addresses are anti-spoofed on its own host, so
these sources are what the network's instances really send from, while any
other in-subnet source — a packet the uplink delivers with a forged address —
is left to the security groups. nova-network accepted the whole CIDR.

Egress default (README, "Semantics decisions"): a port whose groups have no
egress rule at all keeps egress open (``egress_open``, nova-network); otherwise
its egress is the union of its groups' egress rules (Neutron). Anti-spoofing
and the DHCP/RA protections apply either way, unless port security is off.

Names in the IR are derived from generated ids only (never from user names), so
nothing a user types can reach a ruleset as syntax.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from functools import lru_cache

import netaddr

from secfw.cloud import CloudState
from secfw.compiler.ir import (
    AddressPair,
    AddressSet,
    Family,
    FloatingNat,
    GroupChain,
    HostFilter,
    IcmpMatch,
    IRDirection,
    IRRule,
    PortPolicy,
    PortRange,
)
from secfw.compiler.metadata import route_mark
from secfw.compiler.sources import IPV4_HOST
from secfw.constants import PORT_PROTOCOL_NUMBERS
from secfw.gcpause import collector_paused
from secfw.model import Instance, Network, Port, Rule, canonical_remote, protocol_number

ICMP_PROTOCOLS = frozenset({1, 58})
SAME_NET_PREFIX = "net-"
_PORT_PROTOCOL_NUMBERS = PORT_PROTOCOL_NUMBERS


@lru_cache(maxsize=1 << 16)
def chain_name(group_id: str, direction: IRDirection) -> str:
    """The IR name of a group's chain: ``sg-<group id>-in`` or ``-out``. One
    string per chain, shared by every port that names it (cached: at 10,000
    ports the ports' chain lists hold 200k names of ~500 chains, 17 MB as
    separate strings)."""
    return f"sg-{group_id}-{'in' if direction == 'ingress' else 'out'}"


@lru_cache(maxsize=1 << 16)
def _ingress_chain(group_id: str) -> str:
    """``chain_name(group_id, "ingress")`` with one argument: ``map`` calls it
    from C (a 10k-port host names 200k ingress chains, and a generator calling
    the two-argument form was a sixth of its compile, profiled)."""
    return chain_name(group_id, "ingress")


def set_name(group_id: str, family: str = "ipv4") -> str:
    """The IR name of a source group's address set: ``sg-<group id>-v4`` or ``-v6``."""
    return f"sg-{group_id}-{'v4' if family == 'ipv4' else 'v6'}"


def same_net_set_name(network_id: str, family: str = "ipv4") -> str:
    """The IR name of a network's same-net address set: ``net-<network id>-v4`` or ``-v6``."""
    return f"{SAME_NET_PREFIX}{network_id}-{'v4' if family == 'ipv4' else 'v6'}"


def compile_host(state: CloudState, host: str, allow_same_net: bool = True,
                 set_cache: dict[str, AddressSet] | None = None) -> HostFilter:
    """The filter of ``host`` for the cloud in ``state`` (see the module docstring).

    ``set_cache``: address sets already computed for the same ``state`` (by name),
    filled as they are computed — a set's elements are the same on every host, so
    compiling every host of a cloud (the audits) computes each set once.

    Python's cyclic collector is paused meanwhile (:func:`collector_paused`): a
    10k-port host's compile allocates ~10^5 tuples, policies and strings, none of
    them in a cycle, and the collections they trigger walk the whole cloud state
    each time (~0.2-0.3 s of a 0.7-1.0 s compile at 10k, measured; the agent
    already paused it around its compile, the bench, the CLI and the audits did
    not)."""
    with collector_paused():
        return _compile_host(state, host, allow_same_net, set_cache)


def _compile_host(state: CloudState, host: str, allow_same_net: bool,
                  set_cache: dict[str, AddressSet] | None) -> HostFilter:
    """:func:`compile_host`'s body (the collector paused)."""
    instances = sorted((i for i in state.instances.values() if i.host == host), key=lambda i: i.id)
    group_ids = sorted({g for i in instances for g in i.security_groups})
    with_egress = {g for g in group_ids if has_egress_rule(state, g)}
    ports = [
        port_policy(state, instance, port, allow_same_net, with_egress)
        for instance in instances
        for port in state.ports_of(instance.id)
    ]
    chains = [group_chain(state, g, "ingress") for g in group_ids]
    chains += [group_chain(state, g, "egress") for g in sorted(with_egress)]
    referenced = {r.remote_set for c in chains for r in c.rules if r.remote_set}
    referenced.update(name for p in ports for name in p.same_net_sets)
    cache: dict[str, AddressSet] = {} if set_cache is None else set_cache
    sets = []
    for name in sorted(referenced):
        found = cache.get(name)
        if found is None:
            found = cache[name] = address_set(state, name)
        sets.append(found)
    floating = floating_nat(state, host)
    return HostFilter(
        host=host,
        ports=tuple(sorted(ports, key=lambda p: p.tap)),
        chains=tuple(sorted(chains, key=lambda c: c.name)),
        sets=tuple(sets),
        floating=floating,
        internal=internal_networks(state) if floating else (),
    )


def floating_nat(state: CloudState, host: str) -> tuple[FloatingNat, ...]:
    """The 1:1 NAT of the floating IPs associated with ports of instances on
    ``host``, by floating address. A mapping whose fixed address is no longer the
    port's is left out (the port was readdressed: nothing to map to)."""
    found = []
    for port_id, addresses in state.floating_by_port.items():
        port = state.ports.get(port_id)
        instance = state.instances.get(port.instance_id) if port else None
        if port is None or instance is None or instance.host != host:
            continue
        for address in addresses:
            if state.floating_ips[address].fixed_ip == port.ip:
                found.append(FloatingNat(address, port.ip, port.tap, port.id))
    return tuple(sorted(found, key=lambda n: ipaddress.ip_address(n.floating)))


def floating_pools(state: CloudState) -> tuple[str, ...]:
    """The CIDRs of every floating pool, merged: the addresses a full agent pass
    checks conntrack's NAT bindings against (:func:`secfw.conntrack.stale_nat`)."""
    return normalise_addresses(p.cidr for p in state.floating_pools.values())


def internal_networks(state: CloudState) -> tuple[str, ...]:
    """Every instance network's IPv4 CIDR, merged: what SNAT never applies towards
    (traffic between instances keeps its fixed source, as nova-network's did)."""
    return normalise_addresses(n.cidr for n in state.networks.values())


def has_egress_rule(state: CloudState, group_id: str) -> bool:
    """Whether the group has at least one egress rule (its ports' egress is then filtered)."""
    return any(r.direction == "egress" for r in state.rules_by_group.get(group_id, {}).values())


def port_policy(
    state: CloudState, instance: Instance, port: Port, allow_same_net: bool,
    with_egress: set[str],
) -> PortPolicy:
    """The policy of one port; ``with_egress`` are the groups that have an egress rule."""
    network = state.networks[port.network_id]
    families = ("ipv4", "ipv6") if network.cidr6 else ("ipv4",)
    same_net = allow_same_net and port.port_security
    groups = instance.security_groups
    egress = tuple(chain_name(g, "egress") for g in groups if g in with_egress)
    return PortPolicy(
        tap=port.tap,
        port_id=port.id,
        instance_id=instance.id,
        mac=port.mac,
        ipv4=(port.ip,),
        same_net_sets=tuple(same_net_set_name(network.id, f) for f in families if same_net),
        ingress_chains=tuple(map(_ingress_chain, groups)),
        egress_chains=egress,
        egress_open=not egress,
        ipv6=(port.ip6,) if port.ip6 else (),
        allowed_pairs=address_pairs(port),
        port_security=port.port_security,
        metadata_route=_metadata_route(state, network),
    )


def _metadata_route(state: CloudState, network: Network) -> int:
    """The reply routing mark of the network's ports (:func:`route_mark`): only a
    network that overlaps another needs one — by destination address alone the
    host cannot tell which of the two the metadata server's reply is for."""
    if network.vlan is None or not state.overlapping_subnets(network.id):
        return 0
    return route_mark(network.vlan)


def address_pairs(port: Port) -> tuple[AddressPair, ...]:
    """The port's allowed address pairs: canonical CIDRs, lower-case MACs, sorted,
    without duplicates (the port's own MAC where the pair names none)."""
    pairs = {
        AddressPair(str(ipaddress.ip_network(cidr, strict=False)), mac.lower())
        for cidr, mac in port.address_pairs()
    }
    return tuple(sorted(pairs))


def group_chain(state: CloudState, group_id: str, direction: IRDirection) -> GroupChain:
    """The group's rules of one direction, normalised, deduplicated and sorted."""
    rules = [r for r in state.rules_by_group.get(group_id, {}).values() if r.direction == direction]
    compiled = sorted({ir_rule(r) for r in rules}, key=_rule_sort_key)
    return GroupChain(chain_name(group_id, direction), group_id, direction, tuple(compiled))


def ir_rule(rule: Rule) -> IRRule:
    """One model rule as an IR rule (normalised: ``0.0.0.0/0`` is "any source")."""
    proto = protocol_number(rule.protocol)
    family: Family = "ipv4" if rule.ethertype == "IPv4" else "ipv6"
    ports = icmp = None
    if proto in _PORT_PROTOCOL_NUMBERS and rule.port_min is not None:
        high = rule.port_max if rule.port_max is not None else rule.port_min
        ports = PortRange(rule.port_min, high)
    elif proto in ICMP_PROTOCOLS and rule.port_min is not None:
        icmp = IcmpMatch(rule.port_min, rule.port_max)
    return IRRule(
        rule_id=rule.id,
        family=family,
        protocol=proto,
        ports=ports,
        icmp=icmp,
        remote_cidr=canonical_remote(rule.remote_cidr, rule.ethertype),
        remote_set=set_name(rule.remote_group_id, family) if rule.remote_group_id else None,
    )


def _rule_sort_key(rule: IRRule) -> tuple[object, ...]:
    return (
        rule.family,
        -1 if rule.protocol is None else rule.protocol,
        rule.ports or PortRange(-1, -1),
        (-1, -1)
        if rule.icmp is None
        else (rule.icmp.type, -1 if rule.icmp.code is None else rule.icmp.code),
        rule.remote_cidr or "",
        rule.remote_set or "",
        rule.rule_id,
    )


def address_set(state: CloudState, name: str) -> AddressSet:
    """The address set ``name``: a source group's (see :func:`set_name`): every
    address, on any host, of the ports of the group's members; or a network's
    same-net set (:func:`same_net_set_name`, :func:`same_net_set`)."""
    family: Family = "ipv4" if name.endswith("-v4") else "ipv6"
    if name.startswith(SAME_NET_PREFIX):
        return same_net_set(state, name[len(SAME_NET_PREFIX) : -len("-v4")], family)
    group_id = name[len("sg-") : -len("-v4")]
    addresses = [
        address
        for member in state.group_members(group_id)
        for port in state.ports_of(member.id)
        for address in member_addresses(state, port, family)
    ]
    return AddressSet(name, group_id, family, normalise_addresses(addresses))


def member_addresses(state: CloudState, port: Port, family: Family) -> list[str]:
    """What a member's ``port`` puts into a source group's set: :func:`port_addresses`
    less every address that a port of another network overlapping the port's
    may also send from (:meth:`CloudState.twin_claims`).

    Two VLAN networks may overlap (docs/semantics.md, "Overlapping networks"), and
    a source group's set is one set of addresses shared by every port that uses
    the group: 10.0.0.5 of network B in it would also admit 10.0.0.5 of network A
    at A's ports. An address that exists twice names no one port, so it is left
    out — fail closed: that member is not admitted by address (on its own
    network, ``allow_same_net_traffic`` still admits it). No twin, the usual
    case, keeps the addresses as they are."""
    addresses = port_addresses(port, family)
    twins = state.twin_claims(port.network_id)
    if not twins or not addresses:
        return addresses
    kept = netaddr.IPSet(addresses) - netaddr.IPSet(twins)
    return [str(c) for c in kept.iter_cidrs()]


def same_net_set(state: CloudState, network_id: str, family: Family) -> AddressSet:
    """The same-net set of a network in ``family``: what every port of the network,
    on any host, may send from (fixed address and allowed address pairs), clipped
    to the network's subnet of that family — same-net never reaches beyond the
    subnet, as nova-network's never did. A port joining or leaving is one element."""
    subnet = network_subnet(state.networks[network_id], family)
    addresses = [
        clipped
        for port_id in state.ports_by_network.get(network_id, ())  # any order: sorted below
        for clipped in same_net_addresses(state.ports[port_id], family, subnet)
    ]
    name = same_net_set_name(network_id, family)
    return AddressSet(name, network_id, family, normalise_addresses(addresses))


def network_subnet(network: Network, family: Family) -> str | None:
    """The network's subnet of ``family`` (None: it has none)."""
    return network.cidr if family == "ipv4" else network.cidr6


def same_net_addresses(port: Port, family: Family, subnet: str | None) -> list[str]:
    """What ``port`` puts into its network's same-net set of ``family``
    (``subnet``: the network's subnet of that family): its addresses clipped
    to the subnet."""
    if not subnet:
        return []
    return [c for a in port_addresses(port, family) if (c := _clip(a, subnet)) is not None]


@lru_cache(maxsize=1 << 17)
def _clip(cidr: str, subnet: str) -> str | None:
    """The part of ``cidr`` inside ``subnet`` (two CIDRs are nested or disjoint):
    ``cidr`` itself, ``subnet`` in canonical text, or None (other family, or
    disjoint). Integer arithmetic on the two address spans; a text the fast
    parser does not take goes to :func:`_clip_slow` (same answer, or its error).
    Cached: a same-net set is recomputed whole when one port of a big network
    changes, and every other address is the same as the time before."""
    inner, outer = _span(cidr), _span(subnet)
    if inner is None or outer is None:
        return _clip_slow(cidr, subnet)
    if inner[0] != outer[0]:
        return None
    if outer[1] <= inner[1] and inner[2] <= outer[2]:
        return cidr
    if inner[1] <= outer[1] and outer[2] <= inner[2]:  # rare: a pair covering the subnet
        return ipaddress.ip_network(subnet).with_prefixlen
    return None


def _span(text: str) -> tuple[int, int, int] | None:
    """(version, first, last) of the strict CIDR (or bare address) ``text``, or
    None when the text is not in the plain form parsed here. ``inet_pton`` is
    the C parser (it refuses IPv4 leading zeros, as :mod:`ipaddress` does);
    host bits set, a zone or a netmask-form prefix return None."""
    address, slash, prefix = text.partition("/")
    version, family, bits = (6, socket.AF_INET6, 128) if ":" in address else (4, socket.AF_INET, 32)
    try:
        first = int.from_bytes(socket.inet_pton(family, address), "big")
    except OSError:
        return None
    if not slash:
        return version, first, first
    if not (prefix.isascii() and prefix.isdigit() and len(prefix) <= 3 and int(prefix) <= bits):
        return None
    size = 1 << (bits - int(prefix))
    if first & (size - 1):
        return None
    return version, first, first + size - 1


def _clip_slow(cidr: str, subnet: str) -> str | None:
    """:func:`_clip` by :mod:`ipaddress`, for the texts :func:`_span` does not take."""
    network, outer = ipaddress.ip_network(cidr), ipaddress.ip_network(subnet)
    if network.version != outer.version:
        return None
    if network.subnet_of(outer):  # type: ignore[arg-type]
        return cidr
    return outer.with_prefixlen if outer.subnet_of(network) else None  # type: ignore[arg-type]


def port_addresses(port: Port, family: Family) -> list[str]:
    """What a port may send from, in ``family``: its fixed address and the CIDRs of
    its allowed address pairs (Neutron counts these as the member's addresses in
    remote-group rules)."""
    fixed = port.ip if family == "ipv4" else port.ip6
    version = 4 if family == "ipv4" else 6
    # A validated CIDR is IPv6 exactly when its text has a colon (no parse needed).
    pairs = [c for c, _ in port.address_pairs() if (":" in c) == (version == 6)]
    return ([fixed] if fixed else []) + pairs


def normalise_addresses(cidrs: Iterable[str]) -> tuple[str, ...]:
    """Canonical, sorted, non-overlapping CIDRs.

    Networks are merged (interval sets reject overlapping elements); single
    addresses stay ``/32`` (``/128``) unless a network already covers them, so
    one member joining or leaving is one element added or removed.
    """
    texts = list(cidrs)
    single = [key for text in texts if (key := host_key(text)) is not None]
    if len(single) == len(texts):  # only single addresses (the usual set): nothing to merge
        return tuple(key[2] for key in sorted(set(single)))
    hosts: set[netaddr.IPNetwork] = set()
    networks: list[netaddr.IPNetwork] = []
    for text in texts:
        net = netaddr.IPNetwork(text)
        is_host = net.prefixlen == (32 if net.version == 4 else 128)
        (hosts.add(net.cidr) if is_host else networks.append(net.cidr))
    merged = netaddr.cidr_merge(networks)
    kept = [h for h in hosts if not any(h in n for n in merged)]
    return tuple(
        str(n) for n in sorted([*kept, *merged], key=lambda n: (n.version, n.first, n.last))
    )


@lru_cache(maxsize=1 << 17)
def host_key(text: str) -> tuple[int, int, str] | None:
    """(version, address, canonical text) when ``text`` is one address, else None;
    the text is :func:`normalise_addresses`' own, and so is the order of the
    keys. Cached: big sets are recomputed whole on a change, and their
    addresses are parsed once. An IPv4 address in canonical form is taken as
    it is (no netaddr object: a 10k-port host's first compile parses ~15k of
    them)."""
    ipv4 = IPV4_HOST.fullmatch(text)
    if ipv4:
        address = ipv4.group(1)
        return 4, int.from_bytes(socket.inet_aton(address), "big"), address + "/32"
    net = netaddr.IPNetwork(text)
    if net.prefixlen != (32 if net.version == 4 else 128):
        return None
    return net.version, net.first, str(net.cidr)
