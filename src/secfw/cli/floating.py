"""The floating-IP commands (nova's names): pools, allocation, association.

Same contracts as :mod:`secfw.cli.main`: one API call per command, ``-f table|json``,
every error one line on stderr and nothing changed.
"""

from __future__ import annotations

from typing import Any

import click

from secfw.cli.main import CliState, emit, output_command, silent_command
from secfw.cli.output import Columns
from secfw.cloud import CloudState
from secfw.model import FloatingIp, FloatingPool

#: ``nova floating-ip-list``.
FLOATING_COLUMNS: Columns = (
    ("Id", "id"),
    ("IP", "ip"),
    ("Server Id", "server_id"),
    ("Fixed IP", "fixed_ip"),
    ("Pool", "pool"),
)
POOL_COLUMNS: Columns = (("Id", "id"), ("Name", "name"), ("CIDR", "cidr"))


def floating_row(state: CloudState, floating: FloatingIp) -> dict[str, Any]:
    """One floating IP as ``floating-ip-list`` shows it (its id is its address)."""
    port = state.ports.get(floating.port_id or "")
    pool = state.floating_pools.get(floating.pool_id)
    return {"id": floating.id, "ip": floating.id,
            "server_id": port.instance_id if port else None,
            "fixed_ip": floating.fixed_ip, "pool": pool.name if pool else floating.pool_id}


def pool_row(pool: FloatingPool) -> dict[str, Any]:
    return {"id": pool.id, "name": pool.name, "cidr": pool.cidr}


@output_command("floating-ip-pool-create")
@click.argument("name")
@click.argument("cidr")
def floating_ip_pool_create(state: CliState, fmt: str, name: str, cidr: str) -> None:
    """Create a floating IP pool (admin project only); print it."""
    emit(pool_row(state.api.floating_pool_create(state.project, name, cidr)), POOL_COLUMNS, fmt)


@output_command("floating-ip-pool-list")
def floating_ip_pool_list(state: CliState, fmt: str) -> None:
    """List the floating IP pools: Id | Name | CIDR."""
    emit([pool_row(p) for p in state.api.floating_pool_list()], POOL_COLUMNS, fmt)


@silent_command("floating-ip-pool-delete")
@click.argument("name")
def floating_ip_pool_delete(state: CliState, name: str) -> None:
    """Delete a floating IP pool none of whose addresses is allocated (admin only)."""
    state.api.floating_pool_delete(state.project, name)


@output_command("floating-ip-create")
@click.argument("pool", required=False)
def floating_ip_create(state: CliState, fmt: str, pool: str | None) -> None:
    """Allocate a floating IP to the project (quota floating_ips); print it."""
    floating = state.api.floating_ip_create(state.project, pool)
    with state.api.keyed_read() as cloud:  # its pool (and port) by key, not the whole store
        row = floating_row(cloud, floating)
    emit(row, FLOATING_COLUMNS, fmt)


@output_command("floating-ip-list")
def floating_ip_list(state: CliState, fmt: str) -> None:
    """List the project's floating IPs: Id | IP | Server Id | Fixed IP | Pool."""
    floatings = state.api.floating_ip_list(state.project)
    with state.api.keyed_read() as cloud:  # their ports and pools by key
        rows = [floating_row(cloud, f) for f in floatings]
    emit(rows, FLOATING_COLUMNS, fmt)


@silent_command("floating-ip-delete")
@click.argument("address")
def floating_ip_delete(state: CliState, address: str) -> None:
    """Release a floating IP (dissociating it first)."""
    state.api.floating_ip_delete(state.project, address)


@silent_command("add-floating-ip")
@click.argument("server")
@click.argument("address")
@click.option("--fixed-address", metavar="A", help="The server's fixed IPv4 address to map to "
              "(default: its first port's).")
def add_floating_ip(state: CliState, server: str, address: str, fixed_address: str | None) -> None:
    """Associate a floating IP with a server: takes effect on the host at once."""
    state.api.add_floating_ip(state.project, server, address, fixed_address)


@silent_command("remove-floating-ip")
@click.argument("server")
@click.argument("address")
def remove_floating_ip(state: CliState, server: str, address: str) -> None:
    """Dissociate a floating IP from a server (its connections through it end)."""
    state.api.remove_floating_ip(state.project, server, address)
