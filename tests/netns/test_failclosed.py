"""Never open, whatever fails — proven with real packets (issue: fail-closed).

One test per way the agent used to fail open, each for every backend × topology
where it applies, each failing on the code before the fix:

* the first pass fails for a reason other than the store → the taps are closed,
  and READY=1 (which releases nova-compute) comes only once they are;
* one port the backend cannot express → that port closed, every other port
  filtered, and later changes (a removed permission) still reach the kernel;
* an explicit topology the taps contradict → refused with a clear error, taps
  closed in the layout they really have; ``--topology auto`` filters;
* br_netfilter switched off on a bridged host → switched back on at once
  (well before the next resync), bridged traffic filtered again.

Waits are bounded polls (agentproc.POLL_LIMIT); the latencies they observe are
printed, never asserted.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from agentproc import (
    EXT,
    POLL_LIMIT,
    cached_tcp,
    filtered_as_expected,
    measured,
    poll,
    table_exists,
    web_cloud,
)

from secfw.store import open_store

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

LONG_RESYNC = "60"  # so that only the mechanism under test can repair in time


def _put(env: Any, kind: str, doc_id: str, doc: dict[str, Any]) -> None:
    """Write a document into the store behind the API's back (what a newer or
    broken writer could leave there)."""
    store = open_store(env.store_url)
    try:
        with store.write() as txn:
            txn.put(kind, doc_id, doc)
    finally:
        store.close()


def _delete(env: Any, kind: str, doc_id: str) -> None:
    store = open_store(env.store_url)
    try:
        with store.write() as txn:
            txn.delete(kind, doc_id)
    finally:
        store.close()


def _closed(env: Any) -> bool:
    """secfw's table is there and nothing reaches the instances, not even what
    their groups allow (web:80 from outside, web → db:22)."""
    return (table_exists(env) and not cached_tcp(env, EXT, "web", 80)
            and not cached_tcp(env, "web", "db", 22))


# --------------------------------------------------------------------------- 1


def test_first_pass_failing_leaves_the_taps_closed_and_ready_waits_for_it(
    env: Any, agents: Any, tmp_path: Path
) -> None:
    """A store document the agent cannot load (not a store outage: an internal
    failure) makes every pass fail. The taps are closed all the same — before the
    first pass even ran — and READY=1 is sent only once they are; when the
    document is repaired the agent filters per the groups."""
    web_cloud(env)
    assert cached_tcp(env, EXT, "web", 22)  # no table yet: nothing filters
    _put(env, "port", "broken", {"id": "broken"})  # a port without its fields
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(POLL_LIMIT)
    try:
        started = time.monotonic()
        agent = agents("--resync-interval", LONG_RESYNC,
                       extra_env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        message = notify.recv(4096).decode()
        measured("agent start -> READY=1 with the first pass failing", time.monotonic() - started)
    finally:
        notify.close()
    assert message.startswith("READY=1\n") and "kernel holds closed" in message, message
    assert _closed(env)  # READY=1 came after the taps were closed
    failure = agent.wait_event("sync_failed")
    assert failure["reason"] == "internal"
    status = agent.status()
    assert status["state"] == "unhealthy" and status["enforcing"] == "closed"
    _delete(env, "port", "broken")
    repaired = time.monotonic()
    poll(lambda: filtered_as_expected(env), "filtering per the groups once the store is sound")
    measured("store repaired -> filtering per the groups", time.monotonic() - repaired)


# --------------------------------------------------------------------------- 2


def test_a_port_the_backend_cannot_express_is_closed_and_the_others_still_filtered(
    env: Any,
) -> None:
    """A rule the renderer refuses (an inverted port range, as a broken writer
    could store) in ``cluster``, which only ``db`` uses: db is left closed — even
    web → db:22, which cluster allows — web is filtered exactly per its groups,
    the pass names db's tap and the reason, and a permission removed afterwards
    still reaches the kernel (the host is not stuck on a stale ruleset)."""
    web_cloud(env)
    cluster = env.group_id("p", "cluster")
    _put(env, "rule", "unexpressible", {
        "id": "unexpressible", "group_id": cluster, "direction": "ingress",
        "ethertype": "IPv4", "protocol": "tcp", "port_min": 5001, "port_max": 5000})
    result = env.sync()
    db_tap = env.port("db").tap
    assert [p.tap for p in result.isolated] == [db_tap]
    assert "port range 5001-5000" in result.isolated[0].reason
    assert not env.tcp("web", "db", 22) and not env.ping("web", "db")  # db: closed
    assert env.tcp(EXT, "web", 80) and not env.tcp(EXT, "web", 22)  # web: per its groups
    env.api.secgroup_delete_rule("p", "global_http", "tcp", "80", "80", "0.0.0.0/0")
    env.sync()
    assert not env.tcp(EXT, "web", 80)  # the removal reached the kernel
    assert env.tcp(EXT, "web", 443)
    _delete(env, "rule", "unexpressible")
    result = env.sync()
    assert result.isolated == ()
    # db filtered per its groups again (polled: on a bridged host web's neighbour
    # entry for db failed while db was closed, and resolving it again takes a try)
    poll(lambda: env.tcp("web", "db", 22), "web -> db:22 once db is filtered again")
    assert not env.tcp(EXT, "db", 22)


# --------------------------------------------------------------------------- 3


def test_a_topology_the_taps_contradict_is_refused_and_closed(env: Any, agents: Any) -> None:
    """The agent told the other topology than the host has — before the fix the
    routed layout on a bridged host let every instance's traffic through — refuses
    with a clear error and keeps the taps closed in the layout they really have;
    ``--topology auto`` on the same host filters per the groups."""
    web_cloud(env)
    wrong = "routed" if env.topology == "bridged" else "bridged"
    agent = agents("--topology", wrong, "--resync-interval", LONG_RESYNC)
    failure = agent.wait_event("sync_failed")
    assert f"--topology {wrong}" in failure["error"] and env.topology in failure["error"]
    poll(lambda: _closed(env), "taps closed")
    assert not env.tcp(EXT, "web", 22)
    agent.wait_status(state="unhealthy")
    agent.stop()
    auto = agents("--topology", "auto")
    poll(lambda: filtered_as_expected(env), "auto: filtering per the groups")
    auto.wait_status(topology=env.topology)


# --------------------------------------------------------------------------- 5


@pytest.mark.topologies("bridged", reason="br_netfilter matters on bridged hosts only")
def test_br_netfilter_switched_off_is_switched_on_at_once(env: Any, agents: Any) -> None:
    """Someone turns br_netfilter's switch off: bridged IP then bypasses the filter
    (web:22 from outside reachable). The agent turns it back on at its next loop
    turn — long before the next resync (60 s here) — logs a drift repair, and the
    traffic is filtered again."""
    web_cloud(env)
    agent = agents("--resync-interval", LONG_RESYNC)
    poll(lambda: filtered_as_expected(env), "filtering per the groups")
    switch = "net.bridge.bridge-nf-call-iptables"
    started = time.monotonic()
    env.helpers.run("ip", "netns", "exec", env.lab.host_ns, "sysctl", "-qw", f"{switch}=0")
    poll(lambda: _sysctl(env, switch) == "1", "br_netfilter switched back on")
    measured("br_netfilter off -> on again", time.monotonic() - started)
    event = agent.wait_event("drift_repaired")
    assert "br_netfilter" in event["restored"]
    assert not env.tcp(EXT, "web", 22) and env.tcp(EXT, "web", 80)


def _sysctl(env: Any, key: str) -> str:
    return str(env.helpers.run("ip", "netns", "exec", env.lab.host_ns, "sysctl", "-n",
                               key).stdout.strip())


# --------------------------------------------------------------------------- 3, in the kernel


def test_the_wrong_layout_in_the_kernel_closes_the_taps_rather_than_opening_them(
    env: Any,
) -> None:
    """Whatever the agent decides, the kernel fails closed: the routed layout on a
    bridged host drops the frames of taps that are bridge ports (its bridge
    table), the bridged layout on a routed host drops packets of taps that are IP
    interfaces (its inet hooks; iptables: ``-i/-o tap+ -j DROP``). Before, both let
    every instance's traffic through."""
    from secfw.agent import Reconciler
    from secfw.backends import get_backend
    from secfw.config import Config

    if env.backend_name == "iptables" and env.topology == "bridged":
        pytest.skip("iptables sees bridged frames only through br_netfilter, which a "
                    "routed host need not have: the agent's topology check closes such "
                    "a host (test_a_topology_the_taps_contradict_is_refused_and_closed)")
    web_cloud(env)
    wrong = "routed" if env.topology == "bridged" else "bridged"
    store = open_store(env.store_url)
    try:
        backend = get_backend(env.backend_name, netns=env.lab.host_ns, topology=wrong)
        Reconciler(store, env.host, Config(), backend).reconcile(full=True)
    finally:
        store.close()
    assert not cached_tcp(env, EXT, "web", 22) and not cached_tcp(env, EXT, "web", 80)
    assert not cached_tcp(env, "web", "db", 22) and not cached_tcp(env, EXT, "db", 22)


