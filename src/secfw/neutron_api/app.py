"""The Neutron v2.0 API (security groups and what they need) as a Flask WSGI app.

Every request is one :class:`secfw.api.Api` call (one transaction) on the
store the app was made for, so the nova-style CLI, the agent and this API see
one model. Each server thread opens its own store handle (a SQLite connection
belongs to the thread that opened it); the stores serialise writers.

Neutron's conventions followed here:

* ids only in URLs: a name where an id is expected is 404, and clients then
  retry with ``?name=`` (openstacksdk's ``find``);
* list filters: any field of the resource, repeated for "any of"
  (``?name=a&name=b``), compared as Neutron compares query strings; ``fields=``
  (repeatable) keeps only the fields asked for;
* a non-admin sees and acts on its own project's resources only (others: 404);
  an admin sees every project and may create in another with ``project_id``;
* errors are ``{"NeutronError": {"type", "message", "detail"}}`` with Neutron's
  status: 400 bad input, 404 unknown, 409 conflict/in use/over quota.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from secfw.api import Api
from secfw.cloud import CloudState
from secfw.errors import (
    ConflictError,
    ForbiddenError,
    InUseError,
    NeutronApiError,
    NotFoundError,
    QuotaError,
    SecfwError,
    StoreError,
    ValidationError,
)
from secfw.model import DEFAULT_GROUP, Rule, SecurityGroup, check_name
from secfw.neutron_api import validate
from secfw.neutron_api.auth import Context, ServiceConfig, context_from_headers, wrap_keystone
from secfw.neutron_api.views import group_view, network_view, port_view, rule_view
from secfw.store.base import retry_conflicts

ApiFactory = Callable[[], Api]

#: The extensions this service implements (GET /v2.0/extensions).
EXTENSIONS: tuple[tuple[str, str, str], ...] = (
    ("security-group", "security-group", "The security groups extension."),
    ("allowed-address-pairs", "Allowed Address Pairs",
     "Provides allowed address pairs"),
    ("port-security", "Port Security", "Provides port security"),
    ("project-id", "project_id field enabled",
     "Extension that indicates that project_id field is enabled."),
    ("standard-attr-description", "standard-attr-description",
     "Extension to add descriptions to standard attributes"),
    ("standard-attr-timestamp", "Resource timestamps",
     "Adds created_at and updated_at fields to all Neutron resources that have "
     "Neutron standard attributes."),
    ("standard-attr-revisions", "Resource revision numbers",
     "This extension will display the revision number of neutron resources."),
    ("security-groups-normalized-cidr", "Security Group Rules Normalized CIDR",
     "Add new field with normalized remote_ip_prefix cidr in SG rule"),
)
EXTENSION_UPDATED = "2026-12-07T00:00:00-00:00"


def create_app(api_factory: ApiFactory, config: ServiceConfig | None = None) -> Any:
    """The WSGI application: Neutron's API over the Api ``api_factory`` makes.

    ``api_factory`` is called once per server thread. With ``auth_strategy =
    keystone`` everything but the version document (``GET /``, public in
    Neutron too) goes through keystonemiddleware's auth_token filter.
    """
    config = config or ServiceConfig()
    app = Flask("secfw.neutron_api")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    local = threading.local()

    def api() -> Api:
        if getattr(local, "api", None) is None:
            local.api = api_factory()
        result: Api = local.api
        return result

    app.config["SECFW_API"] = api
    app.config["SECFW_SERVICE"] = config
    _register(app)
    if config.auth_strategy != "keystone":
        return app
    public = app.wsgi_app
    guarded = wrap_keystone(public, config)

    def dispatch(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO", "") in ("", "/"):
            return public(environ, start_response)
        return guarded(environ, start_response)

    app.wsgi_app = dispatch  # type: ignore[method-assign]
    return app


# --------------------------------------------------------------------------- plumbing


def _api() -> Api:
    """This thread's Api (see :func:`create_app`)."""
    factory: Callable[[], Api] = current_app.config["SECFW_API"]
    return factory()


