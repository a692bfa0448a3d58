"""A write transaction reads only the kinds of records it touches (CloudState.lazy).

The lazy state must be indistinguishable from the eager one for everything it
is asked, and a write that concerns groups and rules must not read the ports
and instances (the cost that made every command O(cloud)).
"""

from __future__ import annotations

from typing import Any

import pytest

import secfw.store.sqlite
from secfw.api import Api
from secfw.cloud import _INDEX_KIND, CloudState
from secfw.demo import build_guide_cloud
from secfw.model import RECORD_TYPES
from secfw.store.base import LazySnapshot, Snapshot


def _lazy_over(snapshot: Snapshot, fetched: list[str]) -> CloudState:
    def fetch(kind: str) -> dict[str, Any]:
        fetched.append(kind)
        return snapshot.kind(kind)

    return CloudState.lazy(LazySnapshot(snapshot.revision, fetch, snapshot.all_docs))


@pytest.fixture
def guide_snapshot(api: Api) -> Snapshot:
    build_guide_cloud(api)
    return api.store.load()


@pytest.mark.parametrize("index", sorted(_INDEX_KIND))
def test_every_index_of_a_lazy_state_equals_the_eager_one(guide_snapshot: Snapshot,
                                                          index: str) -> None:
    fetched: list[str] = []
    lazy = _lazy_over(guide_snapshot, fetched)
    eager = CloudState.from_snapshot(guide_snapshot)
    assert getattr(lazy, index) == getattr(eager, index)
    assert fetched == [_INDEX_KIND[index]]


def test_every_view_of_a_lazy_state_equals_the_eager_one(guide_snapshot: Snapshot) -> None:
    fetched: list[str] = []
    lazy = _lazy_over(guide_snapshot, fetched)
    eager = CloudState.from_snapshot(guide_snapshot)
    for kind in RECORD_TYPES:
        assert lazy.records[kind] == eager.records[kind], kind
    assert sorted(fetched) == sorted(RECORD_TYPES)  # each kind read once


def test_a_put_into_an_unread_kind_reads_it_first(guide_snapshot: Snapshot) -> None:
    """Replacing a record must unindex the stored one: put reads the kind."""
    fetched: list[str] = []
    lazy = _lazy_over(guide_snapshot, fetched)
    eager = CloudState.from_snapshot(guide_snapshot)
    port = next(iter(eager.ports.values()))
    lazy.put(port)
    assert fetched == ["port"]
    assert lazy.used_ips == eager.used_ips


def test_a_rule_write_reads_no_port_nor_instance(api: Api, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    build_guide_cloud(api)
    fetched: list[str] = []
    load_kind = secfw.store.sqlite._load_kind

    def spy(conn: Any, kind: str) -> dict[str, Any]:
        fetched.append(kind)
        return load_kind(conn, kind)

    monkeypatch.setattr(secfw.store.sqlite, "_load_kind", spy)
    api.secgroup_add_rule("alpha", "global_http", "tcp", "8080", "8080", "10.0.0.0/8")
    assert fetched, "the write did not go through the lazy snapshot"
    assert not {"port", "instance", "network", "image"} & set(fetched), fetched
    assert [r.port_min for r in api.secgroup_list_rules("alpha", "global_http")] == [
        80, 443, 8080]
