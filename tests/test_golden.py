"""Golden files: the rulesets of a few fixed clouds, for every backend × topology.

Each cloud is built through the real :class:`~secfw.api.Api` (ids and MACs made
deterministic), compiled for one host and printed as the backend loads it — the
nftables backend's ``nft -f`` text, the iptables backend's ipset/iptables-restore
input — so the four files of one cloud can be read side by side:
``tests/golden/<cloud>.<backend>-<topology>.txt``.

``SECFW_UPDATE_GOLDEN=1`` rewrites them; review the diff before committing.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import secfw.api
from secfw.api import Api
from secfw.backends import BACKENDS, TOPOLOGIES
from secfw.backends.nftables import KernelState, Ruleset, plan, render, to_nft_text
from secfw.compiler.build import compile_host
from secfw.compiler.ir import HostFilter
from secfw.store import open_store

GOLDEN = Path(__file__).parent / "golden"
HOST = "compute-1"
FLAVOR, IMAGE = "m1.tiny", "cirros"


def guide_cloud(api: Api) -> bool:
    """The operations guide's example: a web tier open to the world, a database
    reachable from the web servers only (a source group), ssh from one network,
    ICMP echo; one instance on another host. ``allow_same_net_traffic`` on."""
    api.net_create("demo", "private", "10.1.0.0/24")
    api.secgroup_create("demo", "global_http", "allow web traffic from the internet")
    api.secgroup_add_rule("demo", "global_http", "tcp", "80", "80", "0.0.0.0/0")
    api.secgroup_add_rule("demo", "global_http", "tcp", "443", "443", "0.0.0.0/0")
    api.secgroup_create("demo", "db", "database from the web tier")
    api.secgroup_add_group_rule("demo", "db", "global_http", "tcp", "5432", "5432")
    api.secgroup_add_rule("demo", "db", "tcp", "22", "22", "192.0.2.0/24")
    api.secgroup_add_rule("demo", "db", "icmp", "-1", "-1", "0.0.0.0/0")
    for name, groups, host in (("web1", ["global_http"], HOST), ("web2", ["global_http"], "c2"),
                               ("db1", ["db"], HOST), ("plain", None, HOST)):
        api.boot("demo", name, FLAVOR, IMAGE, host, groups, None)
    return True


def protection_cloud(api: Api) -> bool:
    """Neutron-style rules on a dual-stack network: egress restricted, IPv6 and ICMP
    type/code, a remote group, allowed address pairs (one with its own MAC), a port
    without port security. ``allow_same_net_traffic`` off."""
    api.net_create("p", "dual", "10.71.0.0/24", cidr6="2001:db8:71::/64")
    api.secgroup_create("p", "svc", "service")
    api.rule_create("p", "svc", protocol="tcp", dst_port="8000:8010")
    api.rule_create("p", "svc", ethertype="IPv6", protocol="icmpv6", icmp_type=128, icmp_code=0)
    api.rule_create("p", "svc", direction="egress", protocol="udp", dst_port="53",
                    remote_ip="198.51.100.0/24")
    api.rule_create("p", "svc", remote_group="svc", protocol="tcp", dst_port="9000")
    for name in ("a", "b", "open"):
        api.boot("p", name, FLAVOR, IMAGE, HOST, ["svc"], None)
    ports = {i.name: p for i in api.snapshot().instances.values()
             for p in api.snapshot().ports_of(i.id)}
    api.port_update("p", ports["a"].tap, allowed_address_pairs=[
        "10.71.0.200", "10.72.0.0/28,fa:16:3e:77:77:77"])
    api.port_update("p", ports["open"].tap, port_security=False)
    return False


CLOUDS: dict[str, Callable[[Api], bool]] = {"guide": guide_cloud, "protection": protection_cloud}


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Api:
    """An Api on a fresh store whose ids and MACs are counters, not random."""
    ids, macs = itertools.count(1), itertools.count(1)
    monkeypatch.setattr(secfw.api, "new_id",
                        lambda: f"{next(ids):08x}-0000-4000-8000-000000000000")
    monkeypatch.setattr(secfw.api, "_new_mac",
                        lambda used: f"fa:16:3e:00:00:{next(macs):02x}")
    created = Api(open_store(f"sqlite:///{tmp_path}/golden.db"))
    created.image_create("admin", IMAGE, "qcow2", "public")
    return created


def printed(hf: HostFilter, backend: str, topology: str) -> str:
    """What ``secfw compile --backend B --topology T`` prints for ``hf``."""
    if backend == "nftables":
        from secfw.backends.nftables import render, to_nft_text

        return to_nft_text(render(hf, topology))
    from secfw.backends.iptables import compile_text

    return compile_text(hf, topology=topology)


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cloud", sorted(CLOUDS))
def test_ruleset_matches_golden_file(api: Api, cloud: str, backend: str, topology: str) -> None:
    allow_same_net = CLOUDS[cloud](api)
    hf = compile_host(api.snapshot(), HOST, allow_same_net)
    text = printed(hf, backend, topology)
    path = GOLDEN / f"{cloud}.{backend}-{topology}.txt"
    if os.environ.get("SECFW_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs (SECFW_UPDATE_GOLDEN=1 rewrites it)"


def test_golden_clouds_are_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same cloud built twice prints the same bytes (so the files can be exact)."""
    texts = []
    for attempt in range(2):
        ids, macs = itertools.count(1), itertools.count(1)
        monkeypatch.setattr(secfw.api, "new_id",
                            lambda ids=ids: f"{next(ids):08x}-0000-4000-8000-000000000000")
        monkeypatch.setattr(secfw.api, "_new_mac",
                            lambda used, macs=macs: f"fa:16:3e:00:00:{next(macs):02x}")
        api = Api(open_store(f"sqlite:///{tmp_path}/d{attempt}.db"))
        api.image_create("admin", IMAGE, "qcow2", "public")
        guide_cloud(api)
        texts.append(printed(compile_host(api.snapshot(), HOST, True), "nftables", "bridged"))
    assert texts[0] == texts[1]


