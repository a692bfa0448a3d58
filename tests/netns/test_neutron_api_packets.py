"""What the Neutron API writes, the agent enforces: real packets.

A group and a rule created through ``/v2.0`` (Flask's test client over the
cloud fixture's store), attached with ``PUT /v2.0/ports/ID``, open exactly the
rule's port to a real TCP handshake after one agent pass; deleting the rule
through the API closes it again. Every "blocked" has an "allowed" beside it.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from secfw.api import Api
from secfw.neutron_api.app import create_app
from secfw.store import open_store

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    # The API writes the model; every backend x topology reads the model the same
    # way (test_engine.py covers them): one combination proves the path.
    pytest.mark.backends("nftables", reason="the API path is backend-independent"),
    pytest.mark.topologies("routed", reason="the API path is topology-independent"),
]

EXT = "external"
HEADERS = {"X-Project-Id": "p", "X-Roles": "member"}


def _post(client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=body, headers=HEADERS)
    assert response.status_code == 201, response.get_json()
    result: dict[str, Any] = response.get_json()
    return result


def test_rules_written_through_the_api_are_enforced(cloud: Any) -> None:
    cloud.api.net_create("p", "net-a", "10.1.0.0/24")
    cloud.boot("vm", net="net-a")
    api = Api(open_store(cloud.store_url))
    client = create_app(lambda: api).test_client()
    try:
        group = _post(client, "/v2.0/security-groups",
                      {"security_group": {"name": "web"}})["security_group"]
        rule = _post(client, "/v2.0/security-group-rules", {"security_group_rule": {
            "security_group_id": group["id"], "direction": "ingress", "protocol": "tcp",
            "port_range_min": 80, "port_range_max": 80}})["security_group_rule"]
        port = client.put(f"/v2.0/ports/{cloud.port('vm').id}", headers=HEADERS,
                          json={"port": {"security_groups": [group["id"]]}})
        assert port.status_code == 200, port.get_json()
        cloud.sync()
        assert cloud.tcp(EXT, "vm", 80)
        assert not cloud.tcp(EXT, "vm", 81)
        gone = client.delete(f"/v2.0/security-group-rules/{rule['id']}", headers=HEADERS)
        assert gone.status_code == 204
        cloud.sync()
        assert not cloud.tcp(EXT, "vm", 80)
        assert cloud.tcp("vm", EXT, 8080)  # egress still open: the pass did apply
    finally:
        api.store.close()
