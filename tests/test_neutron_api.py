"""The Neutron-compatible API through Flask's test client: every endpoint, status
code and error body, field sets as Neutron's, and one model with the CLI and
the compiler (what the API writes, ``secfw`` commands and the agent's ruleset
see, and the reverse)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from secfw.api import Api
from secfw.errors import ConfigError, ValidationError
from secfw.neutron_api import auth as auth_module
from secfw.neutron_api.app import create_app
from secfw.neutron_api.auth import ServiceConfig, context_from_headers, load_service_config
from secfw.neutron_api.serve import parse_listen
from secfw.store import open_store

GROUP_FIELDS = {
    "id", "name", "description", "stateful", "shared", "project_id", "tenant_id",
    "revision_number", "tags", "created_at", "updated_at", "security_group_rules",
}
RULE_FIELDS = {
    "id", "security_group_id", "direction", "ethertype", "protocol", "port_range_min",
    "port_range_max", "remote_ip_prefix", "remote_group_id", "normalized_cidr",
    "remote_address_group_id", "description", "project_id", "tenant_id", "revision_number",
    "created_at", "updated_at",
}


class Neutron:
    """Requests as a project (noauth: ``X-Project-Id``), JSON in and out."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def call(self, method: str, path: str, body: Any = None, project: str = "alpha",
             roles: str = "member") -> tuple[int, Any]:
        headers = {"X-Project-Id": project, "X-Roles": roles}
        response = self.client.open(path, method=method, json=body, headers=headers)
        return response.status_code, response.get_json(silent=True)

    def ok(self, method: str, path: str, body: Any = None, status: int = 200,
           **kw: Any) -> Any:
        code, data = self.call(method, path, body, **kw)
        assert code == status, (method, path, code, data)
        return data

    def error(self, method: str, path: str, body: Any, status: int, kind: str,
              **kw: Any) -> str:
        """The message of a Neutron error, after checking status, type and body shape."""
        code, data = self.call(method, path, body, **kw)
        assert code == status, (method, path, code, data)
        assert set(data) == {"NeutronError"}, data
        assert set(data["NeutronError"]) == {"type", "message", "detail"}
        assert data["NeutronError"]["type"] == kind, data
        message: str = data["NeutronError"]["message"]
        return message

    def group(self, name: str, project: str = "alpha", **extra: Any) -> dict[str, Any]:
        body = {"security_group": {"name": name, **extra}}
        created: dict[str, Any] = self.ok("POST", "/v2.0/security-groups", body, 201,
                                          project=project)["security_group"]
        return created

    def rule(self, group_id: str, project: str = "alpha", **attrs: Any) -> dict[str, Any]:
        body = {"security_group_rule": {"security_group_id": group_id,
                                        "direction": "ingress", **attrs}}
        created: dict[str, Any] = self.ok("POST", "/v2.0/security-group-rules", body, 201,
                                          project=project)["security_group_rule"]
        return created


@pytest.fixture
def neutron(store_url: str) -> Iterator[Neutron]:
    apis: list[Api] = []

    def factory() -> Api:
        apis.append(Api(open_store(store_url)))
        return apis[-1]

    app = create_app(factory)
    app.testing = True
    yield Neutron(app.test_client())
    for api in apis:
        api.store.close()


# --------------------------------------------------------------------------- versions


def test_version_document_has_the_self_link(neutron: Neutron) -> None:
    data = neutron.ok("GET", "/")
    [version] = data["versions"]
    assert version["id"] == "v2.0" and version["status"] == "CURRENT"
    assert version["links"] == [{"rel": "self", "href": "http://localhost/v2.0/"}]


def test_extensions_list_and_show(neutron: Neutron) -> None:
    aliases = {e["alias"] for e in neutron.ok("GET", "/v2.0/extensions")["extensions"]}
    assert {"security-group", "allowed-address-pairs", "port-security"} <= aliases
    shown = neutron.ok("GET", "/v2.0/extensions/security-group")["extension"]
    assert shown["alias"] == "security-group"
    neutron.error("GET", "/v2.0/extensions/qos", None, 404, "HTTPNotFound")


def test_unknown_path_and_method_are_neutron_errors(neutron: Neutron) -> None:
    neutron.error("GET", "/v2.0/routers", None, 404, "HTTPNotFound")
    neutron.error("PATCH", "/v2.0/security-groups", None, 405, "HTTPMethodNotAllowed")


# --------------------------------------------------------------------------- groups


def test_first_request_of_a_project_creates_its_default_group(neutron: Neutron) -> None:
    groups = neutron.ok("GET", "/v2.0/security-groups")["security_groups"]
    assert [(g["name"], g["project_id"]) for g in groups] == [("default", "alpha")]
    assert set(groups[0]) == GROUP_FIELDS
    again = neutron.ok("GET", "/v2.0/security-groups")["security_groups"]
    assert [g["id"] for g in again] == [groups[0]["id"]]


