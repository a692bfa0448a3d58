"""Representative ``secfw`` command-line flows run again on the etcd store.

The tests are test_cli.py's own, imported here so pytest collects them in this
module, where the ``store_url`` fixture names a fresh prefix on the session's
etcd (tests/conftest.py). The error contract's "a failed command changes
nothing" check (``Cli.fails``) then holds on etcd too.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
from test_cli import (  # noqa: F401  (collected by pytest from this module)
    booted,
    cloud,
    test_bad_input_is_one_line_and_changes_nothing,
    test_boot_prints_the_server,
    test_default_group_created_on_first_use,
    test_delete_server_frees_its_ports,
    test_group_quota_exceeded,
    test_guide_cluster_source_group,
    test_guide_global_http,
    test_guide_open_group,
    test_list_and_show,
    test_port_list,
    test_rules_add_list_delete_both_formats,
    test_secgroup_delete,
    test_secgroup_membership,
)

from secfw.cli.main import main
from secfw.store import open_store

if TYPE_CHECKING:
    from conftest import Cli, EtcdServer


@pytest.fixture
def store_url(etcd_server: EtcdServer) -> str:
    """A fresh prefix on the session's etcd instead of a SQLite file."""
    return etcd_server.url()


def test_store_from_the_environment(cli: Cli) -> None:
    """``$SECFW_STORE=etcd://…`` selects the etcd store as ``--store`` does."""
    created = cli.runner.invoke(main, ["secgroup-create", "envgroup", "from the environment"],
                                env={"SECFW_STORE": cli.store_url})
    assert created.exit_code == 0, created.stderr
    store = open_store(cli.store_url)
    try:
        names = {doc["name"] for doc in store.load().docs["secgroup"].values()}
    finally:
        store.close()
    assert "envgroup" in names


def test_audit_impact_between_two_revisions(cli: Cli, store_url: str) -> None:
    """etcd keeps its history: ``audit impact --from-revision`` compares the cloud
    at two revisions (the rule added in between is newly allowed; reversed, denied)."""
    from secfw.api import Api
    from secfw.lab.demo import build_guide_cloud
    from secfw.store import open_store

    api = Api(open_store(store_url))
    build_guide_cloud(api)
    before = api.store.revision()
    api.secgroup_add_rule("alpha", "cluster", "tcp", "5432", "5432", "10.10.0.0/24")
    after = api.store.revision()
    api.store.close()
    rows = json.loads(cli.ok("-f", "json", "--project", "alpha", "audit", "impact",
                             "--from-revision", str(before), "--to-revision", str(after)))
    ingress = [r for r in rows if r["direction"] == "ingress"]
    assert [(r["change"], r["instance"], r["ports"], r["sources"]) for r in ingress] == [
        ("allowed", "db1", "5432", ["10.10.0.0/24"])]
    back = json.loads(cli.ok("-f", "json", "--project", "alpha", "audit", "impact",
                             "--from-revision", str(after), "--to-revision", str(before)))
    assert {r["change"] for r in back} == {"denied"} and len(back) == len(rows)
