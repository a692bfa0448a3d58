"""The network-namespace lab: a compute host's instances, materialised on this machine.

``secfw lab up --host H [--topology routed|bridged] [--gateway-on-bridge]`` builds one of
three layouts so that real packets can exercise the firewall. Everything lives in namespaces the lab
creates; the root namespace is never touched (apart from the ``/run/netns`` entries of
those namespaces).

Routed (Calico-style, the default)::

    sfw-i-<h>-<tap>  eth0 (port MAC, ip/prefixlen, default via gateway;
                           ip6/prefixlen6 nodad noprefixroute, default via gateway6)
          │ veth
    sfw-h-<h>        <tap>  /32 and /128 routes, proxy_arp, proxy_ndp for gateway6,
                            permanent neighbour entries ip → MAC and ip6 → MAC
                     sfw-gw (veth, peer sfw-gw-p): every gateway address as /32 or /128
                     sfw-ext 203.0.113.1/24, 198.51.100.1/24, 2001:db8:ffff::1/64
          │ veth
    sfw-x-<h>        eth0 203.0.113.10/24, 198.51.100.10/24, 2001:db8:ffff::10/64,
                          default via 203.0.113.1 and 2001:db8:ffff::1

``<h>`` is 8 hex digits of the SHA-256 of the host name (host names are user data and
labs for different hosts must not collide); ``<tap>`` is the tap name without ``tap``.
Instance names are user data too and are never used anywhere in the topology.

Why each host-side setting exists (docs/nftables.md describes the routed topology):

* ``proxy_arp`` on a tap: an instance ARPs for its gateway *and* for same-subnet peers
  directly; the host answers for everything it routes elsewhere. ``proxy_delay=0``
  because the kernel otherwise delays proxied replies to broadcast ARP requests by up
  to 0.8 s (``neigh/default/proxy_delay``), which would break short probe timeouts.
* a permanent neighbour entry ip → MAC on the tap: without it the host sends to the
  broadcast MAC and the instance's TCP stack silently drops the segments.
* ``rp_filter=0``: tests send spoofed sources on purpose; the firewall, not reverse
  path filtering, must be what drops them.
* the gateways sit on a veth pair (``sfw-gw``) because this kernel has no ``dummy``.
* IPv6 (ports with ``ip6``): the instance's address is added ``nodad`` (usable at
  once) and ``noprefixroute``, with an on-link /128 route to ``gateway6`` and the
  default route through it — so the instance sends everything, same subnet
  included, to the gateway, the routed-topology equivalent of ``proxy_arp``
  (``proxy_ndp`` answers only for addresses with a proxy entry, and one entry per
  peer per tap would grow with the square of the ports). The host side: a /128
  route and a permanent neighbour entry per instance, ``proxy_ndp=1`` (``proxy_delay=0``
  as for ARP) and a proxy entry for ``gateway6`` on the tap, IPv6 forwarding on; no
  duplicate address detection on the host's and external side's own interfaces.

Bridged (nova-network / Neutron "hybrid" style): the host namespace only bridges,
a separate router namespace routes between the networks and to the outside::

    sfw-i-<h>-<tap>  eth0 (port MAC, ip/prefixlen with its prefix route, default via
                           gateway; ip6/prefixlen6 nodad with its prefix route,
                           default via gateway6)
          │ veth
    sfw-h-<h>        <tap> ──┐ master              (no addresses, routes or neighbours)
                     <tap> ──┤
                     sfwbr<n> bridge, one per IPv4 network (stp 0, mcast_snooping 0,
                              forward_delay 0)
                     sfwrl<n> ──┘ master
          │ veth (one leg per network)
    sfw-r-<h>        sfwgw<n> gateway/prefixlen (+ gateway6/prefixlen6 nodad)
                     sfw-ext  203.0.113.1/24, 198.51.100.1/24, 2001:db8:ffff::1/64
          │ veth
    sfw-x-<h>        eth0 as in the routed topology, default routes via the router

``<n>`` is 8 hex digits of the SHA-256 of the IPv4 network (``10.0.0.0/24``): a
network's IPv6 network shares its bridge and leg. The ports of a network must agree
on its gateway (and IPv6 network and gateway6), and networks must not overlap
(LabError otherwise) unless both carry a ``segment`` (two overlapping VLAN networks:
each then has its own bridge, ``<n>`` hashing the network with its VLAN, and the
router's two legs carry the same gateway; the router cannot route between them,
which the lab's tests of overlap do not need). Same-subnet instances talk directly
at layer 2 through their bridge; everything else goes through the router. Why each
setting exists:

* ``stp_state 0`` and ``forward_delay 0``: a new bridge port forwards at once, instead
  of listening and learning for 2 × 15 s while frames are dropped.
* ``mcast_snooping 0``: IPv6 neighbour discovery is multicast (solicited-node
  groups); with snooping on, the bridge forwards a group's frames only to ports that
  sent an MLD report for it, and the lab's instances may not have sent one yet.
* ``addr_gen_mode 1`` (none) in the host namespace, set before any interface
  exists: bridges and taps get no IPv6 link-local address, so the host namespace
  has no addresses at all and never speaks on the instance networks.
* the bridge and leg names start with ``sfw``, never ``tap``: the firewall treats
  every ``tap*`` interface as an instance port.
* the router namespace: IPv4 and IPv6 forwarding on, ``rp_filter=0`` (spoofed
  sources are the firewall's job) and no duplicate address detection, as for the
  routed host namespace; gateway addresses carry the network's real prefix length,
  so the router has a connected route per network.
* the instance's IPv6 address keeps its prefix route (same-subnet peers are on the
  link) and is ``nodad``, usable at once.

Bridged with the gateway on the bridge (``gateway_on_bridge=True``; nova-network's
layout in the operations guide): the host namespace itself holds each network's
gateway addresses on its bridge and routes between the bridges and the outside; there
is no router namespace and no leg::

    sfw-i-<h>-<tap>  eth0 as in the bridged topology
          │ veth
    sfw-h-<h>        <tap> ── master  sfwbr<n> gateway/prefixlen (+ gateway6/prefixlen6
                                      and fe80::1/64, nodad)
                     sfw-ext  203.0.113.1/24, 198.51.100.1/24, 2001:db8:ffff::1/64
          │ veth
    sfw-x-<h>        eth0 as in the routed topology, default routes via the host

The host namespace gets the router's sysctls (forwarding on, ``rp_filter=0``, no
duplicate address detection) on top of the bridged host's (``addr_gen_mode 1``: no
link-local addresses on taps; each bridge gets ``fe80::1``, without which the kernel
sends no neighbour solicitation from it and cannot route IPv6 into it). Here
the host's own IP stack routes traffic into the bridges, which the firewall must
filter too (docs/nftables.md, "Bridged hosts").

Implementation choices:

* pyroute2 for every netlink operation (namespaces, veths, addresses, routes,
  neighbours): ``IPRoute(netns=NAME, flags=0)`` opens a socket inside an existing
  namespace (``flags=0``: never create one by accident); ``netns.create/remove`` for
  the namespaces themselves. No ``ip`` subprocess and no shell anywhere.
* sysctls are written through ``/proc/sys`` from a short-lived thread that joined the
  namespace with ``setns(2)`` (:func:`run_in_netns`): ``setns(CLONE_NEWNET)`` affects
  only the calling thread and ``/proc/sys/net`` follows the calling thread's
  namespace, so the caller's own namespace never changes.
* A JSON state file records the topology and every namespace, link and (bridged)
  network *before* it is created, so :meth:`Lab.down` removes exactly what the lab
  made, even after a crash half-way through :meth:`Lab.up`. A name that exists but
  is not recorded is never adopted. Files without a topology (older ones) are routed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import ipaddress
import itertools
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from secfw.compiler.metadata import route_mark
from secfw.errors import LabError

__all__ = [
    "EXTERNAL_NETWORK6",
    "EXTERNAL_NETWORKS",
    "NETNS_DIR",
    "NS_PREFIX",
    "TOPOLOGIES",
    "ExternalNetwork",
    "Lab",
    "LabPort",
    "Topology",
    "bridge_name",
    "netns_exists",
    "router_leg_names",
    "run_in_netns",
]

T = TypeVar("T")
Topology = Literal["routed", "bridged"]
#: The topologies the lab builds (the same names as :data:`secfw.backends.TOPOLOGIES`).
TOPOLOGIES: tuple[Topology, ...] = ("routed", "bridged")

NETNS_DIR = Path(netns.NETNS_RUN_DIR)  # where iproute2 and pyroute2 bind namespaces
NS_PREFIX = "sfw-"  # every namespace the lab creates starts with this
GW_LINK = "sfw-gw"
GW_PEER = "sfw-gw-p"
EXT_LINK = "sfw-ext"  # must not start with "tap": the firewall drops unknown taps
INSTANCE_IFNAME = "eth0"
CLONE_NEWNET = 0x40000000
SCOPE_LINK = 253  # rtnetlink RT_SCOPE_LINK, what `ip route add X dev Y` uses
AF_INET, AF_INET6 = 2, 10
NTF_PROXY = 0x08  # linux/neighbour.h: a proxy (ND/ARP) entry
_SCOPE_LINK = 253  # RT_SCOPE_LINK (linux/rtnetlink.h): a route on the link, no gateway
_MAIN_TABLE, _RTN_UNICAST = 254, 1  # RT_TABLE_MAIN, RTN_UNICAST (linux/rtnetlink.h)
IFA_F_NODAD, IFA_F_NOPREFIXROUTE = 0x02, 0x200  # linux/if_addr.h

_TAP_RE = re.compile(r"tap[A-Za-z0-9_.-]{1,12}")  # ≤ 15 chars: IFNAMSIZ - 1
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_STATE_VERSION = 1  # "topology" and "networks" are optional keys: absent means routed
#: No duplicate address detection on the lab's own (host and external) interfaces:
#: for its first second a tentative link-local address cannot be used, and the
#: first IPv6 packets through the lab would be lost (measured).
_NO_DAD = {
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/default/accept_dad": "0",
}
_HOST_SYSCTLS = {
    **_NO_DAD,
    "net/ipv4/ip_forward": "1",
    "net/ipv6/conf/all/forwarding": "1",
    "net/ipv4/conf/all/rp_filter": "0",  # effective value is max(all, interface)
    "net/ipv4/conf/default/rp_filter": "0",
}
#: The bridged topology's router namespace routes exactly like the routed host.
_ROUTER_SYSCTLS = _HOST_SYSCTLS
#: The bridged topology's host namespace only bridges: interfaces created after this
#: get no IPv6 link-local address (IN6_ADDR_GEN_MODE_NONE), so it has no addresses.
_BRIDGE_HOST_SYSCTLS = {**_NO_DAD, "net/ipv6/conf/default/addr_gen_mode": "1"}
#: The host namespace of the gateway-on-bridge layout both bridges and routes.
_GATEWAY_HOST_SYSCTLS = {**_BRIDGE_HOST_SYSCTLS, **_ROUTER_SYSCTLS}
#: IFLA_BR_* settings of every lab bridge (see the module docstring).
_BRIDGE_OPTIONS = {"br_stp_state": 0, "br_mcast_snooping": 0, "br_forward_delay": 0}
BRIDGE_PREFIX, LEG_PREFIX, ROUTER_LEG_PREFIX = "sfwbr", "sfwrl", "sfwgw"  # never "tap"
BRIDGE_LINK_LOCAL = "fe80::1"  # gateway on the bridge: the bridge's link-local address


@dataclass(frozen=True)
class ExternalNetwork:
    """One public-looking network between the host and the external namespace."""

    host_ip: str  # on sfw-ext in the host namespace; the external side's gateway
    external_ip: str  # on eth0 in the external namespace
    prefixlen: int


EXTERNAL_NETWORKS = (
    ExternalNetwork("203.0.113.1", "203.0.113.10", 24),
    ExternalNetwork("198.51.100.1", "198.51.100.10", 24),
)
#: The external side's IPv6 network (its address routes through the host).
EXTERNAL_NETWORK6 = ExternalNetwork("2001:db8:ffff::1", "2001:db8:ffff::10", 64)


@dataclass(frozen=True)
class LabPort:
    """One instance port as the lab needs it; validated on construction (LabError).

    ``tap`` is ``tap`` + 1-12 of ``[A-Za-z0-9_.-]`` (the host-side interface name);
    ``mac`` a unicast MAC; ``ip``/``prefixlen`` an IPv4 address and its network;
    ``gateway`` an address of that network other than ``ip``. Optionally the same
    for IPv6: ``ip6``/``prefixlen6``/``gateway6`` (all three or none). ``name`` is
    user data and is only ever carried along, never used in a name, path or command.
    ``floating`` are the floating IPs (IPv4) the host NATs to ``ip``: the bridged
    lab routes them to the port in the external side's view (``Lab._sync_floating``).
    ``segment`` is the VLAN id of a network that overlaps another (None otherwise):
    networks with the same addresses are told apart by it (their own bridge,
    and the metadata replies' routing table, ``Lab.wire_metadata``).
    """

    tap: str
    mac: str
    ip: str
    prefixlen: int
    gateway: str
    name: str = ""
    ip6: str | None = None
    prefixlen6: int | None = None
    gateway6: str | None = None
    floating: tuple[str, ...] = ()
    segment: int | None = None

    def __post_init__(self) -> None:
        if not _TAP_RE.fullmatch(self.tap):
            raise LabError(f"lab: invalid tap name {self.tap!r} (tap + 1-12 of [A-Za-z0-9_.-])")
        if not _MAC_RE.fullmatch(self.mac) or int(self.mac[:2], 16) & 1:
            raise LabError(f"lab: port {self.tap}: invalid or multicast MAC {self.mac!r}")
        network = self.network
        gateway = _ipv4(self.gateway, f"port {self.tap} gateway")
        if gateway not in network or gateway == self.address:
            raise LabError(f"lab: port {self.tap}: gateway {self.gateway} not usable in {network}")
        for address in self.floating:
            _ipv4(address, f"port {self.tap} floating IP")
        if self.segment is not None and not (isinstance(self.segment, int)
                                             and 0 < self.segment < 4096):
            raise LabError(f"lab: port {self.tap}: segment {self.segment!r} is not a VLAN id")
        self._check_ipv6()

    @property
    def network_key(self) -> str:
        """What names the port's network in the lab: its IPv4 network, with the
        segment when it has one (``10.0.0.0/24 vlan 101``)."""
        plain = str(self.network)
        return plain if self.segment is None else f"{plain} vlan {self.segment}"

    def _check_ipv6(self) -> None:
        given = (self.ip6, self.prefixlen6, self.gateway6)
        if all(v is None for v in given):
            return
        if any(v is None for v in given):
            raise LabError(f"lab: port {self.tap}: ip6, prefixlen6 and gateway6 go together")
        network6 = self.network6
        assert network6 is not None and self.gateway6 is not None
        gateway6 = _ipv6(self.gateway6, f"port {self.tap} gateway6")
        if gateway6 not in network6 or gateway6 == self.address6:
            raise LabError(
                f"lab: port {self.tap}: gateway6 {self.gateway6} not usable in {network6}")

    @property
    def address(self) -> ipaddress.IPv4Address:
        """The port's address (raises LabError if malformed)."""
        return _ipv4(self.ip, f"port {self.tap} ip")

    @property
    def network(self) -> ipaddress.IPv4Network:
        """The port's network, ``ip/prefixlen`` with host bits cleared."""
        if not isinstance(self.prefixlen, int) or not 1 <= self.prefixlen <= 31:
            raise LabError(f"lab: port {self.tap}: prefixlen {self.prefixlen!r} not in 1..31")
        return ipaddress.IPv4Interface(f"{self.address}/{self.prefixlen}").network

    @property
    def address6(self) -> ipaddress.IPv6Address | None:
        """The port's IPv6 address, if it has one (raises LabError if malformed)."""
        return None if self.ip6 is None else _ipv6(self.ip6, f"port {self.tap} ip6")

    @property
    def network6(self) -> ipaddress.IPv6Network | None:
        """The port's IPv6 network, ``ip6/prefixlen6`` with host bits cleared."""
        address = self.address6
        if address is None:
            return None
        if not isinstance(self.prefixlen6, int) or not 1 <= self.prefixlen6 <= 127:
            raise LabError(f"lab: port {self.tap}: prefixlen6 {self.prefixlen6!r} not in 1..127")
        return ipaddress.IPv6Interface(f"{address}/{self.prefixlen6}").network

    def spec(self) -> dict[str, Any]:
        """What the topology depends on (not ``name``), as recorded in the state file."""
        spec: dict[str, Any] = {
            "mac": self.mac.lower(),
            "ip": self.ip,
            "prefixlen": self.prefixlen,
            "gateway": self.gateway,
        }
        if self.ip6 is not None:
            spec |= {"ip6": self.ip6, "prefixlen6": self.prefixlen6, "gateway6": self.gateway6}
        if self.segment is not None:
            spec["segment"] = self.segment
        return spec


def bridge_name(network: str) -> str:
    """The host-namespace bridge of an IPv4 network (``10.0.0.0/24``), bridged topology:
    ``sfwbr`` + 8 hex digits of its SHA-256 (13 characters)."""
    return BRIDGE_PREFIX + _network_hash(network)


def router_leg_names(network: str) -> tuple[str, str]:
    """The veth between an IPv4 network's bridge and the router, bridged topology:
    (host-side end, a port of the bridge: ``sfwrl<n>``; router-side end, carrying the
    gateway addresses: ``sfwgw<n>``)."""
    digest = _network_hash(network)
    return LEG_PREFIX + digest, ROUTER_LEG_PREFIX + digest


def _network_hash(network: str) -> str:
    """8 hex digits of the SHA-256 of a network key (:attr:`LabPort.network_key`)."""
    cidr, _, segment = network.partition(" vlan ")
    try:
        canonical = str(ipaddress.IPv4Network(cidr))
        if segment:
            canonical += f" vlan {int(segment)}"
    except (ValueError, TypeError) as exc:
        raise LabError(f"lab: {network!r} is not an IPv4 network") from exc
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class _Network:
    """One instance network of the bridged topology: its bridge, leg and gateways."""

    key: str  # the IPv4 network, e.g. "10.0.0.0/24"
    gateway: str
    prefixlen: int
    gateway6: str | None = None
    prefixlen6: int | None = None

    @property
    def bridge(self) -> str:
        return bridge_name(self.key)

    @property
    def legs(self) -> tuple[str, str]:
        return router_leg_names(self.key)

    def addresses(self) -> set[tuple[int, str, int]]:
        """(family, address, prefixlen) the router-side leg must carry."""
        wanted = {(AF_INET, self.gateway, self.prefixlen)}
        if self.gateway6 is not None and self.prefixlen6 is not None:
            wanted.add((AF_INET6, str(ipaddress.IPv6Address(self.gateway6)), self.prefixlen6))
        return wanted

    @property
    def network6(self) -> ipaddress.IPv6Network | None:
        if self.gateway6 is None:
            return None
        return ipaddress.IPv6Interface(f"{self.gateway6}/{self.prefixlen6}").network


def _ipv4(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except (ValueError, TypeError) as exc:
        raise LabError(f"lab: {what} {text!r} is not an IPv4 address") from exc


def _ipv6(text: str, what: str) -> ipaddress.IPv6Address:
    try:
        return ipaddress.IPv6Address(text)
    except (ValueError, TypeError) as exc:
        raise LabError(f"lab: {what} {text!r} is not an IPv6 address") from exc


# --------------------------------------------------------------------------- namespaces


def netns_exists(name: str) -> bool:
    """Whether a named network namespace (``ip netns`` style) exists."""
    return (NETNS_DIR / name).exists()


def run_in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a fresh thread that has joined namespace ``ns``; return its result.

    Only that thread changes namespace (``setns(2)`` with ``CLONE_NEWNET`` is
    per-thread), and it ends afterwards, so the caller is never left in the wrong
    namespace. Sockets created by ``fn`` stay bound to ``ns`` and may be used from
    any thread. Exceptions raised by ``fn`` propagate; failing to join ``ns`` raises
    LabError.
    """
    outcome: list[Any] = []

    def target() -> None:
        try:
            _join_netns(ns)
            outcome.append((True, fn()))
        except BaseException as exc:  # re-raised in the caller's thread below
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name=f"netns:{ns}", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    result: T = value
    return result


_libc = ctypes.CDLL(None, use_errno=True)


def _join_netns(ns: str) -> None:
    """Move the calling thread into namespace ``ns`` (LabError if it cannot)."""
    if "/" in ns or ns in ("", ".", ".."):  # a name, never a path to some other namespace
        raise LabError(f"lab: invalid network namespace name {ns!r}")
    try:
        fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise LabError(f"lab: network namespace {ns} does not exist") from exc
    except OSError as exc:
        raise LabError(f"lab: cannot open network namespace {ns}: {exc}") from exc
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"lab: cannot enter network namespace {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _write_sysctls(ns: str, values: dict[str, str]) -> None:
    """Write ``/proc/sys/<key>`` = value for each item, inside namespace ``ns``."""

    def write() -> None:
        for key, value in values.items():
            Path("/proc/sys", key).write_text(value)

    run_in_netns(ns, write)


@contextlib.contextmanager
def _netlink(ns: str) -> Iterator[Any]:
    """An rtnetlink socket (pyroute2 ``IPRoute``) inside the existing namespace ``ns``."""
    ipr = IPRoute(netns=ns, flags=0)  # flags=0: fail rather than create the namespace
    try:
        yield ipr
    finally:
        ipr.close()


@contextlib.contextmanager
def _lab_errors(action: str) -> Iterator[None]:
    """Translate OS and netlink failures into one-line LabErrors naming ``action``."""
    try:
        yield
    except LabError:
        raise
    except (OSError, NetlinkError) as exc:
        raise LabError(f"lab: {action}: {exc}") from exc


def _link_index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _delete_link(ipr: Any, ifname: str) -> None:
    """Delete ``ifname`` if present; deleting one veth end destroys its peer too."""
    index = _link_index(ipr, ifname)
    if index is not None:
        ipr.link("del", index=index)


def _up(ipr: Any, ifname: str) -> int:
    index = _link_index(ipr, ifname)
    if index is None:
        raise LabError(f"lab: interface {ifname} vanished while configuring it")
    ipr.link("set", index=index, state="up")
    return index


# --------------------------------------------------------------------------- state file


@dataclass
class _State:
    """What the lab created, in creation order; persisted as JSON."""

    host: str
    namespaces: list[str] = field(default_factory=list)
    links: list[list[str]] = field(default_factory=list)  # [namespace, ifname]
    ports: dict[str, dict[str, Any]] = field(default_factory=dict)  # tap -> spec
    topology: str = "routed"
    networks: list[str] = field(default_factory=list)  # bridged: IPv4 networks with a bridge
    gateway_on_bridge: bool = False  # bridged: the host routes, gateways on the bridges

    def to_json(self) -> str:
        return json.dumps({"version": _STATE_VERSION, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> _State:
        data = json.loads(text)
        if data.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown state version {data.get('version')!r}")
        if data.get("topology", "routed") not in TOPOLOGIES:
            raise ValueError(f"unknown topology {data.get('topology')!r}")
        return cls(
            host=str(data["host"]),
            namespaces=[str(n) for n in data["namespaces"]],
            links=[[str(ns), str(ifname)] for ns, ifname in data["links"]],
            ports={str(tap): dict(spec) for tap, spec in data["ports"].items()},
            topology=str(data.get("topology", "routed")),
            networks=[str(n) for n in data.get("networks", [])],
            gateway_on_bridge=bool(data.get("gateway_on_bridge", False)),
        )


# --------------------------------------------------------------------------- the lab


class Lab:
    """The namespace lab of one compute host.

    Contract: :meth:`up` makes the topology match a list of ports (creating what is
    missing, rebuilding ports whose address or MAC changed, removing ports no longer
    listed; bridged: creating and removing the bridges and router legs of networks
    as they appear and disappear); :meth:`down` removes everything recorded in the
    state file and nothing else. ``topology`` is ``"routed"`` (default) or
    ``"bridged"``; ``gateway_on_bridge`` (bridged only) puts the gateways on the
    host's bridges instead of a router namespace (see the module docstring); a lab
    keeps the layout it was built with until it is brought down. Calls for the same
    ``state_dir`` are serialised with ``flock``. Every failure is a
    :class:`LabError` with a one-line message.
    """

    external_addresses: tuple[str, ...] = tuple(n.external_ip for n in EXTERNAL_NETWORKS)
    external_address6: str = EXTERNAL_NETWORK6.external_ip

    def __init__(self, host: str, state_dir: Path, topology: str = "routed",
                 gateway_on_bridge: bool = False) -> None:
        if not host:
            raise LabError("lab: the host name must not be empty")
        if topology not in TOPOLOGIES:
            raise LabError(
                f"lab: unknown topology {topology!r} (known: {', '.join(TOPOLOGIES)})")
        if gateway_on_bridge and topology != "bridged":
            raise LabError("lab: the gateway can only be on the bridge in the bridged topology")
        self.host = host
        self.state_dir = Path(state_dir)
        self.topology: Topology = topology
        self.gateway_on_bridge = gateway_on_bridge
        self._hash = hashlib.sha256(host.encode()).hexdigest()[:8]

    # ---- names

    @property
    def host_ns(self) -> str:
        """The host namespace: ``sfw-h-<8 hex digits of sha256(host)>``."""
        return f"{NS_PREFIX}h-{self._hash}"

    @property
    def external_ns(self) -> str:
        """The external namespace, routed through the host namespace (routed, and
        bridged with the gateway on the bridge) or the router namespace (bridged)."""
        return f"{NS_PREFIX}x-{self._hash}"

    @property
    def router_ns(self) -> str:
        """The router namespace of the bridged topology: ``sfw-r-<h>`` (the routed
        topology and the gateway-on-bridge layout have none; the name is the same
        either way)."""
        return f"{NS_PREFIX}r-{self._hash}"

    def instance_ns(self, tap: str) -> str:
        """The namespace of the instance behind ``tap`` (deterministic)."""
        if not _TAP_RE.fullmatch(tap):
            raise LabError(f"lab: invalid tap name {tap!r}")
        return f"{NS_PREFIX}i-{self._hash}-{tap[3:]}"

    @property
    def state_file(self) -> Path:
        """The JSON record of what this lab created."""
        return self.state_dir / f"lab-{self._hash}.json"

    def exists(self) -> bool:
        """Whether the lab has been brought up and not brought down."""
        return self.state_file.exists()

    def taps(self) -> list[str]:
        """The taps of the ports the lab currently has (from the state file)."""
        state = self._load()
        return sorted(state.ports) if state else []

    def networks(self) -> list[str]:
        """Bridged: the IPv4 networks that have a bridge and a router leg (from the
        state file); routed: always empty."""
        state = self._load()
        return sorted(state.networks) if state else []

    # ---- up / down

    def up(self, ports: Sequence[LabPort]) -> None:
        """Make the lab contain exactly ``ports`` (idempotent; this is also ``lab sync``)."""
        desired = _check_ports(ports)
        networks = _check_networks(desired.values()) if self.topology == "bridged" else {}
        with self._locked():
            state = self._load()
            if state is None:
                state = _State(host=self.host, topology=self.topology,
                               gateway_on_bridge=self.gateway_on_bridge)
            elif (state.topology, state.gateway_on_bridge) != self.layout:
                raise LabError(
                    f"lab: the lab of host {self.host!r} was built with the "
                    f"{_layout_name(state.topology, state.gateway_on_bridge)}, not the "
                    f"{_layout_name(*self.layout)}; run `secfw lab down --host "
                    f"{self.host!r}` first"
                )
            if self.topology == "bridged":
                self._up_bridged(state, desired, networks)
                return
            self._ensure_host(state)
            with _lab_errors(f"opening {self.host_ns}"), _netlink(self.host_ns) as host:
                for tap in [t for t in state.ports if t not in desired]:
                    self._remove_instance(state, host, tap)
                for port in desired.values():
                    self._ensure_instance(state, host, port)
                with _lab_errors("configuring gateway addresses"):
                    _sync_gateways(host, desired.values())

    @property
    def layout(self) -> tuple[str, bool]:
        """(topology, gateway on the bridge): what a lab keeps until it is brought down."""
        return self.topology, self.gateway_on_bridge

    def _up_bridged(
        self, state: _State, desired: dict[str, LabPort], networks: dict[str, _Network]
    ) -> None:
        """:meth:`up` for the bridged topology: host, router and external namespaces,
        then ports gone, networks gone, networks, ports — in that order, so a bridge
        is only removed once its taps are, and exists before its taps are enslaved."""
        self._ensure_bridged_base(state)
        router_ns = self.host_ns if self.gateway_on_bridge else self.router_ns
        with (
            _lab_errors(f"opening {self.host_ns} and {router_ns}"),
            _netlink(self.host_ns) as host,
            _netlink(router_ns) as router,
        ):
            before = {tap: dict(spec) for tap, spec in state.ports.items()}
            for tap in [t for t in state.ports if t not in desired]:
                self._remove_instance(state, host, tap)
            for key in [k for k in state.networks if k not in networks]:
                self._remove_network(state, host, key)
            for network in networks.values():
                self._ensure_network(state, host, router, network)
            for port in desired.values():
                self._ensure_instance(state, host, port)
            moved = {address for tap, spec in before.items() if state.ports.get(tap) != spec
                     for address in (spec.get("ip"), spec.get("ip6")) if address}
            if moved:
                self._forget_neighbours(router, desired.values(), moved)
            if not self.gateway_on_bridge:
                self._sync_floating(host, router, desired.values(), networks)

    def _sync_floating(self, host: Any, router: Any, ports: Iterable[LabPort],
                       networks: dict[str, _Network]) -> None:
        """Bridged (router namespace): the floating IPs reach the host's bridge.

        The router — the external side's gateway — routes each floating address
        onto the leg of its port's network, to the port's MAC (a /32 route and a
        permanent neighbour entry: the upstream's view of where the address
        lives). The host DNATs it in br_netfilter's IP prerouting hook; when the
        destination changed, br_netfilter looks the new one up in the host's
        routing table and bridges the frame only if the route leads back out of
        the same bridge (br_nf_pre_routing_finish, net/bridge/br_netfilter_hooks.c),
        so the host namespace gets forwarding, a route to each such network via
        its bridge and a neighbour entry per NATed port (it has no address to
        resolve one with). A port with a floating IP gets ``hairpin_mode`` on its
        bridge port, as nova-network set it: its packets to its own floating
        address come back DNATed through the port they came in by, which a bridge
        otherwise never sends a frame out of (flooded frames come back too: the
        lab's IPv6 addresses are ``nodad``). Routes to addresses no longer floating
        are removed."""
        wanted = {f: p for p in ports for f in p.floating}
        with _lab_errors("routing floating IPs"):
            if wanted:
                _write_sysctls(self.host_ns, {"net/ipv4/ip_forward": "1"})
            for port in ports:
                host.brport("set", index=_link_index(host, port.tap),
                            mode=1 if port.floating else 0)
            for port in {p.tap: p for p in wanted.values()}.values():
                bridge = _link_index(host, bridge_name(port.network_key))
                host.route("replace", dst=str(port.network), oif=bridge, scope=_SCOPE_LINK)
                host.neigh("replace", dst=port.ip, lladdr=port.mac.lower(), ifindex=bridge,
                           state="permanent")
            legs = {_link_index(router, n.legs[1]): n for n in networks.values()}
            present = {str(r.get_attr("RTA_DST")): r.get_attr("RTA_OIF")
                       for r in router.route("dump", family=AF_INET, table=_MAIN_TABLE)
                       if r["dst_len"] == 32 and r["type"] == _RTN_UNICAST
                       and r.get_attr("RTA_OIF") in legs}
            gone = {a for a in present if a not in wanted}
            for address in gone:
                router.route("del", dst=f"{address}/32", oif=present[address],
                             scope=_SCOPE_LINK)
            _delete_neighbours(router, gone)
            for address, port in wanted.items():
                leg = _link_index(router, networks[port.network_key].legs[1])
                router.route("replace", dst=f"{address}/32", oif=leg, scope=_SCOPE_LINK)
                router.neigh("replace", dst=address, lladdr=port.mac.lower(), ifindex=leg,
                             state="permanent")

    def _forget_neighbours(self, router: Any, ports: Iterable[LabPort],
                           addresses: set[str]) -> None:
        """Bridged topology: an address whose port went or was rebuilt (another MAC)
        must not linger in the neighbour caches of the router and the other
        instances — on a real network the new owner announces itself; here they
        would keep sending to the old MAC for up to a minute."""
        with _lab_errors("forgetting neighbours of rebuilt ports"):
            _delete_neighbours(router, addresses)
            for port in ports:
                with _netlink(self.instance_ns(port.tap)) as inst:
                    _delete_neighbours(inst, addresses)

    def wire_metadata(self, address: str, ports: Sequence[LabPort]) -> None:
        """The host side of a metadata server listening on ``address`` in the host
        namespace (``secfw metadata serve``; idempotent, call after :meth:`up`).

        ``address`` goes on the host namespace's ``lo``. A routed host already has
        a route and a permanent neighbour entry per tap; a bridged host that only
        bridges gets the same per port, through its network's bridge, so that the
        server's replies reach the instances (the redirected requests arrive by
        br_netfilter's DNAT-to-local path). A port of an overlapping network
        (``segment``) gets its route in the routing table of its segment's
        reply mark too, with a policy rule ``fwmark M lookup M`` (M =
        :func:`~secfw.compiler.metadata.route_mark` of the VLAN): the agent marks
        the server's replies to it with M (docs/nftables.md, "Metadata redirect"),
        since by destination address alone the host could not tell two such
        ports apart on the way back."""
        with _lab_errors("wire the metadata server"), _netlink(self.host_ns) as host:
            lo = _up(host, "lo")
            present = {str(a.get("IFA_ADDRESS")) for a in host.addr("dump", index=lo,
                                                                   family=AF_INET)}
            if address not in present:
                host.addr("add", index=lo, address=address, prefixlen=32, family=AF_INET)
            if self.topology != "bridged" or self.gateway_on_bridge:
                return
            for port in ports:
                index = _up(host, bridge_name(port.network_key))
                host.route("replace", dst=f"{port.ip}/32", oif=index, scope=SCOPE_LINK)
                host.neigh("replace", dst=port.ip, lladdr=port.mac.lower(), ifindex=index,
                           state="permanent")
                if port.segment is not None:
                    _route_segment(host, route_mark(port.segment), port.ip, index)

    def down(self) -> None:
        """Remove every namespace and link recorded in the state file; no-op if none."""
        with self._locked():
            state = self._load()
            if state is None:
                return
            with _lab_errors(f"removing lab {self.host_ns}"):
                self._delete_recorded_links(state)
                for name in reversed(state.namespaces):
                    if netns_exists(name):
                        netns.remove(name)
                self.state_file.unlink()

    # ---- host and external namespaces

    def _ensure_host(self, state: _State) -> None:
        """Create/repair the host namespace, its sysctls, gateway link and external side."""
        self._ensure_ns(state, self.host_ns)
        # Defaults before any interface is created, so interfaces inherit them.
        with _lab_errors(f"setting sysctls in {self.host_ns}"):
            _write_sysctls(self.host_ns, _HOST_SYSCTLS)
        with _lab_errors(f"configuring {self.host_ns}"), _netlink(self.host_ns) as host:
            _up(host, "lo")
            if _link_index(host, GW_LINK) is None:
                self._record_links(state, [GW_LINK])
                host.link("add", ifname=GW_LINK, kind="veth", peer={"ifname": GW_PEER})
            _up(host, GW_PEER)
            _up(host, GW_LINK)
            self._ensure_external(state, host, self.host_ns)

    def _ensure_bridged_base(self, state: _State) -> None:
        """Bridged: create/repair the host namespace (bridges only), the router
        namespace with its sysctls, and the external side behind the router — or,
        with the gateway on the bridge, the routing host namespace and the external
        side behind it."""
        if self.gateway_on_bridge:
            self._ensure_gateway_host(state)
            return
        self._ensure_ns(state, self.host_ns)
        self._ensure_ns(state, self.router_ns)
        # Defaults before any interface is created, so interfaces inherit them.
        with _lab_errors(f"setting sysctls in {self.host_ns} and {self.router_ns}"):
            _write_sysctls(self.host_ns, _BRIDGE_HOST_SYSCTLS)
            _write_sysctls(self.router_ns, _ROUTER_SYSCTLS)
        with _lab_errors(f"configuring {self.host_ns}"), _netlink(self.host_ns) as host:
            _up(host, "lo")
        with _lab_errors(f"configuring {self.router_ns}"), _netlink(self.router_ns) as router:
            _up(router, "lo")
            self._ensure_external(state, router, self.router_ns)

    def _ensure_gateway_host(self, state: _State) -> None:
        """Gateway on the bridge: create/repair the host namespace, which both bridges
        and routes, and the external side behind it."""
        self._ensure_ns(state, self.host_ns)
        # Defaults before any interface is created, so interfaces inherit them.
        with _lab_errors(f"setting sysctls in {self.host_ns}"):
            _write_sysctls(self.host_ns, _GATEWAY_HOST_SYSCTLS)
        with _lab_errors(f"configuring {self.host_ns}"), _netlink(self.host_ns) as host:
            _up(host, "lo")
            self._ensure_external(state, host, self.host_ns)

    def _ensure_external(self, state: _State, host: Any, host_ns: str) -> None:
        """Create/repair the external namespace and its veth to ``host`` (the socket of
        ``host_ns``: the host namespace when routed, the router namespace when bridged)."""
        created = self._ensure_ns(state, self.external_ns)
        _write_sysctls(self.external_ns, _NO_DAD)
        with _netlink(self.external_ns) as ext:
            if (
                created
                or _link_index(host, EXT_LINK) is None
                or (_link_index(ext, INSTANCE_IFNAME) is None)
            ):
                self._record_links(state, [EXT_LINK], host_ns)
                _delete_link(host, EXT_LINK)
                peer = {"ifname": INSTANCE_IFNAME, "net_ns_fd": self.external_ns}
                host.link("add", ifname=EXT_LINK, kind="veth", peer=peer)
            host_index, ext_index = _up(host, EXT_LINK), _up(ext, INSTANCE_IFNAME)
            _up(ext, "lo")
            for net in EXTERNAL_NETWORKS:
                host.addr("replace", index=host_index, address=net.host_ip, prefixlen=net.prefixlen)
                ext.addr(
                    "replace", index=ext_index, address=net.external_ip, prefixlen=net.prefixlen
                )
            ext.route("replace", dst="0.0.0.0/0", gateway=EXTERNAL_NETWORKS[0].host_ip)
            net6 = EXTERNAL_NETWORK6
            for ipr, index, address in ((host, host_index, net6.host_ip),
                                        (ext, ext_index, net6.external_ip)):
                ipr.addr("replace", index=index, address=address, prefixlen=net6.prefixlen,
                         family=AF_INET6, flags=IFA_F_NODAD)
            ext.route("replace", dst="::/0", gateway=net6.host_ip, family=AF_INET6)

    # ---- bridged networks

    def _ensure_network(self, state: _State, host: Any, router: Any, network: _Network) -> None:
        """Create/repair a network's bridge (host namespace) and its veth leg to the
        router, and make the router-side end carry exactly the network's gateways —
        or, with the gateway on the bridge, the bridge itself."""
        bridge, (leg, router_leg) = network.bridge, network.legs
        with _lab_errors(f"network {network.key} ({bridge})"):
            new = network.key not in state.networks
            if new:
                state.networks.append(network.key)  # saved by _record_links
            links = [bridge] if self.gateway_on_bridge else [bridge, leg]
            self._record_links(state, links, force_save=new)
            if _link_index(host, bridge) is None:
                host.link("add", ifname=bridge, kind="bridge", **_BRIDGE_OPTIONS)
            else:  # re-asserted: a sync repairs settings changed behind the lab's back
                host.link("set", index=_link_index(host, bridge), kind="bridge",
                          **_BRIDGE_OPTIONS)
            bridge_index = _up(host, bridge)
            if self.gateway_on_bridge:
                _sync_leg_addresses(host, bridge_index, network.addresses())
                # The kernel sends no neighbour solicitation from an interface
                # without a link-local address (ndisc_send_ns), so it could not
                # route IPv6 into the bridge without one.
                host.addr("replace", index=bridge_index, address=BRIDGE_LINK_LOCAL,
                          prefixlen=64, family=AF_INET6, flags=IFA_F_NODAD)
                return
            if _link_index(host, leg) is None or _link_index(router, router_leg) is None:
                _delete_link(host, leg)  # a leftover end whose peer went with its namespace
                _delete_link(router, router_leg)
                peer = {"ifname": router_leg, "net_ns_fd": self.router_ns}
                host.link("add", ifname=leg, kind="veth", peer=peer)
            _enslave(host, leg, bridge_index)
            _sync_leg_addresses(router, _up(router, router_leg), network.addresses())

    def _remove_network(self, state: _State, host: Any, key: str) -> None:
        """Remove a recorded network's leg (both ends) and bridge."""
        bridge, (leg, _) = bridge_name(key), router_leg_names(key)
        with _lab_errors(f"removing network {key} ({bridge})"):
            for ifname in (leg, bridge):
                link = [self.host_ns, ifname]
                if link in state.links:
                    _delete_link(host, ifname)
                    state.links.remove(link)
            state.networks.remove(key)
            self._save(state)

    # ---- instances

    def _ensure_instance(self, state: _State, host: Any, port: LabPort) -> None:
        """Build the instance behind ``port`` unless it exists with the same spec."""
        ns = self.instance_ns(port.tap)
        with _lab_errors(f"port {port.tap} ({ns})"):
            intact = (
                state.ports.get(port.tap) == port.spec()
                and netns_exists(ns)
                and _link_index(host, port.tap) is not None
            )
            if not intact:
                self._remove_instance(state, host, port.tap)
                self._build_instance(state, host, port)
            # Re-asserted every time (idempotent), so a sync repairs host-side drift.
            if self.topology == "bridged":
                _enslave(host, port.tap, _up(host, bridge_name(port.network_key)))
            else:
                _wire_host_side(self.host_ns, host, port)
            if not intact:
                state.ports[port.tap] = port.spec()  # only now is the port complete
                self._save(state)

    def _build_instance(self, state: _State, host: Any, port: LabPort) -> None:
        """Create the instance namespace and the tap ↔ eth0 veth, configure eth0."""
        ns = self.instance_ns(port.tap)
        self._record_links(state, [port.tap])
        self._ensure_ns(state, ns)
        _delete_link(host, port.tap)  # a leftover end whose peer namespace was deleted
        peer = {"ifname": INSTANCE_IFNAME, "address": port.mac.lower(), "net_ns_fd": ns}
        host.link("add", ifname=port.tap, kind="veth", peer=peer)
        with _netlink(ns) as inst:
            _up(inst, "lo")
            index = _up(inst, INSTANCE_IFNAME)
            inst.addr("replace", index=index, address=port.ip, prefixlen=port.prefixlen)
            inst.route("replace", dst="0.0.0.0/0", gateway=port.gateway, oif=index)
            if port.ip6 is not None:
                if self.topology == "bridged":
                    _configure_ipv6_on_link(inst, index, port)
                else:
                    _configure_ipv6(inst, index, port)

    def _remove_instance(self, state: _State, host: Any, tap: str) -> None:
        """Remove the tap and namespace of ``tap`` if the lab recorded them."""
        ns, link = self.instance_ns(tap), [self.host_ns, tap]
        if link not in state.links and ns not in state.namespaces:
            return
        with _lab_errors(f"removing port {tap} ({ns})"):
            if link in state.links:
                _delete_link(host, tap)
                state.links.remove(link)
            if ns in state.namespaces:
                if netns_exists(ns):
                    netns.remove(ns)
                state.namespaces.remove(ns)
            state.ports.pop(tap, None)
            self._save(state)

    # ---- bookkeeping

    def _ensure_ns(self, state: _State, name: str) -> bool:
        """Create namespace ``name`` (recorded first); True if it had to be created.

        A namespace that exists but is not recorded belongs to someone else (or to a
        lab whose state file was lost): refuse rather than adopt it.
        """
        if name not in state.namespaces:
            if netns_exists(name):
                raise LabError(
                    f"lab: network namespace {name} exists but is not recorded in "
                    f"{self.state_file}; remove it (ip netns delete {name}) or restore the file"
                )
            state.namespaces.append(name)
            self._save(state)
        if netns_exists(name):
            return False
        with _lab_errors(f"creating network namespace {name}"):
            netns.create(name)
        return True

    def _record_links(
        self, state: _State, ifnames: list[str], ns: str | None = None, force_save: bool = False
    ) -> None:
        """Record links of ``ns`` (default: the host namespace) before creating them,
        so down() finds them. Saves if anything is new (or ``force_save``)."""
        ns = ns or self.host_ns
        new = [[ns, n] for n in ifnames if [ns, n] not in state.links]
        if new or force_save:
            state.links.extend(new)
            self._save(state)

    def _delete_recorded_links(self, state: _State) -> None:
        """Delete recorded links first: veths then go at once, not when netns cleanup runs.

        Only in recorded namespaces that still exist; in recording order (taps, then
        bridges and legs, in the host namespace; then the router's external link).
        """
        by_ns: dict[str, list[str]] = {}
        for ns, ifname in state.links:
            by_ns.setdefault(ns, []).append(ifname)
        for ns, ifnames in by_ns.items():
            if ns not in state.namespaces or not netns_exists(ns):
                continue
            with _netlink(ns) as ipr:
                for ifname in ifnames:
                    _delete_link(ipr, ifname)

    def _load(self) -> _State | None:
        """The recorded state, or None if the lab does not exist."""
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LabError(f"lab: cannot read {self.state_file}: {exc}") from exc
        try:
            state = _State.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise LabError(f"lab: corrupt state file {self.state_file}: {exc}") from exc
        if state.host != self.host:
            raise LabError(f"lab: {self.state_file} belongs to host {state.host!r}")
        return state

    def _save(self, state: _State) -> None:
        """Write the state atomically (temporary file + rename)."""
        tmp = self.state_file.with_suffix(".tmp")
        with _lab_errors(f"writing {self.state_file}"):
            tmp.write_text(state.to_json())
            os.replace(tmp, self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive flock on the state directory (serialises lab commands)."""
        with _lab_errors(f"locking {self.state_dir}"):
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _layout_name(topology: str, gateway_on_bridge: bool) -> str:
    """``routed topology``, ``bridged topology``, ``bridged topology with the
    gateway on the bridge``."""
    return f"{topology} topology" + (" with the gateway on the bridge" if gateway_on_bridge
                                     else "")


def _configure_ipv6(inst: Any, index: int, port: LabPort) -> None:
    """The instance's IPv6: address ``nodad noprefixroute``, gateway6 on-link, default
    route through it (see the module docstring)."""
    flags = IFA_F_NODAD | IFA_F_NOPREFIXROUTE
    inst.addr("replace", index=index, address=port.ip6, prefixlen=port.prefixlen6,
              family=AF_INET6, flags=flags)
    inst.route("replace", dst=f"{port.gateway6}/128", oif=index, family=AF_INET6)
    inst.route("replace", dst="::/0", gateway=port.gateway6, oif=index, family=AF_INET6)


def _configure_ipv6_on_link(inst: Any, index: int, port: LabPort) -> None:
    """Bridged: the instance's IPv6 address ``nodad`` with its prefix route (peers of
    the subnet are on the link), default route via ``gateway6``."""
    inst.addr("replace", index=index, address=port.ip6, prefixlen=port.prefixlen6,
              family=AF_INET6, flags=IFA_F_NODAD)
    inst.route("replace", dst="::/0", gateway=port.gateway6, oif=index, family=AF_INET6)


def _delete_neighbours(ipr: Any, addresses: set[str]) -> None:
    """Delete the neighbour entries (any interface, any state) for ``addresses``."""
    for family in (AF_INET, AF_INET6):
        for entry in ipr.neigh("dump", family=family):
            if entry.get_attr("NDA_DST") in addresses:
                with contextlib.suppress(NetlinkError):
                    ipr.neigh("del", dst=entry.get_attr("NDA_DST"), ifindex=entry["ifindex"],
                              family=family)


def _enslave(host: Any, ifname: str, bridge_index: int) -> None:
    """Make ``ifname`` an up port of the bridge ``bridge_index`` (idempotent)."""
    index = _link_index(host, ifname)
    if index is None:
        raise LabError(f"lab: interface {ifname} vanished while configuring it")
    host.link("set", index=index, master=bridge_index)
    _up(host, ifname)


def _sync_leg_addresses(router: Any, index: int, wanted: set[tuple[int, str, int]]) -> None:
    """Make a router leg (or a bridge holding the gateways) carry exactly ``wanted``
    (family, address, prefixlen), apart from its IPv6 link-local address; IPv6 ones
    ``nodad``."""
    present: set[tuple[int, str, int]] = set()
    for family in (AF_INET, AF_INET6):
        for msg in router.addr("dump", index=index, family=family):
            address = msg.get("IFA_ADDRESS")
            if address and not str(address).startswith("fe80:"):
                present.add((family, str(address), int(msg["prefixlen"])))
    for family, address, length in sorted(present - wanted):
        router.addr("del", index=index, address=address, prefixlen=length, family=family)
    for family, address, length in sorted(wanted - present):
        router.addr("add", index=index, address=address, prefixlen=length, family=family,
                    **({"flags": IFA_F_NODAD} if family == AF_INET6 else {}))


def _wire_host_side(host_ns: str, host: Any, port: LabPort) -> None:
    """Route, neighbour and sysctls for ``port`` on its tap (idempotent)."""
    index = _up(host, port.tap)
    sysctls = {
        f"net/ipv4/conf/{port.tap}/proxy_arp": "1",
        f"net/ipv4/conf/{port.tap}/rp_filter": "0",
        f"net/ipv4/neigh/{port.tap}/proxy_delay": "0",
    }
    if port.ip6 is not None:  # proxy_delay: as for ARP, proxied answers wait up to 0.8 s
        sysctls[f"net/ipv6/conf/{port.tap}/proxy_ndp"] = "1"
        sysctls[f"net/ipv6/neigh/{port.tap}/proxy_delay"] = "0"
    _write_sysctls(host_ns, sysctls)
    host.route("replace", dst=f"{port.ip}/32", oif=index, scope=SCOPE_LINK)
    host.neigh("replace", dst=port.ip, lladdr=port.mac.lower(), ifindex=index, state="permanent")
    if port.ip6 is not None:
        host.route("replace", dst=f"{port.ip6}/128", oif=index, family=AF_INET6)
        host.neigh("replace", dst=port.ip6, lladdr=port.mac.lower(), ifindex=index,
                   state="permanent", family=AF_INET6)
        host.neigh("replace", dst=port.gateway6, ifindex=index, flags=NTF_PROXY,
                   family=AF_INET6)


def _sync_gateways(host: Any, ports: Iterable[LabPort]) -> None:
    """Make sfw-gw carry exactly the gateway addresses of ``ports`` (as /32 or /128)."""
    index = _up(host, GW_LINK)
    for family, length, wanted in (
        (AF_INET, 32, {p.gateway for p in ports}),
        (AF_INET6, 128, {p.gateway6 for p in ports if p.gateway6 is not None}),
    ):
        present = {a.get("IFA_ADDRESS") for a in host.addr("dump", index=index, family=family)
                   if a.get("IFA_ADDRESS") and not str(a.get("IFA_ADDRESS")).startswith("fe80:")}
        for address in sorted(wanted - present):
            host.addr("add", index=index, address=address, prefixlen=length, family=family,
                      **({"flags": IFA_F_NODAD} if family == AF_INET6 else {}))
        for address in sorted(present - wanted):
            host.addr("del", index=index, address=address, prefixlen=length, family=family)


def _route_segment(host: Any, mark: int, address: str, index: int) -> None:
    """``address`` through link ``index`` in routing table ``mark``, and the rule
    that sends packets marked ``mark`` there (ip-rule(8): ``fwmark``; a table
    number is any 32-bit value but 0 and the reserved 253-255)."""
    host.route("replace", dst=f"{address}/32", oif=index, scope=SCOPE_LINK, table=mark)
    present = {(r.get("FRA_FWMARK"), r.get("FRA_TABLE")) for r in host.rule("dump")}
    if (mark, mark) not in present:
        host.rule("add", table=mark, fwmark=mark, fwmask=0xFFFFFFFF, priority=100)


def _check_ports(ports: Sequence[LabPort]) -> dict[str, LabPort]:
    """Ports by tap; LabError on duplicates or clashes with lab addresses."""
    by_tap: dict[str, LabPort] = {}
    owner: dict[str, str] = {}  # address or MAC -> tap that uses it
    gateways = {p.gateway for p in ports} | {p.gateway6 for p in ports if p.gateway6}
    for port in ports:
        if port.tap in by_tap:
            raise LabError(f"lab: tap {port.tap} listed twice")
        by_tap[port.tap] = port
        # one address may be in two overlapping networks: its owner is per segment
        addresses = [f"{a} in {port.segment}" if port.segment else a
                     for a in [port.ip] + ([str(port.address6)] if port.ip6 else [])]
        for key in (*addresses, port.mac.lower()):
            if key in owner:
                raise LabError(f"lab: {key} used by both {owner[key]} and {port.tap}")
            owner[key] = port.tap
        for address in (port.ip, *([str(port.address6)] if port.ip6 else [])):
            if address in gateways:
                raise LabError(f"lab: port {port.tap} address {address} is also a gateway")
        _check_not_external(port)
    return by_tap


def _check_networks(ports: Iterable[LabPort]) -> dict[str, _Network]:
    """Bridged: the networks of ``ports`` by IPv4 network; LabError when ports of a
    network disagree on its gateway or IPv6 network, or networks overlap."""
    networks: dict[str, _Network] = {}
    for port in ports:
        key = port.network_key
        have = networks.setdefault(key, _Network(key, port.gateway, port.prefixlen))
        if have.gateway != port.gateway:
            raise LabError(f"lab: ports of network {key} disagree on the gateway "
                           f"({have.gateway}, {port.gateway} of {port.tap})")
        if port.gateway6 is None or port.prefixlen6 is None:
            continue
        gateway6 = str(ipaddress.IPv6Address(port.gateway6))
        if have.gateway6 is None:
            networks[key] = replace(have, gateway6=gateway6, prefixlen6=port.prefixlen6)
        elif (have.gateway6, have.prefixlen6) != (gateway6, port.prefixlen6):
            raise LabError(
                f"lab: ports of network {key} disagree on the IPv6 gateway ({have.gateway6}/"
                f"{have.prefixlen6}, {gateway6}/{port.prefixlen6} of {port.tap})")
    owner6: dict[ipaddress.IPv6Network, str] = {}  # IPv6 network -> its IPv4 network
    for network in networks.values():
        if network.network6 is not None:
            other = owner6.setdefault(network.network6, network.key)
            if other != network.key:
                raise LabError(f"lab: IPv6 network {network.network6} is on both {other} and "
                               f"{network.key} (each network has its own bridge)")
    _check_disjoint_unless_segmented(list(networks))
    _check_disjoint(list(owner6), "IPv6 networks")
    bridges = {n.bridge for n in networks.values()}
    if len(bridges) != len(networks):  # 8 hex digits of SHA-256: never seen, but checked
        raise LabError("lab: two networks hash to the same bridge name")
    return networks


def _check_disjoint_unless_segmented(keys: Sequence[str]) -> None:
    """LabError if two networks overlap, unless both are segments (VLANs) of their
    own: then each has its own bridge and leg, and the host keeps them apart."""
    for i, first in enumerate(keys):
        for second in keys[i + 1:]:
            a, b = (ipaddress.IPv4Network(k.partition(" vlan ")[0]) for k in (first, second))
            if a.overlaps(b) and not (" vlan " in first and " vlan " in second):
                raise LabError(f"lab: networks {a} and {b} overlap")


def _check_disjoint(
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network], what: str
) -> None:
    """LabError if two of ``networks`` overlap (each would need its own bridge and
    router route for the same addresses)."""
    ordered = sorted(networks, key=lambda n: (int(n.network_address), n.prefixlen))
    for first, second in itertools.pairwise(ordered):
        if first.overlaps(second):
            raise LabError(f"lab: {what} {first} and {second} overlap")


def _check_not_external(port: LabPort) -> None:
    """A port's networks must not overlap the external side's."""
    external = [ipaddress.ip_interface(f"{n.host_ip}/{n.prefixlen}").network
                for n in (*EXTERNAL_NETWORKS, EXTERNAL_NETWORK6)]
    for network in (port.network, port.network6):
        if network is not None and any(
                network.version == net.version and network.overlaps(net) for net in external):
            raise LabError(f"lab: port {port.tap}: {network} overlaps the external networks")