def test_create_show_update_delete_group(neutron: Neutron) -> None:
    group = neutron.group("web", description="allow web traffic")
    assert set(group) == GROUP_FIELDS
    assert (group["name"], group["description"], group["project_id"], group["tenant_id"],
            group["stateful"], group["shared"], group["tags"], group["security_group_rules"]
            ) == ("web", "allow web traffic", "alpha", "alpha", True, False, [], [])
    path = f"/v2.0/security-groups/{group['id']}"
    assert neutron.ok("GET", path)["security_group"] == group
    body = {"security_group": {"name": "www", "description": "renamed"}}
    updated = neutron.ok("PUT", path, body)["security_group"]
    assert (updated["name"], updated["description"]) == ("www", "renamed")
    assert updated["revision_number"] == group["revision_number"] + 1
    code, data = neutron.call("DELETE", path)
    assert (code, data) == (204, None)
    message = neutron.error("GET", path, None, 404, "SecurityGroupNotFound")
    assert message == f"Security group {group['id']} does not exist"


def test_a_name_where_an_id_is_expected_is_404(neutron: Neutron) -> None:
    neutron.group("web")
    for method, body in (("GET", None), ("PUT", {"security_group": {"name": "x"}}),
                         ("DELETE", None)):
        message = neutron.error(method, "/v2.0/security-groups/web", body, 404,
                                "SecurityGroupNotFound")
        assert message == "Security group web does not exist"
    found = neutron.ok("GET", "/v2.0/security-groups?name=web")["security_groups"]
    assert [g["name"] for g in found] == ["web"]


def test_list_filters_and_fields(neutron: Neutron) -> None:
    web = neutron.group("web")
    db = neutron.group("db")
    neutron.group("other", project="beta")
    def names(query: str, **kw: Any) -> list[str]:
        data = neutron.ok("GET", f"/v2.0/security-groups?{query}", **kw)
        return sorted(g["name"] for g in data["security_groups"])
    assert names("name=web&name=db") == ["db", "web"]
    assert names(f"id={db['id']}") == ["db"]
    assert names("project_id=alpha") == ["db", "default", "web"]
    assert names("tenant_id=alpha") == ["db", "default", "web"]
    assert names("project_id=beta") == []  # not visible to alpha
    assert names("project_id=beta", project="admin", roles="admin") == ["default", "other"]
    trimmed = neutron.ok("GET", "/v2.0/security-groups?name=web&fields=id&fields=name")
    assert trimmed == {"security_groups": [{"id": web["id"], "name": "web"}]}
    shown = neutron.ok("GET", f"/v2.0/security-groups/{web['id']}?fields=name")
    assert shown == {"security_group": {"name": "web"}}


def test_other_projects_groups_are_invisible_to_members(neutron: Neutron) -> None:
    theirs = neutron.group("secret", project="beta")
    path = f"/v2.0/security-groups/{theirs['id']}"
    neutron.error("GET", path, None, 404, "SecurityGroupNotFound")
    neutron.error("DELETE", path, None, 404, "SecurityGroupNotFound")
    seen = neutron.ok("GET", path, project="ops", roles="reader,admin")["security_group"]
    assert seen["project_id"] == "beta"


def test_default_group_rules(neutron: Neutron) -> None:
    message = neutron.error("POST", "/v2.0/security-groups",
                            {"security_group": {"name": "default"}}, 409,
                            "SecurityGroupDefaultAlreadyExists")
    assert message == "Default security group already exists."
    default = neutron.ok("GET", "/v2.0/security-groups?name=default")["security_groups"][0]
    path = f"/v2.0/security-groups/{default['id']}"
    message = neutron.error("PUT", path, {"security_group": {"name": "x"}}, 409,
                            "SecurityGroupCannotUpdateDefault")
    assert message == "Updating default security group not allowed."
    message = neutron.error("DELETE", path, None, 409, "SecurityGroupCannotRemoveDefault")
    assert message == "Insufficient rights for removing default security group."
    web = neutron.group("web")
    neutron.error("PUT", f"/v2.0/security-groups/{web['id']}",
                  {"security_group": {"name": "default"}}, 409,
                  "SecurityGroupDefaultAlreadyExists")
    described = neutron.ok("PUT", path, {"security_group": {"description": "ours"}})
    assert described["security_group"]["description"] == "ours"


def test_an_admin_deletes_a_projects_default_group(neutron: Neutron) -> None:
    """Neutron refuses the default group's deletion to its project only; an admin
    may (tempest's dynamic credentials do, for every project they drop). The
    project's next request creates a new one, as Neutron does."""
    default = neutron.ok("GET", "/v2.0/security-groups")["security_groups"][0]
    path = f"/v2.0/security-groups/{default['id']}"
    found = neutron.ok("GET", "/v2.0/security-groups?project_id=alpha&name=default",
                       project="admin", roles="admin")["security_groups"]
    assert [g["id"] for g in found] == [default["id"]]
    code, _ = neutron.call("DELETE", path, project="admin", roles="admin")
    assert code == 204
    neutron.error("GET", path, None, 404, "SecurityGroupNotFound", project="admin",
                  roles="admin")
    again = neutron.ok("GET", "/v2.0/security-groups")["security_groups"]
    assert [g["name"] for g in again] == ["default"] and again[0]["id"] != default["id"]


