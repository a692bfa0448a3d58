"""What a port may send from: the anti-spoofing view of a :class:`PortPolicy`.

Shared by the backends (which compile it into sets keyed by tap) and by the
conntrack revocation (which checks existing connections against it), so both
read the IR the same way:

* its own MAC with each of its IPv4 and IPv6 addresses;
* every allowed address pair: the pair's CIDR with the pair's MAC (the port's
  own MAC when the pair names none — the compiler already filled it in);
* for every MAC it may use, the IPv6 link-local address derived from it
  (modified EUI-64, RFC 4291 appendix A): instances send router and neighbour
  solicitations, MLD reports and DHCPv6 from it;
* with its own MAC only, the unspecified addresses ``0.0.0.0`` (a DHCP client
  before it has an address, RFC 2131 4.1; ARP probes, RFC 5227) and ``::``
  (duplicate address detection, RFC 4862 5.4.2; MLD reports during it). The
  protection rules restrict what may be sent from these two.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import NamedTuple

from secfw.compiler.ir import Family, PortPolicy

UNSPECIFIED = {"ipv4": "0.0.0.0/32", "ipv6": "::/128"}

#: Entries of the per-port caches (here and in the nftables renderer's
#: protection sets): room for every port of a 100k-port host. One render asks
#: each of them more than once (the spoof and the ARP sets both take a port's
#: elements; ND targets take its sources again), so a cache smaller than the
#: host misses every time: at 50k ports with 32k entries, every port's sources
#: were computed three times and its elements twice (profiled).
PORT_CACHE = 1 << 17

#: An IPv4 address in the form ``ipaddress`` prints (no leading zeros), optionally
#: with ``/32``: its canonical CIDR is the address and ``/32``, without parsing it
#: (10^4 addresses parsed by ``ipaddress`` were a third of a big host's first render).
IPV4_HOST = re.compile(
    r"((?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d))(?:/32)?"
)


class Source(NamedTuple):
    """One (MAC, CIDR) a port may send from; ``cidr`` is canonical. Ordered by
    (MAC, CIDR). A named tuple, not a frozen dataclass: a 10k-port host's first
    render hashes and sorts ~60k of them, and the dataclass's ``__hash__`` and
    ``__lt__`` are Python functions (a sixth of that render, profiled)."""

    mac: str
    cidr: str

    @property
    def family(self) -> Family:
        return "ipv6" if ":" in self.cidr else "ipv4"

    @property
    def is_host(self) -> bool:
        """A single address (``/32``, ``/128``) rather than a network."""
        return self.cidr.endswith("/32" if self.family == "ipv4" else "/128")


@lru_cache(maxsize=PORT_CACHE)
def link_local(mac: str) -> str:
    """The IPv6 link-local address of ``mac`` as a /128 (modified EUI-64:
    ``fa:16:3e:00:00:01`` → ``fe80::f816:3eff:fe00:1/128``), printed as
    ``ipaddress`` prints it (RFC 5952) without building the address.

    The interface id is ``m0^2 m1 : m2 ff : fe m3 : m4 m5`` (the universal/local
    bit inverted, RFC 4291 2.5.1); its middle two groups are never zero, so the
    longest zero run is the prefix's three zero groups, plus the first group of
    the id when that is zero too: ``fe80::`` then the non-zero groups.
    """
    m = [int(part, 16) for part in mac.split(":")]
    first = (m[0] ^ 0x02) << 8 | m[1]
    groups = [first] if first else []
    groups += [m[2] << 8 | 0xFF, 0xFE00 | m[3], m[4] << 8 | m[5]]
    return "fe80::" + ":".join(f"{g:x}" for g in groups) + "/128"


@lru_cache(maxsize=1 << 16)
def _host(address: str) -> str:
    """``address`` as a canonical host CIDR (cached: the fixed-address index
    asks it of every port of a full pass, and again when a port changes)."""
    ipv4 = IPV4_HOST.fullmatch(address)
    if ipv4:
        return ipv4.group(1) + "/32"
    return ipaddress.ip_network(address).with_prefixlen


def port_macs(port: PortPolicy) -> tuple[str, ...]:
    """Every MAC the port may send from: its own first, then its pairs', sorted."""
    others = sorted({p.mac.lower() for p in port.allowed_pairs} - {port.mac.lower()})
    return (port.mac.lower(), *others)


@lru_cache(maxsize=PORT_CACHE)
def port_sources(port: PortPolicy) -> tuple[Source, ...]:
    """Every (MAC, CIDR) ``port`` may send from (see the module docstring), sorted.

    Empty when port security is off: nothing is checked then. Cached: the backend
    and the revocation ask for the same ports again and again."""
    if not port.port_security:
        return ()
    mac = port.mac.lower()
    found = {Source(mac, _host(a)) for a in (*port.ipv4, *port.ipv6)}
    found |= {Source(p.mac.lower(), _host(p.cidr)) for p in port.allowed_pairs}
    found |= {Source(m, link_local(m)) for m in port_macs(port)}
    found |= {Source(mac, u) for u in UNSPECIFIED.values()}
    return tuple(sorted(found))


@lru_cache(maxsize=PORT_CACHE)
def nd_targets(port: PortPolicy) -> tuple[str, ...]:
    """The IPv6 CIDRs ``port`` may advertise in a neighbour advertisement: its
    IPv6 sources except ``::``, sorted and without duplicates."""
    targets = {s.cidr for s in port_sources(port)
               if s.family == "ipv6" and s.cidr != UNSPECIFIED["ipv6"]}
    return tuple(sorted(targets))


