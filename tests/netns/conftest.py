"""Fixtures of the packet-level engine tests: a cloud, its host's lab and its agent.

:class:`CloudLab` ties together what an operator has on one compute host:

* a fresh SQLite store and an :class:`~secfw.api.Api` on it (the cloud model);
* the namespace :class:`~secfw.lab.hostlab.Lab` of that host (a routed or bridged host
  namespace, one namespace per instance, an external namespace with 203.0.113.10 /
  198.51.100.10);
* one in-process agent (:class:`~secfw.agent.Reconciler` with a real backend
  running *inside the lab's host namespace*), driven by :meth:`CloudLab.sync`.

The ``cloud`` fixture is parametrised over every backend × topology combination
(:data:`COMBINATIONS`), so each scenario runs four times. A test that inspects one
backend's own tables declares it with ``@pytest.mark.backends("nftables")``; a test
for one topology with ``@pytest.mark.topologies("routed")``; the other combinations
are then skipped with that reason, never silently.

Probes name their endpoints by instance name or :data:`EXTERNAL`; blocked probes
cost :data:`PROBE_TIMEOUT` seconds. Every fixture tears down what it built (the lab,
scratch namespaces, stores), also when the test fails.

Test modules cannot import this file (pytest loads it as a plugin), so everything
they need is reachable from the fixtures: ``cloud``, ``scratch_ns``, ``lab_factory``
and ``helpers`` (this module's functions and constants).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess

from secfw.agent import Reconciler, SyncResult
from secfw.api import Api
from secfw.backends import BACKENDS, TOPOLOGIES, get_backend
from secfw.compiler.build import chain_name, set_name
from secfw.config import Config
from secfw.lab import netns_tools
from secfw.lab.demo import lab_ports
from secfw.lab.hostlab import NS_PREFIX, Lab, netns_exists
from secfw.model import Port
from secfw.store import open_store

PROBE_TIMEOUT = 0.3  # seconds a blocked probe waits
#: backend × topology: the namespace suite runs every scenario in each.
COMBINATIONS = tuple((b, t) for t in TOPOLOGIES for b in BACKENDS)
EXTERNAL = "external"  # probe endpoint: the lab's external namespace, 203.0.113.10
EXTERNAL_IP = Lab.external_addresses[0]
FLAVOR, IMAGE = "m1.tiny", "cirros"
#: Where the lab's metadata server listens in the host namespace (CloudLab.serve_metadata):
#: the lab's own namespace, so a fixed port collides with nothing.
METADATA_SERVER = ("192.0.2.254", 8775)
VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def secfw_command() -> str:
    """The project's ``secfw`` console script (the venv's), else the one on PATH."""
    candidate = VENV_BIN / "secfw"
    return str(candidate) if candidate.exists() else "secfw"


def run(
    *args: str, stdin: str | None = None, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command (no shell), capture text output; raise with stderr on failure."""
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60,
                          check=False, env=None if env is None else {**os.environ, **env})
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


