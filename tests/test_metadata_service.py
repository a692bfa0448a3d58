"""The metadata service without namespaces: its HTTP paths (werkzeug's test
client), what the model gives each port, the conntrack entry it trusts, and the
compiler's redirect."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import Any

import pytest
from werkzeug.test import Client

from secfw.api import Api
from secfw.compiler.ir import HostFilter, PortPolicy
from secfw.compiler.metadata import (
    METADATA_ADDRESS,
    metadata_redirect,
    parse_listen,
    port_mark,
    with_metadata,
)
from secfw.metadata.app import MetadataApp
from secfw.metadata.content import InstanceData, hostname, index_host
from secfw.metadata.identity import Asker, redirected

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b"
FULL = InstanceData("0b6c-uuid", "Web 1", "web-1", "alpha", "10.0.0.5", {"role": "web"},
                    "k", KEY, b"#!/bin/sh\n")
BARE = InstanceData("9f1e-uuid", "db", "db", "alpha", "10.0.0.6")


def _get(data: InstanceData | None, path: str) -> tuple[int, bytes]:
    response = Client(MetadataApp(lambda environ: data)).get(path)
    return response.status_code, response.data


@pytest.mark.parametrize(("path", "body"), [
    ("/openstack", b"latest\n"),
    ("/openstack/", b"latest\n"),
    ("/openstack/latest/", b"meta_data.json\nuser_data\n"),
    ("/openstack/latest/user_data", b"#!/bin/sh\n"),
    ("/latest/", b"meta-data/\nuser-data\n"),
    ("/latest/meta-data/", b"hostname\ninstance-id\nlocal-hostname\nlocal-ipv4\npublic-keys/\n"),
    ("/latest/meta-data/instance-id", b"0b6c-uuid"),
    ("/latest/meta-data/hostname", b"web-1"),
    ("/latest/meta-data/local-hostname", b"web-1"),
    ("/latest/meta-data/local-ipv4", b"10.0.0.5"),
    ("/latest/meta-data/public-keys/", b"0=k\n"),
    ("/latest/meta-data/public-keys/0/", b"openssh-key\n"),
    ("/latest/meta-data/public-keys/0/openssh-key", KEY.encode() + b"\n"),
    ("/latest/user-data", b"#!/bin/sh\n"),
])
def test_paths_of_an_instance_with_everything(path: str, body: bytes) -> None:
    assert _get(FULL, path) == (200, body)


def test_meta_data_json_has_the_models_fields() -> None:
    status, body = _get(FULL, "/openstack/latest/meta_data.json")
    assert status == 200
    assert json.loads(body) == {
        "uuid": "0b6c-uuid", "name": "Web 1", "hostname": "web-1", "project_id": "alpha",
        "launch_index": 0, "availability_zone": "nova", "meta": {"role": "web"},
        "public_keys": {"k": KEY}, "keys": [{"name": "k", "type": "ssh", "data": KEY}],
    }
    assert "public_keys" not in json.loads(_get(BARE, "/openstack/latest/meta_data.json")[1])


@pytest.mark.parametrize("path", [
    "/openstack/latest/user_data", "/latest/user-data", "/latest/meta-data/public-keys/",
    "/latest/meta-data/public-keys/0/openssh-key",
])
def test_missing_pieces_are_404(path: str) -> None:
    assert _get(BARE, path)[0] == 404


def test_listings_leave_out_what_is_missing() -> None:
    assert _get(BARE, "/openstack/latest")[1] == b"meta_data.json\n"
    assert _get(BARE, "/latest")[1] == b"meta-data/\n"
    assert b"public-keys" not in _get(BARE, "/latest/meta-data/")[1]


@pytest.mark.parametrize("path", [
    "/", "/latest/meta-data/nope", "/openstack/2012-08-10/meta_data.json",
    "/latest/meta-data/public-keys/1/openssh-key", "/latest//user-data",
])
def test_unknown_paths_are_404(path: str) -> None:
    assert _get(FULL, path)[0] == 404


def test_an_unknown_asker_gets_404_everywhere() -> None:
    for path in ("/openstack", "/latest/meta-data/", "/latest/user-data"):
        assert _get(None, path)[0] == 404


def test_only_get_and_head() -> None:
    client = Client(MetadataApp(lambda environ: FULL))
    assert client.post("/latest/user-data").status_code == 405
    assert client.head("/latest/user-data").status_code == 200


def test_the_resolver_sees_only_the_connection() -> None:
    """Headers a client sends never reach the decision: the resolver gets the
    environ, and the app passes it on untouched (what it reads is the peer)."""
    seen: list[dict[str, Any]] = []

    def resolve(environ: dict[str, Any]) -> InstanceData | None:
        seen.append(environ)
        return FULL if environ["REMOTE_ADDR"] == "10.0.0.5" else None

    client = Client(MetadataApp(resolve))
    response = client.get("/latest/user-data", environ_base={"REMOTE_ADDR": "10.0.0.9"},
                          headers={"X-Forwarded-For": "10.0.0.5"})
    assert response.status_code == 404 and len(seen) == 1


@pytest.mark.parametrize(("name", "label"), [
    ("Web 1", "web-1"), ("a_b.c", "a-b-c"), ("--x--", "x"), ("!!!", "server"),
    ("x" * 80, "x" * 63),
])
def test_hostname(name: str, label: str) -> None:
    assert hostname(name) == label


# ---- the model → the index the server looks connections up in


def _cloud(api: Api) -> None:
    api.image_create("admin", "cirros", "qcow2", "public")
    api.net_create("alpha", "n1", "10.1.0.0/24")
    api.net_create("alpha", "n2", "10.2.0.0/24")
    api.keypair_add("alpha", "k", KEY)
    api.boot("alpha", "one", "m1.tiny", "cirros", "h1", None, ["n1"], key_name="k",
             user_data=b"one", meta=["a=1"])
    api.boot("alpha", "two", "m1.tiny", "cirros", "h1", None, ["n2"], user_data=b"two")
    api.boot("alpha", "far", "m1.tiny", "cirros", "h2", None, ["n1"])


def test_same_address_on_two_networks_gives_each_its_own_data(api: Api) -> None:
    """The API refuses overlapping networks today; the index must not depend on
    that: ``two``'s port is given ``one``'s address in the snapshot itself."""
    _cloud(api)
    cloud = api.snapshot()
    ports = {cloud.instances[p.instance_id].name: p for p in cloud.ports.values()}
    ports["two"] = replace(ports["two"], ip=ports["one"].ip)
    cloud.put(ports["two"])
    index = index_host(cloud, "h1")
    one = index[(port_mark(ports["one"].tap), ports["one"].ip)]
    two = index[(port_mark(ports["two"].tap), ports["two"].ip)]
    assert (one.name, one.user_data, one.public_key, one.meta) == ("one", b"one", KEY,
                                                                   {"a": "1"})
    assert (two.name, two.user_data, two.public_key) == ("two", b"two", None)
    assert len(index) == 2  # h2's instance is not served by h1


def test_a_port_without_port_security_is_not_served(api: Api) -> None:
    _cloud(api)
    cloud = api.snapshot()
    port = next(p for p in cloud.ports.values() if cloud.instances[p.instance_id].name == "one")
    api.port_update("alpha", port.tap, port_security=False)
    assert (port_mark(port.tap), port.ip) not in index_host(api.snapshot(), "h1")


# ---- the conntrack entry the server trusts


class _Attrs:
    def __init__(self, **attrs: Any) -> None:
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def _entry(mark: int | None, dst: str = METADATA_ADDRESS, dport: int = 80) -> _Attrs:
    tuple_ip = _Attrs(CTA_IP_V4_SRC="10.1.0.3", CTA_IP_V4_DST=dst)
    proto = _Attrs(CTA_PROTO_NUM=6, CTA_PROTO_SRC_PORT=40000, CTA_PROTO_DST_PORT=dport)
    return _Attrs(CTA_MARK=mark, CTA_TUPLE_ORIG=_Attrs(CTA_TUPLE_IP=tuple_ip,
                                                       CTA_TUPLE_PROTO=proto))


def test_only_a_redirected_connection_names_an_asker() -> None:
    mark = port_mark("tap1234")
    assert redirected(_entry(mark)) == Asker(mark, "10.1.0.3")
    assert redirected(_entry(None)) is None
    assert redirected(_entry(0)) is None  # no metadata mark
    assert redirected(_entry(mark, dst="192.0.2.254")) is None  # straight to the server
    assert redirected(_entry(mark, dport=8775)) is None


# ---- the compiler's redirect


def _port(tap: str, ips: tuple[str, ...], security: bool = True) -> PortPolicy:
    return PortPolicy(tap, "p-" + tap, "i", "fa:16:3e:00:00:01", ips, (), (),
                      port_security=security)


def test_redirect_covers_the_ipv4_addresses_of_protected_ports() -> None:
    md = metadata_redirect([_port("tapa", ("10.9.0.1", "10.0.0.1")), _port("tapb", ("10.0.0.2",)),
                            _port("tapc", ("10.0.0.3",), security=False)], "192.0.2.254", 8775)
    assert [(p.tap, p.address) for p in md.ports] == [
        ("tapa", "10.0.0.1"), ("tapa", "10.9.0.1"), ("tapb", "10.0.0.2")]
    assert {p.mark for p in md.ports if p.tap == "tapa"} == {port_mark("tapa")}
    assert port_mark("tapa") != port_mark("tapb")
    assert all(p.mark >> 24 == 0x5E for p in md.ports)


def test_with_metadata_off_and_on() -> None:
    hf = HostFilter("h", (_port("tapa", ("10.0.0.1",)),), (), ())
    assert with_metadata(hf, None) is hf
    on = with_metadata(hf, ("192.0.2.254", 8775))
    assert on.metadata is not None and on.metadata.address == "192.0.2.254"
    assert with_metadata(on, None) == replace(on, metadata=None)


@pytest.mark.parametrize("text", [
    "192.0.2.254", "192.0.2.254:0", "192.0.2.254:70000", "169.254.169.254:80", "0.0.0.0:80",
    "host:80", "[::1]:80",
])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


def test_parse_listen() -> None:
    assert parse_listen("192.0.2.254:8775") == ("192.0.2.254", 8775)


def test_config_metadata_listen(tmp_path: Any) -> None:
    from secfw.config import load_config
    from secfw.errors import ConfigError

    path = tmp_path / "secfw.conf"
    path.write_text("[DEFAULT]\nmetadata_listen = 192.0.2.254:8775\n")
    assert load_config(str(path)).metadata_listen == ("192.0.2.254", 8775)
    path.write_text("[DEFAULT]\nallow_same_net_traffic = false\n")
    assert load_config(str(path)).metadata_listen is None
    path.write_text("[DEFAULT]\nmetadata_listen = 169.254.169.254:80\n")
    with pytest.raises(ConfigError, match="metadata_listen"):
        load_config(str(path))


@pytest.mark.parametrize("topology", ["routed", "bridged"])
def test_renderer_follows_the_redirect_as_ports_come_and_go(topology: str) -> None:
    """The nftables Renderer's cached metadata part equals a fresh rendering, and
    the plan from its delta equals the plan from scratch, at every step."""
    from secfw.backends.nftables.plan import plan
    from secfw.backends.nftables.render import Renderer, render
    from secfw.backends.nftables.state import KernelState, StateCache

    one, two = _port("tapa", ("10.0.0.1",)), _port("tapb", ("10.0.0.2",))
    listen = ("192.0.2.254", 8775)
    steps = [
        with_metadata(HostFilter("h", (one,), (), ()), listen),
        with_metadata(HostFilter("h", (one, two), (), ()), listen),
        HostFilter("h", (one, two), (), ()),
        with_metadata(HostFilter("h", (two,), (), ()), listen),
        with_metadata(HostFilter("h", (two,), (), ()), ("192.0.2.253", 8775)),
    ]
    renderer, states = Renderer(topology), StateCache()
    previous = states.state(renderer.render(steps[0]), renderer.delta)
    for before, hf in itertools.pairwise(steps):
        ruleset = renderer.render(hf)
        assert ruleset == render(hf, topology)
        after = states.state(ruleset, renderer.delta)
        assert after == KernelState.from_ruleset(ruleset)
        expected = plan(KernelState.from_ruleset(render(before, topology)), ruleset)
        assert plan(previous, ruleset, after, renderer.delta) == expected
        previous = after


# ---- the command line


def test_serve_needs_an_address(cli: Any, tmp_path: Any) -> None:
    result = cli.run("metadata", "serve", "--host", "h1")
    assert result.exit_code == 2 and "--listen" in result.stderr
    result = cli.run("metadata", "serve", "--host", "h1", "--listen", "169.254.169.254:80")
    assert result.exit_code == 2 and "'--listen'" in result.stderr


def test_compile_shows_the_redirect_when_configured(cli: Any, tmp_path: Any) -> None:
    cli.ok("net-create", "n1", "10.1.0.0/24")
    cli.ok("image-create", "cirros", "--visibility", "public")
    cli.ok("boot", "vm", "--flavor", "m1.tiny", "--image", "cirros", "--nic", "net-id=n1",
           "--host", "h1")
    assert "metadata" not in cli.ok("compile", "--host", "h1")
    config = tmp_path / "secfw.conf"
    config.write_text("[DEFAULT]\nmetadata_listen = 192.0.2.254:8775\n")
    text = cli.ok("compile", "--host", "h1", "--config", str(config))
    assert "dnat ip to 192.0.2.254:8775" in text and "chain metadata-in" in text
    text = cli.ok("compile", "--host", "h1", "--config", str(config), "--backend", "iptables")
    assert "-j DNAT --to-destination 192.0.2.254:8775" in text


# ---- isolation keeps the redirect of the kept ports only


def test_an_isolated_port_loses_its_redirect() -> None:
    from secfw.agent.isolation import Isolation
    from secfw.errors import UnsupportedError

    good, bad = _port("tapa", ("10.0.0.1",)), _port("tapb", ("10.0.0.2",))
    desired = with_metadata(HostFilter("h", (good, bad), (), ()), ("192.0.2.254", 8775))

    def check(hf: HostFilter) -> None:
        if any(p.tap == "tapb" for p in hf.ports):
            raise UnsupportedError("refused")

    kept = Isolation().compute(desired, check)
    assert kept.metadata is not None
    assert [p.tap for p in kept.metadata.ports] == ["tapa"]


def test_a_store_that_cannot_answer_is_503() -> None:
    from secfw.errors import StoreError

    def resolve(environ: dict[str, Any]) -> InstanceData | None:
        raise StoreError("store down")

    assert Client(MetadataApp(resolve)).get("/latest/user-data").status_code == 503
