"""verify's data path (:mod:`secfw.audit.skeleton`) on the golden clouds' kernel listings.

The listings are what nft 1.0.6 printed for the golden rulesets (tests/test_golden.py
checks they are the kernel's own output). Against the model's rendering:

* untouched, the skeleton is equal and no port differs;
* any one element of a set keyed by a port (its tap, or on a bridged host its mark,
  read from the listing's own ``egress_marks``/``ingress_marks``) deleted: exactly
  that port differs, the skeleton stays equal;
* a rule whose first statement names a port's tap added to a base chain: that port;
* an element keyed by no port, a rule naming no tap, a rule naming an interface
  that is no port's, a chain's hook changed, a table with flags (dormant: none of
  its chains runs; the evaluator then answers ``unknown``): a skeleton difference
  (every port probed).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from test_golden import CLOUDS, HOST, api, listing_path  # noqa: F401 (api: a fixture)

from secfw.api import Api
from secfw.audit import nftkernel
from secfw.audit.skeleton import PortData, port_data
from secfw.backends import TOPOLOGIES
from secfw.backends.nftables import Ruleset, render
from secfw.compiler.build import compile_host
from secfw.compiler.ir import HostFilter

#: Sets and maps keyed by a port (docs/nftables.md, "Membership is data").
PORT_KEYED = ("ingress_ports", "egress_ports", "ingress_slot0", "egress_slot0", "spoof4",
              "spoof6", "nd_targets", "arp_hosts", "egress_marks", "ingress_marks")


def checked(hf: HostFilter, topology: str, listing: dict[str, Any]) -> PortData:
    return port_data(listing, rendered(hf, topology), topology, [p.tap for p in hf.ports],
                     {c.name for c in hf.chains}, {s.name for s in hf.sets})


_RENDERED: dict[tuple[int, str], tuple[HostFilter, Ruleset]] = {}


def rendered(hf: HostFilter, topology: str) -> Ruleset:
    """``render(hf, topology)``, once per filter (each test checks many listings)."""
    hit = _RENDERED.get((id(hf), topology))
    if hit is None or hit[0] is not hf:
        hit = _RENDERED[(id(hf), topology)] = (hf, render(hf, topology))
    return hit[1]


def owners(listing: dict[str, Any]) -> dict[str, str]:
    """Element key → tap: taps themselves, and the marks the listing maps them to."""
    found: dict[str, str] = {}
    for obj in listing["nftables"]:
        body = obj.get("map")
        if body is not None and body["name"] in ("egress_marks", "ingress_marks"):
            for tap, mark in body.get("elem", []):
                found[tap] = tap
                found[str(mark)] = tap
        if body is not None and body["name"] == "egress_ports":
            found.update((str(key), str(key)) for key, _ in body.get("elem", [])
                         if str(key).startswith("tap"))
    return found


def first_key(element: Any) -> str:
    key = element[0] if isinstance(element, list) else element
    key = key["concat"][0] if isinstance(key, dict) and "concat" in key else key
    return str(key)


def body_of(listing: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((body for obj in listing["nftables"] for kind, body in obj.items()
                 if kind in ("set", "map", "chain") and body.get("name") == name), None)


@pytest.fixture(params=[(c, t) for c in sorted(CLOUDS) for t in TOPOLOGIES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def golden(request: pytest.FixtureRequest, api: Api) -> tuple[HostFilter, str, dict[str, Any]]:  # noqa: F811
    cloud, topology = request.param
    allow_same_net = CLOUDS[cloud](api)
    hf = compile_host(api.snapshot(), HOST, allow_same_net)
    return hf, topology, json.loads(listing_path(cloud, topology).read_text())


def test_each_port_element_deleted_names_its_port(
        golden: tuple[HostFilter, str, dict[str, Any]]) -> None:
    hf, topology, listing = golden
    assert checked(hf, topology, listing) == PortData(None, frozenset())
    tap_of = owners(listing)
    tried = 0
    for name in PORT_KEYED:
        body = body_of(listing, name)
        for index, element in enumerate(body.get("elem", []) if body else []):
            tampered = copy.deepcopy(listing)
            del body_of(tampered, name)["elem"][index]  # type: ignore[index]
            found = checked(hf, topology, tampered)
            assert found == PortData(None, frozenset({tap_of[first_key(element)]})), \
                (name, element, found)
            tried += 1
    assert tried >= 2 * len(hf.ports)


def rule(listing: dict[str, Any], chain: str, expr: list[Any]) -> dict[str, Any]:
    """``listing`` with a rule ``expr`` first in ``chain`` (of any family)."""
    tampered = copy.deepcopy(listing)
    body = body_of(tampered, chain)
    assert body is not None
    at = next(i for i, obj in enumerate(tampered["nftables"])
              if "rule" in obj and obj["rule"]["chain"] == chain)
    tampered["nftables"].insert(at, {"rule": {"family": body["family"], "table": "secfw",
                                              "chain": chain, "expr": expr}})
    return tampered


def test_a_rule_naming_a_tap_is_that_port_s(
        golden: tuple[HostFilter, str, dict[str, Any]]) -> None:
    hf, topology, listing = golden
    tap = hf.ports[0].tap
    chain = "forward-ingress" if topology == "routed" else "to-tap"
    guarded = [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": tap}},
               {"drop": None}]
    assert checked(hf, topology, rule(listing, chain, guarded)) == \
        PortData(None, frozenset({tap}))
    unguarded = [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp",
                                                              "field": "dport"}},
                            "right": 2222}}, {"accept": None}]
    stranger = [dict(guarded[0], match=dict(guarded[0]["match"], right="tapnobody")),
                {"drop": None}]
    for expr in (unguarded, stranger):
        assert checked(hf, topology, rule(listing, chain, expr)).skeleton is not None


def test_an_element_keyed_by_no_port_or_a_hook_is_the_skeleton(
        golden: tuple[HostFilter, str, dict[str, Any]]) -> None:
    hf, topology, listing = golden
    tampered = copy.deepcopy(listing)
    ports = body_of(tampered, "ingress_ports")
    assert ports is not None
    ports["elem"].append(["tap*" if topology == "routed" else 12345, {"accept": None}])
    assert checked(hf, topology, tampered).skeleton is not None
    tampered = copy.deepcopy(listing)
    base = body_of(tampered, "forward-egress")
    assert base is not None
    base["prio"] = base["prio"] + 1
    assert checked(hf, topology, tampered).skeleton is not None


def test_a_dormant_table_is_the_skeleton_and_unknown_to_the_evaluator(
        golden: tuple[HostFilter, str, dict[str, Any]]) -> None:
    hf, topology, listing = golden
    tampered = copy.deepcopy(listing)
    table = next(obj["table"] for obj in tampered["nftables"]
                 if "table" in obj and obj["table"]["family"] == "inet")
    table["flags"] = "dormant"
    assert checked(hf, topology, tampered).skeleton is not None
    stage = nftkernel.paths_after(topology, hf.ports[0].tap, "ingress")[0]
    probe = nftkernel.Probe(stage.iifname, stage.oifname, "192.0.2.1", "10.0.0.1", 6,
                            sport=40000, dport=22)
    with pytest.raises(nftkernel.Unsupported, match="dormant"):
        nftkernel.NftRuleset(tampered).run([stage], probe)
    nftkernel.NftRuleset(listing).run([stage], probe)  # untouched: evaluated