def shared_fixed_addresses(ports: Iterable[PortPolicy]) -> dict[str, str]:
    """Port id → why, for every port whose fixed IPv4 or IPv6 address another port
    of ``ports`` also has (two overlapping VLAN networks on one host). A routed
    host routes an instance's address to its tap (a /32 or /128 route), and one
    address cannot lead to two taps: the agent keeps these taps closed rather than
    let the host's routing pick one of them (docs/agent.md)."""
    ports = tuple(ports)
    # The usual answer is "none", asked on every full pass: one C-level pass over
    # the canonical addresses decides it; the index is built only when some
    # address really is there twice.
    hosts = [*map(_host, itertools.chain.from_iterable(p.ipv4 for p in ports)),
             *map(_host, itertools.chain.from_iterable(p.ipv6 for p in ports))]
    if len(set(hosts)) == len(hosts):
        return {}
    return FixedAddresses(ports).shared()


class FixedAddresses:
    """The ports of a host by fixed address (canonical host CIDR), kept port by
    port: :meth:`shared` answers :func:`shared_fixed_addresses` at the cost of
    the addresses held by more than one port — none, nearly always — rather
    than of the host's ports (an incremental pass asks it every time). An
    address has one owner in ``_one`` or several in ``_many``, never both."""

    def __init__(self, ports: Iterable[PortPolicy] = ()) -> None:
        self._one: dict[str, PortPolicy] = {}
        self._many: dict[str, list[PortPolicy]] = {}
        for port in ports:
            self.add(port)

    def add(self, port: PortPolicy) -> None:
        """Index ``port`` (once per policy object)."""
        for address in map(_host, (*port.ipv4, *port.ipv6)):
            if address in self._many:
                self._many[address].append(port)
            elif address in self._one:
                self._many[address] = [self._one.pop(address), port]
            else:
                self._one[address] = port

    def remove(self, port: PortPolicy) -> None:
        """Forget ``port``, a policy :meth:`add` was given."""
        for address in map(_host, (*port.ipv4, *port.ipv6)):
            owners = self._many.get(address)
            if owners is None:
                del self._one[address]
                continue
            owners.remove(port)
            if len(owners) == 1:
                self._one[address] = owners[0]
                del self._many[address]

    def shared(self) -> dict[str, str]:
        """Port id → why, as :func:`shared_fixed_addresses` gives for the ports
        indexed (the first address in sorted order names the reason)."""
        found: dict[str, str] = {}
        for address in sorted(self._many):
            owners = self._many[address]
            names = ", ".join(sorted(p.tap for p in owners))
            for port in owners:
                found.setdefault(port.port_id, f"fixed address {address.split('/')[0]} is "
                                 f"also another port's on this routed host ({names}): "
                                 "overlapping networks cannot both be routed")
        return found


def address_owners(ports: Iterable[PortPolicy], family: Family) -> dict[str, str | None]:
    """Who an address of ``family`` belongs to, as the bridged backends dispatch
    what the host routes into a bridge: non-overlapping canonical CIDRs, sorted,
    covering every address a port has or may use (its addresses, its allowed
    address pairs), each mapped to the one tap that claims it — or to None where
    several ports claim it (a shared address pair: the host's neighbour table, not
    the model, decides which port receives it). ValueError for a malformed CIDR
    (the backends turn it into their BackendError)."""
    version = 4 if family == "ipv4" else 6
    claims: dict[str, set[str]] = {}
    for port in ports:
        for cidr in (*port.ipv4, *port.ipv6, *(pair.cidr for pair in port.allowed_pairs)):
            key = _network_key(cidr)
            if key[0] == version:
                claims.setdefault(key[3], set()).add(port.tap)
    if all(_is_host(cidr) for cidr in claims):  # the usual case: fixed addresses only
        return {cidr: next(iter(taps)) if len(taps) == 1 else None
                for cidr, taps in sorted(claims.items(), key=lambda kv: _network_key(kv[0]))}
    return _split(claims, family)


def _split(claims: dict[str, set[str]], family: Family) -> dict[str, str | None]:
    """:func:`address_owners` with networks: a sweep over the networks' boundaries;
    each stretch between two boundaries belongs to the taps of the networks that
    cover it, and adjacent stretches of one owner are merged before they are
    written as CIDRs."""
    events: dict[int, list[tuple[int, str]]] = {}
    for cidr, taps in claims.items():
        network = ipaddress.ip_network(cidr)
        for tap in taps:
            events.setdefault(int(network.network_address), []).append((1, tap))
            events.setdefault(int(network.broadcast_address) + 1, []).append((-1, tap))
    active: Counter[str] = Counter()
    stretches: list[tuple[int, int, str | None]] = []
    points = sorted(events)
    for start, end in itertools.pairwise(points):
        for delta, tap in events[start]:
            active[tap] += delta
        owners = [tap for tap, count in active.items() if count > 0]
        if not owners:
            continue
        owner = owners[0] if len(owners) == 1 else None
        if stretches and stretches[-1][1] == start and stretches[-1][2] == owner:
            stretches[-1] = (stretches[-1][0], end, owner)
        else:
            stretches.append((start, end, owner))
    address = ipaddress.IPv4Address if family == "ipv4" else ipaddress.IPv6Address
    return {net.with_prefixlen: owner for start, end, owner in stretches
            for net in ipaddress.summarize_address_range(address(start), address(end - 1))}


def _is_host(cidr: str) -> bool:
    return cidr.endswith("/32") or cidr.endswith("/128")


@lru_cache(maxsize=1 << 16)
def _network_key(cidr: str) -> tuple[int, int, int, str]:
    """(IP version, first address, prefix length, canonical CIDR) of ``cidr``:
    parsed once (a render meets every address again and again); sorts by address."""
    network = ipaddress.ip_network(cidr)
    return network.version, int(network.network_address), network.prefixlen, \
        network.with_prefixlen
