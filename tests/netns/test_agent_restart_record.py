"""A restart that needs no read-back (agent.kernelrecord): ``agent --once``
keeps the generation and digest of what the kernel holds in its state
directory, with the store revision and inputs its ruleset was made from; a
second ``--once`` with nothing changed trusts it — nothing loaded, no
read-back, 0 commands — and after a tampering (the generation moved) reads back
and repairs, judged with real packets. A daemon restarted in sync that way
builds its state on the next pass and enforces the changes after it exactly.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable
from typing import Any

import pytest
from agentproc import AgentProcess, cached_tcp, filtered_as_expected, lab_sync, poll, web_cloud

from secfw.agent.kernelrecord import record_path
from secfw.backends.nftables.generation import GenerationReader

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.backends("nftables", reason="the nftables generation"),
]

EXT = "external"


def once(cloud: Any) -> tuple[str, int]:
    """An ``agent --once`` run: its ``kernel_record`` action (``""`` when it
    logged none) and the commands of its sync."""
    stderr = cloud.agent_cli("--once").stderr
    record = re.findall(r'msg=kernel_record action="([^"]+)"', stderr)
    commands = re.findall(r"msg=sync .*\bcommands=(\d+)\b", stderr)
    assert len(commands) == 1, stderr
    return (record[0] if record else ""), int(commands[0])


def open_everything(cloud: Any) -> None:
    """Tampering behind the agent's back: an accept rule first in the ingress chain."""
    chain = "forward-ingress" if cloud.topology == "routed" else "postrouting-ingress"
    cloud.tamper("nft", f"insert rule inet secfw {chain} accept")


def test_a_restart_with_nothing_changed_reads_nothing_back(cloud: Any) -> None:
    web_cloud(cloud)
    action, commands = once(cloud)
    assert action == "" and commands > 0  # the first agent: no record yet
    assert not cloud.tcp(EXT, "web", 22)

    assert once(cloud) == ("in sync, nothing loaded", 0)
    assert once(cloud) == ("in sync, nothing loaded", 0)  # the record stays true
    assert not cloud.tcp(EXT, "web", 22)
    assert cloud.tcp(EXT, "web", 80)

    open_everything(cloud)
    assert cloud.tcp(EXT, "web", 22), "the tampering did not open tcp/22"
    action, commands = once(cloud)
    assert action == "" and commands > 0  # the generation moved: read back, repaired
    assert not cloud.tcp(EXT, "web", 22)
    assert cloud.tcp(EXT, "web", 80)

    cloud.api.secgroup_add_rule("p", "global_http", "tcp", "22", "22", "203.0.113.0/24")
    action, commands = once(cloud)
    assert action == "read back" and commands > 0  # another ruleset: another digest
    assert cloud.tcp(EXT, "web", 22)


def test_a_record_another_user_wrote_is_never_trusted(cloud: Any) -> None:
    """Tampering, then a record brought up to date by someone who is not the
    agent's user (another uid owns the file; or it is world-writable): its
    generation and digest match, yet the agent reads back and repairs. Before
    the record's ownership was checked, the agent trusted it and tcp/22 stayed
    open."""
    web_cloud(cloud)
    assert once(cloud)[1] > 0
    path = record_path(cloud.work_dir / "agent-state", cloud.host)
    assert path.exists()
    open_everything(cloud)
    for owner, mode in ((65534, 0o644), (os.geteuid(), 0o666)):
        assert cloud.tcp(EXT, "web", 22), "the tampering did not open tcp/22"
        forged = json.loads(path.read_text(encoding="utf-8"))
        reader = GenerationReader(cloud.lab.host_ns)
        try:
            forged["generation"] = reader.read()
        finally:
            reader.close()
        path.write_text(json.dumps(forged), encoding="utf-8")
        os.chown(path, owner, owner)
        os.chmod(path, mode)
        action, commands = once(cloud)
        assert action == "" and commands > 0  # refused: read back and repaired
        assert not cloud.tcp(EXT, "web", 22)
        assert cloud.tcp(EXT, "web", 80)
        open_everything(cloud)


def test_a_daemon_restarted_in_sync_enforces_the_next_changes_exactly(
        env: Any, agents: Callable[..., AgentProcess]) -> None:
    """``systemctl restart`` of a loaded host: the new daemon is in sync from
    the record (nothing loaded), builds its state on the next pass without a
    read-back, and then a rule added, a member removed and a port added each
    reach the kernel exactly (real packets)."""
    web_cloud(env)
    first = agents()
    first.wait_event("sync")
    poll(lambda: filtered_as_expected(env), "the first daemon's ruleset")
    assert first.kill(signal.SIGTERM) == 0  # the record is written at stop

    second = agents()
    second.wait_event("kernel_record", action="in sync, nothing loaded")
    built = second.wait_event("sync", trigger="materialize")
    assert built["commands"] == "0"
    assert filtered_as_expected(env)

    env.api.secgroup_add_rule("p", "global_http", "tcp", "22", "22", "0.0.0.0/0")
    poll(lambda: cached_tcp(env, EXT, "web", 22), "tcp/22 opened by the rule added")
    assert cached_tcp(env, "web", "db", 22)
    env.api.remove_secgroup("p", "web", "global_http")  # web leaves db's source group
    poll(lambda: not cached_tcp(env, "web", "db", 22), "web no longer a member")
    assert not cached_tcp(env, EXT, "web", 80)
    env.boot("web2", ["global_http"], "net-a")
    lab_sync(env)
    poll(lambda: env.tcp(EXT, "web2", 80), "the port added passes tcp/80")
    assert not env.tcp(EXT, "web2", 23)
    assert not second.events("drift_repaired")
