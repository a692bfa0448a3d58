"""The volume service's commands (cinder): volumes, attachments, volume snapshots.

Same contracts as :mod:`secfw.cli.main`. Names and arguments are the guide's
(``cinder create --display-name NAME SIZE`` is ``volume-create``; nova's
``volume-attach SERVER VOLUME [DEVICE]``); ``volume-list`` has the guide's
columns.
"""

from __future__ import annotations

from typing import Any

import click

from secfw.cli.main import CliState, emit, output_command, silent_command
from secfw.errors import ValidationError
from secfw.model import Volume, VolumeSnapshot, parse_bool

#: ``cinder list`` as the guide prints it.
VOLUME_COLUMNS = (
    ("ID", "id"),
    ("Status", "status"),
    ("Display Name", "display_name"),
    ("Size", "size"),
    ("Volume Type", "volume_type"),
    ("Attached to", "attached_to"),
)
SNAPSHOT_COLUMNS = (
    ("ID", "id"),
    ("Volume ID", "volume_id"),
    ("Status", "status"),
    ("Display Name", "display_name"),
    ("Size", "size"),
)


def volume_row(volume: Volume) -> dict[str, Any]:
    """A volume as ``cinder show`` lists it (``volume-list`` shows some columns)."""
    return {"id": volume.id, "status": volume.status,
            "display_name": volume.name if volume.name is not None else "None",
            "size": volume.size_gb, "volume_type": "None",
            "attached_to": volume.attached_to or "", "device": volume.device,
            "delete_on_termination": volume.delete_on_termination,
            "display_description": volume.description, "snapshot_id": volume.snapshot_id,
            "image_id": volume.image_id, "project": volume.project}


def snapshot_row(snap: VolumeSnapshot) -> dict[str, Any]:
    return {"id": snap.id, "volume_id": snap.volume_id, "status": "available",
            "display_name": snap.name if snap.name is not None else "None",
            "size": snap.size_gb, "display_description": snap.description,
            "project": snap.project}


@output_command("volume-create")
@click.argument("size")
@click.option("--display-name", help="The volume's name.")
@click.option("--display-description", help="A description.")
@click.option("--snapshot-id", help="Make the volume from this volume snapshot.")
@click.option("--image-id", help="Make the volume from this image.")
def volume_create(state: CliState, fmt: str, size: str, display_name: str | None,
                  display_description: str | None, snapshot_id: str | None,
                  image_id: str | None) -> None:
    """Create a volume of SIZE GB (cinder create); print it."""
    volume = state.api.volume_create(state.project, size, display_name, display_description,
                                     snapshot_id, image_id)
    emit(volume_row(volume), None, fmt)


@output_command("volume-list")
def volume_list(state: CliState, fmt: str) -> None:
    """List the project's volumes: ID | Status | Display Name | Size | Volume Type |
    Attached to."""
    emit([volume_row(v) for v in state.api.volume_list(state.project)], VOLUME_COLUMNS, fmt)


@output_command("volume-show")
@click.argument("volume")
def volume_show(state: CliState, fmt: str, volume: str) -> None:
    """Show a volume (by ID or display name)."""
    emit(volume_row(state.api.volume_show(state.project, volume)), None, fmt)


@silent_command("volume-delete")
@click.argument("volume")
def volume_delete(state: CliState, volume: str) -> None:
    """Delete a volume (refused while attached or while it has snapshots)."""
    state.api.volume_delete(state.project, volume)


@output_command("volume-attach")
@click.argument("server")
@click.argument("volume")
@click.argument("device", required=False)
def volume_attach(state: CliState, fmt: str, server: str, volume: str,
                  device: str | None) -> None:
    """Attach a volume to a server (one server at a time) as DEVICE (default: the
    next free /dev/vdX); print the attachment."""
    attached = state.api.volume_attach(state.project, server, volume, device)
    row = {"device": attached.device, "id": attached.id, "serverId": attached.attached_to,
           "volumeId": attached.id}
    emit(row, None, fmt)


@silent_command("volume-detach")
@click.argument("server")
@click.argument("volume")
def volume_detach(state: CliState, server: str, volume: str) -> None:
    """Detach a volume from a server."""
    state.api.volume_detach(state.project, server, volume)


@output_command("snapshot-create")
@click.argument("args", nargs=-1, metavar="VOLUME")
@click.option("--force", is_flag=False, flag_value="True", default="False",
              metavar="[True|False]",
              help="Snapshot the volume even if it is attached to an instance (False).")
@click.option("--display-name", help="The snapshot's name.")
@click.option("--display-description", help="A description.")
def snapshot_create(state: CliState, fmt: str, args: tuple[str, ...], force: str,
                    display_name: str | None, display_description: str | None) -> None:
    """Snapshot a volume (cinder snapshot-create [--force True|False] VOLUME); print it."""
    volume, forced = _snapshot_target(args, force)
    snap = state.api.snapshot_create(state.project, volume, forced, display_name,
                                     display_description)
    emit(snapshot_row(snap), None, fmt)


def _snapshot_target(args: tuple[str, ...], force: str) -> tuple[str, bool]:
    """VOLUME and --force: ``--force VOLUME`` (a bare flag before the volume) reads
    the volume as --force's value, so a non-boolean value with no VOLUME is both."""
    if len(args) == 1:
        return args[0], parse_bool(force, "--force")
    if not args and force.strip().lower() not in ("true", "false", "1", "0"):
        return force, True
    raise ValidationError("give exactly one VOLUME to snapshot")


@output_command("snapshot-list")
def snapshot_list(state: CliState, fmt: str) -> None:
    """List the project's volume snapshots."""
    emit([snapshot_row(s) for s in state.api.snapshot_list(state.project)],
         SNAPSHOT_COLUMNS, fmt)


@output_command("snapshot-show")
@click.argument("snapshot")
def snapshot_show(state: CliState, fmt: str, snapshot: str) -> None:
    """Show a volume snapshot (by ID or display name)."""
    emit(snapshot_row(state.api.snapshot_show(state.project, snapshot)), None, fmt)


@silent_command("snapshot-delete")
@click.argument("snapshot")
def snapshot_delete(state: CliState, snapshot: str) -> None:
    """Delete a volume snapshot."""
    state.api.snapshot_delete(state.project, snapshot)