def test_an_admin_filter_on_a_project_creates_its_default_group(neutron: Neutron) -> None:
    """Neutron makes sure the default group of the project a list is filtered on
    exists (a project known to Keystone but new to the network service)."""
    found = neutron.ok("GET", "/v2.0/security-groups?project_id=gamma",
                       project="admin", roles="admin")["security_groups"]
    assert [(g["name"], g["project_id"]) for g in found] == [("default", "gamma")]
    members = neutron.ok("GET", "/v2.0/security-groups?project_id=delta")["security_groups"]
    assert members == []  # a member's filter on another project creates nothing
    listed = neutron.ok("GET", "/v2.0/security-groups?project_id=delta",
                        project="admin", roles="admin")["security_groups"]
    assert [g["project_id"] for g in listed] == ["delta"]


def test_an_admin_cannot_delete_a_default_group_in_use(neutron: Neutron) -> None:
    """An admin's delete of a default group still refuses a group in use (409):
    here a rule of another group names it as its remote group."""
    default = neutron.ok("GET", "/v2.0/security-groups")["security_groups"][0]
    web = neutron.group("web")
    neutron.rule(web["id"], protocol="tcp", remote_group_id=default["id"])
    neutron.error("DELETE", f"/v2.0/security-groups/{default['id']}", None, 409,
                  "SecurityGroupInUse", project="admin", roles="admin")


def test_group_bad_bodies(neutron: Neutron) -> None:
    sg = "/v2.0/security-groups"
    message = neutron.error("POST", sg, {"group": {}}, 400, "HTTPBadRequest")
    assert message == "Unable to find 'security_group' in request body"
    message = neutron.error("POST", sg, {"security_group": {"name": "a", "colour": 1}}, 400,
                            "HTTPBadRequest")
    assert message == "Unrecognized attribute(s) 'colour'"
    message = neutron.error("POST", sg, {"security_group": {"name": "x" * 256}}, 400,
                            "HTTPBadRequest")
    assert message.startswith("Invalid input for name. Reason:")
    neutron.error("POST", sg, {"security_group": {"name": "a", "stateful": False}}, 400,
                  "HTTPBadRequest")
    neutron.error("POST", sg, {"security_group": {"name": "a", "id": "x"}}, 400,
                  "HTTPBadRequest")
    response = neutron.client.post(sg, data=b"{not json", headers={"X-Project-Id": "alpha"})
    assert response.status_code == 400


def test_duplicate_group_name_and_quota_are_409(neutron: Neutron) -> None:
    neutron.group("web")
    neutron.error("POST", "/v2.0/security-groups", {"security_group": {"name": "web"}}, 409,
                  "Conflict")
    for n in range(8):  # default + web + 8 = the default quota of 10
        neutron.group(f"g{n}")
    message = neutron.error("POST", "/v2.0/security-groups",
                            {"security_group": {"name": "one-more"}}, 409, "OverQuota")
    assert message == "Quota exceeded for resources: ['security_group']."


def test_project_id_in_body(neutron: Neutron) -> None:
    body = {"security_group": {"name": "web", "project_id": "beta"}}
    message = neutron.error("POST", "/v2.0/security-groups", body, 400, "HTTPBadRequest")
    assert "requires admin privileges" in message
    made = neutron.ok("POST", "/v2.0/security-groups", body, 201, project="admin",
                      roles="admin")["security_group"]
    assert made["project_id"] == "beta"
    assert neutron.ok("GET", f"/v2.0/security-groups/{made['id']}", project="beta")


def test_group_in_use_is_409(neutron: Neutron, store_url: str) -> None:
    web = neutron.group("web")
    api = Api(open_store(store_url))
    api.net_create("alpha", "net", "10.20.0.0/24", vlan=101)
    api.image_create("alpha", "img")
    api.boot("alpha", "vm", "m1.tiny", "img", "h1", ["web"], ["net"])
    api.store.close()
    message = neutron.error("DELETE", f"/v2.0/security-groups/{web['id']}", None, 409,
                            "SecurityGroupInUse")
    assert message == f"Security Group {web['id']} in use."


# --------------------------------------------------------------------------- rules