class _RecordingBackend:
    """The real nftables backend, remembering the transaction of the last pass."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.last_plan: Any = None

    def read(self) -> Any:
        return self.inner.read()

    def plan(self, current: Any, desired: Any) -> Any:
        self.last_plan = self.inner.plan(current, desired)
        return self.last_plan

    def apply(self, plan: Any) -> None:
        self.inner.apply(plan)

    def committed(self, desired: Any) -> Any:
        return self.inner.committed(desired)

    def cleanup(self) -> None:
        self.inner.cleanup()

    def __getattr__(self, name: str) -> Any:  # optional extras (describe, …): the real ones
        return getattr(self.inner, name)


class CloudLab:
    """A cloud model, the lab of one of its hosts, and that host's agent (see module doc)."""

    def __init__(self, store_url: str, lab: Lab, host: str, work_dir: Path,
                 backend: str = "nftables", topology: str = "routed") -> None:
        self.store_url = store_url
        self.work_dir = work_dir
        self.backend_name, self.topology = backend, topology
        self.api = Api(open_store(store_url))
        self.lab = lab
        self.host = host
        self.allow_same_net = True
        self.backend: _RecordingBackend | None = None
        self._agent_store: Any = None
        self._reconciler: Reconciler | None = None
        self.metadata_listen: tuple[str, int] | None = None
        self._metadata_server: subprocess.Popen[bytes] | None = None
        self.api.image_create("admin", IMAGE, "qcow2", "public")

    # ---- the model

    def boot(
        self,
        name: str,
        groups: Sequence[str] = (),
        net: str | None = None,
        project: str = "p",
        host: str | None = None,
    ) -> Any:
        """Boot ``name`` (one NIC on ``net``) on this host unless ``host`` says otherwise."""
        return self.api.boot(
            project, name, FLAVOR, IMAGE, host or self.host, list(groups) or None,
            [net] if net else None,
        )

    def group_id(self, project: str, name: str) -> str:
        return self.api.snapshot().group_by_name[(project, name)]

    def port(self, name: str) -> Port:
        """The (only) port of the instance called ``name`` (in any project)."""
        state = self.api.snapshot()
        found = [p for i in state.instances.values() if i.name == name
                 for p in state.ports_of(i.id)]
        assert len(found) == 1, f"instance {name!r} has {len(found)} ports"
        return found[0]

    def ip(self, name: str) -> str:
        return EXTERNAL_IP if name == EXTERNAL else self.port(name).ip

    def ns(self, name: str) -> str:
        return self.lab.external_ns if name == EXTERNAL else self.lab.instance_ns(
            self.port(name).tap)

    # ---- the agent

    def configure(self, allow_same_net: bool) -> None:
        """Set ``allow_same_net_traffic``; the next sync is a new agent's first (full) pass."""
        self.allow_same_net = allow_same_net
        self._reconciler = None

    def stop_agent(self) -> None:
        """Forget the in-process agent (its kernel table stays, as when the daemon
        stops): the next :meth:`sync` is a new agent's first (full) pass, with no
        memory of what the store held meanwhile."""
        self._reconciler = None

    def sync(self, *, lab: bool = True, full: bool = False) -> SyncResult:
        """Bring the lab in line with the store (unless ``lab=False``), then run ONE
        agent pass inside the lab's host namespace; return what the pass did."""
        if lab:
            ports = lab_ports(self.api.snapshot(), self.host)
            self.lab.up(ports)
            if self.metadata_listen is not None:
                self.lab.wire_metadata(self.metadata_listen[0], ports)
        if self._reconciler is None:
            if self._agent_store is None:
                self._agent_store = open_store(self.store_url)
            self.backend = _RecordingBackend(self.make_backend())
            config = Config(self.allow_same_net, self.metadata_listen)
            self._reconciler = Reconciler(self._agent_store, self.host, config, self.backend)
        assert self.backend is not None
        self.backend.last_plan = None
        return self._reconciler.reconcile(full=full)

    def serve_metadata(self) -> None:
        """Start ``secfw metadata serve`` in the lab's host namespace on
        :data:`METADATA_SERVER` (wired by the lab) and have the agent redirect to
        it from its next pass on (a new agent: the next sync is full)."""
        address, port = METADATA_SERVER
        self.metadata_listen = METADATA_SERVER
        self.lab.up(lab_ports(self.api.snapshot(), self.host))
        self.lab.wire_metadata(address, lab_ports(self.api.snapshot(), self.host))
        log = (self.work_dir / "metadata.log").open("wb")
        self._metadata_server = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.host_ns, secfw_command(), "--store",
             self.store_url, "metadata", "serve", "--host", self.host,
             "--listen", f"{address}:{port}"], stdout=log, stderr=log)
        self._reconciler = None
        for _ in range(200):  # bounded: 10 s
            if self._metadata_server.poll() is not None:
                raise AssertionError("metadata server exited: "
                                     + (self.work_dir / "metadata.log").read_text())
            if netns_tools.tcp_connect(self.lab.host_ns, address, port, 0.05):
                return
            time.sleep(0.05)
        raise AssertionError("metadata server not listening after 10 s")

    def stop_metadata(self) -> None:
        """Stop the metadata server started by :meth:`serve_metadata`, if any."""
        server, self._metadata_server = self._metadata_server, None
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    def metadata(self, name: str, path: str, address: str = "169.254.169.254",
                 port: int = 80) -> tuple[int, bytes] | None:
        """``GET path`` from instance ``name`` to ``address:port`` (the metadata
        address by default): status and body, None when nothing answered."""
        return netns_tools.http_get(self.ns(name), address, port, path, 2.0)

    def lab_exec(self, name: str, *command: str) -> str:
        """Run ``command`` in the namespace of instance ``name``; its output."""
        return run("ip", "netns", "exec", self.ns(name), *command).stdout

    def make_backend(self) -> Any:
        """A new backend of this combination, inside the lab's host namespace."""
        return get_backend(self.backend_name, netns=self.lab.host_ns, topology=self.topology)

    @property
    def agent_args(self) -> tuple[str, ...]:
        """The agent CLI options of this combination."""
        return ("--backend", self.backend_name, "--topology", self.topology)

    @property
    def last_commands(self) -> tuple[str, ...]:
        """The nft commands of the last pass's transaction."""
        assert self.backend is not None and self.backend.last_plan is not None
        return tuple(self.backend.last_plan.commands)

    def agent_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip netns exec HOSTNS secfw --store URL agent --host H ARGS`` (a real process)."""
        return run("ip", "netns", "exec", self.lab.host_ns, secfw_command(), "--store",
                   self.store_url, "agent", "--host", self.host, *self.agent_args, *args,
                   check=check, env=self.agent_env())

    def agent_env(self) -> dict[str, str]:
        """Environment for agent processes: their status report stays in the test's dir."""
        return {"SECFW_STATE_DIR": str(self.work_dir / "agent-state")}

    # ---- the kernel, as nft(8) sees it in the host namespace

    def nft(self, *args: str, stdin: str | None = None) -> str:
        return run("ip", "netns", "exec", self.lab.host_ns, "nft", *args, stdin=stdin).stdout

    def table(self) -> list[dict[str, Any]]:
        """The objects (sets, maps, chains, rules) of secfw's tables: ``inet secfw``
        and the layer-2 one of the topology (``arp secfw`` or ``bridge secfw``)."""
        layer2 = "bridge" if self.topology == "bridged" else "arp"
        objects = []
        for family in ("inet", layer2):
            listing = json.loads(self.nft("-j", "list", "table", family, "secfw"))
            objects += [obj for obj in listing["nftables"] if "metainfo" not in obj]
        return objects

    def set_elements(self, name: str) -> list[Any]:
        """Elements of set/map ``name`` of secfw's tables, as nft's JSON gives them."""
        for obj in self.table():
            body = obj.get("set") or obj.get("map")
            if body and body["name"] == name:
                return list(body.get("elem", []))
        raise AssertionError(f"no set or map {name!r} in secfw's tables")

    def group_set(self, project: str, group: str) -> str:
        """The name of the address set of source group ``group`` (nftables)."""
        return set_name(self.group_id(project, group))

    # ---- the kernel, whichever backend filled it

    def ruleset_text(self) -> str:
        """Everything secfw holds in the host namespace as text: its nftables tables,
        or its iptables/ip6tables chains (both variants) and ipsets."""
        if self.backend_name == "nftables":
            layer2 = "bridge" if self.topology == "bridged" else "arp"
            # -a: rule handles too, so "unchanged" means no rule was rewritten
            return self.nft("-a", "list", "table", "inet", "secfw") + self.nft(
                "-a", "list", "table", layer2, "secfw")
        lines = []
        for tool in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save",
                     "ip6tables-legacy-save"):
            out = run("ip", "netns", "exec", self.lab.host_ns, tool, "-t", "filter").stdout
            lines += [line for line in out.splitlines() if "secfw" in line]
        ipsets = run("ip", "netns", "exec", self.lab.host_ns, "ipset", "list", "-o", "save")
        lines += [line for line in ipsets.stdout.splitlines() if "secfw" in line]
        return "\n".join(lines) + "\n"

    def group_chain(self, project: str, group: str, direction: str = "ingress") -> str:
        """The name the backend gives the chain of ``group``'s ``direction`` rules."""
        ir_name = chain_name(self.group_id(project, group), direction)
        if self.backend_name == "nftables":
            return ir_name
        from secfw.backends.iptables.render import group_chain_name

        return group_chain_name(ir_name)

    def secfw_present(self) -> bool:
        """Whether secfw's table (nftables) or chains (iptables) exist in the host."""
        if self.backend_name == "nftables":
            return run("ip", "netns", "exec", self.lab.host_ns, "nft", "list", "table",
                       "inet", "secfw", check=False).returncode == 0
        return ":secfw-" in self.ruleset_text()

    def iptables_variant(self) -> str:
        """The iptables variant holding secfw's chains (``nft`` or ``legacy``)."""
        for variant in ("nft", "legacy"):
            out = run("ip", "netns", "exec", self.lab.host_ns, f"iptables-{variant}-save",
                      "-t", "filter").stdout
            if ":secfw-" in out:
                return variant
        raise AssertionError("no secfw chains in either iptables variant")

    def tamper(self, *command: str) -> None:
        """Run ``command`` in the host namespace behind the agent's back; a leading
        ``iptables`` is the variant secfw uses."""
        if command[0] == "iptables":
            command = (f"iptables-{self.iptables_variant()}", *command[1:])
        run("ip", "netns", "exec", self.lab.host_ns, *command)

    def taps_in_ruleset(self) -> set[str]:
        """Every tap name secfw's rules or sets mention (``tap*``/``tap+`` excepted)."""
        return set(_TAP_NAME.findall(self.ruleset_text())) - {"tap"}

    def group_addresses(self, project: str, group: str) -> set[str]:
        """The IPv4 addresses in source group ``group``'s set (``10.1.0.2``)."""
        name = self.group_set(project, group)
        if self.backend_name == "nftables":
            return {_without_host_prefix(e) for e in self.set_elements(name)}
        from secfw.backends.iptables.render import set_name as ipset_name

        out = run("ip", "netns", "exec", self.lab.host_ns, "ipset", "list", "-o", "save",
                  ipset_name(name)).stdout
        return {line.split()[2].removesuffix("/32") for line in out.splitlines()
                if line.startswith("add ")}

    # ---- probes (endpoints: instance names or EXTERNAL)

    def tcp(self, src: str, dst: str, port: int) -> bool:
        """A real TCP handshake from ``src`` to ``dst:port`` (a listener runs on ``dst``)."""
        with netns_tools.listen(self.ns(dst), "tcp", port):
            return netns_tools.tcp_connect(self.ns(src), self.ip(dst), port, PROBE_TIMEOUT)

    def udp(self, src: str, dst: str, port: int) -> bool:
        """A real UDP datagram from ``src`` reaches a listener on ``dst:port``."""
        dst_ns = self.ns(dst)
        with netns_tools.listen(dst_ns, "udp", port):
            return netns_tools.udp_probe(self.ns(src), dst_ns, self.ip(dst), port, PROBE_TIMEOUT)

    def ping(self, src: str, dst: str) -> bool:
        """An ICMP echo request from ``src`` to ``dst`` is answered."""
        return netns_tools.ping(self.ns(src), self.ip(dst), 1, PROBE_TIMEOUT)

    def arrives(
        self,
        dst: str,
        proto: str,
        port: int | None = None,
        *,
        src_ip: str = EXTERNAL_IP,
        from_ns: str | None = None,
        icmp_type: int = 8,
        icmp_code: int = 0,
    ) -> bool:
        """A crafted packet (scapy) with source ``src_ip`` — spoofed if need be — sent
        from ``from_ns`` (default: the external namespace) is seen on ``dst``'s eth0.

        ``proto`` is ``tcp`` (a SYN to ``port``), ``udp`` (a datagram to ``port``) or
        ``icmp`` (``icmp_type``/``icmp_code``). Each packet carries a unique token,
        so only this very packet counts.
        """
        return crafted_arrives(
            from_ns or self.lab.external_ns, self.ns(dst), src_ip, self.ip(dst), proto, port,
            icmp_type, icmp_code,
        )


