"""``secfw api serve``: the Neutron-compatible API on waitress.

waitress is a pure-Python production WSGI server (no C build, no fork model
to configure, a thread pool), which keeps the service a single process that
the store's own locking already makes safe. Flask and waitress are imported
only when the command runs: every other ``secfw`` command stays as fast as
before.
"""

from __future__ import annotations

import ipaddress
import sys

import click

from secfw.api import Api
from secfw.cli.main import CliState, main, pass_state, scope_options
from secfw.errors import ValidationError
from secfw.store.base import open_store

#: waitress's worker threads; each opens its own store handle.
THREADS = 4


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[IPV6]:PORT`` → (address, port); port 0 picks a free one."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValidationError(f"--listen {text!r}: expected ADDR:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValidationError(f"--listen {text!r}: {host!r} is not an IP address") from None
    return host, int(port_text)


@main.group("api")
def api_group() -> None:
    """The Neutron-compatible REST API (see secfw.neutron_api)."""


@api_group.command("serve")
@click.option("--listen", default="127.0.0.1:9696", show_default=True, metavar="ADDR:PORT",
              help="Address and port to serve on (port 0: any free port, printed).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="neutron.conf-style file: [DEFAULT] auth_strategy = noauth|keystone, "
                   "[keystone_authtoken].")
@scope_options
@pass_state
def serve_command(state: CliState, listen: str, config_path: str | None) -> None:
    """Serve Neutron's v2.0 security-group API over the store until interrupted."""
    from waitress import create_server

    from secfw.neutron_api.app import create_app
    from secfw.neutron_api.auth import load_service_config

    host, port = parse_listen(listen)
    config = load_service_config(config_path)
    url = state.store_url
    open_store(url).close()  # a bad store URL fails now, not on the first request
    app = create_app(lambda: Api(open_store(url)), config)
    server = create_server(app, host=host, port=port, threads=THREADS)
    bound = server.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    # One line on stdout once the socket is bound: callers (tests) wait for it.
    print(f"secfw api: listening on http://{shown}:{bound[1]}/ "
          f"(auth_strategy={config.auth_strategy})", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        sys.exit(0)