def _context() -> Context:
    """The caller (from the identity headers), checked once per request."""
    ctx: Context | None = g.get("secfw_context")
    if ctx is not None:
        return ctx
    headers = {k.lower(): v for k, v in request.headers.items()}
    found = context_from_headers(headers, current_app.config["SECFW_SERVICE"])
    if found is None:
        raise NeutronApiError(401, "HTTPUnauthorized", "Authentication required")
    check_name(found.project, "project")
    g.secfw_context = found
    return found


def neutron_error(status: int, kind: str, message: str) -> Response:
    """Neutron's error body with ``status``."""
    response = jsonify({"NeutronError": {"type": kind, "message": message, "detail": ""}})
    response.status_code = status
    return response


#: secfw's error classes → (status, Neutron type) for errors this layer did not
#: already phrase as Neutron does.
_STATUS: tuple[tuple[type[SecfwError], int, str], ...] = (
    (NotFoundError, 404, "NotFound"),
    (QuotaError, 409, "OverQuota"),
    (InUseError, 409, "InUse"),
    (ConflictError, 409, "Conflict"),
    (ForbiddenError, 403, "Forbidden"),
    (ValidationError, 400, "InvalidInput"),
    (StoreError, 503, "ServiceUnavailable"),
)


def over_quota(resource: str) -> NeutronApiError:
    """Neutron's 409 for a create over the project's quota (secfw's quotas:
    security groups per project, rules per group)."""
    return NeutronApiError(409, "OverQuota", f"Quota exceeded for resources: ['{resource}'].")


def _secfw_error(exc: SecfwError) -> Response:
    if isinstance(exc, NeutronApiError):
        return neutron_error(exc.status, exc.kind, str(exc))
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return neutron_error(status, kind, str(exc))
    return neutron_error(500, "HTTPInternalServerError", str(exc))


def _http_error(exc: HTTPException) -> Response:
    kind = "HTTP" + "".join(w.capitalize() for w in (exc.name or "Error").split())
    return neutron_error(exc.code or 500, kind, exc.description or exc.name or "")


def _body() -> Any:
    body = request.get_json(force=True, silent=True)
    if body is None:
        raise validate.bad_request("Malformed request body")
    return body


def _listing(collection: str, items: Iterable[dict[str, Any]]) -> Response:
    """``{collection: [...]}`` filtered by the query string, trimmed by ``fields``."""
    filters = {k: request.args.getlist(k) for k in request.args if k != "fields"}
    for key in ("limit", "marker", "sort_key", "sort_dir", "page_reverse"):
        filters.pop(key, None)
    wanted = request.args.getlist("fields")
    kept = [_fields(item, wanted) for item in items if _matches(item, filters)]
    return jsonify({collection: kept})


def _matches(item: dict[str, Any], filters: dict[str, list[str]]) -> bool:
    """Neutron's list filters: each field equal to one of its values; filters on
    fields the resource does not have are ignored (as Neutron without
    filter validation)."""
    for key, values in filters.items():
        if key not in item:
            continue
        if _as_query(item[key]) not in values and not _in_list(item[key], values):
            return False
    return True


