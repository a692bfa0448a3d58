"""The metadata service's HTTP paths: a WSGI application on werkzeug.

OpenStack's paths (``/openstack``, ``/openstack/latest/meta_data.json``,
``/openstack/latest/user_data``) and EC2's (``/latest/meta-data/`` and its
entries, ``/latest/user-data``), each answered for the instance that asks. Who
asks is decided by ``resolve`` from the connection alone (the WSGI environ's
peer address and port: :mod:`.identity` reads the rest from the kernel); the
request's headers, path and body never name an instance. A connection
``resolve`` does not recognise, and a piece the instance does not have
(user data, a key pair), get 404; when the store cannot be read, 503. Only GET
(and HEAD) are served.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from secfw.errors import SecfwError
from secfw.metadata.content import InstanceData

log = logging.getLogger("secfw.metadata")

Resolver = Callable[[dict[str, Any]], InstanceData | None]
StartResponse = Callable[..., Any]

_TEXT = "text/plain; charset=utf-8"
_EC2_KEYS = ("hostname", "instance-id", "local-hostname", "local-ipv4")



def _get(path: str, endpoint: str, strict_slashes: bool = True) -> Rule:
    """A path served to GET (and so HEAD) only; ``strict_slashes=False``: with or
    without a trailing slash, no redirect."""
    return Rule(path, endpoint=endpoint, methods=["GET"], strict_slashes=strict_slashes)

_URLS = Map([
    _get("/openstack", "openstack_versions", strict_slashes=False),
    _get("/openstack/latest", "openstack_files", strict_slashes=False),
    _get("/openstack/latest/meta_data.json", "openstack_meta_data"),
    _get("/openstack/latest/user_data", "user_data"),
    _get("/latest", "ec2_versions", strict_slashes=False),
    _get("/latest/meta-data", "ec2_keys", strict_slashes=False),
    _get("/latest/meta-data/<any(" + ", ".join(f'"{k}"' for k in _EC2_KEYS) + "):key>",
         "ec2_value"),
    _get("/latest/meta-data/public-keys", "ec2_public_keys", strict_slashes=False),
    _get("/latest/meta-data/public-keys/0", "ec2_key_formats", strict_slashes=False),
    _get("/latest/meta-data/public-keys/0/openssh-key", "ec2_openssh_key"),
    _get("/latest/user-data", "user_data"),
], merge_slashes=False, redirect_defaults=False)


class MetadataApp:
    """The WSGI application; ``resolve`` names the asking instance (see module)."""

    def __init__(self, resolve: Resolver) -> None:
        self.resolve = resolve

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        response = self.respond(Request(environ))
        return response(environ, start_response)

    def respond(self, request: Request) -> Response:
        """The response to ``request`` (404 for anyone ``resolve`` does not know)."""
        try:
            endpoint, args = _URLS.bind_to_environ(request.environ).match()
            data = self.resolve(request.environ)
            if data is None:
                raise NotFound()
            return _ENDPOINTS[endpoint](data, **args)
        except HTTPException as exc:
            return Response(f"{exc.code} {exc.name}\n", status=exc.code, mimetype="text/plain")
        except SecfwError as exc:  # the store or conntrack could not answer: try again
            log.warning("metadata request failed: %s", exc)
            return Response("503 Service Unavailable\n", status=503, mimetype="text/plain")


def _text(lines: Iterable[str]) -> Response:
    return Response("".join(f"{line}\n" for line in lines), content_type=_TEXT)


def _openstack_versions(data: InstanceData) -> Response:
    return _text(["latest"])


def _openstack_files(data: InstanceData) -> Response:
    return _text(["meta_data.json", *(["user_data"] if data.user_data is not None else [])])


def openstack_meta_data(data: InstanceData) -> dict[str, Any]:
    """``meta_data.json``: nova's keys, those the model has."""
    document: dict[str, Any] = {
        "uuid": data.uuid, "name": data.name, "hostname": data.hostname,
        "project_id": data.project, "launch_index": 0, "availability_zone": "nova",
        "meta": data.meta,
    }
    if data.key_name is not None and data.public_key is not None:
        document["public_keys"] = {data.key_name: data.public_key}
        document["keys"] = [{"name": data.key_name, "type": "ssh", "data": data.public_key}]
    return document


def _openstack_meta_data(data: InstanceData) -> Response:
    body = json.dumps(openstack_meta_data(data), sort_keys=True)
    return Response(body, content_type="application/json")


def _user_data(data: InstanceData) -> Response:
    if data.user_data is None:
        raise NotFound()
    return Response(data.user_data, content_type="application/octet-stream")


def _ec2_versions(data: InstanceData) -> Response:
    return _text(["meta-data/", *(["user-data"] if data.user_data is not None else [])])


def _ec2_keys(data: InstanceData) -> Response:
    return _text([*_EC2_KEYS, *(["public-keys/"] if data.public_key is not None else [])])


def _ec2_value(data: InstanceData, key: str) -> Response:
    values = {"hostname": data.hostname, "local-hostname": data.hostname,
              "instance-id": data.uuid, "local-ipv4": data.local_ipv4}
    return Response(values[key], content_type=_TEXT)


def _key_or_404(data: InstanceData) -> tuple[str, str]:
    if data.public_key is None or data.key_name is None:
        raise NotFound()
    return data.key_name, data.public_key


def _ec2_public_keys(data: InstanceData) -> Response:
    name, _ = _key_or_404(data)
    return _text([f"0={name}"])


def _ec2_key_formats(data: InstanceData) -> Response:
    _key_or_404(data)
    return _text(["openssh-key"])


def _ec2_openssh_key(data: InstanceData) -> Response:
    _, key = _key_or_404(data)
    return _text([key])


_ENDPOINTS: dict[str, Callable[..., Response]] = {
    "openstack_versions": _openstack_versions,
    "openstack_files": _openstack_files,
    "openstack_meta_data": _openstack_meta_data,
    "user_data": _user_data,
    "ec2_versions": _ec2_versions,
    "ec2_keys": _ec2_keys,
    "ec2_value": _ec2_value,
    "ec2_public_keys": _ec2_public_keys,
    "ec2_key_formats": _ec2_key_formats,
    "ec2_openssh_key": _ec2_openssh_key,
}
