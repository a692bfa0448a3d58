"""Read commands that page (--limit N, --marker ID; secfw.paging), on both stores.

The pages of a listing, followed by the markers they print on stderr, are the
unpaged listing, row for row; bad values are one stderr line and exit 2; a page
reads the store's ordered index and the page's records, never a whole kind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from secfw.api import Api
from secfw.store import open_store

if TYPE_CHECKING:  # tests/conftest.py: a runtime import would find tests/netns/conftest.py
    from conftest import Cli, EtcdServer

NEXT = re.compile(r"^secfw: next page: --marker (\S+)$")

#: Each listing with the options that scope it (run as project "p").
LISTINGS = (
    ("list",), ("list", "--all-projects"), ("list", "--host", "h1"),
    ("secgroup-list",), ("secgroup-list", "--all-projects"),
    ("secgroup-list-rules", "web"), ("security", "group", "rule", "list"),
    ("security", "group", "rule", "list", "web"),
    ("net-list",), ("net-list", "--all-projects"), ("port-list", "--host", "h1"),
)


@pytest.fixture(params=("sqlite", "etcd"))
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/paging.db"
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return server.url()


@pytest.fixture
def cloud(url: str, cli_on: type[Cli]) -> Cli:
    """Names that sort apart only by a prefix, a space, case and non-ASCII
    letters, in two projects whose names are prefixes of each other."""
    api = Api(open_store(url))
    try:
        api.net_create("admin", "n", "10.50.0.0/24")
        api.net_create("admin", "n b", "10.51.0.0/24")
        api.net_create("p", "nb", "10.52.0.0/24", vlan=5)
        api.net_create("q", "N", "10.53.0.0/24", vlan=6)
        api.image_create("admin", "cirros", visibility="public")
        for project in ("p", "pp"):
            for name in ("web", "a", "ab", "a b", "B", "é"):
                api.secgroup_create(project, name, name)
        for port in (22, 80, 443, 8080):
            api.secgroup_add_rule("p", "web", "tcp", str(port), str(port), "0.0.0.0/0")
        api.secgroup_add_group_rule("p", "a", "web", "tcp", "5432", "5432")
        for number, (name, host) in enumerate((("vm", "h1"), ("vm b", "h2"), ("vmb", "h1"),
                                               ("é", "h1"), ("Vm", "h1"))):
            api.boot("p", name, "m1.tiny", "cirros", host, ["web"], ["n", "nb"][: 1 + number % 2])
        api.boot("pp", "other", "m1.tiny", "cirros", "h1", None, ["n b"])
    finally:
        api.store.close()
    return cli_on(url)


def pages(cli: Cli, listing: tuple[str, ...], limit: int) -> Iterator[list[Any]]:
    """Every page of ``listing``, each marker taken from the previous page's stderr."""
    marker: list[str] = []
    for _ in range(50):
        result = cli.run("--project", "p", *listing, "-f", "json", "--limit", str(limit), *marker)
        assert result.exit_code == 0, (listing, result.stderr)
        yield json.loads(result.stdout)
        found = [NEXT.match(line) for line in result.stderr.splitlines()]
        if not any(found):
            assert result.stderr == ""
            return
        (match,) = [m for m in found if m]
        marker = ["--marker", match.group(1)]
    raise AssertionError("the pages never ended")


@pytest.mark.parametrize("listing", LISTINGS, ids=" ".join)
def test_pages_in_turn_are_the_listing(cloud: Cli, listing: tuple[str, ...]) -> None:
    whole = cloud.json("--project", "p", *listing)
    assert len(whole) >= 3, "too few rows to page"
    for limit in (1, 2, len(whole), len(whole) + 1):
        got = list(pages(cloud, listing, limit))
        assert [row for page in got for row in page] == whole, limit
        assert all(len(page) == limit for page in got[:-1])
        assert 1 <= len(got[-1]) <= limit


def test_the_last_full_page_names_no_next_one(cloud: Cli) -> None:
    whole = cloud.json("--project", "p", "list")
    result = cloud.run("--project", "p", "list", "--limit", str(len(whole)))
    assert result.exit_code == 0 and result.stderr == ""


@pytest.mark.parametrize("options", (("--limit", "0"), ("--limit", "-1"),
                                     ("--marker", "no-such-id"), ("--limit", "x")))
def test_bad_paging_values_are_one_line_and_exit_2(cloud: Cli, options: tuple[str, ...]) -> None:
    for listing in LISTINGS:
        line = cloud.fails("--project", "p", *listing, *options, code=2)
        assert ("--limit" in line) if options[0] == "--limit" else ("--marker" in line), line