def test_rule_create_show_list_delete(neutron: Neutron) -> None:
    web = neutron.group("web")
    rule = neutron.rule(web["id"], protocol="tcp", port_range_min=80, port_range_max=80,
                        remote_ip_prefix="10.0.0.0/8", description="http")
    assert set(rule) == RULE_FIELDS
    assert {k: rule[k] for k in ("security_group_id", "direction", "ethertype", "protocol",
                                 "port_range_min", "port_range_max", "remote_ip_prefix",
                                 "normalized_cidr", "remote_group_id", "description",
                                 "project_id")} == {
        "security_group_id": web["id"], "direction": "ingress", "ethertype": "IPv4",
        "protocol": "tcp", "port_range_min": 80, "port_range_max": 80,
        "remote_ip_prefix": "10.0.0.0/8", "normalized_cidr": "10.0.0.0/8",
        "remote_group_id": None, "description": "http", "project_id": "alpha"}
    path = f"/v2.0/security-group-rules/{rule['id']}"
    assert neutron.ok("GET", path)["security_group_rule"] == rule
    shown = neutron.ok("GET", f"/v2.0/security-groups/{web['id']}")["security_group"]
    assert shown["security_group_rules"] == [rule]
    listed = neutron.ok("GET", f"/v2.0/security-group-rules?security_group_id={web['id']}")
    assert listed["security_group_rules"] == [rule]
    assert neutron.ok("GET", "/v2.0/security-group-rules?direction=egress") == {
        "security_group_rules": []}
    described = neutron.ok("PUT", path, {"security_group_rule": {"description": "web"}})
    assert described["security_group_rule"]["description"] == "web"
    neutron.error("PUT", path, {"security_group_rule": {"protocol": "udp"}}, 400,
                  "HTTPBadRequest")
    assert neutron.call("DELETE", path) == (204, None)
    message = neutron.error("DELETE", path, None, 404, "SecurityGroupRuleNotFound")
    assert message == f"Security group rule {rule['id']} does not exist"


def test_protocol_by_name_or_number_and_duplicates(neutron: Neutron) -> None:
    web = neutron.group("web")
    first = neutron.rule(web["id"], protocol="6", port_range_min=22, port_range_max=22)
    assert first["protocol"] == "6"  # shown as given, as Neutron does
    body = {"security_group_rule": {"security_group_id": web["id"], "direction": "ingress",
                                    "protocol": "tcp", "port_range_min": 22,
                                    "port_range_max": 22, "remote_ip_prefix": "0.0.0.0/0"}}
    message = neutron.error("POST", "/v2.0/security-group-rules", body, 409,
                            "SecurityGroupRuleExists")
    assert message == f"Security group rule already exists. Rule id is {first['id']}."
    icmp6 = neutron.rule(web["id"], ethertype="ipv6", protocol="icmp", port_range_min=128)
    assert (icmp6["ethertype"], icmp6["protocol"], icmp6["port_range_min"],
            icmp6["port_range_max"]) == ("IPv6", "ipv6-icmp", 128, None)
    any_proto = neutron.rule(web["id"], direction="egress", protocol="any")
    assert any_proto["protocol"] is None
    assert neutron.rule(web["id"], protocol="DCCP")["protocol"] == "dccp"
    legacy = neutron.rule(web["id"], direction="egress", ethertype="IPv6", protocol="1")
    assert legacy["protocol"] == "58"  # Neutron's canonical form of ICMP with IPv6
    message = neutron.error("POST", "/v2.0/security-group-rules", {"security_group_rule": {
        "security_group_id": web["id"], "direction": "egress", "ethertype": "IPv6",
        "protocol": "ipv6-icmp"}}, 409, "SecurityGroupRuleExists")
    assert legacy["id"] in message


