"""A write that a restarted etcd watch delivers again never revives access the
store has revoked — judged with real packets.

The agent's pass takes the watch's documents from its ChangeFeed
(secfw.agent.etcdwatch). A watch that fails in mid-stream starts again after the
last write it knew of before, so writes come twice; appended again, the older
version of a document passed for the newest. Here: ``app`` joins
``global_http`` (db accepts ssh from its members), then leaves it; the feed
receives both writes and the first once more, as that watch would deliver them;
the pass must leave app without ssh to db. (The feed is fed by the test with
each write's documents, read from the store right after the write: the watch's
own transport is not what is under test.)"""

from __future__ import annotations

import os
from typing import Any

import pytest
from agentproc import web_cloud

from secfw.agent.etcdwatch import ChangeFeed
from secfw.store.base import Change

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.backends("nftables", reason="the feed is the same for every backend"),
]


def written(cloud: Any, write: Any) -> tuple[int, list[Change]]:
    """Make one write; its revision and documents, as the watch delivers them."""
    before = cloud.api.store.revision()
    write()
    return cloud.api.store.changes_since(before)


def test_a_replayed_write_never_revives_revoked_access(cloud: Any) -> None:
    web_cloud(cloud, lab=False)
    cloud.api.secgroup_create("p", "other", "app's own group")
    cloud.boot("app", ["other"], "net-a")
    cloud.sync()
    assert not cloud.tcp("app", "db", 22)

    feed = ChangeFeed()
    feed.start(cloud.api.store.revision())
    joined = written(cloud, lambda: cloud.api.add_secgroup("p", "app", "global_http"))
    left = written(cloud, lambda: cloud.api.remove_secgroup("p", "app", "global_http"))
    for write in (joined, left, joined):  # the last: delivered again after a restart
        feed.push(*write)
    cloud._reconciler.feed = feed
    cloud.sync(lab=False)
    assert not cloud.tcp("app", "db", 22), "a replayed write revived ssh from app"
    assert cloud._reconciler.applied_revision == left[0]  # not back at the replay's
