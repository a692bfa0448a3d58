"""The network-namespace lab: a compute host's instances, materialised on this machine.

``secfw lab up --host H`` builds a routed (Calico-style) topology so that real packets
can exercise the firewall. Everything lives in namespaces the lab creates; the root
namespace is never touched (apart from the ``/run/netns`` entries of those namespaces)::

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

Why each host-side setting exists (see docs/nftables-design.md, "Routed topology"):

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

Implementation choices:

* pyroute2 for every netlink operation (namespaces, veths, addresses, routes,
  neighbours): ``IPRoute(netns=NAME, flags=0)`` opens a socket inside an existing
  namespace (``flags=0``: never create one by accident); ``netns.create/remove`` for
  the namespaces themselves. No ``ip`` subprocess and no shell anywhere.
* sysctls are written through ``/proc/sys`` from a short-lived thread that joined the
  namespace with ``setns(2)`` (:func:`run_in_netns`): ``setns(CLONE_NEWNET)`` affects
  only the calling thread and ``/proc/sys/net`` follows the calling thread's
  namespace, so the caller's own namespace never changes.
* A JSON state file records every namespace and host-side link *before* it is created,
  so :meth:`Lab.down` removes exactly what the lab made, even after a crash half-way
  through :meth:`Lab.up`. A name that exists but is not recorded is never adopted.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from secfw.errors import LabError

__all__ = [
    "EXTERNAL_NETWORK6",
    "EXTERNAL_NETWORKS",
    "NETNS_DIR",
    "NS_PREFIX",
    "ExternalNetwork",
    "Lab",
    "LabPort",
    "netns_exists",
    "run_in_netns",
]

T = TypeVar("T")

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
IFA_F_NODAD, IFA_F_NOPREFIXROUTE = 0x02, 0x200  # linux/if_addr.h

_TAP_RE = re.compile(r"tap[A-Za-z0-9_.-]{1,12}")  # ≤ 15 chars: IFNAMSIZ - 1
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_STATE_VERSION = 1
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

    def __post_init__(self) -> None:
        if not _TAP_RE.fullmatch(self.tap):
            raise LabError(f"lab: invalid tap name {self.tap!r} (tap + 1-12 of [A-Za-z0-9_.-])")
        if not _MAC_RE.fullmatch(self.mac) or int(self.mac[:2], 16) & 1:
            raise LabError(f"lab: port {self.tap}: invalid or multicast MAC {self.mac!r}")
        network = self.network
        gateway = _ipv4(self.gateway, f"port {self.tap} gateway")
        if gateway not in network or gateway == self.address:
            raise LabError(f"lab: port {self.tap}: gateway {self.gateway} not usable in {network}")
        self._check_ipv6()

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
        return spec


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

    def to_json(self) -> str:
        return json.dumps({"version": _STATE_VERSION, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> _State:
        data = json.loads(text)
        if data.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown state version {data.get('version')!r}")
        return cls(
            host=str(data["host"]),
            namespaces=[str(n) for n in data["namespaces"]],
            links=[[str(ns), str(ifname)] for ns, ifname in data["links"]],
            ports={str(tap): dict(spec) for tap, spec in data["ports"].items()},
        )


# --------------------------------------------------------------------------- the lab


class Lab:
    """The namespace lab of one compute host.

    Contract: :meth:`up` makes the topology match a list of ports (creating what is
    missing, rebuilding ports whose address or MAC changed, removing ports no longer
    listed); :meth:`down` removes everything recorded in the state file and nothing
    else. Calls for the same ``state_dir`` are serialised with ``flock``. Every
    failure is a :class:`LabError` with a one-line message.
    """

    external_addresses: tuple[str, ...] = tuple(n.external_ip for n in EXTERNAL_NETWORKS)
    external_address6: str = EXTERNAL_NETWORK6.external_ip

    def __init__(self, host: str, state_dir: Path) -> None:
        if not host:
            raise LabError("lab: the host name must not be empty")
        self.host = host
        self.state_dir = Path(state_dir)
        self._hash = hashlib.sha256(host.encode()).hexdigest()[:8]

    # ---- names

    @property
    def host_ns(self) -> str:
        """The host namespace: ``sfw-h-<8 hex digits of sha256(host)>``."""
        return f"{NS_PREFIX}h-{self._hash}"

    @property
    def external_ns(self) -> str:
        """The external namespace, routed through the host namespace."""
        return f"{NS_PREFIX}x-{self._hash}"

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

    # ---- up / down

    def up(self, ports: Sequence[LabPort]) -> None:
        """Make the lab contain exactly ``ports`` (idempotent; this is also ``lab sync``)."""
        desired = _check_ports(ports)
        with self._locked():
            state = self._load() or _State(host=self.host)
            self._ensure_host(state)
            with _lab_errors(f"opening {self.host_ns}"), _netlink(self.host_ns) as host:
                for tap in [t for t in state.ports if t not in desired]:
                    self._remove_instance(state, host, tap)
                for port in desired.values():
                    self._ensure_instance(state, host, port)
                with _lab_errors("configuring gateway addresses"):
                    _sync_gateways(host, desired.values())

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
            self._ensure_external(state, host)

    def _ensure_external(self, state: _State, host: Any) -> None:
        """Create/repair the external namespace and its veth to the host."""
        created = self._ensure_ns(state, self.external_ns)
        _write_sysctls(self.external_ns, _NO_DAD)
        with _netlink(self.external_ns) as ext:
            if (
                created
                or _link_index(host, EXT_LINK) is None
                or (_link_index(ext, INSTANCE_IFNAME) is None)
            ):
                self._record_links(state, [EXT_LINK])
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

    def _record_links(self, state: _State, ifnames: list[str]) -> None:
        """Record host-namespace links before creating them, so down() finds them."""
        new = [[self.host_ns, n] for n in ifnames if [self.host_ns, n] not in state.links]
        if new:
            state.links.extend(new)
            self._save(state)

    def _delete_recorded_links(self, state: _State) -> None:
        """Delete recorded links first: veths then go at once, not when netns cleanup runs."""
        if not netns_exists(self.host_ns) or self.host_ns not in state.namespaces:
            return
        with _netlink(self.host_ns) as host:
            for ns, ifname in state.links:
                if ns == self.host_ns:
                    _delete_link(host, ifname)

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


def _configure_ipv6(inst: Any, index: int, port: LabPort) -> None:
    """The instance's IPv6: address ``nodad noprefixroute``, gateway6 on-link, default
    route through it (see the module docstring)."""
    flags = IFA_F_NODAD | IFA_F_NOPREFIXROUTE
    inst.addr("replace", index=index, address=port.ip6, prefixlen=port.prefixlen6,
              family=AF_INET6, flags=flags)
    inst.route("replace", dst=f"{port.gateway6}/128", oif=index, family=AF_INET6)
    inst.route("replace", dst="::/0", gateway=port.gateway6, oif=index, family=AF_INET6)


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


def _check_ports(ports: Sequence[LabPort]) -> dict[str, LabPort]:
    """Ports by tap; LabError on duplicates or clashes with lab addresses."""
    by_tap: dict[str, LabPort] = {}
    owner: dict[str, str] = {}  # address or MAC -> tap that uses it
    gateways = {p.gateway for p in ports} | {p.gateway6 for p in ports if p.gateway6}
    for port in ports:
        if port.tap in by_tap:
            raise LabError(f"lab: tap {port.tap} listed twice")
        by_tap[port.tap] = port
        addresses = [port.ip] + ([str(port.address6)] if port.ip6 else [])
        for key in (*addresses, port.mac.lower()):
            if key in owner:
                raise LabError(f"lab: {key} used by both {owner[key]} and {port.tap}")
            owner[key] = port.tap
        for address in addresses:
            if address in gateways:
                raise LabError(f"lab: port {port.tap} address {address} is also a gateway")
        _check_not_external(port)
    return by_tap


def _check_not_external(port: LabPort) -> None:
    """A port's networks must not overlap the external side's."""
    external = [ipaddress.ip_interface(f"{n.host_ip}/{n.prefixlen}").network
                for n in (*EXTERNAL_NETWORKS, EXTERNAL_NETWORK6)]
    for network in (port.network, port.network6):
        if network is not None and any(
                network.version == net.version and network.overlaps(net) for net in external):
            raise LabError(f"lab: port {port.tap}: {network} overlaps the external networks")