def _as_query(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def _in_list(value: Any, values: list[str]) -> bool:
    if isinstance(value, bool):
        return str(value).lower() in (v.lower() for v in values)
    if isinstance(value, list):
        return any(str(v) in values for v in value)
    return False


def _fields(item: dict[str, Any], wanted: list[str]) -> dict[str, Any]:
    if not wanted:
        return item
    return {k: v for k, v in item.items() if k in wanted}


def _one(resource: str, item: dict[str, Any], status: int = 200) -> Response:
    response = jsonify({resource: _fields(item, request.args.getlist("fields"))})
    response.status_code = status
    return response


def _visible(ctx: Context, project: str | None) -> bool:
    return ctx.is_admin or project == ctx.project


def _target_project(ctx: Context, attrs: dict[str, Any]) -> str:
    """The project a new resource belongs to: the caller's, or (admins only)
    the ``project_id``/``tenant_id`` of the body."""
    given = attrs.get("project_id", attrs.get("tenant_id"))
    if "project_id" in attrs and "tenant_id" in attrs and attrs["project_id"] != attrs[
        "tenant_id"
    ]:
        raise validate.bad_request("project_id and tenant_id do not match")
    if given is None or given == ctx.project:
        return ctx.project
    if not ctx.is_admin:
        raise validate.bad_request(
            "Specifying 'project_id' or 'tenant_id' other than the authenticated "
            "project in request requires admin privileges"
        )
    return check_name(str(given), "project")


def _group(state: CloudState, ctx: Context, group_id: str) -> SecurityGroup:
    """A group by id that the caller may see (404 as Neutron's otherwise)."""
    group = state.groups.get(group_id)
    if group is None or not _visible(ctx, group.project):
        raise NeutronApiError(
            404, "SecurityGroupNotFound", f"Security group {group_id} does not exist"
        )
    return group


def _rule(state: CloudState, ctx: Context, rule_id: str) -> Rule:
    rule = state.rules.get(rule_id)
    if rule is None or not _visible(ctx, state.groups[rule.group_id].project):
        raise NeutronApiError(
            404, "SecurityGroupRuleNotFound", f"Security group rule {rule_id} does not exist"
        )
    return rule


def _state(ctx: Context, project: str | None = None) -> CloudState:
    """The cloud, with the ``default`` group of ``project`` (default: the
    caller's) created on first use (Neutron creates it on a project's first
    security-group request)."""
    project = project or ctx.project
    api = _api()
    state = api.snapshot()
    if (project, DEFAULT_GROUP) in state.group_by_name:
        return state  # the common case: one read of the store, no write
    api.secgroup_list(project)
    return api.snapshot()


def _filtered_project(ctx: Context) -> str | None:
    """The one project an admin's list is filtered on (``project_id=`` or
    ``tenant_id=``), whose default group Neutron's ``get_security_groups``
    makes sure of; None otherwise (members see their own project only)."""
    values = request.args.getlist("project_id") or request.args.getlist("tenant_id")
    if not ctx.is_admin or len(values) != 1:
        return None
    try:
        return check_name(values[0], "project")
    except ValidationError:
        return None  # not a project secfw can hold: the filter matches nothing


# --------------------------------------------------------------------------- routes


def _register(app: Flask) -> None:
    app.register_error_handler(SecfwError, _secfw_error)
    app.register_error_handler(HTTPException, _http_error)
    app.add_url_rule("/", view_func=versions)
    for path in ("/v2.0", "/v2.0/"):
        app.add_url_rule(path, view_func=resources, endpoint=f"resources{path}")
    app.add_url_rule("/v2.0/extensions", view_func=extensions)
    app.add_url_rule("/v2.0/extensions/<alias>", view_func=extension)
    sg = "/v2.0/security-groups"
    app.add_url_rule(sg, view_func=list_groups)
    app.add_url_rule(sg, view_func=create_group, methods=["POST"])
    app.add_url_rule(f"{sg}/<group_id>", view_func=show_group)
    app.add_url_rule(f"{sg}/<group_id>", view_func=update_group, methods=["PUT"])
    app.add_url_rule(f"{sg}/<group_id>", view_func=delete_group, methods=["DELETE"])
    sgr = "/v2.0/security-group-rules"
    app.add_url_rule(sgr, view_func=list_rules)
    app.add_url_rule(sgr, view_func=create_rule, methods=["POST"])
    app.add_url_rule(f"{sgr}/<rule_id>", view_func=show_rule)
    app.add_url_rule(f"{sgr}/<rule_id>", view_func=update_rule, methods=["PUT"])
    app.add_url_rule(f"{sgr}/<rule_id>", view_func=delete_rule, methods=["DELETE"])
    app.add_url_rule("/v2.0/ports", view_func=list_ports)
    app.add_url_rule("/v2.0/ports/<port_id>", view_func=show_port)
    app.add_url_rule("/v2.0/ports/<port_id>", view_func=update_port, methods=["PUT"])
    app.add_url_rule("/v2.0/networks", view_func=list_networks)
    app.add_url_rule("/v2.0/networks/<network_id>", view_func=show_network)
    app.after_request(_request_id)


def _request_id(response: Response) -> Response:
    """Every answer carries a request id, as Neutron's (clients log it)."""
    response.headers.setdefault("X-Openstack-Request-Id", f"req-{uuid.uuid4()}")
    return response


def versions() -> Response:
    """The version document; clients follow its ``self`` link."""
    base = request.host_url.rstrip("/")
    return jsonify({"versions": [{
        "id": "v2.0",
        "status": "CURRENT",
        "links": [{"rel": "self", "href": f"{base}/v2.0/"}],
    }]})


def resources() -> Response:
    base = request.host_url.rstrip("/") + "/v2.0/"
    names = ("security_group", "security_group_rule", "port", "network", "extension")
    return jsonify({"resources": [
        {"name": n, "collection": n.replace("_", "-") + "s" if "_" in n else n + "s",
         "links": [{"rel": "self", "href": base + n.replace("_", "-") + "s"}]}
        for n in names
    ]})


def _extension_view(alias: str, name: str, description: str) -> dict[str, Any]:
    return {"alias": alias, "name": name, "description": description,
            "updated": EXTENSION_UPDATED, "links": []}


def extensions() -> Response:
    _context()
    return _listing("extensions", (_extension_view(*e) for e in EXTENSIONS))


def extension(alias: str) -> Response:
    _context()
    for entry in EXTENSIONS:
        if entry[0] == alias:
            return _one("extension", _extension_view(*entry))
    raise NeutronApiError(404, "HTTPNotFound", f"Extension with alias {alias} does not exist")


# ---- security groups


def list_groups() -> Response:
    ctx = _context()
    state = _state(ctx, _filtered_project(ctx))
    groups = sorted(
        (g for g in state.groups.values() if _visible(ctx, g.project)),
        key=lambda g: (g.project, g.name != DEFAULT_GROUP, g.name, g.id),
    )
    return _listing("security_groups", (group_view(state, g) for g in groups))


def show_group(group_id: str) -> Response:
    ctx = _context()
    state = _state(ctx)
    return _one("security_group", group_view(state, _group(state, ctx, group_id)))


def create_group() -> tuple[Response, int] | Response:
    ctx = _context()
    attrs = validate.resource_body(_body(), "security_group", validate.GROUP_POST)
    project = _target_project(ctx, attrs)
    name = validate.text_attr(attrs, "name")
    description = validate.text_attr(attrs, "description")
    _check_stateful(attrs)
    if name == DEFAULT_GROUP:
        raise NeutronApiError(
            409, "SecurityGroupDefaultAlreadyExists", "Default security group already exists."
        )
    api = _api()
    group = _create_group(api, project, name, description)
    return _one("security_group", group_view(api.snapshot(), group), 201)


def _create_group(api: Api, project: str, name: str, description: str) -> SecurityGroup:
    """Neutron allows several groups of one name (and the empty name); secfw's
    model keys groups by name within a project, so a duplicate name is 409."""
    if not name.strip():
        raise validate.bad_request(
            "Invalid input for name. Reason: secfw needs a non-blank security group name."
        )
    try:
        return api.secgroup_create(project, name, description)
    except QuotaError:
        raise over_quota("security_group") from None


def _check_stateful(attrs: dict[str, Any]) -> None:
    if "stateful" in attrs and not validate.parse_bool_attr(attrs["stateful"], "stateful"):
        raise validate.bad_request(
            "Invalid input for stateful. Reason: secfw's security groups are always stateful."
        )


def update_group(group_id: str) -> Response:
    ctx = _context()
    attrs = validate.resource_body(_body(), "security_group", validate.GROUP_PUT)
    _check_stateful(attrs)
    api = _api()
    group = _group(_state(ctx), ctx, group_id)
    name = validate.text_attr(attrs, "name", group.name)
    description = validate.text_attr(attrs, "description", group.description)
    if group.name == DEFAULT_GROUP and name != DEFAULT_GROUP:
        raise NeutronApiError(
            409, "SecurityGroupCannotUpdateDefault",
            "Updating default security group not allowed.",
        )
    if name == DEFAULT_GROUP and group.name != DEFAULT_GROUP:
        raise NeutronApiError(
            409, "SecurityGroupDefaultAlreadyExists", "Default security group already exists."
        )
    updated = api.secgroup_update(group.project, group.id, name, description)
    return _one("security_group", group_view(api.snapshot(), updated))


def delete_group(group_id: str) -> tuple[str, int]:
    ctx = _context()
    api = _api()
    group = _group(_state(ctx), ctx, group_id)
    # Neutron refuses a project's own delete of its default group, not an admin's
    # (securitygroups_db.delete_security_group); tempest's credential clean-up
    # deletes each dropped project's default group as admin.
    if group.name == DEFAULT_GROUP and not ctx.is_admin:
        raise NeutronApiError(
            409, "SecurityGroupCannotRemoveDefault",
            "Insufficient rights for removing default security group.",
        )
    try:
        api.secgroup_delete(group.project, group.id, allow_default=ctx.is_admin)
    except InUseError:
        raise NeutronApiError(
            409, "SecurityGroupInUse", f"Security Group {group.id} in use."
        ) from None
    return "", 204


# ---- rules


def list_rules() -> Response:
    ctx = _context()
    state = _state(ctx)
    rules = [
        r for r in state.rules.values() if _visible(ctx, state.groups[r.group_id].project)
    ]
    rules.sort(key=lambda r: (state.groups[r.group_id].project, r.group_id, r.created, r.id))
    return _listing("security_group_rules", (rule_view(state, r) for r in rules))


def show_rule(rule_id: str) -> Response:
    ctx = _context()
    state = _state(ctx)
    return _one("security_group_rule", rule_view(state, _rule(state, ctx, rule_id)))


def create_rule() -> Response:
    ctx = _context()
    attrs = validate.resource_body(_body(), "security_group_rule", validate.RULE_POST)
    checked = validate.parse_rule(attrs)
    api = _api()
    state = _state(ctx)
    remote = (
        _group(state, ctx, checked.remote_group_id)
        if checked.remote_group_id is not None
        else None
    )
    group = _group(state, ctx, checked.security_group_id)
    if checked.project is not None and checked.project != group.project:
        _target_project(ctx, attrs)  # a non-admin naming another project: Neutron's 400
        raise validate.bad_request("project_id must be the security group's project")
    if remote is not None and remote.project != group.project:
        # Only an admin gets here (others do not see the group: 404 above).
        raise validate.bad_request(
            f"Invalid input for remote_group_id. Reason: security group {remote.id} belongs "
            "to another project; secfw's rules name groups of their own project only."
        )
    duplicate = _duplicate(api, group, checked)
    if duplicate is not None:
        raise NeutronApiError(
            409, "SecurityGroupRuleExists",
            f"Security group rule already exists. Rule id is {duplicate}.",
        )
    try:
        rule = _create_rule(api, group, checked)
    except QuotaError:
        raise over_quota("security_group_rule") from None
    return _one("security_group_rule", rule_view(api.snapshot(), rule), 201)


def _create_rule(api: Api, group: SecurityGroup, checked: validate.RuleRequest) -> Rule:
    """One transaction; a duplicate created since :func:`_duplicate` looked is
    still refused there (a ConflictError: 409)."""
    return api.rule_create(
        group.project, group.id, checked.direction, checked.ethertype, checked.protocol,
        checked.dst_port, checked.icmp_type, checked.icmp_code, checked.remote_ip,
        checked.remote_group_id, checked.description, checked.protocol_text,
    )


def _duplicate(api: Api, group: SecurityGroup, req: validate.RuleRequest) -> str | None:
    """The id of the group's rule that means the same as the request, if any
    (judged by the model: ``tcp`` equals ``6``, ``0.0.0.0/0`` no remote)."""
    try:
        found = api.rule_find(group.project, group.id, req.direction, req.ethertype,
                              req.protocol, req.dst_port, req.icmp_type, req.icmp_code,
                              req.remote_ip, req.remote_group_id)
    except ValidationError:
        return None  # rule_create reports it
    return found.id if found else None


def update_rule(rule_id: str) -> Response:
    ctx = _context()
    attrs = validate.resource_body(_body(), "security_group_rule", validate.RULE_PUT)
    api = _api()
    rule = _rule(_state(ctx), ctx, rule_id)
    description = validate.text_attr(attrs, "description", rule.description)
    state = api.snapshot()
    updated = api.rule_update(state.groups[rule.group_id].project, rule.id, description)
    return _one("security_group_rule", rule_view(api.snapshot(), updated))


def delete_rule(rule_id: str) -> tuple[str, int]:
    ctx = _context()
    api = _api()
    state = _state(ctx)
    rule = _rule(state, ctx, rule_id)
    api.rule_delete(state.groups[rule.group_id].project, rule.id)
    return "", 204


# ---- ports and networks


def _port_views(state: CloudState, ctx: Context) -> list[dict[str, Any]]:
    ports = [
        p for p in state.ports.values()
        if _visible(ctx, state.instances[p.instance_id].project)
    ]
    ports.sort(key=lambda p: (state.instances[p.instance_id].project, p.id))
    return [port_view(state, p, ctx.is_admin) for p in ports]


def list_ports() -> Response:
    ctx = _context()
    return _listing("ports", _port_views(_api().snapshot(), ctx))


def _port(state: CloudState, ctx: Context, port_id: str) -> dict[str, Any]:
    port = state.ports.get(port_id)
    if port is None or not _visible(ctx, state.instances[port.instance_id].project):
        raise NeutronApiError(404, "PortNotFound", f"Port {port_id} could not be found.")
    return port_view(state, port, ctx.is_admin)


def show_port(port_id: str) -> Response:
    ctx = _context()
    return _one("port", _port(_api().snapshot(), ctx, port_id))


def update_port(port_id: str) -> Response:
    """``security_groups`` (every port of the instance: secfw keeps groups per
    instance), ``allowed_address_pairs``, ``port_security_enabled``."""
    ctx = _context()
    attrs = validate.resource_body(_body(), "port", validate.PORT_PUT)
    api = _api()
    state = _state(ctx)
    current = _port(state, ctx, port_id)
    project = current["project_id"]
    groups = validate.parse_group_ids(attrs["security_groups"]) \
        if "security_groups" in attrs else None
    pairs = validate.parse_address_pairs(attrs["allowed_address_pairs"]) \
        if "allowed_address_pairs" in attrs else None
    security = validate.parse_bool_attr(attrs["port_security_enabled"], "port_security_enabled") \
        if "port_security_enabled" in attrs else None
    if groups is not None:
        for group_id in groups:
            group = state.groups.get(group_id)
            if group is None or group.project != project:
                raise NeutronApiError(
                    404, "SecurityGroupNotFound", f"Security group {group_id} does not exist"
                )
    def change() -> None:
        with api.batch():
            if groups is not None:
                api.port_set_groups(project, port_id, groups)
            if pairs is not None or security is not None:
                api.port_update(project, port_id, pairs, security)

    retry_conflicts(change, what="port update")  # one transaction, re-run on a lost race
    return _one("port", _port(api.snapshot(), ctx, port_id))


def list_networks() -> Response:
    ctx = _context()
    state = _api().snapshot()
    nets = sorted(
        (n for n in state.networks.values() if ctx.is_admin or n.usable_by(ctx.project)),
        key=lambda n: (n.name, n.id),
    )
    return _listing("networks", (network_view(n, ctx.is_admin) for n in nets))


def show_network(network_id: str) -> Response:
    ctx = _context()
    network = _api().snapshot().networks.get(network_id)
    if network is None or not (ctx.is_admin or network.usable_by(ctx.project)):
        raise NeutronApiError(
            404, "NetworkNotFound", f"Network {network_id} could not be found."
        )
    return _one("network", network_view(network, ctx.is_admin))
