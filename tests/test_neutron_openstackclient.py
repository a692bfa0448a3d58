"""Unmodified python-openstackclient (and the openstacksdk under it) against
``secfw api serve``, started by the test on a free loopback port, noauth
(``--os-auth-type none --os-endpoint URL``: every call acts as the ``admin``
project).

The clients are the ``conformance`` extra (``make conformance`` installs them
and sets SECFW_REQUIRE_CONFORMANCE=1, which turns their absence into a
failure); without them these tests are skipped.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.conformance

OPENSTACK = Path(sys.executable).parent / "openstack"
SECFW = Path(sys.executable).parent / "secfw"
#: How long the server may take to print its address (start-up, not an assertion).
START_TIMEOUT_S = 60.0


def first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line the server prints on stdout (its address), waiting at
    most ``timeout`` seconds; a server that exits or stays silent fails."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"secfw api serve printed nothing in {timeout} s")
    line = proc.stdout.readline()
    if not line:
        stderr = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"secfw api serve exited: {stderr}")
    return line


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if not OPENSTACK.exists():
        if os.environ.get("SECFW_REQUIRE_CONFORMANCE") == "1":
            pytest.fail(f"{OPENSTACK} missing: pip install -e '.[conformance]'")
        pytest.skip("python-openstackclient not installed (the conformance extra)")
    store = f"sqlite:///{tmp_path_factory.mktemp('neutron')}/secfw.db"
    proc = subprocess.Popen(
        [str(SECFW), "--store", store, "api", "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = first_line(proc, START_TIMEOUT_S)
        url = line.split("listening on ", 1)[1].split()[0]
        yield {"url": url, "store": store}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def openstack(server: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    return subprocess.run(
        [str(OPENSTACK), "--os-auth-type", "none", "--os-endpoint", server["url"], *args],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )


def ok_json(server: dict[str, str], *args: str) -> Any:
    result = openstack(server, *args, "-f", "json")
    assert result.returncode == 0, (args, result.stderr)
    return json.loads(result.stdout)


def fails(server: dict[str, str], *args: str) -> str:
    result = openstack(server, *args)
    assert result.returncode != 0, (args, result.stdout)
    return result.stderr


def secfw(server: dict[str, str], *args: str) -> Any:
    result = subprocess.run([str(SECFW), "--store", server["store"], *args, "-f", "json"],
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)


def test_groups_and_rules(server: dict[str, str]) -> None:
    group = ok_json(server, "security", "group", "create", "web", "--description", "web tier")
    assert (group["name"], group["description"]) == ("web", "web tier")
    names = {g["Name"] for g in ok_json(server, "security", "group", "list")}
    assert {"default", "web"} <= names
    shown = ok_json(server, "security", "group", "show", "web")  # by name: 404, then ?name=
    assert shown["id"] == group["id"]
    rule = ok_json(server, "security", "group", "rule", "create", "web", "--protocol", "tcp",
                   "--dst-port", "80:81", "--remote-ip", "10.0.0.0/8")
    assert (rule["port_range_min"], rule["port_range_max"], rule["remote_ip_prefix"]) == (
        80, 81, "10.0.0.0/8")
    duplicate = fails(server, "security", "group", "rule", "create", "web", "--protocol", "6",
                      "--dst-port", "80:81", "--remote-ip", "10.0.0.0/8")
    assert f"Security group rule already exists. Rule id is {rule['id']}." in duplicate
    assert "Invalid value for port 70000" in fails(
        server, "security", "group", "rule", "create", "web", "--protocol", "tcp",
        "--dst-port", "70000")
    assert "Default security group already exists." in fails(
        server, "security", "group", "create", "default")
    listed = ok_json(server, "security", "group", "rule", "list", "web")
    assert [r["ID"] for r in listed] == [rule["id"]]
    nova_view = secfw(server, "secgroup-list-rules", "web")
    assert [(r["ip_protocol"], r["from_port"], r["to_port"]) for r in nova_view] == [
        ("tcp", 80, 81)]
    assert openstack(server, "security", "group", "rule", "delete", rule["id"]).returncode == 0
    assert ok_json(server, "security", "group", "rule", "list", "web") == []
    assert openstack(server, "security", "group", "delete", "web").returncode == 0
    assert "web" in fails(server, "security", "group", "show", "web")


def test_port_set_security_group(server: dict[str, str]) -> None:
    for args in (("net-create", "public", "10.10.0.0/24"),
                 ("image-create", "cirros", "--visibility", "public"),
                 ("boot", "vm1", "--flavor", "m1.tiny", "--image", "cirros", "--nic",
                  "net-id=public", "--host", "h1")):
        subprocess.run([str(SECFW), "--store", server["store"], *args], check=True,
                       capture_output=True, timeout=120)
    [port] = secfw(server, "port-list")
    db = ok_json(server, "security", "group", "create", "db")
    assert openstack(server, "port", "set", "--security-group", "db", port["id"]
                     ).returncode == 0
    shown = ok_json(server, "port", "show", port["id"])
    assert db["id"] in shown["security_group_ids"]
    assert [g["name"] for g in secfw(server, "list-secgroup", "vm1")] == ["default", "db"]
    assert "in use" in fails(server, "security", "group", "delete", "db")
    assert openstack(server, "port", "unset", "--security-group", "db", port["id"]
                     ).returncode == 0
    assert [g["name"] for g in secfw(server, "list-secgroup", "vm1")] == ["default"]
    assert openstack(server, "security", "group", "delete", "db").returncode == 0



def test_keystone_mode_rejects_requests_without_a_token(store_url: str) -> None:
    """The real auth_token filter (the ``keystone`` extra): no token is 401 even
    with a forged ``X-Project-Id`` (auth_token strips and refills identity
    headers), while the version document stays public. No Keystone is contacted:
    a request without a token is refused before any validation."""
    if os.environ.get("SECFW_REQUIRE_CONFORMANCE") != "1":
        pytest.importorskip("keystonemiddleware.auth_token")
    from secfw.api import Api
    from secfw.neutron_api.app import create_app
    from secfw.neutron_api.auth import ServiceConfig
    from secfw.store import open_store

    config = ServiceConfig(auth_strategy="keystone", keystone_authtoken={
        "www_authenticate_uri": "http://127.0.0.1:9/identity",
        "auth_url": "http://127.0.0.1:9/identity",
        "delay_auth_decision": "false",
    })
    api = Api(open_store(store_url))
    try:
        client = create_app(lambda: api, config).test_client()
        assert client.get("/").status_code == 200
        forged = client.get("/v2.0/security-groups",
                            headers={"X-Project-Id": "alpha", "X-Roles": "admin",
                                     "X-Identity-Status": "Confirmed"})
        assert forged.status_code == 401
        assert "alpha" not in {g.project for g in api.snapshot().groups.values()}
    finally:
        api.store.close()