# --------------------------------------------------------------------------- read-back


def listing_path(cloud: str, topology: str) -> Path:
    """libnftables' JSON listing of a golden cloud's nftables tables (nft 1.0.6)."""
    return GOLDEN / f"{cloud}.nftables-{topology}.listing.json"


def listing_text(listing: dict[str, Any]) -> str:
    """A listing as stored: one object a line, handles and metainfo left out (they
    are not part of what is compared)."""
    objects = [{kind: {k: v for k, v in body.items() if k != "handle"}}
               for obj in listing["nftables"] for kind, body in obj.items()
               if kind != "metainfo"]
    lines = ",\n".join(json.dumps(obj, sort_keys=True) for obj in objects)
    return '{"nftables": [\n' + lines + "\n]}\n"


def golden_ruleset(api: Api, cloud: str, topology: str) -> Ruleset:
    allow_same_net = CLOUDS[cloud](api)  # builds the cloud: before the snapshot
    return render(compile_host(api.snapshot(), HOST, allow_same_net), topology)


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("cloud", sorted(CLOUDS))
def test_kernel_listing_reads_back_equal_rule_by_rule(api: Api, cloud: str,
                                                      topology: str) -> None:
    """What nft lists for a golden ruleset (stored; the netns test below checks the
    file is the kernel's own output) normalises to exactly the rendered state —
    every rule by comment and expressions — so a full pass plans nothing."""
    ruleset = golden_ruleset(api, cloud, topology)
    listing = json.loads(listing_path(cloud, topology).read_text())
    read, want = KernelState.from_nft_json(listing), KernelState.from_ruleset(ruleset)
    for key, chain in want.chains.items():
        assert read.chains[key] == chain, key
    assert read == want
    assert plan(read, ruleset).empty


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("cloud", sorted(CLOUDS))
def test_any_rule_replaced_under_its_comment_is_seen(api: Api, cloud: str,
                                                     topology: str) -> None:
    """Each rule of a golden listing in turn given other content (``accept``, or
    ``drop`` where it was ``accept``) under the same comment: the plan rewrites
    exactly that chain, never the whole table."""
    ruleset = golden_ruleset(api, cloud, topology)
    listing = json.loads(listing_path(cloud, topology).read_text())
    rules = [i for i, obj in enumerate(listing["nftables"]) if "rule" in obj]
    assert rules
    for index in rules:
        tampered = copy.deepcopy(listing)
        body = tampered["nftables"][index]["rule"]
        body["expr"] = [{"drop": None}] if body["expr"] == [{"accept": None}] else [
            {"accept": None}]
        tx = plan(KernelState.from_nft_json(tampered), ruleset)
        family, chain = body["family"], body["chain"]
        assert not tx.full and tx.commands[0] == f"flush chain {family} secfw {chain}", (
            body, tx.commands[:2])


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)")
@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("cloud", sorted(CLOUDS))
def test_listing_files_are_what_the_kernel_lists(api: Api, cloud: str, topology: str) -> None:
    """The stored listing is what this kernel and libnftables list after applying
    the golden ruleset (``SECFW_UPDATE_GOLDEN=1`` rewrites it)."""
    from secfw.backends.nftables import NftablesExecutor
    from secfw.bench.namespaces import scratch_netns

    ruleset = golden_ruleset(api, cloud, topology)
    with scratch_netns() as ns:
        executor = NftablesExecutor(ns)
        executor.apply_text(to_nft_text(ruleset))
        listing = executor.read_json()
        del executor
    assert listing is not None
    path = listing_path(cloud, topology)
    if os.environ.get("SECFW_UPDATE_GOLDEN"):
        path.write_text(listing_text(listing))
    assert listing_text(listing) == path.read_text(), (
        f"{path.name} differs (SECFW_UPDATE_GOLDEN=1 rewrites it)")
