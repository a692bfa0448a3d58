"""The agent as an operator runs it: ``ip netns exec HOSTNS secfw agent --host H …``.

Each test starts real agent processes in the lab's host namespace and judges them
by real packets, ``nft`` listings, their logfmt logs, their status report and
their metrics: taps appearing before and after their ports, drift repair of each
kind, kill -9 and restart (with a TCP stream flowing through), store outages,
SIGTERM, ``--cleanup``.

No assertion is timed: waits are bounded polls (up to 10 s) and the latencies
they observe are printed (run with ``-s`` to see them) and collected in
:data:`MEASURED`.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from agentproc import (
    EXT,
    POLL_LIMIT,
    filtered_as_expected,
    lab_sync,
    log_time,
    measured,
    poll,
    table_exists,
    web_cloud,
)

from secfw.api import Api
from secfw.lab import netns_tools
from secfw.lab.demo import lab_ports
from secfw.lab.hostlab import run_in_netns
from secfw.store import open_store

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

FOREIGN_TABLES = """\
table inet other {
	chain c {
		type filter hook forward priority 10; policy accept;
		ip daddr 192.0.2.99 drop
	}
}
table ip foreign {
	set blocked {
		type ipv4_addr
		elements = { 192.0.2.1 }
	}
	chain x {
		ip saddr @blocked drop
		tcp dport 9 reject
	}
}
"""


def foreign_listing(env: Any) -> tuple[str, str]:
    return (env.nft("-a", "-s", "list", "table", "inet", "other"),
            env.nft("-a", "-s", "list", "table", "ip", "foreign"))


class Stream:
    """A TCP connection ``src_ns`` → ``dst_ip:port`` sending 1 KiB every 5 ms, counted
    at the receiving end; any error or EOF is recorded, and the longest silence."""

    def __init__(self, src_ns: str, dst_ns: str, dst_ip: str, port: int) -> None:
        self.server = netns_tools.socket_in_netns(dst_ns, socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("0.0.0.0", port))
        self.server.listen(1)
        self.server.settimeout(5)
        self.client = netns_tools.socket_in_netns(src_ns, socket.AF_INET, socket.SOCK_STREAM)
        self.client.settimeout(5)
        self.client.connect((dst_ip, port))
        self.conn, _ = self.server.accept()
        self.conn.settimeout(1)
        self.received, self.errors, self.max_gap = 0, [], 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        chunk = b"x" * 1024
        while not self._stop.is_set():
            try:
                self.client.sendall(chunk)
            except OSError as exc:
                self.errors.append(f"send: {exc}")
                return
            time.sleep(0.005)

    def _receive(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            try:
                data = self.conn.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                self.errors.append(f"recv: {exc}")
                return
            if not data:
                self.errors.append("recv: EOF")
                return
            now = time.monotonic()
            self.max_gap, last = max(self.max_gap, now - last), now
            self.received += len(data)

    def flowing(self) -> bool:
        """10 kB more than now reach the receiver, and no error: waited for (a cut
        connection never delivers them), not timed — a loaded machine runs the
        sending and receiving threads late, the connection is not slower for it."""
        before = self.received
        poll(lambda: self.received > before + 10_000 or self.errors, "the stream flowing")
        return not self.errors

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in (self.client, self.conn, self.server):
            sock.close()


def copy_store(url: str, target: Path) -> str:
    """A consistent copy of a SQLite store (backup API: includes the WAL)."""
    source = sqlite3.connect(url.removeprefix("sqlite://"))
    copy = sqlite3.connect(target)
    with copy:
        source.backup(copy)
    source.close()
    copy.close()
    return f"sqlite:///{target}"


def replay(source_url: str, target_url: str, since: int) -> None:
    """Write the source store's changes after ``since`` into the target store: the
    same documents (ids, MACs, addresses) as if the API had done it there."""
    source, target = open_store(source_url), open_store(target_url)
    try:
        _, changes = source.changes_since(since)
        with target.write() as txn:
            for change in changes:
                if change.doc is None:
                    txn.delete(change.kind, change.id)
                else:
                    txn.put(change.kind, change.id, change.doc)
    finally:
        source.close()
        target.close()


def store_path(env: Any) -> Path:
    return Path(env.store_url.removeprefix("sqlite://"))


# --------------------------------------------------------------------------- taps


def test_tap_before_its_port_is_dropped_then_filtered(env: Any, agents: Any,
                                                      tmp_path: Path) -> None:
    """A tap that appears before the store knows its port gets nothing (fail closed)
    and is reported as unknown; once its port is stored it is filtered by its groups.
    A tap appearing after its port is known is filtered at once. Both time-to-filter
    latencies are measured; the link events are seen by the agent."""
    web_cloud(env)
    agent = agents()
    agent.wait_event("sync")
    assert filtered_as_expected(env)

    # The port "early" exists in a copy of the store only: its tap appears first.
    revision = env.api.store.revision()
    copy_url = copy_store(env.store_url, tmp_path / "future.db")
    future = Api(open_store(copy_url))
    future.boot("p", "early", "m1.tiny", "cirros", env.host, ["global_http"], ["net-a"])
    early = next(p for p in lab_ports(future.snapshot(), env.host) if p.name == "early")
    created = time.time()
    lab_sync(env, future)
    wired = time.time()
    link = agent.wait_event("link", tap=early.tap, event="appeared", known="False")
    measured("link event seen after the tap was created (upper bound)",
             log_time(link) - created)
    early_ns = env.lab.instance_ns(early.tap)
    with netns_tools.listen(early_ns, "tcp", 80):
        assert not netns_tools.tcp_connect(env.lab.external_ns, early.ip, 80, 0.3)
        assert not netns_tools.ping(early_ns, env.ip("web"), 1, 0.3)
        poll(lambda: early.tap in (agent.status().get("unknown_taps") or []),
             "status lists the unknown tap")

        replay(copy_url, env.store_url, revision)  # now the store knows the port
        stored = time.monotonic()
        poll(lambda: netns_tools.tcp_connect(env.lab.external_ns, early.ip, 80, 0.05),
             "the new port's allowed traffic passes")
        measured("time-to-filter, tap first: port stored -> traffic allowed",
                 time.monotonic() - stored)
    with netns_tools.listen(early_ns, "tcp", 22):
        assert not netns_tools.tcp_connect(env.lab.external_ns, early.ip, 22, 0.3)
    future.store.close()

    # The port "late" is stored first; its tap appears afterwards.
    env.boot("late", ["global_http"], "net-a")
    poll(lambda: agent.status().get("revision") == env.api.store.revision(),
         "the agent applied the new port")
    late = env.port("late")
    created = time.monotonic()
    lab_sync(env)
    wired = time.monotonic()
    with netns_tools.listen(env.ns("late"), "tcp", 80):
        poll(lambda: netns_tools.tcp_connect(env.lab.external_ns, late.ip, 80, 0.05),
             "traffic to the late tap passes")
    measured("time-to-filter, port first: tap wired -> traffic allowed",
             time.monotonic() - wired)
    measured("lab.up of one instance (namespace, veth, routes)", wired - created)
    assert not env.tcp(EXT, "late", 22)
    agent.wait_event("link", tap=late.tap, event="appeared", known="True")
    poll(lambda: not agent.status().get("unknown_taps"), "no unknown tap left")


# --------------------------------------------------------------------------- drift


#: Tamperings with what secfw holds: (what, command, key of the drift_repaired
#: event, what that key must name), per backend and topology — on a bridged host
#: nftables judges ingress on postrouting and names taps in the bridge table.
DRIFTS: dict[tuple[str, str], tuple[tuple[str, tuple[str, ...], str, str], ...]] = {
    ("nftables", "routed"): (
        ("flush a chain", ("nft", "flush chain inet secfw forward-ingress"), "chains",
         "forward-ingress"),
        ("delete a map element",
         ("nft", 'delete element inet secfw ingress_ports { "%(web)s" }'), "sets",
         "ingress_ports"),
        ("insert a rule", ("nft", "insert rule inet secfw forward-ingress accept"), "chains",
         "forward-ingress"),
        ("delete the table", ("nft", "delete table inet secfw"), "table", "absent"),
    ),
    ("nftables", "bridged"): (
        ("flush a chain", ("nft", "flush chain inet secfw postrouting-ingress"), "chains",
         "postrouting-ingress"),
        ("delete a map element",
         ("nft", 'delete element bridge secfw ingress_marks { "%(web)s" }'), "sets",
         "ingress_marks"),
        ("insert a rule", ("nft", "insert rule inet secfw postrouting-ingress accept"),
         "chains", "postrouting-ingress"),
        ("delete the table", ("nft", "delete table inet secfw"), "table", "absent"),
        # one of two tables gone: the whole is rewritten (``replaced``)
        ("delete the bridge table", ("nft", "delete table bridge secfw"), "replaced", "True"),
    ),
}
for _topology in ("routed", "bridged"):
    DRIFTS[("iptables", _topology)] = (
        ("flush a chain", ("iptables", "-F", "secfw-ingress"), "chains", "secfw-ingress"),
        ("insert a rule", ("iptables", "-I", "secfw-ingress", "-j", "RETURN"), "chains",
         "secfw-ingress"),
        ("delete the jump", ("iptables", "-D", "FORWARD", "-j", "secfw-fwd"), "replaced",
         "False"),
        # a foreign ACCEPT above secfw's jump: the jump is moved back on top
        ("accept above the jump", ("iptables", "-I", "FORWARD", "1", "-j", "ACCEPT"),
         "chains", "FORWARD"),
    )


def test_drift_is_repaired_within_one_period_and_foreign_tables_untouched(
    env: Any, agents: Any
) -> None:
    """Each kind of tampering with secfw's table is repaired within one resync period
    (0.5 s here), logged with what differed, and filtering is as before; tables of
    other owners come out byte-identical (handles included)."""
    web_cloud(env)
    env.nft("-f", "-", stdin=FOREIGN_TABLES)
    foreign = foreign_listing(env)
    agent = agents()
    agent.wait_event("sync")
    time.sleep(1.5)  # three resync periods without tampering: no false drift
    assert agent.status()["drift_repairs"] == 0
    assert filtered_as_expected(env)

    drifts = DRIFTS[(env.backend_name, env.topology)]
    for count, (name, command, key, value) in enumerate(drifts, start=1):
        env.tamper(*(part % {"web": env.port("web").tap} for part in command))
        tampered = time.time()
        event = agent.wait_event("drift_repaired", count=count)
        measured(f"drift repair ({name})", log_time(event) - tampered)
        assert value in event.get(key, ""), (name, event)
        assert filtered_as_expected(env), name
    agent.wait_status(drift_repairs=len(drifts))  # the report follows the log line
    assert foreign_listing(env) == foreign


# --------------------------------------------------------------------------- restart


def test_kill_and_restart_keep_filtering_and_established_flows(env: Any, agents: Any) -> None:
    """kill -9 leaves the ruleset in force; a restart with nothing changed sends
    nothing (commands=0, table byte-identical); a restart after a change sends only
    the difference; a TCP stream allowed before keeps flowing through all of it;
    SIGTERM exits 0, the rules stay and the status says stopped."""
    web_cloud(env)
    first = agents()
    first.wait_event("sync")
    # its report follows the sync line: a kill -9 before it would leave none to say "gone"
    first.wait_status(state="healthy")
    stream = Stream(env.lab.external_ns, env.ns("web"), env.ip("web"), 443)
    try:
        assert stream.flowing()
        listing = env.ruleset_text()
        assert first.kill() == -signal.SIGKILL
        assert first.status()["state"] == "gone"
        assert filtered_as_expected(env) and stream.flowing()

        second = agents()
        sync = second.wait_event("sync")
        assert sync["full"] == "True" and sync["commands"] == "0", sync
        assert env.ruleset_text() == listing
        assert second.kill() == -signal.SIGKILL
        assert stream.flowing()

        env.api.secgroup_add_rule("p", "global_http", "tcp", "8080", "8080", "0.0.0.0/0")
        third = agents()
        sync = third.wait_event("sync")
        print(f"\nrestart after one rule added: {sync}")
        assert sync["replaced"] == "False" and 0 < int(sync["commands"]) <= 6, sync
        assert env.tcp(EXT, "web", 8080) and filtered_as_expected(env)
        assert stream.flowing()
        assert not stream.errors, stream.errors
        measured("longest silence of the TCP stream across kill -9 and restarts",
                 stream.max_gap)
    finally:
        stream.close()
    assert third.kill(signal.SIGTERM) == 0, third.lines[-5:]
    assert table_exists(env) and filtered_as_expected(env)
    status = third.status()
    assert status["state"] == "stopped" and status["running"] is False
    assert third.events("stopped")


# --------------------------------------------------------------------------- store outage


def test_store_unreadable_keeps_last_ruleset_then_catches_up(env: Any, agents: Any) -> None:
    """The store file made unreadable (chmod 000; the agent runs without
    CAP_DAC_OVERRIDE, like a hardened service): the agent reports unhealthy within a
    resync period and keeps filtering as before; a change made meanwhile is applied
    once the file is readable again."""
    web_cloud(env)
    agent = agents(drop_dac=True)
    agent.wait_event("sync")
    assert filtered_as_expected(env)
    path = store_path(env)
    os.chmod(path, 0)
    try:
        down = time.monotonic()
        poll(lambda: agent.status()["state"] == "unhealthy", "status says unhealthy")
        measured("store outage noticed (chmod 000)", time.monotonic() - down)
        assert "store" in agent.status()["last_error"]
        assert filtered_as_expected(env)
        env.api.secgroup_add_rule("p", "global_http", "tcp", "8080", "8080", "0.0.0.0/0")
        assert not env.tcp(EXT, "web", 8080)
    finally:
        os.chmod(path, 0o644)
    back = time.monotonic()
    with netns_tools.listen(env.ns("web"), "tcp", 8080):
        poll(lambda: netns_tools.tcp_connect(env.lab.external_ns, env.ip("web"), 8080, 0.05),
             "the change made during the outage is applied")
    measured("store pick-up after the outage (chmod back -> traffic)", time.monotonic() - back)
    poll(lambda: agent.status()["state"] == "healthy", "status healthy again")
    assert filtered_as_expected(env)


def test_store_removed_or_corrupt_keeps_last_ruleset_then_recovers(
    env: Any, agents: Any, tmp_path: Path
) -> None:
    """The store file renamed away (removed), then corrupted in place: each time the
    agent turns unhealthy, keeps the ruleset, and recovers when the file is back."""
    web_cloud(env)
    agent = agents()
    agent.wait_event("sync")
    assert filtered_as_expected(env)
    path = store_path(env)
    aside = tmp_path / "aside.db"
    os.rename(path, aside)
    try:
        poll(lambda: agent.status()["state"] == "unhealthy", "unhealthy when removed")
        assert "missing" in agent.status()["last_error"]
        assert filtered_as_expected(env)
    finally:
        os.rename(aside, path)
    poll(lambda: agent.status()["state"] == "healthy", "healthy when restored")

    # Everything into the main file first: pages still in the WAL would mask the damage.
    with sqlite3.connect(path) as checkpoint:
        checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    header = path.read_bytes()[:100]
    with open(path, "r+b") as handle:
        handle.write(b"this is not a database".ljust(100, b"\0"))
    try:
        poll(lambda: agent.status()["state"] == "unhealthy", "unhealthy when corrupt")
        print(f"\ncorrupt store: {agent.status()['last_error']}")
        assert filtered_as_expected(env)
    finally:
        with open(path, "r+b") as handle:
            handle.write(header)
    poll(lambda: agent.status()["state"] == "healthy", "healthy when repaired")
    assert filtered_as_expected(env)


def test_store_missing_at_start_fails_closed_then_filters(
    env: Any, agents: Any, tmp_path: Path
) -> None:
    """A host whose agent starts while the store is missing and no table exists (a
    reboot during a store outage) gets the closed filter — every tap dropped — rather
    than none; when the store appears, the agent filters per the groups."""
    web_cloud(env)
    assert env.tcp(EXT, "web", 22)  # no table yet: nothing filters
    missing = tmp_path / "later.db"
    agent = agents(store_url=f"sqlite:///{missing}")
    started = time.monotonic()
    poll(lambda: table_exists(env) and not env.tcp(EXT, "web", 80), "closed filter")
    measured("closed filter installed while the store is missing", time.monotonic() - started)
    assert not env.tcp("web", "db", 22)
    assert agent.wait_status(state="unhealthy") and not missing.exists()
    # closed before the store was even read (not after the first failed pass)
    assert agent.wait_event("closed")["action"].startswith("every tap dropped")
    copy_store(env.store_url, missing)
    appeared = time.monotonic()
    poll(lambda: filtered_as_expected(env), "filtering per the groups once the store exists")
    measured("store appeared -> filtering per the groups", time.monotonic() - appeared)
    agent.wait_status(state="healthy")


# --------------------------------------------------------------------------- operations


def test_metrics_status_and_sd_notify(env: Any, agents: Any, tmp_path: Path) -> None:
    """The metrics endpoint (inside the host namespace) serves the counters; the
    status command reads the running agent's report; systemd gets READY=1."""
    web_cloud(env)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(POLL_LIMIT)
    try:
        agent = agents("--metrics-address", "127.0.0.1:9468",
                       extra_env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert notify.recv(4096).decode().startswith("READY=1\nSTATUS=healthy")
    finally:
        notify.close()
    agent.wait_event("sync")

    def scrape() -> str:
        def get() -> str:
            with urllib.request.urlopen("http://127.0.0.1:9468/metrics", timeout=5) as reply:
                return str(reply.read().decode())

        return run_in_netns(env.lab.host_ns, get)

    text = scrape()
    revision = env.api.store.revision()
    for expected in ('secfw_agent_syncs_total{kind="full"}', "secfw_agent_transactions_total 1.0",
                     "secfw_agent_ports 2.0", "secfw_agent_healthy 1.0",
                     f"secfw_agent_applied_revision {float(revision)}",
                     "secfw_agent_drift_repairs_total 0.0",
                     'secfw_agent_sync_failures_total{reason="store"} 0.0',
                     "secfw_agent_sync_duration_seconds_bucket", "secfw_agent_set_elements"):
        assert expected in text, expected
    env.tamper(*DRIFTS[(env.backend_name, env.topology)][0][1])  # flush a chain
    poll(lambda: "secfw_agent_drift_repairs_total 1.0" in scrape(), "drift counted")

    status = env.helpers.run(env.helpers.secfw_command(), "agent", "status", "--host", env.host,
                             "--state-dir", str(agent.state_dir), "-f", "json").stdout
    assert '"state": "healthy"' in status and f'"revision": {revision}' in status
    table = env.helpers.run(env.helpers.secfw_command(), "agent", "status", "--host", env.host,
                            "--state-dir", str(agent.state_dir)).stdout
    assert "HEALTHY" in table and "| drift repairs" in table


def test_cleanup_removes_exactly_secfws_table(env: Any) -> None:
    """``agent --cleanup`` deletes table inet secfw and nothing else; 0 when absent."""
    web_cloud(env)
    env.nft("-f", "-", stdin=FOREIGN_TABLES)
    foreign = foreign_listing(env)
    env.agent_cli("--once")
    assert table_exists(env)
    for _ in range(2):  # the second run finds nothing to remove
        done = env.helpers.run("ip", "netns", "exec", env.lab.host_ns,
                               env.helpers.secfw_command(), "agent", *env.agent_args,
                               "--cleanup")
        assert done.returncode == 0 and "msg=cleanup" in done.stderr
        assert not table_exists(env)
    assert foreign_listing(env) == foreign
    tables = env.nft("list", "tables")
    assert "inet other" in tables and "ip foreign" in tables and "secfw" not in tables
    if env.backend_name == "iptables":  # neither chains nor sets left
        assert "secfw" not in env.ruleset_text()