@pytest.mark.parametrize(("attrs", "kind", "message"), [
    ({"protocol": "tcp", "port_range_min": 80, "port_range_max": 65536},
     "SecurityGroupInvalidPortValue", "Invalid value for port 65536"),
    ({"protocol": "tcp", "port_range_min": -16, "port_range_max": 80},
     "SecurityGroupInvalidPortValue", "Invalid value for port -16"),
    ({"protocol": "tcp", "port_range_min": "x", "port_range_max": 80},
     "SecurityGroupInvalidPortValue", "Invalid value for port x"),
    ({"protocol": "tcp", "port_range_min": 0, "port_range_max": 80},
     "SecurityGroupInvalidPortValue", "Invalid value for port 0"),
    ({"protocol": "tcp", "port_range_min": 81, "port_range_max": 80},
     "SecurityGroupInvalidPortRange",
     "For TCP/UDP protocols, port_range_min must be <= port_range_max"),
    ({"protocol": "udp", "port_range_max": 80},
     "SecurityGroupInvalidPortRange",
     "For TCP/UDP protocols, port_range_min must be <= port_range_max"),
    ({"protocol": "icmp", "port_range_max": 6}, "SecurityGroupMissingIcmpType",
     "ICMP code (port-range-max) 6 is provided but ICMP type (port-range-min) is missing."),
    ({"protocol": "icmp", "port_range_min": 300, "port_range_max": 1},
     "SecurityGroupInvalidIcmpValue",
     "Invalid value for ICMP type (port_range_min) 300. It must be 0 to 255."),
    ({"protocol": "icmp", "port_range_min": 1, "port_range_max": 300},
     "SecurityGroupInvalidIcmpValue",
     "Invalid value for ICMP code (port_range_max) 300. It must be 0 to 255."),
    ({"port_range_min": 22, "port_range_max": 22}, "SecurityGroupProtocolRequiredWithPorts",
     "Must also specify protocol if port range is given."),
    ({"protocol": "gre", "port_range_min": 22, "port_range_max": 22},
     "SecurityGroupInvalidProtocolForPort",
     "Invalid protocol gre for port range, only supported for TCP, UDP, UDPLITE, SCTP and "
     "DCCP protocols."),
    ({"ethertype": "IPv4", "remote_ip_prefix": "2001:db8::/64"},
     "SecurityGroupRuleParameterConflict",
     "Conflicting value ethertype IPv4 for CIDR 2001:db8::/64"),
    ({"ethertype": "IPv6", "remote_ip_prefix": "10.0.0.0/8"},
     "SecurityGroupRuleParameterConflict", "Conflicting value ethertype IPv6 for CIDR 10.0.0.0/8"),
    ({"ethertype": "IPv4", "protocol": "ipv6-icmp"},
     "SecurityGroupEthertypeConflictWithProtocol",
     "Invalid ethertype IPv4 for protocol ipv6-icmp."),
    ({"remote_ip_prefix": "10.0.0.0/8", "remote_group_id": "GROUP"},
     "SecurityGroupRemoteGroupAndRemoteIpPrefix",
     "Only remote_ip_prefix or remote_group_id may be provided."),
    ({"remote_ip_prefix": "10.0.0/33"}, "InvalidCIDR",
     "Invalid CIDR 10.0.0/33 given as IP prefix."),
    ({"ethertype": "IPv5"}, "SecurityGroupRuleInvalidEtherType",
     "Security group rule for ethertype 'IPv5' not supported. Allowed values are "
     "['IPv4', 'IPv6']."),
    ({"direction": "sideways"}, "HTTPBadRequest",
     "Invalid input for direction. Reason: 'sideways' is not in ['ingress', 'egress']."),
    ({"colour": "red"}, "HTTPBadRequest", "Unrecognized attribute(s) 'colour'"),
])
def test_rule_validation_messages(neutron: Neutron, attrs: dict[str, Any], kind: str,
                                  message: str) -> None:
    web = neutron.group("web")
    if attrs.get("remote_group_id") == "GROUP":
        attrs = {**attrs, "remote_group_id": web["id"]}
    body = {"security_group_rule": {"security_group_id": web["id"], "direction": "ingress",
                                    **attrs}}
    got = neutron.error("POST", "/v2.0/security-group-rules", body, 400, kind)
    assert got == message
    assert neutron.ok("GET", "/v2.0/security-group-rules") == {"security_group_rules": []}


def test_rule_protocol_not_supported(neutron: Neutron) -> None:
    web = neutron.group("web")
    body = {"security_group_rule": {"security_group_id": web["id"], "direction": "ingress",
                                    "protocol": "tcpx"}}
    message = neutron.error("POST", "/v2.0/security-group-rules", body, 400,
                            "SecurityGroupRuleInvalidProtocol")
    assert message.startswith("Security group rule protocol tcpx not supported.")
    assert message.endswith("and integer representations [0 to 255] are supported.")
    body["security_group_rule"]["protocol"] = "256"
    neutron.error("POST", "/v2.0/security-group-rules", body, 400,
                  "SecurityGroupRuleInvalidProtocol")


def test_rule_required_attributes_and_unknown_groups(neutron: Neutron) -> None:
    web = neutron.group("web")
    sgr = "/v2.0/security-group-rules"
    message = neutron.error("POST", sgr, {"security_group_rule": {"direction": "ingress"}},
                            400, "HTTPBadRequest")
    assert message == ("Failed to parse request. Required attribute 'security_group_id' "
                       "not specified")
    message = neutron.error("POST", sgr, {"security_group_rule": {
        "security_group_id": web["id"]}}, 400, "HTTPBadRequest")
    assert message == "Failed to parse request. Required attribute 'direction' not specified"
    neutron.error("POST", sgr, {"security_group_rule": {
        "security_group_id": "web", "direction": "ingress"}}, 404, "SecurityGroupNotFound")
    theirs = neutron.group("theirs", project="beta")
    neutron.error("POST", sgr, {"security_group_rule": {
        "security_group_id": web["id"], "direction": "ingress",
        "remote_group_id": theirs["id"]}}, 404, "SecurityGroupNotFound")
    neutron.error("GET", f"{sgr}/nope", None, 404, "SecurityGroupRuleNotFound")


