"""What only the etcd store has: its URL, fail-over between members, the schema
key, and etcd's refusals reported as one clear StoreError. The Store contract
itself is tests/test_store_contract.py (both stores)."""

from __future__ import annotations

import base64
import ipaddress
import socket
from typing import TYPE_CHECKING, Any

import pytest

import secfw.store.etcd
from secfw.agent.storewatch import ReopeningStore
from secfw.errors import StoreError
from secfw.store import open_store
from secfw.store.etcd import DEFAULT_PREFIX, EtcdStore, parse_url

if TYPE_CHECKING:
    from conftest import EtcdServer


def _refusing_port() -> int:
    """A port on 127.0.0.1 that is bound but not listening: connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("url", "endpoints", "prefix"), [
    ("etcd://127.0.0.1:2379", (("127.0.0.1", 2379),), DEFAULT_PREFIX),
    ("etcd://a:1,b:2/", (("a", 1), ("b", 2)), DEFAULT_PREFIX),
    ("etcd://a:1/cloud/one/", (("a", 1),), "/cloud/one"),
    ("etcd://[::1]:2379/x", (("::1", 2379),), "/x"),
    ("etcd://::1:2379", (("::1", 2379),), DEFAULT_PREFIX),
    ("etcd://project_etcd_1:2379", (("project_etcd_1", 2379),), DEFAULT_PREFIX),
    ("etcd://etcd-1.example.org:2379,10.0.0.2:2379", (("etcd-1.example.org", 2379),
                                                      ("10.0.0.2", 2379)), DEFAULT_PREFIX),
])
def test_url_forms(url: str, endpoints: tuple[tuple[str, int], ...], prefix: str) -> None:
    parsed = parse_url(url)
    assert (parsed.endpoints, parsed.prefix) == (endpoints, prefix)


@pytest.mark.parametrize("url", [
    "etcd://", "etcd://host", "etcd://host:", "etcd://:2379", "etcd://h:0", "etcd://h:99999",
    "etcd://h:1,,h:2", "etcd://h:port", "etcd://[::1:2379", "etcd://[h]:2379",
    "etcd://-h:2379", "etcd://h..x:2379",
    # user information, a query, a fragment: once taken into the host or the prefix
    "etcd://user:pw@h:2379/p", "etcd://h:2379/p?x=1", "etcd://h:2379/p#f", "etcd://h :2379",
])
def test_malformed_urls_are_store_errors(url: str) -> None:
    with pytest.raises(StoreError, match="HOST:PORT"):
        open_store(url)


def test_a_dead_member_is_skipped(etcd_server: EtcdServer) -> None:
    prefix = etcd_server.url().rsplit("/", 1)[1]
    url = f"etcd://127.0.0.1:{_refusing_port()},{etcd_server.endpoint}/{prefix}"
    store = open_store(url)
    try:
        with store.write() as txn:
            txn.put("secgroup", "a", {"name": "a"})
        assert store.load().docs == {"secgroup": {"a": {"name": "a"}}}
    finally:
        store.close()


def test_no_reachable_member_is_one_store_error() -> None:
    url = f"etcd://127.0.0.1:{_refusing_port()},127.0.0.1:{_refusing_port()}/x"
    with pytest.raises(StoreError, match="no etcd member reachable"):
        open_store(url)


def test_another_schema_version_is_refused(etcd_server: EtcdServer) -> None:
    url = etcd_server.url()
    prefix = parse_url(url).prefix
    etcd_server.post("kv/put", {"key": base64.b64encode(f"{prefix}/schema".encode()).decode(),
                                "value": base64.b64encode(b"99").decode()})
    with pytest.raises(StoreError, match="schema version 99"):
        EtcdStore(url)


def test_prefixes_are_separate_stores(etcd_server: EtcdServer) -> None:
    """Two prefixes on one cluster: neither sees the other's documents, and
    writes under one do not move the other's revision."""
    one, two = open_store(etcd_server.url()), open_store(etcd_server.url())
    try:
        with one.write() as txn:
            txn.put("secgroup", "a", {"name": "a"})
        assert two.load().docs == {} and two.revision() == 0
        with two.write() as txn:
            txn.put("secgroup", "b", {"name": "b"})
        revision = one.revision()
        with two.write() as txn:
            txn.put("secgroup", "c", {"name": "c"})
        assert one.revision() == revision
        assert one.changes_since(revision) == (revision, [])
    finally:
        one.close()
        two.close()


def test_a_refused_transaction_says_which_limit(etcd_server: EtcdServer) -> None:
    """etcd refuses a transaction over --max-txn-ops; the error names the option.
    (The test server allows 100000 operations: this one has more, each port
    being six: its document and five index entries.)"""
    store = open_store(etcd_server.url())
    try:
        with pytest.raises(StoreError, match="max-txn-ops"), store.write() as txn:
            for number in range(17_000):
                txn.put("port", str(number), {"network_id": "n", "instance_id": "i", "mac": "m",
                                              "ip": str(ipaddress.ip_address(0x0A000000 + number))})
        assert store.revision() == 0
    finally:
        store.close()


def test_load_reads_pages_at_one_revision(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading reads pages of keys, all at the first page's revision: a write
    committed between two pages is not half in the snapshot."""
    monkeypatch.setattr(secfw.store.etcd, "PAGE_KEYS", 2)
    url = etcd_server.url()
    store, writer = EtcdStore(url), EtcdStore(url)
    try:
        with writer.write() as txn:
            for name in "abcdefg":
                txn.put("secgroup", name, {"name": name})
        before = writer.load()
        real_call = store._members.call
        pages = []

        def call_then_write(what: str, request: Any) -> Any:
            answer = real_call(what, request)
            if what == "load" and not pages:
                with writer.write() as txn:  # between the first and the second page
                    txn.put("secgroup", "a", {"name": "changed"})
                    txn.put("secgroup", "zzz", {"name": "zzz"})
            pages.append(what)
            return answer

        monkeypatch.setattr(store._members, "call", call_then_write)
        assert store.load() == before
        assert pages.count("load") > 2  # it did read in pages
        monkeypatch.undo()
        assert store.load() == writer.load() != before
    finally:
        store.close()
        writer.close()


def test_the_agent_refuses_a_prefix_that_holds_no_store(etcd_server: EtcdServer) -> None:
    """A mistyped prefix must not read as an empty cloud (the agent would drop
    every port's traffic): the agent's store refuses it and creates nothing."""
    url = etcd_server.url()
    agent_view = ReopeningStore(url)
    with pytest.raises(StoreError, match="no secfw store under this prefix"):
        agent_view.load()
    with pytest.raises(StoreError, match="no secfw store under this prefix"):
        agent_view.load()  # still nothing: the first attempt did not initialise it
    created = open_store(url)
    try:
        with created.write() as txn:
            txn.put("secgroup", "a", {"name": "a"})
        assert agent_view.load().docs == {"secgroup": {"a": {"name": "a"}}}
    finally:
        agent_view.close()
        created.close()