def test_a_marker_of_another_listing_is_refused(cloud: Cli) -> None:
    """The id of a row the listing filters out (a VLAN network of another
    project, an instance of another host) cannot say where the page starts."""
    others = cloud.json("--project", "p", "net-list", "--all-projects")
    hidden = {n["id"] for n in others} - {n["id"] for n in cloud.json("--project", "p",
                                                                      "net-list")}
    (network,) = hidden
    cloud.fails("--project", "p", "net-list", "--marker", network, code=2)
    on_h2 = [i["id"] for i in cloud.json("--project", "p", "list") if i["host"] == "h2"]
    cloud.fails("--project", "p", "list", "--host", "h1", "--marker", on_h2[0], code=2)


def test_port_list_pages_one_host_at_a_time(cloud: Cli) -> None:
    line = cloud.fails("--project", "p", "port-list", "--limit", "2", code=2)
    assert "--host" in line


def _no_load() -> Any:
    raise AssertionError("a page loaded the whole store")


def test_a_page_reads_no_whole_kind(cloud: Cli, store_reads: Callable[[Api], list[list[str]]],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    api = Api(open_store(cloud.store_url))
    try:
        logs = store_reads(api)
        monkeypatch.setattr(api.store, "load", _no_load)
        first = api.server_page("p", None, False, 2, None)
        api.server_page("p", None, False, 2, first.next_marker)
        api.secgroup_page("p", True, 2, None)
        api.rule_page("p", "web", 2, None)
        api.network_page("p", False, 1, None)
        api.port_page("p", "h1", 2, None)
        reads = [r for log in logs for r in log]
        assert [r for r in reads if r.startswith("page ")], reads
        whole = {"all", "kind instance", "kind port", "kind secgroup", "kind rule",
                 "kind network"}
        assert not whole & set(reads), reads
    finally:
        api.store.close()


#: Each unpaged listing (as project "p") and the Api method that lists the same rows
#: from the whole store: the CLI reads them from the ordered indexes instead.
WHOLE_STORE_LISTINGS: tuple[tuple[tuple[str, ...], Callable[[Api], list[Any]]], ...] = (
    (("secgroup-list",), lambda api: api.secgroup_list("p")),
    (("secgroup-list", "--all-projects"), lambda api: api.secgroup_list("p", True)),
    (("secgroup-list-rules", "web"), lambda api: api.secgroup_list_rules("p", "web")),
    (("security", "group", "rule", "list"), lambda api: api.rule_list("p")),
    (("security", "group", "rule", "list", "a"), lambda api: api.rule_list("p", "a")),
    (("net-list",), lambda api: api.net_list("p")),
    (("net-list", "--all-projects"), lambda api: api.net_list("p", True)),
    (("list",), lambda api: api.list_instances("p")),
    (("list", "--all-projects"), lambda api: api.list_instances("p", None, True)),
    (("list", "--host", "h1"), lambda api: api.list_instances("p", "h1")),
)


@pytest.mark.parametrize(("listing", "listed"), WHOLE_STORE_LISTINGS,
                         ids=[" ".join(a) for a, _ in WHOLE_STORE_LISTINGS])
def test_an_unpaged_listing_is_the_whole_store_one(
        cloud: Cli, listing: tuple[str, ...], listed: Callable[[Api], list[Any]]) -> None:
    rows = cloud.json("--project", "p", *listing)
    api = Api(open_store(cloud.store_url))
    try:
        expected = listed(api)
    finally:
        api.store.close()
    assert [row["id"] for row in rows] == [item.id for item in expected]


def test_the_security_group_commands_never_load_the_whole_store(
        cloud: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write prints what it made, a listing lists: each reads by key. Loading
    the whole store cost ~6 s of CPU per command at 50k ports (bench_store)."""
    store_class = type(open_store(cloud.store_url))
    monkeypatch.setattr(store_class, "load", lambda _self: _no_load())
    commands = (
        ("secgroup-add-rule", "a", "tcp", "7", "7", "10.0.0.0/8"),
        ("secgroup-add-group-rule", "ab", "web", "tcp", "9", "9"),
        ("security", "group", "rule", "create", "ab", "--protocol", "udp", "--dst-port", "53",
         "--remote-group", "a"),
        ("secgroup-list",), ("secgroup-list", "--all-projects"), ("secgroup-list-rules", "ab"),
        ("security", "group", "rule", "list"), ("net-list",), ("list",),
        ("list", "--host", "h1"), ("list-secgroup", "vm"), ("show", "vm"),
    )
    for command in commands:
        cloud.ok("--project", "p", *command)
    rules = cloud.json("--project", "p", "secgroup-list-rules", "ab")
    assert [r["source_group"] for r in rules] == ["web", "a"]  # names, read by key