def test_rule_quota_is_409(neutron: Neutron) -> None:
    web = neutron.group("web")
    for port in range(1, 21):  # the default quota: 20 rules per group
        neutron.rule(web["id"], protocol="tcp", port_range_min=port, port_range_max=port)
    body = {"security_group_rule": {"security_group_id": web["id"], "direction": "ingress",
                                    "protocol": "udp"}}
    message = neutron.error("POST", "/v2.0/security-group-rules", body, 409, "OverQuota")
    assert message == "Quota exceeded for resources: ['security_group_rule']."


# --------------------------------------------------------------------------- ports, networks


@pytest.fixture
def booted(store_url: str) -> dict[str, Any]:
    """alpha's instance on a VLAN network and beta's on the flat one; ids by name."""
    api = Api(open_store(store_url))
    try:
        flat = api.net_create("admin", "public", "10.10.0.0/24")
        vlan = api.net_create("alpha", "alpha-net", "10.20.0.0/24", vlan=101,
                              cidr6="2001:db8:20::/64")
        api.image_create("admin", "cirros", "qcow2", "public")
        api.boot("alpha", "vm", "m1.tiny", "cirros", "h1", None, ["alpha-net"])
        api.boot("beta", "other", "m1.tiny", "cirros", "h1", None, ["public"])
        ports = {p.instance: p for p in api.port_list("admin", host="h1")}
        return {"flat": flat.id, "vlan": vlan.id, "port": ports["vm"].id,
                "beta_port": ports["other"].id}
    finally:
        api.store.close()


def test_ports_list_and_show(neutron: Neutron, booted: dict[str, Any]) -> None:
    ports = neutron.ok("GET", "/v2.0/ports")["ports"]
    assert [p["id"] for p in ports] == [booted["port"]]
    port = ports[0]
    assert (port["network_id"], port["project_id"], port["port_security_enabled"],
            port["allowed_address_pairs"], port["device_owner"]) == (
        booted["vlan"], "alpha", True, [], "compute:nova")
    assert [ip["ip_address"] for ip in port["fixed_ips"]] == ["10.20.0.2", "2001:db8:20::2"]
    assert "binding:host_id" not in port
    default = neutron.ok("GET", "/v2.0/security-groups?name=default")["security_groups"][0]
    assert port["security_groups"] == [default["id"]]
    assert neutron.ok("GET", f"/v2.0/ports/{booted['port']}")["port"] == port
    neutron.error("GET", f"/v2.0/ports/{booted['beta_port']}", None, 404, "PortNotFound")
    every = neutron.ok("GET", "/v2.0/ports", project="admin", roles="admin")["ports"]
    assert {p["id"] for p in every} == {booted["port"], booted["beta_port"]}
    assert {p["binding:host_id"] for p in every} == {"h1"}
    by_network = neutron.ok("GET", f"/v2.0/ports?network_id={booted['flat']}",
                            project="admin", roles="admin")["ports"]
    assert [p["id"] for p in by_network] == [booted["beta_port"]]


def test_port_set_security_groups_pairs_and_port_security(
    neutron: Neutron, booted: dict[str, Any], cli: Any
) -> None:
    web = neutron.group("web")
    db = neutron.group("db")
    path = f"/v2.0/ports/{booted['port']}"
    port = neutron.ok("PUT", path, {"port": {"security_groups": [web["id"], db["id"]]}})
    assert port["port"]["security_groups"] == [web["id"], db["id"]]
    listed = cli.json("--project", "alpha", "list-secgroup", "vm")
    assert [g["name"] for g in listed] == ["web", "db"]
    pairs = [{"ip_address": "10.20.0.50", "mac_address": "fa:16:3e:00:00:01"},
             {"ip_address": "10.20.0.64/28"}]
    port = neutron.ok("PUT", path, {"port": {"allowed_address_pairs": pairs}})["port"]
    mac = port["mac_address"]
    assert port["allowed_address_pairs"] == [
        {"ip_address": "10.20.0.50", "mac_address": "fa:16:3e:00:00:01"},
        {"ip_address": "10.20.0.64/28", "mac_address": mac}]
    viewed = cli.json("--project", "alpha", "port-list")[0]
    assert viewed["allowed_address_pairs"] == ["10.20.0.50/32,fa:16:3e:00:00:01",
                                               "10.20.0.64/28"]
    message = neutron.error("PUT", path, {"port": {"port_security_enabled": False}}, 409,
                            "Conflict")
    assert "allowed address pairs" in message
    port = neutron.ok("PUT", path, {"port": {"allowed_address_pairs": [],
                                             "port_security_enabled": False}})["port"]
    assert (port["port_security_enabled"], port["allowed_address_pairs"]) == (False, [])
    assert neutron.ok("PUT", path, {"port": {"security_groups": []}})["port"][
        "security_groups"] == []


