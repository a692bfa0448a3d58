"""Revocation: cut the established connections a filter change no longer allows.

The nftables filter accepts ``ct state established,related`` before any rule, so a
connection accepted under the old rules would live on after its rule, its group
membership or its port is gone (the peers' recurring bug, docs/protection.md).
After the new ruleset is live, :func:`revoke` deletes exactly those conntrack
entries:

1. **What changed** (:func:`affected_networks`): the ports whose policy differs
   between the previous and the new :class:`HostFilter`, or one of whose group
   chains, or a source-group set one of those chains uses, differs. Their
   addresses — fixed ones and allowed-address-pair networks, from both versions —
   are the only ones whose connections can have been revoked. Without a previous
   filter (the agent's first pass) every port is affected. And the addresses
   that left a same-net set (:func:`left_same_net`: a port of the network, on any
   host, deleted or readdressed): a connection *from* one of them to a port of
   the network was let in as same-net traffic. Watching these rather than every
   port of the network keeps a change on a big flat network one filtered dump.
2. **Dump** the conntrack table of the agent's namespace through ctnetlink
   (pyroute2 ``NFCTSocket``) and keep the entries whose original source or
   destination is such an address. For a few single addresses (the usual
   incremental change) the kernel filters the dump (``CTA_FILTER``); otherwise one
   full dump per address family.
3. **Judge** each with the *new* filter (:class:`~secfw.compiler.evaluate.PolicyIndex`):
   egress of the port that owns the source, ingress of the port that owns the
   destination. An entry to or from an address that belonged to a port of the old
   filter and belongs to none of the new one is revoked too (its port is gone).
   Entries whose source is an address of the host itself were created by the
   host's own output, which secfw does not filter: they are left alone.
4. **Delete** the ones no longer allowed, one ctnetlink message each (no
   subprocess). An entry that expired meanwhile is not an error.

Entries still allowed are never touched, so unrelated updates cut nothing.

Floating IPs (1:1 NAT, :class:`~secfw.compiler.ir.FloatingNat`). A connection to a
floating address has the floating address as its original destination: it is
watched when the port it maps to is affected and judged as the packet the filter
saw, with the fixed address as destination (DNAT ran first). A mapping the change
removed (dissociated, reassigned, its port gone) revokes every connection through
it whatever the groups say (:func:`nat_entries`): those whose original
destination is the floating address (DNATed, hairpin included) and those of the
fixed address whose reply goes to the floating address (SNATed), so a reassigned
address reaches only its new instance.

Agent restarts (:func:`stale_nat`). The diff above only sees what changed while
an agent watched: a mapping removed or moved while none ran is unknown to the
next agent's first pass, and conntrack still holds its NAT bindings (a binding
is chosen by the first packet of a connection and never revisited), so those
connections would keep reaching the old instance. Every full pass (the first
one included) therefore also compares the NAT bindings of the entries that
involve a floating pool with the current mappings and deletes the ones that no
longer match — two IPv4 dumps per full pass, filtered by the kernel to the NATed
entries, and only when the cloud has pools or the host maps floating addresses.

No conntrack zones: in the routed topology a packet between two instances of one
host crosses the forward hook once — one conntrack entry, on which the sender's
egress and the receiver's ingress were both evaluated. Neutron needed a zone per
port because its hybrid bridge made the packet traverse netfilter twice (bridge
and routing) with the same tuple. Entries in a non-zero zone belong to someone
else and are skipped.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from secfw.compiler.evaluate import IPNetwork, Packet, PolicyIndex
from secfw.compiler.ir import FloatingNat, GroupChain, HostFilter, IRRule, PortPolicy
from secfw.errors import BackendError
from secfw.netns import inside_netns

log = logging.getLogger(__name__)

_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_IP_ATTR = {4: "CTA_IP_V4", 6: "CTA_IP_V6"}
_ICMP_ATTR = {1: "CTA_PROTO_ICMP", 58: "CTA_PROTO_ICMPV6"}
#: Conntrack status bits of a translated entry (enum ip_conntrack_status,
#: include/uapi/linux/netfilter/nf_conntrack_common.h).
_IPS_SRC_NAT, _IPS_DST_NAT = 1 << 4, 1 << 5
#: Up to this many watched addresses, the kernel filters the dump (two filtered
#: dumps per address); beyond, one full dump is cheaper.
_MAX_FILTERED = 32


@dataclass(frozen=True)
class Entry:
    """A conntrack entry: its original tuple (:class:`Packet`), ICMP id and zone."""

    packet: Packet
    icmp_id: int | None = None
    zone: int = 0


@dataclass
class Revocation:
    """What :func:`revoke` did: entries examined, deleted, and their tuples (for logs)."""

    examined: int = 0
    deleted: int = 0
    revoked: list[Packet] = field(default_factory=list)

    def as_fields(self) -> dict[str, Any]:
        return {"examined": self.examined, "deleted": self.deleted}


# --------------------------------------------------------------------------- what changed


def affected_ports(previous: HostFilter | None, new: HostFilter) -> list[PortPolicy]:
    """Ports (both versions of each) whose verdicts may have changed: added,
    removed or changed policies, and ports using a changed chain or a chain whose
    source-group set changed. Every port of ``new`` when ``previous`` is None."""
    if previous is None:
        return list(new.ports)
    dirty = _changed_chains(previous, new)
    old_ports, new_ports = {p.tap: p for p in previous.ports}, {p.tap: p for p in new.ports}
    found: list[PortPolicy] = []
    for tap in sorted(old_ports.keys() | new_ports.keys()):
        versions = [p for p in (old_ports.get(tap), new_ports.get(tap)) if p is not None]
        uses_dirty = any(c in dirty for p in versions for c in _chains_of(p))
        if uses_dirty or len(versions) == 1 or versions[0] != versions[1]:
            found += versions
    return found


def left_same_net(previous: HostFilter | None, new: HostFilter) -> list[IPNetwork]:
    """The elements of same-net sets (of both filters) that ``new`` no longer has.

    Only a removal can revoke anything, and only a connection whose source is the
    removed address (same-net is an ingress permission, remote = source). A set
    gone altogether is no one's: the ports that named it changed their policy and
    are affected anyway. Over-inclusive is harmless (a removed host a network
    element now covers): every candidate is judged by the new filter."""
    if previous is None:
        return []
    new_sets = {s.name: s for s in new.sets}
    changed = [(old, fresh) for old in previous.sets
               if (fresh := new_sets.get(old.name)) is not None and fresh is not old
               and fresh.elements != old.elements]
    if not changed:
        return []
    same_net = {name for p in new.ports for name in p.same_net_sets}
    gone = {e for old, fresh in changed if old.name in same_net
            for e in set(old.elements) - set(fresh.elements)}
    return sorted((ipaddress.ip_network(t) for t in gone),
                  key=lambda n: (n.version, n.network_address, n.prefixlen))


def _chains_of(port: PortPolicy) -> tuple[str, ...]:
    return (*port.ingress_chains, *port.egress_chains)


def _changed_chains(previous: HostFilter, new: HostFilter) -> set[str]:
    """Chains that may now refuse what they accepted: chains that appeared, went
    or lost a rule, and chains using a set that lost an element.

    A chain only accepts (a group's rules are allow rules: a packet is accepted
    when any rule matches), so a chain that kept every rule and gained some, or
    whose sets kept every element and gained some, accepts a superset of what it
    did: no connection it admitted can be revoked by it (a rule added, a member
    booted — the usual change — then costs no conntrack dump)."""
    old_chains = {c.name: c for c in previous.chains}
    new_chains = {c.name: c for c in new.chains}
    old_sets = {s.name: s.elements for s in previous.sets}
    new_sets = {s.name: s.elements for s in new.sets}
    sets = {n for n in old_sets.keys() | new_sets.keys()
            if not _grew(old_sets.get(n), new_sets.get(n))}
    chains = {n for n in old_chains.keys() | new_chains.keys()
              if not _grew(_rules(old_chains.get(n)), _rules(new_chains.get(n)))}
    chains |= {c.name for c in new.chains if any(r.remote_set in sets for r in c.rules)}
    return chains


def _rules(chain: GroupChain | None) -> tuple[IRRule, ...] | None:
    return None if chain is None else chain.rules


def _grew(old: tuple[Any, ...] | None, new: tuple[Any, ...] | None) -> bool:
    """Whether ``new`` holds everything ``old`` held (both present): equal or more."""
    return old is not None and new is not None and (old == new or set(old) <= set(new))


def affected_networks(ports: Iterable[PortPolicy]) -> list[IPNetwork]:
    """The addresses (fixed ones as /32 or /128, address pairs as networks) of ``ports``."""
    texts = {t for p in ports for t in (*p.ipv4, *p.ipv6, *(a.cidr for a in p.allowed_pairs))}
    return sorted((ipaddress.ip_network(t) for t in texts),
                  key=lambda n: (n.version, n.network_address, n.prefixlen))


# --------------------------------------------------------------------------- the judgement


def revoked_entries(
    entries: Iterable[Entry], previous: HostFilter | None, new: HostFilter,
    local: Iterable[str] = (),
) -> Iterator[Entry]:
    """The entries of ``entries`` that the change from ``previous`` to ``new``
    revoked (see the module docstring, steps 1 and 3). ``local``: the host's own
    addresses. Pure."""
    affected = affected_ports(previous, new)
    peers = _Matcher(left_same_net(previous, new))
    if not affected and peers.empty:
        return
    watched = _Matcher(affected_networks(affected))
    own = {ipaddress.ip_address(a) for a in local}
    dnat = _dnat_map(previous, new)
    candidates = [
        (e, packet) for e in entries
        if not e.zone and ipaddress.ip_address(e.packet.src) not in own
        and (watched.contains((packet := _as_filtered(e.packet, dnat)).src)
             or watched.contains(packet.dst) or peers.contains(packet.src))
    ]
    if not candidates:
        return
    index = PolicyIndex(new)
    for entry, packet in candidates:
        if not index.allows(packet) or _owner_gone(index, watched, packet):
            yield entry


def _dnat_map(previous: HostFilter | None, new: HostFilter) -> dict[str, str]:
    """Floating → fixed address, as the filter saw it: the new mappings, and the
    old ones of addresses no longer mapped (their entries are :func:`nat_entries`')."""
    mapping = {n.floating: n.fixed for n in (previous.floating if previous else ())}
    mapping.update({n.floating: n.fixed for n in new.floating})
    return mapping


def _as_filtered(packet: Packet, dnat: dict[str, str]) -> Packet:
    """The original tuple with a floating destination replaced by its fixed address:
    the packet the forward hook saw after the DNAT of prerouting."""
    fixed = dnat.get(packet.dst)
    return packet if fixed is None else replace(packet, dst=fixed)


def gone_mappings(previous: HostFilter | None, new: HostFilter) -> list[FloatingNat]:
    """The NAT mappings of ``previous`` that ``new`` does not have (same floating
    and fixed address): every connection through them is revoked."""
    if previous is None:
        return []
    kept = {(n.floating, n.fixed) for n in new.floating}
    return [n for n in previous.floating if (n.floating, n.fixed) not in kept]


def _owner_gone(index: PolicyIndex, watched: _Matcher, packet: Packet) -> bool:
    """An end of ``packet`` belonged to an affected port and belongs to no port of
    the new filter (its port is gone, or no longer has that address). Only the
    addresses of affected ports can have lost their owner."""
    return any(watched.contains(a) and not index.owners.ports(a)
               for a in (packet.src, packet.dst))


class _Matcher:
    """Membership in a list of networks: exact lookup for hosts, a scan for the rest."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        nets = list(networks)
        self.hosts = {n.network_address for n in nets if n.num_addresses == 1}
        self.networks = [n for n in nets if n.num_addresses > 1]

    @property
    def empty(self) -> bool:
        return not self.hosts and not self.networks

    def contains(self, address: str) -> bool:
        addr = ipaddress.ip_address(address)
        if addr in self.hosts:
            return True
        return any(n.version == addr.version and addr in n for n in self.networks)


@dataclass(frozen=True)
class NatEntry:
    """A conntrack entry with the two ends of its reply tuple: ``reply_src`` differs
    from the original destination when the entry was DNATed (to ``reply_src``),
    ``reply_dst`` from the original source when it was SNATed (to ``reply_dst``)."""

    entry: Entry
    reply_src: str
    reply_dst: str


def stale_nat(entries: Iterable[NatEntry], new: HostFilter, pools: Iterable[str]
              ) -> Iterator[Entry]:
    """The entries of ``entries`` whose NAT binding involves a floating address (an
    address of ``pools``, or one ``new`` maps) and is not a current mapping of
    ``new``: DNATed from a floating address to anything but its current fixed
    address (dissociated, moved), or SNATed to a floating address that is no
    longer the source's mapping. Entries NAT left alone, and the other NAT of the
    host (the metadata redirect, anyone else's), are never yielded. Pure."""
    current = {(n.floating, n.fixed) for n in new.floating}
    floating = _Matcher([*(ipaddress.ip_network(p) for p in pools),
                         *(ipaddress.ip_network(n.floating) for n in new.floating)])
    if floating.empty:
        return
    known: dict[str, bool] = {}  # a table has few distinct NATed addresses: parse each once

    def is_floating(address: str) -> bool:
        found = known.get(address)
        if found is None:
            found = known[address] = floating.contains(address)
        return found

    for nat in entries:
        packet = nat.entry.packet
        if nat.entry.zone or ":" in packet.src:  # NAT here is IPv4 only
            continue
        dnat = nat.reply_src != packet.dst and is_floating(packet.dst)
        snat = nat.reply_dst != packet.src and is_floating(nat.reply_dst)
        if (dnat and (packet.dst, nat.reply_src) not in current) or \
                (snat and (nat.reply_dst, packet.src) not in current):
            yield nat.entry


# --------------------------------------------------------------------------- the kernel


def revoke(previous: HostFilter | None, new: HostFilter, netns: str | None = None,
           pools: Iterable[str] | None = None) -> Revocation:
    """Delete the conntrack entries of ``netns`` (default: this one) that the change
    from ``previous`` to ``new`` revoked; call it once ``new`` is live.

    ``pools`` (a full pass: the CIDRs of the cloud's floating pools) also deletes
    every NAT binding through a floating address that ``new`` no longer maps
    that way (:func:`stale_nat`), whatever ``previous`` says.

    Raises BackendError when ctnetlink cannot be used (module missing, no
    permission); the kernel's filter is unaffected either way.
    """
    result = Revocation()
    # No previous filter (an agent's first pass): every port is affected, so every
    # entry is looked at — dumped whole, and judged only if there is any (the
    # address lists cost seconds at 10k ports; a restarted host may have none).
    everything = previous is None and bool(new.ports)
    watched: list[IPNetwork] = []
    if not everything:
        affected = affected_networks(affected_ports(previous, new))
        watched = affected + left_same_net(previous, new) + _floating_of(affected, previous, new)
    gone = gone_mappings(previous, new)
    floating = [] if pools is None else [*pools, *(n.floating for n in new.floating)]
    if not everything and not watched and not gone and not floating:
        return result
    if _table_empty(netns):
        return result
    # pyroute2 only now: importing it is ~0.2 s of a one-shot agent process, whose
    # first pass into a fresh namespace finds an empty table.
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with inside_netns(netns), Conntrack() as table:
            doomed = list(nat_entries(table, gone))
            if floating:
                doomed += stale_nat(table.nat_entries(), new, floating)
            if everything or watched:
                entries = list(table.entries(None if everything else _filter_addresses(watched)))
                result.examined = len(entries)
                if entries:  # revoked_entries filters them by the affected ports itself
                    doomed += revoked_entries(entries, previous, new, _local_addresses())
            doomed = list(dict.fromkeys(doomed))
            result.deleted = sum(table.delete(entry) for entry in doomed)
            result.revoked = [e.packet for e in doomed]
    except (OSError, NetlinkError) as exc:
        raise BackendError(f"conntrack: {exc}") from exc
    return result


def _table_empty(netns: str | None) -> bool:
    """Whether the conntrack table of ``netns`` holds no entry: its
    ``nf_conntrack_count`` (a per-namespace sysctl; /proc/sys follows the calling
    thread's namespace) reads 0. Then :func:`revoke` has nothing to judge or
    delete: an entry made after this read was made while ``new`` was live, as
    revoke's contract requires. False when unknown (no nf_conntrack loaded: the
    dump then says why)."""
    try:
        with inside_netns(netns):
            count = Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text()
    except OSError:
        return False
    return count.strip() == "0"


def _floating_of(affected: list[IPNetwork], previous: HostFilter | None,
                 new: HostFilter) -> list[IPNetwork]:
    """The floating addresses mapped to an affected address: connections to them
    carry the floating address as their original destination."""
    watched = _Matcher(affected)
    mappings = [*(previous.floating if previous else ()), *new.floating]
    return sorted({ipaddress.ip_network(n.floating) for n in mappings
                   if watched.contains(n.fixed)}, key=lambda n: n.network_address)


def nat_entries(table: Conntrack, gone: Iterable[FloatingNat]) -> Iterator[Entry]:
    """Every entry through the mappings ``gone``: original destination the
    floating address (DNATed), or original source the fixed address with the
    reply going to the floating address (SNATed)."""
    for mapping in gone:
        yield from table.entries([mapping.floating], ends=("daddr",))
        for entry, reply_dst in table.with_reply_dst(mapping.fixed):
            if reply_dst == mapping.floating:
                yield entry


class Conntrack:
    """The conntrack table of the namespace it is opened in: one ctnetlink socket
    per address family, for dumping and deleting entries. A context manager."""

    def __init__(self) -> None:
        from pyroute2 import NFCTSocket

        self._socks = {v: NFCTSocket(nfgen_family=f) for v, f in _FAMILIES.items()}

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()

    def entries(self, addresses: Iterable[str] | None = None,
                ends: tuple[str, ...] = ("saddr", "daddr")) -> Iterator[Entry]:
        """Every IPv4 and IPv6 entry (its original tuple); with ``addresses``, only
        those whose original source or destination (``ends``) is one of them,
        filtered by the kernel (``CTA_FILTER``, Linux 5.8+: the table is walked in
        the kernel and only matches cross netlink). An entry is yielded once."""
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        if addresses is None:
            for version, sock in self._socks.items():
                yield from _parsed(version, sock.dump())
            return
        seen: set[Entry] = set()
        for address in addresses:
            version = ipaddress.ip_address(address).version
            for end in ends:
                wanted = NFCTAttrTuple(family=_FAMILIES[version], **{end: address})
                for entry in _parsed(version, self._socks[version].dump(tuple_orig=wanted)):
                    if entry not in seen:
                        seen.add(entry)
                        yield entry

    def with_reply_dst(self, source: str) -> Iterator[tuple[Entry, str]]:
        """The IPv4 entries whose original source is ``source``, each with the
        destination of its reply tuple (the SNATed source, if any)."""
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        wanted = NFCTAttrTuple(family=socket.AF_INET, saddr=source)
        for message in self._socks[4].dump(tuple_orig=wanted):
            entry, reply = _parse(4, message), message.get_attr("CTA_TUPLE_REPLY")
            if entry is not None and reply is not None:
                address = reply.get_attr("CTA_TUPLE_IP").get_attr("CTA_IP_V4_DST")
                yield entry, str(ipaddress.ip_address(address))

    def nat_entries(self) -> Iterator[NatEntry]:
        """The IPv4 entries NAT translated, each once, with the ends of its reply
        tuple. Two dumps the kernel filters on the status bits IPS_DST_NAT and
        IPS_SRC_NAT (ctnetlink's CTA_STATUS/CTA_STATUS_MASK dump filter), so only
        NATed entries cross netlink: parsing a message costs far more than the
        kernel's walk (a whole 20k-entry table: seconds in pyroute2). A kernel
        that ignored the filter would send every entry: :func:`stale_nat` judges
        by the tuples, not the bits, so the result is the same, only slower."""
        seen: set[Entry] = set()
        for bit in (_IPS_DST_NAT, _IPS_SRC_NAT):
            for message in self._socks[4].dump(status=bit, status_mask=bit):
                entry, reply = _parse(4, message), message.get_attr("CTA_TUPLE_REPLY")
                if entry is None or reply is None or entry in seen:
                    continue
                seen.add(entry)
                ip = reply.get_attr("CTA_TUPLE_IP")
                yield NatEntry(entry, str(ipaddress.ip_address(ip.get_attr("CTA_IP_V4_SRC"))),
                               str(ipaddress.ip_address(ip.get_attr("CTA_IP_V4_DST"))))

    def delete(self, entry: Entry) -> bool:
        """Delete one entry by its original tuple (and zone); False when it was
        already gone (expired, or closed meanwhile)."""
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        packet = entry.packet
        version = ipaddress.ip_address(packet.src).version
        tuple_orig = NFCTAttrTuple(
            family=_FAMILIES[version], saddr=packet.src, daddr=packet.dst,
            proto=packet.protocol, sport=packet.sport, dport=packet.dport,
            icmp_id=entry.icmp_id, icmp_type=packet.icmp_type, icmp_code=packet.icmp_code,
        )
        zone = {"zone": entry.zone} if entry.zone else {}
        try:
            self._socks[version].entry("del", tuple_orig=tuple_orig, **zone)
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                return False
            raise
        return True


def _filter_addresses(networks: list[IPNetwork]) -> list[str] | None:
    """The addresses to ask the kernel for, or None (dump everything) when a
    network is not a single address or there are too many to ask one by one."""
    if len(networks) > _MAX_FILTERED or any(n.num_addresses != 1 for n in networks):
        return None
    return [str(n.network_address) for n in networks]


def _parsed(version: int, messages: Iterable[Any]) -> Iterator[Entry]:
    for message in messages:
        entry = _parse(version, message)
        if entry is not None:
            yield entry


def _parse(version: int, message: Any) -> Entry | None:
    """An :class:`Entry` from a ctnetlink message; None if it has no usable tuple."""
    orig = message.get_attr("CTA_TUPLE_ORIG")
    if orig is None:
        return None
    ip, proto = orig.get_attr("CTA_TUPLE_IP"), orig.get_attr("CTA_TUPLE_PROTO")
    prefix = _IP_ATTR[version]
    number = proto.get_attr("CTA_PROTO_NUM")
    icmp = _ICMP_ATTR.get(number)
    packet = Packet(
        src=str(ipaddress.ip_address(ip.get_attr(prefix + "_SRC"))),
        dst=str(ipaddress.ip_address(ip.get_attr(prefix + "_DST"))),
        protocol=number,
        sport=proto.get_attr("CTA_PROTO_SRC_PORT"),
        dport=proto.get_attr("CTA_PROTO_DST_PORT"),
        icmp_type=proto.get_attr(icmp + "_TYPE") if icmp else None,
        icmp_code=proto.get_attr(icmp + "_CODE") if icmp else None,
    )
    icmp_id = proto.get_attr(icmp + "_ID") if icmp else None
    return Entry(packet, icmp_id, message.get_attr("CTA_ZONE") or 0)


def _local_addresses() -> list[str]:
    """Every address configured in the current namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()
                if a.get_attr("IFA_ADDRESS")]
