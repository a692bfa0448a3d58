"""The compute model's commands: flavors, keypairs, images (glance), boot, show, meta.

Same contracts as :mod:`secfw.cli.main` (one API call per command, ``-f table|json``,
one-line errors). Names and arguments are the operations guide's nova and glance
commands; tables have the guide's columns where it shows them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, BinaryIO, Protocol

import click

from secfw.api import iso_time
from secfw.cli.main import CliState, _split_groups, emit, output_command, silent_command
from secfw.cli.output import Columns, python2_cell, python2_repr
from secfw.errors import ValidationError
from secfw.model import (
    MAX_USER_DATA_B64,
    Flavor,
    Host,
    Image,
    Keypair,
    parse_bool,
    parse_nic,
)
from secfw.scheduler import HostUsage

#: ``nova flavor-list`` as the guide prints it.
FLAVOR_COLUMNS: Columns = (
    ("ID", "id"),
    ("Name", "name"),
    ("Memory_MB", "memory_mb"),
    ("Disk", "disk"),
    ("Ephemeral", "ephemeral"),
    ("VCPUs", "vcpus"),
    ("extra_specs", "extra_specs"),
)
FLAVOR_ACCESS_COLUMNS: Columns = (("Flavor_ID", "flavor_id"), ("Tenant_ID", "tenant_id"))
#: ``host-list``: capacity and what the instances placed on each host use.
HOST_COLUMNS: Columns = (
    ("Host", "host"),
    ("VCPUs", "vcpus"),
    ("VCPUs Used", "vcpus_used"),
    ("Memory_MB", "memory_mb"),
    ("Memory_MB Used", "memory_mb_used"),
    ("Disk_GB", "disk_gb"),
    ("Disk_GB Used", "disk_gb_used"),
    ("Instances", "instances"),
    ("Properties", "properties"),
)
KEYPAIR_COLUMNS: Columns = (("Name", "name"), ("Type", "type"), ("Fingerprint", "fingerprint"))
#: ``glance image-list`` (v1).
IMAGE_COLUMNS: Columns = (
    ("ID", "id"),
    ("Name", "name"),
    ("Disk Format", "disk_format"),
    ("Container Format", "container_format"),
    ("Size", "size"),
    ("Status", "status"),
)
#: Bytes of a --pub-key or --user-data file read at most (more is refused by the API).
MAX_SMALL_FILE = 1 << 20


# --------------------------------------------------------------------------- rows


def _specs_cell(specs: dict[str, str], fmt: str) -> Any:
    """extra_specs (and a host's properties) as the guide's nova printed a dict in
    a table (``{}``, ``{u'gpu': u'true'}``, keys sorted); JSON: an object."""
    return specs if fmt == "json" else python2_repr(dict(sorted(specs.items())))


def flavor_row(flavor: Flavor, fmt: str) -> dict[str, Any]:
    return {"id": flavor.id, "name": flavor.name, "memory_mb": flavor.ram_mb,
            "disk": flavor.disk_gb, "ephemeral": flavor.ephemeral_gb, "swap": flavor.swap_mb,
            "vcpus": flavor.vcpus, "rxtx_factor": flavor.rxtx_factor,
            "is_public": flavor.is_public, "extra_specs": _specs_cell(flavor.extra_specs, fmt)}


def flavor_details(flavor: Flavor, fmt: str) -> dict[str, Any]:
    """``flavor-show``: every attribute, sorted by name as nova prints them."""
    return {"disk": flavor.disk_gb, "ephemeral": flavor.ephemeral_gb,
            "extra_specs": _specs_cell(flavor.extra_specs, fmt), "id": flavor.id,
            "is_public": flavor.is_public, "name": flavor.name, "ram": flavor.ram_mb,
            "rxtx_factor": flavor.rxtx_factor, "swap": flavor.swap_mb or "",
            "vcpus": flavor.vcpus}


def image_row(image: Image) -> dict[str, Any]:
    return {"id": image.id, "name": image.name, "disk_format": image.disk_format,
            "container_format": image.container_format, "size": image.size,
            "status": image.status, "visibility": image.visibility, "project": image.project}


def image_details(image: Image, fmt: str) -> dict[str, Any]:
    """``image-show`` as glance v1 prints it: ``Property 'K'`` rows first (table), then
    every attribute by name; JSON has the properties as one object."""
    attributes: dict[str, Any] = {
        "checksum": image.checksum,
        "container_format": image.container_format,
        "created_at": iso_time(image.created) if image.created else None,
        "disk_format": image.disk_format,
        "id": image.id,
        "is_public": image.visibility == "public",
        "location": image.location,
        "min_disk": image.min_disk,
        "min_ram": image.min_ram,
        "name": image.name,
        "owner": image.project,
        "size": image.size,
        "status": image.status,
        "updated_at": iso_time(image.updated) if image.updated else None,
    }
    if fmt == "json":
        return {**attributes, "properties": dict(image.properties),
                "visibility": image.visibility}
    props = {f"Property '{k}'": v for k, v in sorted(image.properties.items())}
    return {**props, **attributes}


def keypair_row(pair: Keypair) -> dict[str, Any]:
    return {"name": pair.name, "type": pair.type, "fingerprint": pair.fingerprint,
            "public_key": pair.public_key, "id": pair.id, "project": pair.project,
            "created_at": iso_time(pair.created) if pair.created else None}


def _read_file(path: str, what: str, limit: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of a small user file (``-`` is stdin), as a one-line error if unreadable."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
    except OSError as exc:
        raise ValidationError(f"cannot read {what} {path!r}: {exc.strerror}") from exc
    if len(data) > limit:
        raise ValidationError(f"{what} {path!r} is larger than {limit} bytes")
    return data


# --------------------------------------------------------------------------- flavors


@output_command("flavor-list")
def flavor_list(state: CliState, fmt: str) -> None:
    """List flavors: ID | Name | Memory_MB | Disk | Ephemeral | VCPUs | extra_specs."""
    flavors = state.api.flavor_list(state.project)
    emit([flavor_row(f, fmt) for f in flavors], FLAVOR_COLUMNS, fmt)


@output_command("flavor-show")
@click.argument("flavor")
def flavor_show(state: CliState, fmt: str, flavor: str) -> None:
    """Show a flavor (by ID or name): Property | Value."""
    emit(flavor_details(state.api.flavor_show(state.project, flavor), fmt), None, fmt)


@output_command("flavor-create")
@click.argument("name")
@click.argument("flavor_id", metavar="ID")
@click.argument("ram", metavar="RAM")
@click.argument("disk", metavar="DISK")
@click.argument("vcpus", metavar="VCPUS")
@click.option("--ephemeral", default="0", show_default=True, metavar="GB",
              help="Size of the secondary ephemeral disk.")
@click.option("--swap", default="0", show_default=True, metavar="MB", help="Swap size.")
@click.option("--rxtx-factor", default="1.0", show_default=True, metavar="FACTOR",
              help="Bandwidth cap factor (times the network's rxtx_base).")
@click.option("--is-public", default="true", show_default=True, metavar="true|false",
              help="Usable by every project (false: admin and flavor-access-add projects).")
def flavor_create(
    state: CliState, fmt: str, name: str, flavor_id: str, ram: str, disk: str, vcpus: str,
    ephemeral: str, swap: str, rxtx_factor: str, is_public: str,
) -> None:
    """Create a flavor (admin project only): RAM in MB, DISK in GB; ID 'auto' generates one."""
    flavor = state.api.flavor_create(state.project, name, flavor_id, ram, disk, vcpus,
                                     ephemeral, swap, rxtx_factor, is_public)
    emit(flavor_row(flavor, fmt), FLAVOR_COLUMNS, fmt)


@silent_command("flavor-delete")
@click.argument("flavor")
def flavor_delete(state: CliState, flavor: str) -> None:
    """Delete a flavor (admin project only); servers booted with it keep it in show."""
    state.api.flavor_delete(state.project, flavor)


@silent_command("flavor-key")
@click.argument("flavor")
@click.argument("action", type=click.Choice(["set", "unset"]))
@click.argument("pairs", nargs=-1, metavar="KEY[=VALUE]...")
def flavor_key(state: CliState, flavor: str, action: str, pairs: Sequence[str]) -> None:
    """Set (KEY=VALUE) or unset (KEY) extra_specs of a flavor (admin project only)."""
    state.api.flavor_key(state.project, flavor, action, pairs)


def _emit_access(state: CliState, fmt: str, flavor: str) -> None:
    rows = [{"flavor_id": f, "tenant_id": t}
            for f, t in state.api.flavor_access_list(state.project, flavor)]
    emit(rows, FLAVOR_ACCESS_COLUMNS, fmt)


@output_command("flavor-access-add")
@click.argument("flavor")
@click.argument("tenant", metavar="PROJECT")
def flavor_access_add(state: CliState, fmt: str, flavor: str, tenant: str) -> None:
    """Let PROJECT use a private flavor (admin project only); print the access list."""
    state.api.flavor_access(state.project, flavor, tenant, add=True)
    _emit_access(state, fmt, flavor)


@output_command("flavor-access-remove")
@click.argument("flavor")
@click.argument("tenant", metavar="PROJECT")
def flavor_access_remove(state: CliState, fmt: str, flavor: str, tenant: str) -> None:
    """Take PROJECT's access to a private flavor away; print the access list."""
    state.api.flavor_access(state.project, flavor, tenant, add=False)
    _emit_access(state, fmt, flavor)


@output_command("flavor-access-list")
@click.option("--flavor", required=True, help="A private flavor (ID or name).")
def flavor_access_list(state: CliState, fmt: str, flavor: str) -> None:
    """List the projects given access to a private flavor: Flavor_ID | Tenant_ID."""
    _emit_access(state, fmt, flavor)


# --------------------------------------------------------------------------- keypairs


@silent_command("keypair-add")
@click.argument("name")
@click.option("--pub-key", "pub_key", metavar="FILE",
              help="Register this OpenSSH public key ('-': stdin) instead of generating one.")
def keypair_add(state: CliState, name: str, pub_key: str | None) -> None:
    """Generate a key pair and print its private key (once; it is not kept), or register
    the public key of --pub-key (prints nothing)."""
    public = _read_file(pub_key, "public key file") if pub_key is not None else None
    _pair, private = state.api.keypair_add(state.project, name, public)
    if private is not None:
        click.echo(private, nl=False)


@output_command("keypair-list")
def keypair_list(state: CliState, fmt: str) -> None:
    """List the project's keypairs: Name | Type | Fingerprint."""
    emit([keypair_row(k) for k in state.api.keypair_list(state.project)], KEYPAIR_COLUMNS, fmt)


@output_command("keypair-show")
@click.argument("name")
def keypair_show(state: CliState, fmt: str, name: str) -> None:
    """Show a keypair: Property | Value (the public key and its fingerprint)."""
    emit(keypair_row(state.api.keypair_show(state.project, name)), None, fmt)


@silent_command("keypair-delete")
@click.argument("name")
def keypair_delete(state: CliState, name: str) -> None:
    """Delete a keypair (servers booted with it keep showing its name)."""
    state.api.keypair_delete(state.project, name)


# --------------------------------------------------------------------------- images


def _visibility(is_public: str | None, visibility: str | None) -> str | None:
    if is_public is not None and visibility is not None:
        raise ValidationError("give --is-public or --visibility, not both")
    if is_public is not None:
        return "public" if parse_bool(is_public, "--is-public") else "private"
    return visibility


def _image_data(file: str | None, location: str | None, stdin: bool) -> _Source | None:
    """The stream of image bytes: --file, else (with ``stdin``) stdin when it is not a
    terminal and holds something (glance reads a redirected stdin), else None."""
    if file is not None:
        if location is not None:
            raise ValidationError("give --file (or stdin) or --location, not both")
        try:
            return open(file, "rb")
        except OSError as exc:
            raise ValidationError(f"cannot read image file {file!r}: {exc.strerror}") from exc
    if location is not None or not stdin:
        return None
    stream = sys.stdin.buffer
    if stream.isatty():
        return None
    peek = stream.read(1)
    if not peek:
        return None
    return _Prepended(peek, stream)


class _Source(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class _Prepended:
    """A binary stream of ``head`` then the rest of ``tail`` (stdin cannot seek back)."""

    def __init__(self, head: bytes, tail: BinaryIO) -> None:
        self.head = head
        self.tail = tail

    def read(self, size: int = -1) -> bytes:
        if self.head:
            head, self.head = self.head, b""
            return head + self.tail.read(max(size - len(head), 0) if size >= 0 else -1)
        return self.tail.read(size)

    def close(self) -> None:
        """stdin stays open."""


@output_command("image-create")
@click.argument("args", nargs=-1, metavar="[NAME] | [SERVER NAME]")
@click.option("--name", help="Image name (glance form).")
@click.option("--disk-format", help="ami, ari, aki, vhd, vmdk, raw, qcow2 (default), vdi or iso.")
@click.option("--container-format", help="ami, ari, aki, bare (default), ovf or ova.")
@click.option("--min-disk", metavar="GB", help="Smallest root disk the image boots on (0).")
@click.option("--min-ram", metavar="MB", help="Smallest memory the image boots with (0).")
@click.option("--is-public", metavar="true|false", help="Visible to every project.")
@click.option("--visibility", help="public or private (default private).")
@click.option("--property", "properties", multiple=True, metavar="KEY=VALUE",
              help="An extra property (repeatable).")
@click.option("--location", metavar="URL", help="Where the image is (recorded; not fetched).")
@click.option("--copy-from", metavar="URL", help="Refused: secfw downloads nothing.")
@click.option("--file", "file", metavar="FILE", help="Read the image bytes from FILE "
              "(with --name, else from stdin when it is redirected).")
def image_create(
    state: CliState, fmt: str, args: tuple[str, ...], name: str | None,
    disk_format: str | None, container_format: str | None, min_disk: str | None,
    min_ram: str | None, is_public: str | None, visibility: str | None,
    properties: tuple[str, ...], location: str | None, copy_from: str | None,
    file: str | None,
) -> None:
    """Register an image (glance: --name N [options] [--location URL | --file F | < F]),
    or snapshot a server (nova: SERVER NAME); print it like image-show.

    The short form NAME [options] registers an image without reading stdin.
    """
    options = (name, disk_format, container_format, min_disk, min_ram, is_public, visibility,
               location, copy_from, file)
    if len(args) == 2:
        if properties or any(option is not None for option in options):
            raise ValidationError("image-create SERVER NAME (a snapshot) takes no image options")
        image = state.api.image_snapshot(state.project, args[0], args[1])
        emit(image_details(image, fmt), None, fmt)
        return
    if len(args) > 2 or (args and name is not None) or (not args and name is None):
        raise ValidationError("give --name NAME (an image), NAME, or SERVER NAME (a snapshot)")
    if copy_from is not None:
        raise ValidationError("--copy-from is not supported: secfw downloads nothing; give the "
                              "bytes with --file or on stdin, or record --location")
    data = _image_data(file, location, stdin=name is not None)
    try:
        image = state.api.image_create(
            state.project, name if name is not None else args[0], disk_format or "qcow2",
            _visibility(is_public, visibility) or "private",
            container_format=container_format or "bare", min_disk=min_disk or "0",
            min_ram=min_ram or "0", properties=properties, location=location, data=data)
    finally:
        if data is not None:
            data.close()
    emit(image_details(image, fmt), None, fmt)


@output_command("image-list")
def image_list(state: CliState, fmt: str) -> None:
    """List the images the project can boot (its own and public ones):
    ID | Name | Disk Format | Container Format | Size | Status."""
    emit([image_row(i) for i in state.api.image_list(state.project)], IMAGE_COLUMNS, fmt)


@output_command("image-show")
@click.argument("image")
def image_show(state: CliState, fmt: str, image: str) -> None:
    """Show an image (by ID or name) with all its properties."""
    emit(image_details(state.api.image_show(state.project, image), fmt), None, fmt)


@output_command("image-update")
@click.argument("image")
@click.option("--name", help="New name.")
@click.option("--disk-format", help="New disk format.")
@click.option("--container-format", help="New container format.")
@click.option("--min-disk", metavar="GB", help="New minimum root disk.")
@click.option("--min-ram", metavar="MB", help="New minimum memory.")
@click.option("--is-public", metavar="true|false", help="Visible to every project.")
@click.option("--visibility", help="public or private.")
@click.option("--property", "properties", multiple=True, metavar="KEY=VALUE",
              help="Set a property (repeatable).")
@click.option("--purge-props", is_flag=True, help="Drop every property not given.")
def image_update(
    state: CliState, fmt: str, image: str, name: str | None, disk_format: str | None,
    container_format: str | None, min_disk: str | None, min_ram: str | None,
    is_public: str | None, visibility: str | None, properties: tuple[str, ...],
    purge_props: bool,
) -> None:
    """Change an image (the owner's, or any as admin); print it."""
    updated = state.api.image_update(
        state.project, image, name=name, disk_format=disk_format,
        container_format=container_format, min_disk=min_disk, min_ram=min_ram,
        visibility=_visibility(is_public, visibility), properties=properties,
        purge_props=purge_props)
    emit(image_details(updated, fmt), None, fmt)


@silent_command("image-delete")
@click.argument("image")
def image_delete(state: CliState, image: str) -> None:
    """Delete an image; servers and snapshots based on it keep showing its ID."""
    state.api.image_delete(state.project, image)


# --------------------------------------------------------------------------- servers


@output_command("boot")
@click.argument("name")
@click.option("--flavor", required=True, help="Flavor name or ID.")
@click.option("--image", help="Image name or ID (not needed to boot from a volume on vda).")
@click.option("--security-groups", "security_groups", multiple=True, metavar="A,B",
              help="Comma-separated groups (repeatable; default: default).")
@click.option("--nic", "nics", multiple=True, metavar="net-id=NET",
              help="Attach to network NET (repeatable; default: the only usable network).")
@click.option("--host", help="Compute host to run on (default: the scheduler chooses).")
@click.option("--key-name", "--key_name", "key_name", metavar="KEYPAIR",
              help="A keypair of the project to inject.")
@click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE",
              help="Metadata item (repeatable).")
@click.option("--user-data", "user_data", metavar="FILE",
              help=f"User data file (at most {MAX_USER_DATA_B64} bytes once base64-encoded).")
@click.option("--block-device-mapping", "block_devices", multiple=True,
              metavar="DEV=ID:[snap]:SIZE:DELETE_ON_TERMINATE",
              help="Attach a volume (or a new one from a snapshot: type snap) at boot; "
                   "vda boots from it (repeatable).")
def boot(
    state: CliState, fmt: str, name: str, flavor: str, image: str | None,
    security_groups: Sequence[str], nics: Sequence[str], host: str | None,
    key_name: str | None, meta: Sequence[str], user_data: str | None,
    block_devices: Sequence[str],
) -> None:
    """Boot an instance (one port per network), scheduled onto a registered host
    unless --host is given; print it like show (ERROR with a NoValidHost fault
    when no host fits)."""
    groups = _split_groups(security_groups)
    networks = [parse_nic(nic) for nic in nics]
    data = _read_file(user_data, "user data file") if user_data is not None else None
    instance = state.api.boot(state.project, name, flavor, image, host, groups, networks,
                              key_name=key_name, meta=meta, user_data=data,
                              block_devices=block_devices)
    emit(_server(state, instance.id, fmt), None, fmt)


def _server(state: CliState, server: str, fmt: str) -> dict[str, Any]:
    """``show``'s properties: as the API gives them in JSON; in a table, as the
    guide's novaclient printed them (:func:`nova_show_rows`)."""
    shown = state.api.show(state.project, server)
    return shown if fmt == "json" else nova_show_rows(shown)


def nova_show_rows(shown: dict[str, Any]) -> dict[str, str]:
    """The ``Property | Value`` rows of ``nova show`` for :meth:`Api.show`'s data.

    As novaclient (the guide's, Python 2) did: one ``<name> network`` row per
    network with its addresses comma-separated, every row sorted by name
    (Python's order: upper case first), and each value printed with Python 2's
    ``str()`` (``None``, ``{u'description': u'…'}``). ``host`` is left out: the
    guide's admin sees the compute node as ``hostId``, which holds it.
    """
    rows = {key: value for key, value in shown.items() if key not in ("networks", "host")}
    for network, addresses in shown["networks"].items():
        rows[f"{network} network"] = ", ".join(addresses)
    return {key: python2_cell(rows[key]) for key in sorted(rows)}


@output_command("show")
@click.argument("server")
def show(state: CliState, fmt: str, server: str) -> None:
    """Show an instance: Property | Value (nova's properties)."""
    emit(_server(state, server, fmt), None, fmt)


@silent_command("meta")
@click.argument("server")
@click.argument("action", type=click.Choice(["set", "delete"]))
@click.argument("items", nargs=-1, metavar="KEY[=VALUE]...")
def meta(state: CliState, server: str, action: str, items: Sequence[str]) -> None:
    """Set (KEY=VALUE) or delete (KEY) metadata items of a server."""
    state.api.meta(state.project, server, action, items)



# --------------------------------------------------------------------------- compute hosts


def host_row(host: Host, used: HostUsage, fmt: str) -> dict[str, Any]:
    return {"host": host.id, "vcpus": host.vcpus, "vcpus_used": used.vcpus,
            "memory_mb": host.ram_mb, "memory_mb_used": used.ram_mb,
            "disk_gb": host.disk_gb, "disk_gb_used": used.disk_gb,
            "instances": used.instances, "properties": _specs_cell(host.properties, fmt)}


@output_command("host-add")
@click.argument("name")
@click.option("--vcpus", required=True, metavar="N", help="Virtual CPUs the host offers.")
@click.option("--ram-mb", required=True, metavar="MB", help="Memory the host offers.")
@click.option("--disk-gb", required=True, metavar="GB", help="Disk the host offers.")
@click.option("--property", "properties", multiple=True, metavar="KEY=VALUE",
              help="A capability flavors' extra_specs are matched against (repeatable).")
def host_add(state: CliState, fmt: str, name: str, vcpus: str, ram_mb: str, disk_gb: str,
             properties: tuple[str, ...]) -> None:
    """Register a compute host for the scheduler (admin only); print it."""
    host = state.api.host_add(state.project, name, vcpus, ram_mb, disk_gb, properties)
    emit(host_row(*state.api.host_show(host.id), fmt), None, fmt)


@output_command("host-list")
def host_list(state: CliState, fmt: str) -> None:
    """List registered hosts with their capacity and what is used of it."""
    emit([host_row(h, u, fmt) for h, u in state.api.host_list()], HOST_COLUMNS, fmt)


@output_command("host-show")
@click.argument("name")
def host_show(state: CliState, fmt: str, name: str) -> None:
    """Show a registered host: Property | Value."""
    emit(host_row(*state.api.host_show(name), fmt), None, fmt)


@silent_command("host-delete")
@click.argument("name")
def host_delete(state: CliState, name: str) -> None:
    """Unregister a host (admin only); refused while instances run on it."""
    state.api.host_delete(state.project, name)