def test_port_update_errors(neutron: Neutron, booted: dict[str, Any]) -> None:
    path = f"/v2.0/ports/{booted['port']}"
    message = neutron.error("PUT", path, {"port": {"name": "x"}}, 400, "HTTPBadRequest")
    assert message == "Unrecognized attribute(s) 'name'"
    message = neutron.error("PUT", path, {"port": {"security_groups": ["web"]}}, 400,
                            "InvalidInput")
    assert message == "Invalid input for operation: 'web' is not an integer or uuid."
    neutron.error("PUT", path, {"port": {"security_groups": [
        "00000000-0000-0000-0000-000000000000"]}}, 404, "SecurityGroupNotFound")
    theirs = neutron.group("theirs", project="beta")
    neutron.error("PUT", path, {"port": {"security_groups": [theirs["id"]]}}, 404,
                  "SecurityGroupNotFound")
    neutron.error("PUT", f"/v2.0/ports/{booted['beta_port']}",
                  {"port": {"security_groups": []}}, 404, "PortNotFound")
    neutron.error("PUT", path, {"port": {"port_security_enabled": "maybe"}}, 400,
                  "HTTPBadRequest")
    neutron.error("PUT", path, {"port": {"allowed_address_pairs": [{"mac_address": "x"}]}},
                  400, "HTTPBadRequest")
    neutron.error("PUT", path, {"port": {"allowed_address_pairs": [
        {"ip_address": "not-an-ip"}]}}, 400, "InvalidInput")


def test_networks_visibility_and_provider_attributes(
    neutron: Neutron, booted: dict[str, Any]
) -> None:
    nets = neutron.ok("GET", "/v2.0/networks")["networks"]
    assert {n["id"]: n["shared"] for n in nets} == {booted["flat"]: True, booted["vlan"]: False}
    assert all("provider:segmentation_id" not in n for n in nets)
    hidden = neutron.ok("GET", "/v2.0/networks", project="beta")["networks"]
    assert [n["id"] for n in hidden] == [booted["flat"]]
    neutron.error("GET", f"/v2.0/networks/{booted['vlan']}", None, 404, "NetworkNotFound",
                  project="beta")
    shown = neutron.ok("GET", f"/v2.0/networks/{booted['vlan']}", project="admin",
                       roles="admin")["network"]
    assert (shown["provider:network_type"], shown["provider:segmentation_id"],
            len(shown["subnets"])) == ("vlan", 101, 2)
    port = neutron.ok("GET", f"/v2.0/ports/{booted['port']}")["port"]
    assert {ip["subnet_id"] for ip in port["fixed_ips"]} == set(shown["subnets"])


# --------------------------------------------------------------------------- one model


def test_cli_and_compiler_see_what_the_api_writes(
    neutron: Neutron, booted: dict[str, Any], cli: Any
) -> None:
    web = neutron.group("web")
    neutron.ok("PUT", f"/v2.0/ports/{booted['port']}", {"port": {"security_groups": [
        web["id"]]}})
    rule = neutron.rule(web["id"], protocol="tcp", port_range_min=5432, port_range_max=5433)
    rules = cli.json("--project", "alpha", "secgroup-list-rules", "web")
    assert [(r["ip_protocol"], r["from_port"], r["to_port"]) for r in rules] == [
        ("tcp", 5432, 5433)]
    assert "5432-5433" in cli.ok("compile", "--host", "h1")
    neutron.ok("DELETE", f"/v2.0/security-group-rules/{rule['id']}", status=204)
    assert "5432-5433" not in cli.ok("compile", "--host", "h1")


def test_api_sees_what_the_cli_writes(neutron: Neutron, cli: Any) -> None:
    cli.ok("--project", "alpha", "secgroup-create", "ssh", "from the office")
    cli.ok("--project", "alpha", "secgroup-add-rule", "ssh", "tcp", "22", "22",
           "192.0.2.0/24")
    [group] = neutron.ok("GET", "/v2.0/security-groups?name=ssh")["security_groups"]
    assert group["description"] == "from the office"
    [rule] = group["security_group_rules"]
    assert (rule["protocol"], rule["port_range_min"], rule["port_range_max"],
            rule["remote_ip_prefix"], rule["direction"]) == ("tcp", 22, 22, "192.0.2.0/24",
                                                             "ingress")


# --------------------------------------------------------------------------- auth, serve


def test_noauth_context() -> None:
    config = ServiceConfig()
    ctx = context_from_headers({"x-project-id": "alpha", "x-roles": "member"}, config)
    assert ctx is not None and (ctx.project, ctx.is_admin) == ("alpha", False)
    ctx = context_from_headers({}, config)
    assert ctx is not None and (ctx.project, ctx.is_admin) == ("admin", True)
    ctx = context_from_headers({"x-tenant-id": "beta", "x-roles": "Admin"}, config)
    assert ctx is not None and (ctx.project, ctx.is_admin) == ("beta", True)


