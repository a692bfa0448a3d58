"""Faults of a multi-host cloud on a 3-member etcd cluster, judged with packets.

Two hosts (routed) on the lab's underlay, a real agent on each; the cluster's
three members run in the fabric namespace (192.0.2.254, ports 2379/2381/2383)
and every URL names all three. srv (host 2, net-b, group web: tcp 80) is probed
from client (host 1, net-a) and from host 2's external namespace.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agentproc import parse_logfmt, poll
from pyroute2 import IPRoute
from test_multihost import FLAVOR, IMAGE, Cloud

from secfw.agent.status import read_report, status_path
from secfw.api import Api
from secfw.lab import netns_tools
from secfw.lab.demo import secfw_executable
from secfw.lab.etcdlocal import LocalCluster
from secfw.lab.multihost import UPLINK, MultiHostLab, host_names
from secfw.store import open_store
from secfw.store.backup import dump

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]
#: No periodic resync within a test: a full pass comes from a failure or a compaction.
AGENT_ARGS = ("--resync-interval", "600", "--poll-interval", "0.05", "--backoff-max", "1")
#: Bound for waits that include etcd noticing a lost quorum (its request timeout)
#: and the agent's next failing pass.
SLOW_LIMIT = 40.0


@dataclass
class Faulty:
    cloud: Cloud
    cluster: LocalCluster
    url: str
    tmp: Path

    @property
    def lab(self) -> MultiHostLab:
        return self.cloud.lab

    def state(self, host: int) -> str:
        return read_report(self.cloud.state_dir, self.cloud.hosts[host]).state

    def ext_tcp(self, port: int) -> bool:
        """host 2's external namespace -> srv:port (crosses host 2's filter only)."""
        srv_ns, srv_ip = self.cloud.ns_ip("srv")
        with netns_tools.listen(srv_ns, "tcp", port):
            return netns_tools.tcp_connect(self.lab.labs[self.cloud.hosts[1]].external_ns,
                                           srv_ip, port, 0.3)

    def log_events(self, host: int, msg: str) -> list[dict[str, str]]:
        text = (self.tmp / f"agent-{self.cloud.hosts[host]}.log").read_text()
        return [e for e in map(parse_logfmt, text.splitlines()) if e.get("msg") == msg]

    def restart(self, index: int) -> None:
        self.cluster.members[index].restart()
        self.lab.record_restart(index, self.cluster.members[index])


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[Faulty]:
    name = f"f{uuid.uuid4().hex[:6]}c"
    lab = MultiHostLab(name, host_names(name, 2), tmp_path / "lab")
    try:
        lab.up({})
        cluster = lab.start_etcd(members=3)
        url = lab.store_url.rsplit("/", 1)[0] + f"/t{uuid.uuid4().hex[:8]}"
        assert url.count(",") == 2
        api: Api = lab.in_fabric(lambda: Api(open_store(url)))
        cloud = Cloud(lab, api, lab.hosts, tmp_path / "agents")
        cloud.call(lambda a: (
            a.image_create("admin", IMAGE, "qcow2", "public"),
            a.net_create("p", "net-a", "10.1.0.0/24"), a.net_create("p", "net-b", "10.2.0.0/24"),
            a.secgroup_create("p", "web", "http"),
            a.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0"),
            a.boot("p", "client", FLAVOR, IMAGE, lab.hosts[0], None, ["net-a"]),
            a.boot("p", "srv", FLAVOR, IMAGE, lab.hosts[1], ["web"], ["net-b"])))
        cloud.sync()
        for host in lab.hosts:
            lab.start_agent(host, secfw_executable(), url, cloud.state_dir, AGENT_ARGS,
                            log=tmp_path / f"agent-{host}.log")
        faulty = Faulty(cloud, cluster, url, tmp_path)
        poll(lambda: _reported(faulty, 0) and _reported(faulty, 1)
             and faulty.state(0) == faulty.state(1) == "healthy", "both agents' first pass")
        cloud.eventually("client", "srv", 80, allowed=True)
        assert not cloud.tcp("client", "srv", 8080)
        yield faulty
        lab.in_fabric(api.store.close)
    finally:
        lab.down()


def _reported(faulty: Faulty, host: int) -> bool:
    return status_path(faulty.cloud.state_dir, faulty.cloud.hosts[host]).exists()


def _cli_in_fabric(lab: MultiHostLab, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", lab.fabric_ns, secfw_executable(),
                           "--store", url, "--project", "p", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _open_8080(faulty: Faulty) -> None:
    faulty.cloud.call(lambda a: a.secgroup_add_rule("p", "web", "tcp", "8080", "8080",
                                                    "0.0.0.0/0"))


def test_one_member_killed_loses_nothing_and_agents_keep_up(faulty: Faulty) -> None:
    """The member everyone talks to first is killed: a write still commits, both
    agents follow it (packets), and after that member rejoined and another one
    died, the store still holds the write."""
    initial = faulty.cloud.call(lambda a: dump(a.store))["docs"]
    faulty.cluster.members[0].kill()  # perhaps the leader: a write waits for the next one
    poll(lambda: all(faulty.cluster.members[i].healthy() for i in (1, 2)),
         "members 1 and 2 have a leader", SLOW_LIMIT)
    _open_8080(faulty)
    faulty.cloud.eventually("client", "srv", 8080, allowed=True)
    before = faulty.cloud.call(lambda a: dump(a.store))["docs"]
    assert len(before["rule"]) == len(initial["rule"]) + 1
    faulty.restart(0)
    faulty.cluster.members[1].kill()  # perhaps the leader: wait for the next one's election
    poll(lambda: all(faulty.cluster.members[i].healthy() for i in (0, 2)),
         "members 0 and 2 have a leader", SLOW_LIMIT)
    assert faulty.cloud.call(lambda a: dump(a.store))["docs"] == before
    poll(lambda: faulty.state(0) == faulty.state(1) == "healthy", "both agents healthy")


def test_quorum_lost_fails_writes_agents_hold_then_catch_up(faulty: Faulty) -> None:
    """Two of three members die: a CLI write fails with exit 7 and one line; the
    agents keep enforcing the last ruleset and report unhealthy; once the members
    are back, a write reaches the kernels and the agents are healthy again."""
    faulty.cluster.members[1].kill()
    faulty.cluster.members[2].kill()
    done = _cli_in_fabric(faulty.lab, faulty.url, "secgroup-add-rule", "web", "tcp", "8080",
                          "8080", "0.0.0.0/0")
    assert done.returncode == 7, done
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("secfw: error: store "), done.stderr
    poll(lambda: faulty.state(0) == faulty.state(1) == "unhealthy",
         "both agents report unhealthy", SLOW_LIMIT)
    assert faulty.cloud.tcp("client", "srv", 80)  # the last ruleset, still in force
    assert not faulty.cloud.tcp("client", "srv", 8080)
    faulty.restart(1)
    faulty.restart(2)
    done = _cli_in_fabric(faulty.lab, faulty.url, "secgroup-add-rule", "web", "tcp", "8080",
                          "8080", "0.0.0.0/0")
    assert done.returncode == 0, done.stderr
    faulty.cloud.eventually("client", "srv", 8080, allowed=True)
    poll(lambda: faulty.state(0) == faulty.state(1) == "healthy", "both agents healthy again",
         SLOW_LIMIT)


def test_host_cut_from_the_underlay_holds_then_resyncs_past_a_compaction(
        faulty: Faulty) -> None:
    """Host 2's uplink goes down: its agent holds the last ruleset (srv:80 open
    from its external side, 8080 closed although the store now opens it); the
    history is compacted meanwhile; back on the underlay the agent finds its
    revision compacted, loads everything (a full pass) and opens 8080.

    The agent's TCP connections are aborted while the link is down (``ss -K``,
    as a member restart or a NAT timeout would): a watch whose connection
    merely waits out a short cut is still in step with etcd (a compaction
    never cancels a watch that is not behind it), so it rightly needs no full
    pass — the away-ness under test has to be real, not a matter of timing."""
    host_ns = faulty.lab.labs[faulty.cloud.hosts[1]].host_ns
    assert faulty.ext_tcp(80) and not faulty.ext_tcp(8080)
    full_before = sum(e.get("full") == "True" for e in faulty.log_events(1, "sync"))
    _set_uplink(host_ns, "down")
    try:
        _abort_tcp(host_ns)
        _open_8080(faulty)
        faulty.cloud.call(lambda a: a.secgroup_create("p", "later", "moves the history on"))
        faulty.lab.in_fabric(faulty.cluster.members[0].compact)
        poll(lambda: faulty.state(1) == "unhealthy", "host 2's agent unhealthy", SLOW_LIMIT)
        assert faulty.ext_tcp(80) and not faulty.ext_tcp(8080)  # held
    finally:
        _set_uplink(host_ns, "up")
    poll(lambda: faulty.ext_tcp(8080), "host 2 converged: 8080 open", SLOW_LIMIT)
    # The pass's log line follows its kernel commit: wait for it, do not race it.
    poll(lambda: sum(e.get("full") == "True" for e in faulty.log_events(1, "sync")) > full_before,
         "the agent loaded everything after the compaction", SLOW_LIMIT)


def _abort_tcp(host_ns: str) -> None:
    """Abort every established TCP connection of ``host_ns`` (its agent's to
    etcd): ``ss -K`` destroys the sockets through sock_diag, so their owners
    see ECONNABORTED at once."""
    subprocess.run(["ip", "netns", "exec", host_ns, "ss", "-K", "-t", "state", "established"],
                   check=True, capture_output=True, timeout=10)


def _set_uplink(host_ns: str, state: str) -> None:
    ipr: Any = IPRoute(netns=host_ns, flags=0)
    try:
        ipr.link("set", index=ipr.link_lookup(ifname=UPLINK)[0], state=state)
    finally:
        ipr.close()
