"""The agent's passes on the etcd store, judged with real packets.

The ``cloud`` fixture's store is a fresh prefix on the session's etcd
(tests/conftest.py) instead of a SQLite file, and its in-process agent
(``env.sync()``: the real Reconciler, the kernel of the lab's host namespace)
reads it. A ``secfw agent`` *process* runs inside the host namespace, whose
loopback cannot reach the tests' etcd: that is the multi-host lab's job (etcd
over the underlay, issue #13). One backend × topology: the store is under test.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest
from agentproc import filtered_as_expected, web_cloud

from secfw.lab import netns_tools

if TYPE_CHECKING:
    from conftest import EtcdServer

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.backends("nftables", reason="the store is under test, not the backend"),
    pytest.mark.topologies("routed", reason="the store is under test, not the topology"),
]


@pytest.fixture
def cloud_store_url(etcd_server: EtcdServer) -> str:
    return etcd_server.url()


def test_agent_passes_on_etcd_follow_writes_and_survive_compaction(
    env: Any, etcd_server: EtcdServer
) -> None:
    """The cloud is read from etcd and enforced; a rule added opens the port
    through an incremental pass (etcd's history); after the history was
    compacted past the agent's revision, the next pass loads everything and the
    removal of that rule closes the port again."""
    assert env.store_url.startswith("etcd://")
    web_cloud(env)
    assert env.sync().full
    assert filtered_as_expected(env)
    web_ns, web_ip, ext_ns = env.ns("web"), env.ip("web"), env.lab.external_ns
    with netns_tools.listen(web_ns, "tcp", 8080):
        assert not netns_tools.tcp_connect(ext_ns, web_ip, 8080, 0.3)
        rule = env.api.secgroup_add_rule("p", "global_http", "tcp", "8080", "8080",
                                         "0.0.0.0/0")
        result = env.sync(lab=False)
        assert not result.full and result.revision == env.api.store.revision()
        assert netns_tools.tcp_connect(ext_ns, web_ip, 8080, 0.3)

        env.api.rule_delete("p", rule.id)
        env.api.secgroup_add_rule("p", "global_http", "tcp", "8081", "8081", "0.0.0.0/0")
        etcd_server.compact()  # the delete is now out of etcd's history
        result = env.sync(lab=False)
        assert result.revision == env.api.store.revision()
        assert not netns_tools.tcp_connect(ext_ns, web_ip, 8080, 0.3)
    assert filtered_as_expected(env)