def test_keystone_context_needs_a_confirmed_identity() -> None:
    config = ServiceConfig(auth_strategy="keystone", keystone_authtoken={"auth_url": "x"})
    assert context_from_headers({"x-project-id": "p1"}, config) is None
    assert context_from_headers({"x-identity-status": "Invalid", "x-project-id": "p1"},
                                config) is None
    ctx = context_from_headers({"x-identity-status": "Confirmed", "x-project-id": "p1",
                                "x-roles": "reader,admin"}, config)
    assert ctx is not None and (ctx.project, ctx.is_admin) == ("p1", True)
    ctx = context_from_headers({"x-identity-status": "Confirmed", "x-project-id": "admin"},
                               config)
    assert ctx is not None and not ctx.is_admin  # with Keystone only the role makes an admin


def test_keystone_mode_guards_everything_but_the_version_document(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app behind a stand-in for auth_token (which needs a Keystone): it
    sets the identity headers from the token as auth_token does; the version
    document stays public; a request the filter let through unconfirmed is 401."""
    seen: list[dict[str, str]] = []

    def fake_filter(app: Any, conf: dict[str, str]) -> Any:
        seen.append(conf)

        def guarded(environ: dict[str, Any], start_response: Any) -> Any:
            token = environ.get("HTTP_X_AUTH_TOKEN")
            environ["HTTP_X_IDENTITY_STATUS"] = "Confirmed" if token == "good" else "Invalid"
            environ["HTTP_X_PROJECT_ID"] = "p1"
            return app(environ, start_response)

        return guarded

    monkeypatch.setattr(auth_module, "wrap_keystone", lambda app, cfg: fake_filter(
        app, cfg.keystone_authtoken))
    monkeypatch.setattr("secfw.neutron_api.app.wrap_keystone", auth_module.wrap_keystone)
    config = ServiceConfig(auth_strategy="keystone", keystone_authtoken={"auth_url": "k"})
    api = Api(open_store(store_url))
    client = create_app(lambda: api, config).test_client()
    try:
        assert seen == [{"auth_url": "k"}]
        assert client.get("/").status_code == 200
        denied = client.get("/v2.0/security-groups", headers={"X-Auth-Token": "bad"})
        assert denied.status_code == 401
        assert denied.get_json()["NeutronError"]["type"] == "HTTPUnauthorized"
        allowed = client.get("/v2.0/security-groups", headers={"X-Auth-Token": "good"})
        assert [g["project_id"] for g in allowed.get_json()["security_groups"]] == ["p1"]
    finally:
        api.store.close()


def test_service_config(tmp_path: Path) -> None:
    assert load_service_config(None).auth_strategy == "noauth"
    conf = tmp_path / "neutron.conf"
    conf.write_text("[DEFAULT]\nauth_strategy = keystone\n[keystone_authtoken]\n"
                    "auth_url = http://127.0.0.1:5000\nauth_type = password\n")
    loaded = load_service_config(str(conf))
    assert loaded.auth_strategy == "keystone"
    assert loaded.keystone_authtoken == {"auth_url": "http://127.0.0.1:5000",
                                         "auth_type": "password"}
    conf.write_text("[DEFAULT]\nauth_strategy = keystone\n")
    with pytest.raises(ConfigError, match="keystone_authtoken"):
        load_service_config(str(conf))
    conf.write_text("[DEFAULT]\nauth_strategy = none\n")
    with pytest.raises(ConfigError, match="auth_strategy"):
        load_service_config(str(conf))
    with pytest.raises(ConfigError, match="cannot read"):
        load_service_config(str(tmp_path / "missing.conf"))


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9696") == ("127.0.0.1", 9696)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9696", "localhost:9696", "127.0.0.1:65536", "127.0.0.1:x"):
        with pytest.raises(ValidationError):
            parse_listen(bad)


def test_serve_refuses_bad_listen_and_config(cli: Any, tmp_path: Path) -> None:
    assert "expected ADDR:PORT" in cli.fails("api", "serve", "--listen", "nope", code=2)
    missing = str(tmp_path / "missing.conf")
    assert "cannot read config" in cli.fails("api", "serve", "--config", missing, code=8)


def test_names_through_the_api_stay_data(
    neutron: Neutron, booted: dict[str, Any], cli: Any
) -> None:
    name = 'x"; flush ruleset; add table inet pwn { $(reboot) }'
    group = neutron.group(name, description="} drop;")
    assert group["name"] == name
    neutron.ok("PUT", f"/v2.0/ports/{booted['port']}",
               {"port": {"security_groups": [group["id"]]}})
    neutron.rule(group["id"], protocol="tcp", port_range_min=443, port_range_max=443)
    ruleset = cli.ok("compile", "--host", "h1")
    assert "443" in ruleset
    assert "pwn" not in ruleset and "reboot" not in ruleset and "flush ruleset" not in ruleset
