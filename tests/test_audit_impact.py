"""``secfw audit impact``: flows a change newly allows or denies, before it is made.

On the operations guide's cloud: a new rule opens exactly its box to the instances
of its group (and nothing else); deleting it again is the mirror; a neutral command
gives no row; the store is unchanged by ``impact -- …``. ``difference`` is checked
on hypothesis regions point by point. SQLite keeps no history: ``--from-revision``
fails in one line.
"""

from __future__ import annotations

import json
from typing import Any

import netaddr
from hypothesis import given, settings
from hypothesis import strategies as st

from secfw.api import Api
from secfw.audit.impact import impact, scope_ports
from secfw.audit.policy import CloudPolicy
from secfw.audit.space import Box, Region, contains, difference
from secfw.lab.demo import build_guide_cloud
from secfw.store import open_store


def _rows(cli: Any, *args: str) -> Any:
    """The JSON rows of ``audit impact`` (``-f json`` before the nested command)."""
    return json.loads(cli.ok("-f", "json", *args))


def _guide(store_url: str) -> None:
    api = Api(open_store(store_url))
    build_guide_cloud(api)
    api.store.close()


def test_impact_of_a_new_rule_is_its_box_on_its_instances(cli: Any, store_url: str,
                                                          store_state: Any) -> None:
    _guide(store_url)
    before = store_state(store_url)
    rows = _rows(cli, "--project", "alpha", "audit", "impact", "--", "secgroup-add-rule",
                    "global_http", "tcp", "8080", "8081", "198.51.100.0/24")
    assert store_state(store_url) == before  # nothing written
    assert rows and all(r["change"] == "allowed" for r in rows)
    assert {r["instance"] for r in rows} == {"web1", "web2"}
    for row in rows:
        assert (row["direction"], row["protocol"], row["ports"]) == ("ingress", "tcp", "8080-8081")
        assert row["sources"] == ["198.51.100.0/24"]
        assert [r["group"] for r in row["rules"]] == ["global_http"]


def test_impact_of_deleting_a_rule_is_newly_denied(cli: Any, store_url: str) -> None:
    _guide(store_url)
    rows = _rows(cli, "--project", "alpha", "audit", "impact", "--", "secgroup-delete-rule",
                    "global_http", "tcp", "443", "443", "0.0.0.0/0")
    assert rows and {r["change"] for r in rows} == {"denied"}
    ingress = [r for r in rows if r["direction"] == "ingress"]
    assert {(r["instance"], r["ports"]) for r in ingress} == {("web1", "443"), ("web2", "443")}
    assert all(r["rules"][0]["group"] == "global_http" for r in ingress)
    # the other instances can no longer open 443 towards the web servers (their egress)
    webs = {r["address"] for r in ingress}
    egress = [r for r in rows if r["direction"] == "egress"]
    assert egress and all(set(r["destinations"]) <= {f"{w}/32" for w in webs} for r in egress)


def test_neutral_change_and_errors(cli: Any, store_url: str) -> None:
    _guide(store_url)
    # creating a group no instance uses changes no flow
    assert _rows(cli, "--project", "alpha", "audit", "impact", "--", "secgroup-create",
                    "spare", "nobody uses it") == []
    out = cli.fails("--project", "alpha", "audit", "impact", "--", "secgroup-add-rule",
                    "nosuch", "tcp", "22", "22", "0.0.0.0/0", code=3)
    assert "nosuch" in out
    cli.fails("audit", "impact", "--", "lab", "up", code=2)
    out = cli.fails("audit", "impact", "--from-revision", "1", code=7)
    assert "history" in out


def test_impact_on_a_new_instance(api: Api) -> None:
    build_guide_cloud(api)
    before = CloudPolicy(api.snapshot())
    api.boot("alpha", "web3", "m1.tiny", "cirros", "compute1", ["global_http"], ["alpha-net"])
    after = CloudPolicy(api.snapshot())
    rows = impact(before, after, scope_ports(before, after, "alpha", False))
    assert {r["instance"] for r in rows if r["direction"] == "ingress"} >= {"web3"}
    assert all(r["change"] == "allowed" for r in rows if r["instance"] == "web3")


_boxes = st.builds(lambda p, a, b: Box(p, p, min(a, b), max(a, b)),
                   st.sampled_from([6, 17]), st.integers(0, 40), st.integers(0, 40))
_nets = st.sampled_from(["10.0.0.0/30", "10.0.0.2/31", "10.0.0.0/29", "10.0.0.5/32"])
_regions = st.lists(st.builds(lambda n, b: Region("ipv4", netaddr.IPSet([n]), b), _nets, _boxes),
                    max_size=4)


@settings(max_examples=60, deadline=None)
@given(_regions, _regions)
def test_difference_is_pointwise(left: list[Region], right: list[Region]) -> None:
    found = difference("ipv4", left, right)
    for address in (f"10.0.0.{i}" for i in range(9)):
        for proto in (6, 17):
            for sel in range(0, 42):
                point = Box(proto, proto, sel, sel)
                expected = contains(left, address, point) and not contains(right, address, point)
                assert contains(found, address, point) == expected, (address, proto, sel)