_TAP_NAME = re.compile(r"\btap[A-Za-z0-9_.-]*[A-Za-z0-9_]")


def _without_host_prefix(element: Any) -> str:
    """An nft JSON set element (``"10.0.0.1"``, a prefix object, or wrapped) as text."""
    value = element["elem"]["val"] if isinstance(element, dict) and "elem" in element else element
    if isinstance(value, dict) and "prefix" in value:
        value = f"{value['prefix']['addr']}/{value['prefix']['len']}"
    return str(value).removesuffix("/32")


def crafted_arrives(
    from_ns: str,
    dst_ns: str,
    src_ip: str,
    dst_ip: str,
    proto: str,
    port: int | None = None,
    icmp_type: int = 8,
    icmp_code: int = 0,
    iface: str = "eth0",
) -> bool:
    """See :meth:`CloudLab.arrives`; usable for namespaces outside a :class:`CloudLab`."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.packet import Raw

    token = b"secfw-" + uuid.uuid4().hex.encode()
    sport = random.randrange(20000, 60000)
    l4: Any
    if proto == "tcp":
        l4 = TCP(sport=sport, dport=port, flags="S", seq=random.randrange(1 << 32))
    elif proto == "udp":
        l4 = UDP(sport=sport, dport=port)
    elif proto == "icmp":
        l4 = ICMP(type=icmp_type, code=icmp_code)
        if icmp_type in (0, 8, 13, 14, 15, 16, 17, 18):
            l4.id, l4.seq = random.randrange(1, 0x10000), 1
    else:
        raise ValueError(f"unknown protocol {proto!r}")
    packet = IP(src=src_ip, dst=dst_ip) / l4 / Raw(token)
    frame = netns_tools.send_and_sniff(
        packet,
        src_ns=from_ns,
        dst_ns=dst_ns,
        bpf=f"{proto} and src host {src_ip} and dst host {dst_ip}",
        match=lambda f: token in bytes(f),
        timeout=PROBE_TIMEOUT,
        sniff_iface=iface,
    )
    return frame is not None


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """Labs for host names (and topologies) of the test's choice, all brought down
    afterwards."""
    labs: list[Lab] = []

    def make(host: str, topology: str = "routed", gateway_on_bridge: bool = False) -> Lab:
        lab = Lab(host, tmp_path / f"lab-{len(labs)}", topology=topology,
                  gateway_on_bridge=gateway_on_bridge)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.down()


def _combination_id(combination: tuple[str, str]) -> str:
    return "-".join(combination)


@pytest.fixture
def cloud_store_url(tmp_path: Path) -> str:
    """The store of the ``cloud`` fixture: a SQLite file (a module may override
    this fixture, e.g. with an etcd prefix: test_agent_etcd.py)."""
    return f"sqlite:///{tmp_path}/secfw.db"


@pytest.fixture(params=COMBINATIONS, ids=_combination_id)
def cloud(
    request: pytest.FixtureRequest, tmp_path: Path, lab_factory: Callable[..., Lab],
    cloud_store_url: str,
) -> Iterator[CloudLab]:
    """A fresh store + Api, the lab of a unique host and its in-process agent, for
    one backend × topology combination (skipped with the test's stated reason when
    it declared other ``backends``/``topologies``).

    Nothing exists in the kernel until the first :meth:`CloudLab.sync`.
    """
    backend, topology = request.param
    _skip_unless_declared(request, "backends", backend)
    _skip_unless_declared(request, "topologies", topology)
    host = f"h-{uuid.uuid4().hex[:8]}"
    env = CloudLab(cloud_store_url, lab_factory(host, topology), host, tmp_path, backend,
                   topology)
    try:
        yield env
    finally:
        env.stop_metadata()
        env._reconciler = None
        env.backend = None  # drop the libnftables context (and its netlink socket)
        if env._agent_store is not None:
            env._agent_store.close()
        env.api.store.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the ``cloud`` combinations a test's ``backends``/``topologies``
    markers exclude: they are not tests of it, so they are left out of the run
    rather than reported as skipped (a skip then always means a test that could
    not run here)."""
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        combination = callspec.params.get("cloud") if callspec is not None else None
        # Only this fixture's (backend, topology) pairs: a module may parametrise
        # its own ``cloud`` differently.
        excluded = combination in COMBINATIONS and any(
            (mark := item.get_closest_marker(name)) is not None and value not in mark.args
            for name, value in zip(("backends", "topologies"), combination, strict=True))
        (dropped if excluded else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _skip_unless_declared(request: pytest.FixtureRequest, marker: str, value: str) -> None:
    """Skip when the test's ``marker`` (``backends``/``topologies``) excludes ``value``;
    the marker's ``reason=`` says why."""
    mark = request.node.get_closest_marker(marker)
    if mark is not None and value not in mark.args:
        pytest.skip(f"{value}: {mark.kwargs.get('reason', f'test is for {mark.args} only')}")


@pytest.fixture
def scratch_ns() -> Iterator[Callable[[], str]]:
    """Create throw-away ``sfw-s-…`` namespaces (so lab probes accept them); all are
    removed afterwards, with every interface in them."""
    created: list[str] = []

    def make() -> str:
        name = f"{NS_PREFIX}s-{uuid.uuid4().hex[:10]}"
        run("ip", "netns", "add", name)
        created.append(name)
        return name

    try:
        yield make
    finally:
        for name in created:
            if netns_exists(name):
                with contextlib.suppress(AssertionError):
                    run("ip", "netns", "del", name)


@pytest.fixture
def helpers() -> Any:
    """Module-level helpers of this conftest, for tests (which cannot import it)."""
    import types

    return types.SimpleNamespace(
        run=run,
        secfw_command=secfw_command,
        crafted_arrives=crafted_arrives,
        EXTERNAL=EXTERNAL,
        EXTERNAL_IP=EXTERNAL_IP,
        PROBE_TIMEOUT=PROBE_TIMEOUT,
        CloudLab=CloudLab,
    )


@pytest.fixture
def env(cloud: Any, helpers: Any) -> Any:
    """The ``cloud`` fixture with :func:`helpers` attached (for agentproc)."""
    cloud.helpers = helpers
    return cloud


@pytest.fixture
def agents(env: Any, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start agents (all killed at the end); they share one state directory."""
    started: list[AgentProcess] = []
    state_dir = tmp_path / "state"

    def start(*args: str, **kwargs: Any) -> AgentProcess:
        agent = AgentProcess(env, state_dir, *args, **kwargs)
        started.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in started:
            agent.stop()
