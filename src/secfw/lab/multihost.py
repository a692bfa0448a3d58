"""The multi-host lab: several compute hosts' labs joined by an underlay, one etcd.

``secfw lab up --hosts N`` builds N single-host labs (:class:`secfw.lab.hostlab.Lab`, one
per host ``<name>1`` … ``<name>N``, each with its instances and external side) and
an **underlay** — the cloud's fabric — in a namespace of its own::

    sfw-u-<c>   bridge sfwfab ─┬─ sfwu<h1> ══ sfw-ul 192.0.2.1/24   in sfw-h-<h1>
                192.0.2.254/24 ├─ sfwu<h2> ══ sfw-ul 192.0.2.2/24   in sfw-h-<h2>
                etcd :2379     └─ …
                (bridged: one bridge sfwfb<n> per instance network, joined by a veth
                 sfwup<n> to the network's bridge sfwbr<n> on every host)

``<c>`` is 8 hex digits of the SHA-256 of the lab's name, ``<h>`` of the host's
name (user data never reaches a name). 192.0.2.0/24 is TEST-NET-1 (RFC 5737): it
cannot clash with the instance networks of a real cloud nor with the lab's
external networks (203.0.113.0/24, 198.51.100.0/24).

Why it is built this way:

* **etcd on the underlay**, in the fabric namespace (192.0.2.254:2379), rather than
  on the root namespace's loopback: every host namespace then reaches it exactly
  as a compute host reaches its cluster, through its uplink, and cutting a host's
  uplink cuts it from the store as a real partition would. Nothing is added to
  the root namespace (parallel labs do not clash: each fabric is private, so the
  well-known ports are free in it). Commands run against the store from inside
  the fabric namespace (``ip netns exec sfw-u-<c> secfw --store etcd://192.0.2.254:2379 …``,
  or :meth:`MultiHostLab.in_fabric` in-process).
* **routed** (Calico's model): each host routes its own instances (/32, /128 to
  the tap, as the single-host lab does) and every remote instance's address via
  that host's underlay address — the routes Calico's BGP would distribute.
  ``proxy_arp`` on the taps answers for remote peers of the same subnet too.
* **bridged** (nova-network/Neutron "hybrid"): the instance networks are layer-2
  segments spanning the hosts (a fabric bridge per network; the veth stands for a
  physical NIC or a VLAN). One router serves each network: the first host's router
  namespace, a "network node"; the other hosts' router legs are set down, since
  the same gateway address answering from several routers on one segment would
  make the instances' ARP a race.
* traffic between instances on different hosts therefore crosses *both* hosts'
  filters: the sender's egress on its host, the receiver's ingress on its own.
* etcd's ports in the fabric namespace answer only underlay addresses (a table
  ``inet sfwlab`` there): the lab's etcd has no authentication, and instances
  must never reach the store that defines their own filters.

A JSON state file records the fabric namespace and the hosts before they are made,
and the processes started (etcd, agents) with their command lines, so
:meth:`MultiHostLab.down` removes exactly what the lab made and signals only its
own processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import netns

from secfw.errors import LabError
from secfw.lab.hostlab import (
    _ROUTER_SYSCTLS,
    AF_INET6,
    IFA_F_NODAD,
    NS_PREFIX,
    Lab,
    LabPort,
    _delete_link,
    _enslave,
    _lab_errors,
    _link_index,
    _netlink,
    _sync_leg_addresses,
    _up,
    _write_sysctls,
    bridge_name,
    netns_exists,
    router_leg_names,
    run_in_netns,
)

__all__ = ["ETCD_ADDRESS", "ETCD_PORT", "UNDERLAY", "MultiHostLab", "host_names"]

T = TypeVar("T")
UNDERLAY = ipaddress.IPv4Network("192.0.2.0/24")  # TEST-NET-1, RFC 5737
UNDERLAY6 = ipaddress.IPv6Network("2001:db8:fab::/64")  # RFC 3849 documentation space
ETCD_ADDRESS = "192.0.2.254"
ETCD_PORT = 2379
FABRIC_BRIDGE = "sfwfab"
UPLINK = "sfw-ul"  # in each host namespace; never "tap*" (the firewall's instance ports)
MAX_HOSTS = 200  # underlay addresses .1 … .200; .254 is etcd's
MAX_ETCD_MEMBERS = 5  # ports 2379 … 2388: a client and a peer port each
_STATE_VERSION = 1
#: SIGTERM first, then this long before SIGKILL, when the lab stops its processes.
STOP_GRACE_S = 10.0


def host_names(name: str, count: int) -> list[str]:
    """The hosts of a lab ``name`` with ``count`` hosts: ``name1`` … ``nameN``."""
    if not 1 <= count <= MAX_HOSTS:
        raise LabError(f"lab: --hosts must be within 1..{MAX_HOSTS}, not {count}")
    return [f"{name}{i}" for i in range(1, count + 1)]


@dataclass
class _State:
    """What the multi-host lab made (persisted as JSON; see the module docstring)."""

    name: str
    topology: str
    hosts: list[str] = field(default_factory=list)
    fabric: bool = False  # the fabric namespace was (being) created
    networks: list[str] = field(default_factory=list)  # bridged: fabric bridges made
    processes: dict[str, list[Any]] = field(default_factory=dict)  # role -> [pid, argv]
    etcd_members: int = 1

    def to_json(self) -> str:
        return json.dumps({"version": _STATE_VERSION, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> _State:
        data = json.loads(text)
        if data.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown state version {data.get('version')!r}")
        return cls(str(data["name"]), str(data["topology"]), [str(h) for h in data["hosts"]],
                   bool(data["fabric"]), [str(n) for n in data.get("networks", [])],
                   {str(k): list(v) for k, v in data.get("processes", {}).items()},
                   int(data.get("etcd_members", 1)))


class MultiHostLab:
    """The labs of several hosts on one underlay (module docstring).

    Contract: :meth:`up` makes the hosts' labs hold exactly the given ports, builds
    or repairs the underlay and the routes between hosts (idempotent: also the
    ``sync``); :meth:`start_etcd` and :meth:`start_agent` start processes the lab
    records; :meth:`down` stops those processes and removes every namespace the
    lab recorded, and nothing else. Failures are :class:`LabError`.
    """

    def __init__(self, name: str, hosts: Sequence[str], state_dir: Path,
                 topology: str = "routed") -> None:
        if not hosts or len(set(hosts)) != len(hosts) or len(hosts) > MAX_HOSTS:
            raise LabError(f"lab: a multi-host lab needs 1..{MAX_HOSTS} distinct hosts")
        self.name, self.hosts, self.topology = name, list(hosts), topology
        self.state_dir = Path(state_dir)
        self.labs = {h: Lab(h, self.state_dir / "hosts", topology=topology) for h in hosts}
        self._hash = hashlib.sha256(name.encode()).hexdigest()[:8]

    # ---- names and addresses

    @property
    def fabric_ns(self) -> str:
        """The underlay's namespace (fabric bridges, etcd): ``sfw-u-<c>``."""
        return f"{NS_PREFIX}u-{self._hash}"

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"multihost-{self._hash}.json"

    @property
    def store_url(self) -> str:
        """The URL of the lab's etcd (every member), as every namespace on the
        underlay reaches it; prefix ``/secfw``."""
        state = self._load()
        members = state.etcd_members if state else 1
        endpoints = ",".join(f"{ETCD_ADDRESS}:{ETCD_PORT + 2 * i}" for i in range(members))
        return f"etcd://{endpoints}/secfw"

    def underlay_ip(self, host: str) -> str:
        """``host``'s address on the underlay: 192.0.2.<1-based index>."""
        return str(UNDERLAY.network_address + self.hosts.index(host) + 1)

    def underlay_ip6(self, host: str) -> str:
        return str(UNDERLAY6.network_address + self.hosts.index(host) + 1)

    def in_fabric(self, call: Callable[[], T]) -> T:
        """``call()`` in a thread inside the fabric namespace: the sockets it opens
        (an Api's connections to etcd) are on the underlay."""
        return run_in_netns(self.fabric_ns, call)

    # ---- up / down

    def up(self, ports: Mapping[str, Sequence[LabPort]]) -> None:
        """Make every host's lab hold ``ports[host]`` and join them on the underlay."""
        state = self._load() or _State(self.name, self.topology)
        if state.topology != self.topology or state.hosts not in ([], self.hosts):
            raise LabError(f"lab {self.name!r} exists with other hosts or another topology; "
                           "bring it down first")
        if not state.fabric and netns_exists(self.fabric_ns):  # someone else's: never adopted
            raise LabError(f"lab: network namespace {self.fabric_ns} exists but is not "
                           f"recorded in {self.state_file}")
        state.hosts = list(self.hosts)
        state.fabric = True
        self._save(state)
        self._ensure_fabric()
        for host in self.hosts:
            self.labs[host].up(ports.get(host, []))
            self._ensure_uplink(host)
        if self.topology == "bridged":
            self._join_networks(state, ports)
        else:
            self._route_between_hosts(ports)

    def down(self) -> None:
        """Stop the lab's processes, remove the hosts' labs and the fabric (no-op if none)."""
        state = self._load()
        if state is None:
            return
        for role in sorted(state.processes, key=lambda r: r.startswith("etcd")):  # agents first
            _stop_recorded(*state.processes[role])
        state.processes.clear()
        self._save(state)
        for host in state.hosts:
            Lab(host, self.state_dir / "hosts", topology=self.topology).down()
        if state.fabric and netns_exists(self.fabric_ns):
            with _lab_errors(f"removing {self.fabric_ns}"):
                netns.remove(self.fabric_ns)
        self.state_file.unlink()

    # ---- processes

    def start_etcd(self, members: int = 1) -> Any:
        """Start the lab's etcd — one member, or a cluster of ``members`` — in the
        fabric namespace on 192.0.2.254, ports 2379, 2381, … (data in the state
        directory); recorded, stopped by :meth:`down`. Returns the
        :class:`~secfw.lab.etcdlocal.LocalCluster`."""
        from secfw.lab import etcdlocal

        if not 1 <= members <= MAX_ETCD_MEMBERS:
            raise LabError(f"lab: 1..{MAX_ETCD_MEMBERS} etcd members, not {members}")
        cluster = etcdlocal.start_cluster(self.state_dir / "etcd", members, self.fabric_ns,
                                          ETCD_ADDRESS, ETCD_PORT)
        state = self._load()
        if state is None:
            raise LabError(f"lab {self.name!r} is not up")
        state.etcd_members = members
        self._save(state)
        for i, member in enumerate(cluster.members):
            self._record_process("etcd" if i == 0 else f"etcd{i}", member.process.pid,
                                 member.command)
        return cluster

    def record_restart(self, index: int, member: Any) -> None:
        """After ``member.restart()``: record the new process of etcd member ``index``."""
        self._record_process("etcd" if index == 0 else f"etcd{index}", member.process.pid,
                             member.command)

    def start_agent(self, host: str, executable: str, store_url: str, state_dir: Path,
                    args: Sequence[str] = (), log: Path | None = None) -> subprocess.Popen[str]:
        """``secfw agent --host HOST`` inside ``host``'s namespace (its log lines to
        ``log``, else discarded); recorded, stopped by :meth:`down`. In a session of
        its own: it outlives ``lab up`` and the terminal that ran it."""
        command = ["ip", "netns", "exec", self.labs[host].host_ns, executable,
                   "--store", store_url, "agent", "--host", host, "--state-dir",
                   str(state_dir), *args]
        stderr: Any = subprocess.DEVNULL
        if log is not None:
            stderr = log.open("a")
        try:
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                    text=True, start_new_session=True)
        finally:
            if log is not None:
                stderr.close()
        self._record_process(f"agent:{host}", proc.pid, command)
        return proc

    def running(self, role: str) -> bool:
        """Whether the process the lab recorded as ``role`` (``etcd``,
        ``agent:HOST``) is still the one it started and alive."""
        state = self._load()
        recorded = state.processes.get(role) if state else None
        return recorded is not None and same_process(*recorded)

    def _record_process(self, role: str, pid: int, command: list[str]) -> None:
        state = self._load()
        if state is None:
            raise LabError(f"lab {self.name!r} is not up")
        state.processes[role] = [pid, command]
        self._save(state)

    # ---- the underlay

    def _ensure_fabric(self) -> None:
        """The fabric namespace, its bridge and etcd's address on it."""
        if not netns_exists(self.fabric_ns):
            with _lab_errors(f"creating {self.fabric_ns}"):
                netns.create(self.fabric_ns)
        _write_sysctls(self.fabric_ns, {"net/ipv6/conf/all/accept_dad": "0",
                                        "net/ipv6/conf/default/accept_dad": "0"})
        with _lab_errors(f"configuring {self.fabric_ns}"), _netlink(self.fabric_ns) as fab:
            _up(fab, "lo")
            if _link_index(fab, FABRIC_BRIDGE) is None:
                fab.link("add", ifname=FABRIC_BRIDGE, kind="bridge", br_stp_state=0,
                         br_forward_delay=0, br_mcast_snooping=0)
            index = _up(fab, FABRIC_BRIDGE)
            fab.addr("replace", index=index, address=ETCD_ADDRESS, prefixlen=UNDERLAY.prefixlen)
        self._guard_etcd()

    def _guard_etcd(self) -> None:
        """Only the underlay (the hosts, the fabric itself) may reach etcd's ports.

        Bridged, the fabric namespace is also the instances' router, so without
        this an instance could open etcd (no authentication in the lab) and rewrite
        the cloud; routed, only the missing route back to the instances stopped
        it. A table of the lab's own, replaced whole on every ``up`` (``nft -f``
        applies the file atomically: nft(8), "-f"); etcd's range is 2379 up to one
        client and one peer port per member."""
        last = ETCD_PORT + 2 * MAX_ETCD_MEMBERS - 1
        ruleset = (
            "table inet sfwlab\n"
            "delete table inet sfwlab\n"
            "table inet sfwlab {\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            f"    tcp dport {ETCD_PORT}-{last} ip saddr != {UNDERLAY} drop\n"
            f"    tcp dport {ETCD_PORT}-{last} meta nfproto ipv6 iifname != \"lo\" drop\n"
            "  }\n"
            "}\n"
        )
        done = subprocess.run(["ip", "netns", "exec", self.fabric_ns, "nft", "-f", "-"],
                              input=ruleset, capture_output=True, text=True, check=False,
                              timeout=30)
        if done.returncode != 0:
            raise LabError(f"lab: guarding etcd in {self.fabric_ns}: {done.stderr.strip()}")

    def _ensure_uplink(self, host: str) -> None:
        """The veth host namespace ↔ fabric bridge, with the host's underlay addresses."""
        host_ns, peer = self.labs[host].host_ns, "sfwu" + self.labs[host].host_ns[-8:]
        with (_lab_errors(f"uplink of {host_ns}"), _netlink(self.fabric_ns) as fab,
              _netlink(host_ns) as hst):
            if _link_index(hst, UPLINK) is None or _link_index(fab, peer) is None:
                _delete_link(hst, UPLINK)
                _delete_link(fab, peer)
                fab.link("add", ifname=peer, kind="veth",
                         peer={"ifname": UPLINK, "net_ns_fd": host_ns})
            _enslave(fab, peer, _link_index(fab, FABRIC_BRIDGE) or 0)
            index = _up(hst, UPLINK)
            hst.addr("replace", index=index, address=self.underlay_ip(host),
                     prefixlen=UNDERLAY.prefixlen)
            hst.addr("replace", index=index, address=self.underlay_ip6(host),
                     prefixlen=UNDERLAY6.prefixlen, family=AF_INET6, flags=IFA_F_NODAD)

    def _route_between_hosts(self, ports: Mapping[str, Sequence[LabPort]]) -> None:
        """Routed: on every host, each remote instance's addresses — and the floating
        IPs its host NATs to it — via its host's underlay address (the /32s Calico
        advertises for a floating IP, so it is reached from any host: the DNAT is
        on the instance's host); routes to instances that left are removed."""
        for host in self.hosts:
            wanted: dict[str, tuple[str, int]] = {}
            for other in self.hosts:
                if other == host:
                    continue
                for port in ports.get(other, []):
                    wanted[f"{port.ip}/32"] = (self.underlay_ip(other), 2)
                    for floating in port.floating:
                        wanted[f"{floating}/32"] = (self.underlay_ip(other), 2)
                    if port.ip6 is not None:
                        wanted[f"{port.ip6}/128"] = (self.underlay_ip6(other), 10)
            with _lab_errors(f"routes of {host}"), _netlink(self.labs[host].host_ns) as hst:
                _sync_underlay_routes(hst, _link_index(hst, UPLINK) or 0, wanted)

    def _join_networks(self, state: _State, ports: Mapping[str, Sequence[LabPort]]) -> None:
        """Bridged: one fabric bridge per instance network carrying its gateways (the
        fabric namespace is the network node and routes), every host's bridge of
        that network joined to it, the hosts' own router legs down."""
        networks: dict[str, LabPort] = {}
        for plist in ports.values():
            for port in plist:
                networks.setdefault(str(port.network), port)
        _write_sysctls(self.fabric_ns, _ROUTER_SYSCTLS)
        with _lab_errors(f"networks of {self.fabric_ns}"), _netlink(self.fabric_ns) as fab:
            for key, port in sorted(networks.items()):
                fabric_bridge = "sfwfb" + key_hash(key)
                if _link_index(fab, fabric_bridge) is None:
                    fab.link("add", ifname=fabric_bridge, kind="bridge", br_stp_state=0,
                             br_forward_delay=0, br_mcast_snooping=0)
                fabric_index = _up(fab, fabric_bridge)
                _sync_leg_addresses(fab, fabric_index, _gateways(port))
                for host in self.hosts:
                    self._join_network(fab, fabric_index, host, key)
        state.networks = sorted(networks)
        self._save(state)

    def _join_network(self, fab: Any, fabric_index: int, host: str, key: str) -> None:
        """Join ``host``'s bridge of network ``key`` (if it has one) to the fabric
        bridge, and take the host's router off the segment."""
        lab = self.labs[host]
        with _netlink(lab.host_ns) as hst:
            bridge_index = _link_index(hst, bridge_name(key))
            if bridge_index is None:
                return  # no instance of this network on the host
            link, peer = "sfwup" + key_hash(key), f"sfwf{lab.host_ns[-5:]}{key_hash(key)[:6]}"
            if _link_index(hst, link) is None or _link_index(fab, peer) is None:
                _delete_link(hst, link)
                _delete_link(fab, peer)
                fab.link("add", ifname=peer, kind="veth",
                         peer={"ifname": link, "net_ns_fd": lab.host_ns})
            _enslave(hst, link, bridge_index)
            _enslave(fab, peer, fabric_index)
        with _netlink(lab.router_ns) as router:
            leg = _link_index(router, router_leg_names(key)[1])
            if leg is not None:  # the same gateway on several routers of one segment
                router.link("set", index=leg, state="down")

    # ---- bookkeeping

    def _load(self) -> _State | None:
        try:
            return _State.from_json(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabError(f"lab: corrupt or unreadable {self.state_file}: {exc}") from exc

    def _save(self, state: _State) -> None:
        with _lab_errors(f"writing {self.state_file}"):
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(state.to_json())
            os.replace(tmp, self.state_file)


def key_hash(key: str) -> str:
    """8 hex digits naming an IPv4 network (its bridge's): the fabric bridge and
    veth names."""
    return bridge_name(key)[-8:]


def _gateways(port: LabPort) -> set[tuple[int, str, int]]:
    """(family, address, prefixlen) of the gateways of ``port``'s networks."""
    wanted = {(2, port.gateway, port.prefixlen)}
    if port.gateway6 is not None and port.prefixlen6 is not None:
        wanted.add((10, str(ipaddress.IPv6Address(port.gateway6)), port.prefixlen6))
    return wanted


def _sync_underlay_routes(ipr: Any, uplink: int, wanted: dict[str, tuple[str, int]]) -> None:
    """Make the routes through ``uplink`` to host addresses be exactly ``wanted``
    (destination -> (gateway, family))."""
    present: set[str] = set()
    for family, length in ((2, 32), (10, 128)):
        for route in ipr.route("dump", family=family, oif=uplink):
            if route["dst_len"] == length and route.get_attr("RTA_GATEWAY"):
                present.add(f"{route.get_attr('RTA_DST')}/{length}")
    for dst in sorted(present - set(wanted)):
        ipr.route("del", dst=dst, family=10 if ":" in dst else 2)
    for dst, (gateway, family) in sorted(wanted.items()):
        ipr.route("replace", dst=dst, gateway=gateway, oif=uplink, family=family)


def _stop_recorded(pid: int, command: list[str]) -> None:
    """SIGTERM (then SIGKILL after :data:`STOP_GRACE_S`) the recorded process —
    only if ``/proc/PID/cmdline`` still shows the command the lab started (a pid
    reused by another process is left alone)."""
    if not same_process(pid, command):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and same_process(pid, command):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if same_process(pid, command):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def same_process(pid: int, command: list[str]) -> bool:
    """Whether ``pid`` is alive (not a zombie) and runs ``command``'s program: ``ip
    netns exec`` execs it, so the command line ends with the recorded one's tail."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    args = [a.decode(errors="replace") for a in cmdline if a]
    tail = command[4:] if command[:3] == ["ip", "netns", "exec"] else command
    return bool(args) and args[-len(tail):] == tail if tail else False


@contextlib.contextmanager
def opened(lab: MultiHostLab) -> Iterator[MultiHostLab]:
    """``lab``, brought down when the block ends (tests, the bench)."""
    try:
        yield lab
    finally:
        lab.down()
