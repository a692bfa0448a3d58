"""Three compute hosts on one underlay and one etcd, each with a real ``secfw
agent`` (secfw.lab.multihost), judged with real packets between instances on
different hosts.

etcd is started by the test inside the lab's fabric namespace; the test's own API
calls run there too (``lab.in_fabric``), the agents reach it through their hosts'
uplinks. Every wait is bounded (agentproc.poll); nothing is timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agentproc import poll
from test_protection import AFTER_CUT, Stream

from secfw.api import Api
from secfw.lab import netns_tools
from secfw.lab.demo import lab_ports, secfw_executable
from secfw.lab.hostlab import netns_exists
from secfw.lab.multihost import ETCD_ADDRESS, ETCD_PORT, MultiHostLab, host_names, same_process
from secfw.store import open_store

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

FLAVOR, IMAGE = "m1.tiny", "cirros"
AGENT_ARGS = ("--resync-interval", "5", "--poll-interval", "0.05", "--backoff-max", "1")


@dataclass
class Cloud:
    """The lab, the API on its etcd (called inside the fabric namespace), the hosts."""

    lab: MultiHostLab
    api: Api
    hosts: list[str]
    state_dir: Path
    seen: dict[str, tuple[str, str]] = field(default_factory=dict)

    def call(self, fn: Callable[[Api], Any]) -> Any:
        return self.lab.in_fabric(lambda: fn(self.api))

    def boot(self, name: str, host: int, groups: list[str], net: str = "net-a") -> None:
        self.call(lambda a: a.boot("p", name, FLAVOR, IMAGE, self.hosts[host], groups, [net]))
        self.sync()

    def sync(self) -> None:
        """The labs follow the store (instances booted, deleted)."""
        snapshot = self.call(lambda a: a.snapshot())
        self.lab.up({h: lab_ports(snapshot, h) for h in self.hosts})

    def ns_ip(self, name: str) -> tuple[str, str]:
        """(namespace, address) of instance ``name``, read once (so probes work
        while the store is unreachable; a name is never reused by a test)."""
        if name not in self.seen:
            snapshot = self.call(lambda a: a.snapshot())
            for instance in snapshot.instances.values():
                if instance.name == name:
                    port = snapshot.ports_of(instance.id)[0]
                    self.seen[name] = (self.lab.labs[instance.host].instance_ns(port.tap),
                                       port.ip)
        return self.seen[name]

    def tcp(self, src: str, dst: str, port: int) -> bool:
        src_ns, _ = self.ns_ip(src)
        dst_ns, dst_ip = self.ns_ip(dst)
        with netns_tools.listen(dst_ns, "tcp", port):
            return netns_tools.tcp_connect(src_ns, dst_ip, port, 0.3)

    def eventually(self, src: str, dst: str, port: int, allowed: bool) -> None:
        poll(lambda: self.tcp(src, dst, port) == allowed,
             f"{src} -> {dst}:{port} {'allowed' if allowed else 'blocked'}")


def _start(lab: MultiHostLab, tmp_path: Path) -> Cloud:
    lab.up({})
    lab.start_etcd()
    url = lab.store_url.rsplit("/", 1)[0] + f"/t{uuid.uuid4().hex[:8]}"
    api: Api = lab.in_fabric(lambda: Api(open_store(url)))
    cloud = Cloud(lab, api, lab.hosts, tmp_path / "agents")
    cloud.call(lambda a: (a.image_create("admin", IMAGE, "qcow2", "public"),
                          a.net_create("p", "net-a", "10.1.0.0/24"),
                          a.net_create("p", "net-b", "10.2.0.0/24")))
    for host in lab.hosts:
        lab.start_agent(host, secfw_executable(), url, cloud.state_dir, AGENT_ARGS,
                        log=tmp_path / f"agent-{host}.log")
    return cloud


@pytest.fixture(params=["routed", "bridged"])
def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cloud]:
    name = f"t{uuid.uuid4().hex[:6]}c"
    lab = MultiHostLab(name, host_names(name, 3), tmp_path / "lab", request.param)
    try:
        made = _start(lab, tmp_path)
        yield made
        made.lab.in_fabric(made.api.store.close)
    finally:
        lab.down()


def test_cross_host_traffic_is_filtered_by_both_hosts(cloud: Cloud) -> None:
    """client (host 1) may only send tcp 8080 (an egress rule); srv (host 2) only
    accepts tcp 80. client -> srv:80 is dropped by host 1 (other, on host 3 with
    open egress, gets through); client -> srv:8080 is dropped by host 2, until srv
    accepts 8080 too."""
    cloud.call(lambda a: (
        a.secgroup_create("p", "web", "http"),
        a.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0"),
        a.secgroup_create("p", "out", "egress 8080 only"),
        a.rule_create("p", "out", "egress", protocol="tcp", dst_port="8080")))
    cloud.boot("srv", 1, ["web"])
    cloud.boot("client", 0, ["out"], net="net-b")
    cloud.boot("other", 2, [])  # the default group: egress open
    cloud.eventually("other", "srv", 80, allowed=True)
    cloud.eventually("client", "srv", 80, allowed=False)  # host 1's egress
    assert not cloud.tcp("client", "srv", 8080)  # host 2's ingress
    cloud.call(lambda a: a.secgroup_add_rule("p", "web", "tcp", "8080", "8080", "0.0.0.0/0"))
    cloud.eventually("client", "srv", 8080, allowed=True)
    assert not cloud.tcp("client", "srv", 80)


def test_instances_cannot_reach_the_underlays_etcd(cloud: Cloud) -> None:
    """etcd answers the hosts on the underlay, never an instance: the lab's store has
    no authentication, and an instance that reached it could rewrite every security
    group. other's egress is open, so the underlay's own filter is what stops it.
    Bridged, the underlay namespace is the instances' router: another port of it
    answers them (the path exists; only etcd's ports are closed to them)."""
    cloud.boot("other", 0, [])
    other_ns, _ = cloud.ns_ip("other")
    poll(lambda: cloud.tcp("other", "other", 7001), "other reaches itself: booted")
    if cloud.lab.topology == "bridged":
        with netns_tools.listen(cloud.lab.fabric_ns, "tcp", 7000):
            assert netns_tools.tcp_connect(other_ns, ETCD_ADDRESS, 7000, 0.5)
    assert not netns_tools.tcp_connect(other_ns, ETCD_ADDRESS, ETCD_PORT, 0.5)
    assert not netns_tools.tcp_connect(other_ns, ETCD_ADDRESS, ETCD_PORT + 1, 0.5)


def test_source_group_follows_boots_removals_and_revokes_across_hosts(cloud: Cloud) -> None:
    """db (host 2, net-b) accepts ssh from members of web (net-a). A web server booted on host 1
    gets in; tools (host 3, not in web) does not. Removing web1 from the group
    cuts its established connection on host 2; deleting web1 takes its address
    out of db's filter: the next instance given that address is refused."""
    cloud.call(lambda a: (
        a.secgroup_create("p", "web", "web servers"),
        a.secgroup_create("p", "db", "ssh from web"),
        a.secgroup_add_group_rule("p", "db", "web", "tcp", "22", "22")))
    cloud.boot("db", 1, ["db"], net="net-b")  # not net-a: allow_same_net_traffic
    cloud.boot("tools", 2, [])
    cloud.boot("web1", 0, ["web"])
    cloud.eventually("web1", "db", 22, allowed=True)
    assert not cloud.tcp("tools", "db", 22)

    web_ns, _ = cloud.ns_ip("web1")
    db_ns, db_ip = cloud.ns_ip("db")
    with Stream(web_ns, db_ns, db_ip, 22) as stream:
        stream.wait_flowing()
        cloud.call(lambda a: a.remove_secgroup("p", "web1", "web"))
        # the remote agent's pass is not observable here: wait for a whole window
        # of messages of which none arrives (by message numbers, not a quiet time)
        poll(lambda: stream.silent_for(AFTER_CUT),
             "the established connection of web1 cut on host 2")
    assert not cloud.tcp("web1", "db", 22)

    cloud.call(lambda a: a.add_secgroup("p", "web1", "web"))
    cloud.eventually("web1", "db", 22, allowed=True)
    _, old_ip = cloud.ns_ip("web1")
    cloud.call(lambda a: a.delete("p", "web1"))
    cloud.sync()
    cloud.boot("squatter", 2, [])
    _, new_ip = cloud.ns_ip("squatter")
    assert new_ip == old_ip, "the address of web1 is handed out again"
    cloud.eventually("squatter", "db", 22, allowed=False)


def test_lab_up_hosts_builds_etcd_agents_and_down_removes_all(tmp_path: Path) -> None:
    """``secfw lab up --hosts 2``: underlay, etcd and an agent per host; instances
    booted afterwards appear with ``lab sync --hosts 2`` and are filtered by the
    agents; ``lab down --hosts 2`` stops the processes and removes every namespace."""
    name, env = f"c{uuid.uuid4().hex[:6]}h", {**os.environ, "SECFW_LAB_DIR": str(tmp_path)}
    lab = MultiHostLab(name, host_names(name, 2), tmp_path / "multihost")

    def secfw(*args: str) -> str:
        done = subprocess.run([secfw_executable(), "lab", *args, "--hosts", "2", "--name", name],
                              capture_output=True, text=True, env=env, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        assert lab.store_url in secfw("up")
        assert lab.running("etcd") and lab.running(f"agent:{name}1")
        api: Api = lab.in_fabric(lambda: Api(open_store(lab.store_url)))
        cloud = Cloud(lab, api, lab.hosts, tmp_path)
        cloud.call(lambda a: (
            a.image_create("admin", IMAGE, "qcow2", "public"),
            a.net_create("p", "net-a", "10.1.0.0/24"), a.net_create("p", "net-b", "10.2.0.0/24"),
            a.secgroup_create("p", "web", "http"),
            a.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0"),
            a.boot("p", "a", FLAVOR, IMAGE, f"{name}1", None, ["net-a"]),
            a.boot("p", "b", FLAVOR, IMAGE, f"{name}2", ["web"], ["net-b"])))
        secfw("sync")
        cloud.eventually("a", "b", 80, allowed=True)
        assert not cloud.tcp("a", "b", 22)
        lab.in_fabric(api.store.close)
        namespaces = [lab.fabric_ns, *(lab.labs[h].host_ns for h in lab.hosts)]
        state = json.loads(lab.state_file.read_text())
        processes = [state["processes"][role] for role in ("etcd", f"agent:{name}2")]
        secfw("down")
        assert not any(netns_exists(ns) for ns in namespaces)
        assert not any(same_process(pid, command) for pid, command in processes)
    finally:
        lab.down()