# --------------------------------------------------------------------------- the evidence


def test_taps_joining_and_leaving_a_bridge_are_seen(scratch_ns: Any, helpers: Any) -> None:
    """What the topology check reads: rtnetlink says which taps are bridge ports
    (``tap_links``), and the link watcher reports a tap joining or leaving a
    bridge (libvirt plugs a tap after creating it), so the agent checks again."""
    from secfw.agent.linkwatch import LinkWatcher
    from secfw.lab.hostlab import run_in_netns
    from secfw.netns import tap_links

    ns = scratch_ns()
    ip = ("ip", "-n", ns, "link")
    helpers.run(*ip, "add", "sfwbr0", "type", "bridge")
    helpers.run(*ip, "add", "tapmove", "type", "veth", "peer", "name", "sfwpeer")
    assert tap_links(ns) == ({"tapmove": False}, True)
    moves: list[str] = []
    watcher = LinkWatcher(lambda _name, _present: None, on_move=moves.append)
    run_in_netns(ns, watcher.start)
    try:
        helpers.run(*ip, "set", "tapmove", "master", "sfwbr0")
        poll(lambda: moves == ["tapmove"], "the move into the bridge reported")
        assert tap_links(ns) == ({"tapmove": True}, True)
        helpers.run(*ip, "set", "tapmove", "nomaster")
        poll(lambda: moves == ["tapmove", "tapmove"], "the move out reported")
    finally:
        watcher.stop()
