"""``secfw store dump`` and ``secfw store restore``: backups of the whole store.

They work on any store (``--store``/``$SECFW_STORE``) and move a cloud between
kinds of store: dump SQLite, restore into an empty etcd prefix, and back
(see :mod:`secfw.store.backup`).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click

from secfw.cli.main import CliState, main, pass_state, scope_options
from secfw.errors import StoreError
from secfw.store import backup


@main.group("store")
def store_group() -> None:
    """Backups of the store: one consistent JSON snapshot, restored into an empty store."""


@store_group.command("dump")
@click.option("-o", "--output", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the dump to FILE (atomically: a temporary file renamed) "
                   "instead of standard output.")
@scope_options
@pass_state
def store_dump(state: CliState, output: Path | None) -> None:
    """Print the whole store at one revision as JSON (see secfw.store.backup)."""
    text = backup.dumps(state.api.store)
    if output is None:
        click.echo(text, nl=False)
        return
    _write_atomically(output, text)


@store_group.command("restore")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@scope_options
@pass_state
def store_restore(state: CliState, file: Path) -> None:
    """Write the dump FILE (`-` for standard input) into the store, which must be
    empty (exit 4 otherwise, nothing written)."""
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
    except OSError as exc:
        raise StoreError(f"cannot read {file}: {exc.strerror or exc}") from exc
    docs = backup.parse(text)
    count = backup.restore(state.api.store, docs)
    click.echo(f"restored {count} document(s) into {state.store_url}")


def _write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` via a temporary file in the same directory and a
    rename: a reader never sees half a backup."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
