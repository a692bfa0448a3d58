"""The fixed names, hooks and shared statements of secfw's tables, and the checks
every name and address passes before it is printed (``docs/nftables.md``).

Nothing here depends on the IR; :mod:`.render` and :mod:`.protect` build the
ruleset from these pieces.
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from secfw.backends import TOPOLOGIES
from secfw.backends.nftables.syntax import (
    ACCEPT,
    DROP,
    Ct,
    Hook,
    Masked,
    Match,
    Meta,
    Payload,
    Quoted,
    Symbol,
    VerdictTable,
    VMap,
)
from secfw.compiler.ir import Family
from secfw.compiler.sources import IPV4_HOST
from secfw.constants import PORT_PROTOCOL_NUMBERS
from secfw.errors import BackendError, UnsupportedError
from secfw.model import TAP_PREFIX

# ---- table inet secfw: maps and sets of fixed name
INGRESS_PORTS = "ingress_ports"  # tap -> goto ingress-filter | accept (port security off)
EGRESS_PORTS = "egress_ports"  # tap -> goto egress-open | goto egress-filter | accept
#: tap . target: the addresses / address-pair networks a port's neighbour
#: advertisements may announce (``typeof … . @th,64,128``, see protect.py)
ND_TARGETS = "nd_targets"
ND_TARGET_NETS = "nd_target_nets"
SPOOF = {"ipv4": "spoof4", "ipv6": "spoof6"}  # tap . MAC . host address
SPOOF_NETS = {"ipv4": "spoof4_nets", "ipv6": "spoof6_nets"}  # tap . MAC . network
#: Bridged hosts: a port's address → its ingress mark, for what the host routes into
#: a bridge (see FORWARD_INGRESS_BRIDGED_HOOK).
INGRESS_ADDRS = {"ipv4": "ingress_addrs4", "ipv6": "ingress_addrs6"}

# ---- table inet secfw: chains of fixed name
INGRESS_FILTER = "ingress-filter"
EGRESS_OPEN = "egress-open"
EGRESS_FILTER = "egress-filter"
EGRESS_GUARD = "egress-guard"
EGRESS_PROTECT = "egress-protect"
FORWARD_EGRESS = "forward-egress"
FORWARD_INGRESS = "forward-ingress"
POSTROUTING_INGRESS = "postrouting-ingress"  # bridged hosts (see PortIdentity)
INPUT_EGRESS = "input-egress"
PORTS_SUFFIX = "-ports"

# ---- table inet secfw: floating IPs (1:1 NAT; present only while some are associated)
FLOATING_DNAT = "floating_dnat"  # floating address -> fixed address
FLOATING_SNAT = "floating_snat"  # fixed address -> floating address
FLOATING_INTERNAL = "floating_internal"  # instance networks: never SNATed towards
FLOATING_SELF = "floating_self"  # fixed . fixed: an instance reaching its own floating IP
FLOATING_DNAT_CHAIN = "floating-dnat"  # hook nat prerouting
FLOATING_SNAT_CHAIN = "floating-snat"  # hook nat postrouting

# ---- table arp secfw
ARP_OPEN = "arp_open"  # taps without port security
ARP_HOSTS = "arp_hosts"  # tap . frame MAC . sender MAC . sender IPv4
ARP_NETS = "arp_nets"  # the same with networks (address pairs)
ARP_INPUT = "arp-input"

# ---- table bridge secfw (bridged hosts; ARP_OPEN/HOSTS/NETS live here then)
EGRESS_MARKS = "egress_marks"  # tap -> the mark of packets it sends
INGRESS_MARKS = "ingress_marks"  # tap -> the mark of packets sent to it
PORT_MACS = "port_macs"  # tap . MAC: the source MACs a protected tap may use
FROM_TAP = "from-tap"  # hook prerouting: layer-2 checks, egress mark
TO_TAP = "to-tap"  # hook postrouting: ingress mark

# ---- table inet secfw: the metadata redirect (metadata.py)
METADATA_PORTS = "metadata_ports"  # tap . own address -> conntrack mark
METADATA_REDIRECT = "metadata-redirect"  # hook nat prerouting: the DNAT
METADATA_IN = "metadata-in"  # what taps send to the metadata server
METADATA_ROUTES = "metadata_routes"  # conntrack mark -> packet mark of the server's replies
METADATA_ROUTE = "metadata-route"  # hook route output: marks them (overlapping networks)

FIXED_SETS = frozenset({
    METADATA_PORTS, METADATA_ROUTES,
    INGRESS_PORTS, EGRESS_PORTS, ND_TARGETS, ND_TARGET_NETS, *SPOOF.values(),
    *INGRESS_ADDRS.values(),
    *SPOOF_NETS.values(), ARP_OPEN, ARP_HOSTS, ARP_NETS, EGRESS_MARKS, INGRESS_MARKS,
    PORT_MACS, FLOATING_DNAT, FLOATING_SNAT, FLOATING_INTERNAL, FLOATING_SELF,
})
FIXED_CHAINS = frozenset({
    METADATA_REDIRECT, METADATA_IN, METADATA_ROUTE,
    INGRESS_FILTER, EGRESS_OPEN, EGRESS_FILTER, EGRESS_GUARD, EGRESS_PROTECT,
    FORWARD_EGRESS, FORWARD_INGRESS, POSTROUTING_INGRESS, INPUT_EGRESS, ARP_INPUT,
    FROM_TAP, TO_TAP, FLOATING_DNAT_CHAIN, FLOATING_SNAT_CHAIN,
})

# Egress filters run before ingress filters on forward (an arbitrary but fixed
# order: both must accept, and a drop in either is final). "filter" is 0
# (nft(8), "CHAINS", standard priority names).
FORWARD_EGRESS_HOOK = Hook("filter", "forward", -1, "accept")
FORWARD_INGRESS_HOOK = Hook("filter", "forward", 0, "accept")
INPUT_EGRESS_HOOK = Hook("filter", "input", 0, "accept")
# The arp family has input and output hooks only (nft(8), "ADDRESS FAMILIES"):
# an instance's ARP is addressed to the host in the routed topology.
ARP_INPUT_HOOK = Hook("filter", "input", 0, "accept")
# Bridged hosts. br_netfilter hands bridged IP frames to the IP hooks from its own
# bridge hooks at priority 0 (prerouting, NF_BR_PRI_BRNF), -1 (forward) and
# INT_MAX (postrouting) (net/bridge/br_netfilter_hooks.c); the bridge family's
# "filter" priority is -200 (nft(8), "CHAINS"), so secfw's bridge chains always
# run first and the marks they set are there when the inet chains look.
FROM_TAP_HOOK = Hook("filter", "prerouting", -200, "accept")
TO_TAP_HOOK = Hook("filter", "postrouting", -200, "accept")
# On a bridge the egress side of a packet is judged on forward (or input) as on a
# routed host; the ingress side on postrouting, where br_netfilter calls the IP
# postrouting hook with the mark TO_TAP set for the bridge port the frame leaves by.
POSTROUTING_INGRESS_HOOK = Hook("filter", "postrouting", 0, "accept")
# A packet the host's own IP stack routes into a bridge (a gateway on the bridge)
# meets no bridge hook before its IP postrouting hook, and br_netfilter does not call
# that hook again when the bridge sends it on (br_nf_post_routing returns at once
# without nf_bridge info, net/bridge/br_netfilter_hooks.c). So on forward, after the
# egress filter (which needs the egress mark), the mark is set from the destination
# address (INGRESS_ADDRS): the packet's own IP postrouting hook then filters it as
# traffic to that port. Bridged frames get the mark of the port they really leave by
# from TO_TAP, which runs before br_netfilter's postrouting call.
FORWARD_INGRESS_BRIDGED_HOOK = Hook("filter", "forward", 0, "accept")

# Floating IPs. The nat hooks see only the first packet of a connection; conntrack
# applies the mapping to the rest and reverses it on replies. "dstnat" (-100) and
# "srcnat" (100) are the standard nat priorities (nft(8), "CHAINS"). DNAT on
# prerouting runs before the forward hook, so the filter sees the fixed address as
# the destination and the original source untouched: the security groups judge
# DNATed traffic by its real source.
FLOATING_DNAT_HOOK = Hook("nat", "prerouting", -100, "accept")
FLOATING_SNAT_HOOK = Hook("nat", "postrouting", 100, "accept")

ADDRESS_TYPE: dict[Family, str] = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}
ADDRESS_KEYWORD: dict[Family, str] = {"ipv4": "ip", "ipv6": "ip6"}
ICMP_KEYWORD: dict[int, tuple[Family, str]] = {1: ("ipv4", "icmp"), 58: ("ipv6", "icmpv6")}
#: Protocols whose header starts with 16-bit source and destination ports, so the
#: transport-header match ``th dport`` applies (nft(8), "RAW PAYLOAD EXPRESSION").
PORT_PROTOCOLS = PORT_PROTOCOL_NUMBERS

TAP_WILDCARD = Quoted(TAP_PREFIX + "*")
# Replies of accepted connections pass, invalid packets never do (nft wiki,
# "Simple ruleset for a server": ct state vmap). ICMPv6 neighbour discovery and
# MLD are *untracked* (nf_conntrack_proto_icmpv6.c, noct_valid_new[]): they fall
# through this map to the rules that name them.
CT_STATE = VMap(
    Ct("state"),
    VerdictTable((
        (Symbol("established"), ACCEPT),
        (Symbol("related"), ACCEPT),
        (Symbol("invalid"), DROP),
    )),
)
# After CT_STATE only new (or untracked) packets remain. A TCP packet that opens
# a connection must be a SYN: conntrack's loose pick-up (nf_conntrack_tcp_loose=1,
# the default) would otherwise re-create a revoked connection from its next
# mid-stream segment, in whichever direction happens to send first.
NEW_NOT_SYN = Match(Masked(Payload("tcp", "flags"), ("fin", "syn", "rst", "ack")),
                    Symbol("syn"), "!=")

# nft's scanner reads an identifier as ``letter (letter|digit|/|-|_|.)*`` and does
# not accept quoted names for chains and sets (nft 1.0.6); a bare word could be a
# keyword (``tcp``, ``filter``), so secfw's names must also contain a '-' or '.'.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*[-.][A-Za-z0-9_.-]*")
#: The slot maps (slot_map_name): no ``-`` or ``.``, so never an IR name.
_SLOT = re.compile(r"(ingress|egress)_slot[0-9]{1,5}")
_MAX_NAME = 200  # well below NFT_NAME_MAXLEN (256), leaves room for "-ports"
# A tap is an interface name: IFNAMSIZ is 16 bytes with the NUL.
_TAP = re.compile(re.escape(TAP_PREFIX) + r"[A-Za-z0-9_.-]{1,12}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IPV4_HOST = IPV4_HOST  # canonical IPv4 hosts, not parsed (compiler.sources)


def is_safe_name(name: str) -> bool:
    """True when ``name`` can be written as a bare nft identifier: one of the
    fixed names of the layout, or a name that :func:`check_name` accepts."""
    return name in FIXED_SETS or name in FIXED_CHAINS or _SLOT.fullmatch(name) is not None or (
        len(name) <= _MAX_NAME and _NAME.fullmatch(name) is not None)


def check_name(name: str) -> str:
    """``name`` if it is safe as a bare nft identifier; BackendError otherwise."""
    if len(name) > _MAX_NAME or not _NAME.fullmatch(name):
        raise BackendError(f"nftables: {name!r} is not a valid set or chain name")
    return name


def check_tap(tap: str) -> str:
    """``tap`` if it is a valid tap interface name; BackendError otherwise."""
    if not _TAP.fullmatch(tap):
        raise BackendError(f"nftables: {tap!r} is not a valid tap name")
    return tap


def check_mac(mac: str) -> str:
    """``mac`` lower-cased if it is a unicast MAC address; BackendError otherwise."""
    value = mac.lower()
    if not _MAC.fullmatch(value) or int(value[:2], 16) & 1:
        raise BackendError(f"nftables: {mac!r} is not a unicast MAC address")
    return value


#: The bit that tells an ingress mark from an egress one (see :class:`PortIdentity`).
INGRESS_MARK_BIT = 0x80000080
#: The ingress mark of an address several ports claim (a shared allowed address
#: pair): no port's (egress indices start at 1), dropped when the host routes to it.
SHARED_MARK = INGRESS_MARK_BIT
#: Egress marks are byte palindromes ``b0 b1 b1 b0`` with ``b0 < 0x80``: this many.
MAX_MARKED_TAPS = (1 << 15) - 1


@dataclass(frozen=True)
class PortIdentity:
    """How table ``inet secfw`` tells which port a packet leaves (egress side) or
    goes to (ingress side), and the set elements that name that port.

    * routed: the tap is the interface the IP hooks see: ``iifname``/``oifname``,
      keys of type ``ifname``.
    * bridged: the IP hooks see the *bridge* (br_netfilter passes the bridge as the
      device), so the bridge table marks each frame with its port, and the inet
      table keys on ``meta mark`` (type ``mark``): a tap's egress mark has the top
      bit of its first and last byte clear, its ingress mark the same with
      :data:`INGRESS_MARK_BIT` (both bits) set, so a frame
      that leaves by a non-tap bridge port (still carrying its egress mark) never
      matches an ingress element.

    ``marks`` maps each tap to its egress mark (bridged only, see :func:`assign_marks`).
    """

    topology: str
    marks: Mapping[str, int]

    @property
    def key_type(self) -> str:
        return "mark" if self.topology == "bridged" else "ifname"

    @property
    def egress_key(self) -> Meta:
        return Meta("mark") if self.topology == "bridged" else Meta("iifname")

    @property
    def ingress_key(self) -> Meta:
        return Meta("mark") if self.topology == "bridged" else Meta("oifname")

    def egress(self, tap: str) -> str:
        """The element key that names ``tap`` on the egress side."""
        return tap if self.topology == "routed" else str(self.marks[tap])

    def ingress(self, tap: str) -> str:
        """The element key that names ``tap`` on the ingress side."""
        return tap if self.topology == "routed" else str(self.marks[tap] | INGRESS_MARK_BIT)


def port_identity(topology: str, taps: Iterable[str]) -> PortIdentity:
    """The :class:`PortIdentity` of a host with ``taps`` (BackendError for an
    unknown topology)."""
    if topology == "routed":
        return PortIdentity("routed", {})
    if topology == "bridged":
        return PortIdentity("bridged", assign_marks(taps))
    raise BackendError(f"nftables: unknown topology {topology!r} (known: {', '.join(TOPOLOGIES)})")


def assign_marks(taps: Iterable[str]) -> dict[str, int]:
    """A distinct egress mark per tap, a byte palindrome (:func:`palindrome_mark`)
    chosen by CRC-32 of the name, probing the next value on a collision, taps taken
    in sorted order. Stable: a tap keeps its mark while it exists unless a new tap
    that sorts before it collides with it (then both change in the same atomic
    transaction). BackendError beyond :data:`MAX_MARKED_TAPS` taps.

    Why palindromes: nft 1.0.6 lists some elements of a ``mark . ipv4_addr``
    interval set with the mark byte-swapped (measured at 10k ports: 5 of 10,000
    elements of the former ``same_net4`` set came back swapped, so every full sync
    rewrote them; ``spoof4_nets`` still has mark-led interval keys). A mark that
    reads the same in both byte orders cannot be misread."""
    unique = sorted(set(taps))
    if len(unique) > MAX_MARKED_TAPS:
        raise BackendError(f"nftables: a bridged host takes at most {MAX_MARKED_TAPS} taps "
                           f"({len(unique)} given)")
    marks: dict[str, int] = {}
    used: set[int] = set()
    for tap in unique:
        index = zlib.crc32(check_tap(tap).encode()) % MAX_MARKED_TAPS + 1
        while index in used:
            index = index % MAX_MARKED_TAPS + 1
        used.add(index)
        marks[tap] = palindrome_mark(index)
    return marks


def palindrome_mark(index: int) -> int:
    """Egress mark number ``index`` (1 … :data:`MAX_MARKED_TAPS`): the bytes
    ``b0 b1 b1 b0`` with ``b0 = index >> 8`` (< 0x80) and ``b1 = index & 0xff``."""
    high, low = index >> 8, index & 0xFF
    return high << 24 | low << 16 | low << 8 | high


def slot_map_name(direction: str, index: int) -> str:
    """The verdict map of slot ``index`` of ``direction`` (``ingress_slot0``, …):
    port → ``jump`` its index-th group chain (render._slot_maps)."""
    return f"{direction}_slot{index}"


def ports_set_name(chain: str) -> str:
    """The set of taps dispatched to group chain ``chain``."""
    return chain + PORTS_SUFFIX


def canonical_cidr(text: str, family: Family | None = None) -> str:
    """``text`` (address or CIDR) as a canonical CIDR; BackendError if it is not one.

    A bare address means one host (``/32``, ``/128``); host bits must be zero. With
    ``family`` the address must be of that family. Cached: an address appears in
    many sets.
    """
    cidr = _canonical_cidr(text)
    if family is not None and (":" in cidr) != (family == "ipv6"):
        raise UnsupportedError(f"nftables: {cidr} is not an {family} network")
    return cidr


@lru_cache(maxsize=1 << 16)
def _canonical_cidr(text: str) -> str:
    host = _IPV4_HOST.fullmatch(text)
    if host:  # fast path: most elements are single hosts
        return host.group(1) + "/32"
    try:
        return ipaddress.ip_network(text).with_prefixlen
    except ValueError as exc:
        raise BackendError(f"nftables: {text!r} is not a CIDR: {exc}") from exc


def cidr_family(cidr: str) -> Family:
    """The family of a canonical CIDR."""
    return "ipv6" if ":" in cidr else "ipv4"


def is_host(cidr: str) -> bool:
    """Whether a canonical CIDR is a single address (``/32`` or ``/128``)."""
    return cidr.endswith("/32") if cidr_family(cidr) == "ipv4" else cidr.endswith("/128")
