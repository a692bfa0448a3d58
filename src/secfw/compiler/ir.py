"""The backend-neutral intermediate representation of one host's filter.

The IR says *what* must be filtered, never *how* a technology does it:

* :class:`PortPolicy` — one per port on the host, keyed by its tap: its addresses,
  the same-net address sets whose sources it accepts freely
  (``allow_same_net_traffic``) and the ordered security groups whose rules apply
  to it.
* :class:`GroupChain` — one per (security group, direction) used on the host,
  **shared** by every port that uses the group. Its rules are the group's allow
  rules, already normalised.
* :class:`AddressSet` — one per (source group, family) referenced by a rule of a
  group on this host: the addresses of every port, on any host, of an instance
  that uses the source group. Shared by every rule that references it. And one
  per (network, family) of a protected port on this host while
  ``allow_same_net_traffic`` is on: the addresses of every port of that network,
  on any host (its *same-net* set).
* :class:`FloatingNat` — one per floating IP associated with a port on the host:
  1:1 NAT between the floating address and the port's fixed IPv4 address.

Everything is frozen and sorted, so the same model always gives an equal IR and a
backend renders it byte for byte the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["ipv4", "ipv6"]
IRDirection = Literal["ingress", "egress"]


@dataclass(frozen=True, order=True)
class PortRange:
    """An inclusive range of destination ports (``low == high`` for one port)."""

    low: int
    high: int


@dataclass(frozen=True)
class IcmpMatch:
    """ICMP (or ICMPv6) type and optional code; ``type is None`` never occurs here:
    "any ICMP" is expressed by an :class:`IRRule` with ``icmp=None``."""

    type: int
    code: int | None = None


@dataclass(frozen=True)
class IRRule:
    """One allow rule of a group chain.

    Matches packets of ``family`` whose remote address is in ``remote_cidr`` (a
    canonical CIDR) or in the address set ``remote_set`` (by name), or from anywhere
    when both are None; whose IP protocol is ``protocol`` (number, None = any); and,
    for port protocols, whose destination port is in ``ports``; for ICMP, whose
    type/code match ``icmp``. ``rule_id`` names the model rule it came from.
    """

    rule_id: str
    family: Family
    protocol: int | None = None
    ports: PortRange | None = None
    icmp: IcmpMatch | None = None
    remote_cidr: str | None = None
    remote_set: str | None = None


@dataclass(frozen=True)
class GroupChain:
    """The rules of one security group in one direction, shared by its ports."""

    name: str
    group_id: str
    direction: IRDirection
    rules: tuple[IRRule, ...]


@dataclass(frozen=True)
class AddressSet:
    """Addresses of the members of a source group, or of the ports of a network
    (a same-net set), for one family.

    ``owner_id`` is the source group's id, or the network's. ``elements`` are
    canonical, sorted, non-overlapping CIDRs (single addresses as /32 or /128),
    merged so that interval-based sets accept them as they are.
    """

    name: str
    owner_id: str
    family: Family
    elements: tuple[str, ...]


@dataclass(frozen=True, order=True)
class AddressPair:
    """An address (or CIDR) the port may also send from, with the MAC it may use."""

    cidr: str
    mac: str


@dataclass(frozen=True)
class PortPolicy:
    """The filter of one port (one tap) on this host.

    Ingress is evaluated as: accept a source in one of the address sets named by
    ``same_net_sets`` (the port's network's port addresses, one set per family;
    empty when ``allow_same_net_traffic`` is off or port security is off), then
    each chain of ``ingress_chains`` in order, then drop. Egress: anti-spoofing
    first (only ``mac`` with ``ipv4``/``ipv6``/link-local, or an ``allowed_pairs``
    entry, may leave the port; DHCP/RA server traffic dropped), then each chain of
    ``egress_chains``, then drop — unless ``egress_open`` (no group of the port has
    an egress rule: egress stays open, as nova-network's was).
    ``port_security=False`` means no filtering and no anti-spoofing at all.
    """

    tap: str
    port_id: str
    instance_id: str
    mac: str
    ipv4: tuple[str, ...]
    same_net_sets: tuple[str, ...]
    ingress_chains: tuple[str, ...]
    egress_chains: tuple[str, ...] = ()
    egress_open: bool = True
    ipv6: tuple[str, ...] = ()
    allowed_pairs: tuple[AddressPair, ...] = ()
    port_security: bool = True
    #: the packet mark that routes the host's metadata replies back to this port's
    #: network (:func:`secfw.compiler.metadata.route_mark`); 0: the host's main
    #: routing table can (the port's network overlaps no other)
    metadata_route: int = 0


@dataclass(frozen=True, order=True)
class FloatingNat:
    """A floating IP of a port on this host: packets arriving for ``floating`` are
    DNATed to ``fixed`` (the port's IPv4 address) before they are filtered, so the
    port's ingress rules see the original source; connections the port starts
    towards an address outside every instance network leave with ``floating`` as
    their source (SNAT). ``tap`` and ``port_id`` name the port."""

    floating: str
    fixed: str
    tap: str
    port_id: str


@dataclass(frozen=True, order=True)
class MetadataPort:
    """A port that may reach the metadata service: from ``tap`` with source
    ``address`` (one of the port's own IPv4 addresses, which anti-spoofing
    guarantees), its connections are marked ``mark`` in conntrack."""

    tap: str
    address: str
    mark: int
    #: the packet mark the server's replies get (routed by it to the port's
    #: network, whose address range another network shares); 0: none needed
    route: int = 0


@dataclass(frozen=True)
class MetadataRedirect:
    """The metadata redirect of a host (``secfw.compiler.metadata``).

    TCP from a port of ``ports`` (tap and own source address) to
    ``METADATA_ADDRESS:80`` is marked with the port's conntrack mark and DNATed
    to the local server ``address:port``, whatever the port's egress rules say;
    nothing else from a tap reaches ``address:port``.
    """

    address: str
    port: int
    ports: tuple[MetadataPort, ...]


@dataclass(frozen=True)
class HostFilter:
    """The whole filter of one host: what a backend renders and applies.

    ``floating`` is the host's 1:1 NAT, sorted by floating address; ``internal``
    the IPv4 CIDRs of every instance network (canonical, merged), towards which
    nothing is SNATed — both empty when no floating IP is associated here.
    ``metadata`` is the metadata redirect, None when the host serves none."""

    host: str
    ports: tuple[PortPolicy, ...]
    chains: tuple[GroupChain, ...]
    sets: tuple[AddressSet, ...]
    floating: tuple[FloatingNat, ...] = ()
    internal: tuple[str, ...] = ()
    metadata: MetadataRedirect | None = None

    def port(self, tap: str) -> PortPolicy | None:
        return next((p for p in self.ports if p.tap == tap), None)

    def chain(self, name: str) -> GroupChain | None:
        return next((c for c in self.chains if c.name == name), None)
