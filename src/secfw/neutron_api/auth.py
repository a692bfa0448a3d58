"""Who is asking: the request context, and the service's auth configuration.

``[DEFAULT] auth_strategy`` in the service's config file (neutron.conf's key):

``noauth`` (the default, for local use and tests)
    Nothing is checked, as in Neutron's noauth mode: the project is the
    ``X-Project-Id`` header (else ``X-Tenant-Id``, else ``[DEFAULT]
    noauth_project``, default ``admin``), the roles are ``X-Roles``. Anyone who
    can reach the port can act as anyone: listen on loopback only.
``keystone``
    The WSGI app is wrapped in keystonemiddleware's ``auth_token`` filter, given
    the ``[keystone_authtoken]`` section as its configuration (the same keys as
    in neutron.conf: ``www_authenticate_uri``, ``auth_url``, ``auth_type``,
    ``username``, ``password``, ``project_name``, ...). The filter rejects a
    request without a valid token (401) and replaces the identity headers with
    the token's, so the ``X-Project-Id`` and ``X-Roles`` read here come from
    Keystone (it strips any the client sent: keystonemiddleware's
    ``remove_auth_headers``). keystonemiddleware is the optional extra
    ``secfw[keystone]``.

In either mode a context with the ``admin`` role — or, without Keystone, the
project ``admin`` (secfw's administrator project) — acts across projects, as
Neutron's default policy lets admins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from secfw.config import read_ini
from secfw.errors import ConfigError
from secfw.model import ADMIN_PROJECT

STRATEGIES = ("noauth", "keystone")
ADMIN_ROLE = "admin"


@dataclass(frozen=True)
class ServiceConfig:
    """The API service's settings (see the module docstring)."""

    auth_strategy: str = "noauth"
    noauth_project: str = ADMIN_PROJECT
    keystone_authtoken: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """The caller: its project (secfw's project name) and whether it is an admin."""

    project: str
    is_admin: bool


def load_service_config(path: str | None) -> ServiceConfig:
    """The settings from the INI file at ``path`` (None: the defaults).

    An unknown ``auth_strategy`` is an error, never a silent fallback to noauth.
    """
    if path is None:
        return ServiceConfig()
    parser = read_ini(str(path))
    defaults = parser.defaults()
    strategy = defaults.get("auth_strategy", "noauth").strip().lower()
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"config {path}: auth_strategy must be one of {', '.join(STRATEGIES)}, "
            f"not {strategy!r}"
        )
    section = (
        {k: v for k, v in parser.items("keystone_authtoken") if k not in defaults}
        if parser.has_section("keystone_authtoken")
        else {}
    )
    if strategy == "keystone" and not section:
        raise ConfigError(f"config {path}: auth_strategy keystone needs [keystone_authtoken]")
    return ServiceConfig(
        auth_strategy=strategy,
        noauth_project=defaults.get("noauth_project", ADMIN_PROJECT).strip() or ADMIN_PROJECT,
        keystone_authtoken=section,
    )


def context_from_headers(headers: Mapping[str, str], config: ServiceConfig) -> Context | None:
    """The caller named by the request's identity headers (``headers`` keyed by
    lower-case names); None when a request reached the app without Keystone's
    confirmation (keystone mode)."""
    roles = {r.strip().lower() for r in headers.get("x-roles", "").split(",") if r.strip()}
    project = headers.get("x-project-id") or headers.get("x-tenant-id")
    if config.auth_strategy == "keystone":
        if headers.get("x-identity-status") != "Confirmed" or not project:
            return None
        return Context(project, ADMIN_ROLE in roles)
    project = project or config.noauth_project
    return Context(project, ADMIN_ROLE in roles or project == ADMIN_PROJECT)


WsgiApp = Callable[..., Any]


def wrap_keystone(app: WsgiApp, config: ServiceConfig) -> WsgiApp:
    """``app`` behind keystonemiddleware's auth_token filter (keystone mode)."""
    try:
        from keystonemiddleware import auth_token
    except ImportError as exc:
        raise ConfigError(
            "auth_strategy keystone needs keystonemiddleware: pip install 'secfw[keystone]'"
        ) from exc
    wrapped: WsgiApp = auth_token.AuthProtocol(app, dict(config.keystone_authtoken))
    return wrapped
