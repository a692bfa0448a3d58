"""Throw-away etcd members on 127.0.0.1, for the tests, the benchmarks and the lab.

:func:`start` runs Debian's ``etcd`` binary (package ``etcd-server``) on free
loopback ports with a data directory of the caller's, waits (bounded) until
``/health`` answers, and stops it. :func:`start_cluster` starts several
members as one cluster (the fault tests kill and restart them one by one), on
loopback or inside a network namespace on an address of the caller's (the
multi-host lab's underlay, :mod:`secfw.lab.multihost`; that namespace is private to
its creator, so the well-known ports are free there).
Nothing listens beyond loopback or that namespace. Not for production: no TLS.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secfw.errors import StoreError
from secfw.lab.hostlab import run_in_netns

#: Bound on the wait for a fresh member to answer /health (a slow, shared machine).
START_TIMEOUT_S = 60.0
#: Raised from etcd's defaults (128 operations, 1.5 MiB per request) so that a
#: whole cloud imported in one batch (bench/bench_api.py) fits one transaction.
MAX_TXN_OPS = 100_000
MAX_REQUEST_BYTES = 32 << 20


@dataclass
class LocalEtcd:
    """A running member (see :func:`start`); ``netns``: the network namespace it
    listens in (None: this one), where :meth:`post` and the health check go too."""

    process: subprocess.Popen[bytes]
    client_port: int
    log: Path
    host: str = "127.0.0.1"
    netns: str | None = None
    command: list[str] = field(default_factory=list)  # how to start it again

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def running(self) -> bool:
        return self.process.poll() is None

    def healthy(self) -> bool:
        """Whether the member answers ``/health`` with true (in a cluster: it has a
        leader, so reads and writes go through)."""
        return _healthy(self)

    def restart(self) -> None:
        """Start the stopped member again (same data dir and ports), wait until healthy."""
        if self.running():
            return
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        _wait_healthy(self)

    def url(self, prefix: str | None = None) -> str:
        """An ``etcd://`` store URL; a fresh random prefix unless one is given."""
        return f"etcd://{self.endpoint}/{prefix or 'test-' + uuid.uuid4().hex[:12]}"

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """One request to the v3 JSON gateway (what etcdctl would send)."""
        request = urllib.request.Request(
            f"http://{self.endpoint}/v3/{path}", data=json.dumps(body).encode(), method="POST")

        def send() -> Any:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())

        return send() if self.netns is None else run_in_netns(self.netns, send)

    def compact(self) -> int:
        """Compact the history up to the current revision (returned)."""
        revision = int(self.post("kv/range", {"key": "AA=="})["header"]["revision"])
        self.post("kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def kill(self) -> None:
        """SIGKILL the member (a crash: no clean shutdown) and reap it."""
        self.process.kill()
        self.process.wait(timeout=15)

    def stop(self) -> None:
        """Terminate the member and wait for it (bounded), killing it if need be."""
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out on 127.0.0.1 (closed again: a small race
    with other processes, which :func:`start`'s retry covers)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start(base: Path, attempts: int = 3) -> LocalEtcd:
    """Start a member with its data under ``base`` (created); StoreError when
    etcd is missing or never becomes healthy."""
    if shutil.which("etcd") is None:
        raise StoreError("etcd is not installed (apt-get install etcd-server; `make deps`)")
    base.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):  # a port taken between free_ports and bind
        try:
            return _start_once(base / f"member{attempt}")
        except StoreError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _start_once(data_dir: Path) -> LocalEtcd:
    client, peer = free_ports(2)
    member = _launch(_command("secfw-local", data_dir, "127.0.0.1", client, peer,
                              f"secfw-local=http://127.0.0.1:{peer}"), client, data_dir)
    _wait_healthy(member)
    return member


@dataclass
class LocalCluster:
    """Members started as one cluster by :func:`start_cluster`."""

    members: list[LocalEtcd]

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def url(self, prefix: str | None = None) -> str:
        """An ``etcd://`` URL naming every member; a fresh random prefix unless given."""
        return f"etcd://{self.endpoints}/{prefix or 'test-' + uuid.uuid4().hex[:12]}"

    def stop(self) -> None:
        for member in self.members:
            if member.running():
                member.stop()


def start_cluster(base: Path, size: int = 3, netns: str | None = None,
                  host: str = "127.0.0.1", first_port: int | None = None) -> LocalCluster:
    """``size`` members forming one new cluster, each with its data under ``base``;
    healthy (quorum reached) when returned. On free loopback ports by default; with
    ``netns``, inside that namespace on ``host`` (and its loopback), member ``i``
    on ports ``first_port + 2i`` (client) and ``+ 2i + 1`` (peer)."""
    if shutil.which("etcd") is None:
        raise StoreError("etcd is not installed (apt-get install etcd-server; `make deps`)")
    base.mkdir(parents=True, exist_ok=True)
    if netns is None:
        ports = free_ports(2 * size)
    else:
        ports = list(range(first_port or 2379, (first_port or 2379) + 2 * size))
    names = [f"m{i}" for i in range(size)]
    initial = ",".join(f"{n}=http://{host}:{ports[2 * i + 1]}" for i, n in enumerate(names))
    wrap = ["ip", "netns", "exec", netns] if netns is not None else []
    members = [
        _launch([*wrap, *_command(name, base / name, host, ports[2 * i], ports[2 * i + 1],
                                  initial, also_loopback=netns is not None)],
                ports[2 * i], base / name, host, netns)
        for i, name in enumerate(names)
    ]
    cluster = LocalCluster(members)
    try:
        for member in members:  # every member answers /health only once there is a leader
            _wait_healthy(member)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _command(name: str, data_dir: Path, host: str, client: int, peer: int, initial: str,
             also_loopback: bool = False) -> list[str]:
    clients = f"http://{host}:{client}" + (f",http://127.0.0.1:{client}" if also_loopback
                                            else "")
    return [
        "etcd", "--name", name, "--data-dir", str(data_dir),
        "--listen-client-urls", clients,
        "--advertise-client-urls", f"http://{host}:{client}",
        "--listen-peer-urls", f"http://{host}:{peer}",
        "--initial-advertise-peer-urls", f"http://{host}:{peer}",
        "--initial-cluster", initial,
        "--initial-cluster-state", "new",
        "--max-txn-ops", str(MAX_TXN_OPS), "--max-request-bytes", str(MAX_REQUEST_BYTES),
        "--logger", "zap", "--log-level", "warn",
    ]


def _launch(command: list[str], client: int, data_dir: Path, host: str = "127.0.0.1",
            netns: str | None = None) -> LocalEtcd:
    log = data_dir.with_suffix(".log")
    with log.open("wb") as out:
        # a session of its own: a lab's member outlives `lab up` and its terminal
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return LocalEtcd(process, client, log, host, netns, command)


def _wait_healthy(member: LocalEtcd) -> None:
    """Bounded wait for ``/health``; the member is stopped and StoreError raised
    when it exits or the bound passes."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and member.running():
        if _healthy(member):
            return
        time.sleep(0.1)
    member.stop()
    raise StoreError(
        f"etcd did not become healthy: {member.log.read_text(errors='replace')[-500:]}")


def _healthy(member: LocalEtcd) -> bool:
    def ask() -> bool:
        try:
            with urllib.request.urlopen(f"http://{member.endpoint}/health", timeout=2) as answer:
                return bool(json.loads(answer.read()).get("health") == "true")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    return ask() if member.netns is None else run_in_netns(member.netns, ask)
