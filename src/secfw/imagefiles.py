"""Image bytes, content-addressed, in a directory beside the store.

glance keeps everything about an image in its database except the image itself;
so does secfw. The bytes given to ``image-create`` (stdin or ``--file``) are
written to ``DIR/<sha256>``, where DIR is:

* for a SQLite store ``…/secfw.db``, the directory ``…/secfw.db-images`` next to it
  (beside SQLite's own ``-wal`` and ``-shm`` files);
* for any other store, ``$SECFW_IMAGE_DIR``, else ``/var/lib/secfw/images``.

A file is written to a temporary name in DIR, flushed to disk, then renamed
into place, so a reader never sees a partial image (rename(2) within one file
system is atomic). Equal bytes are stored once; a file is removed when the last
image naming it is deleted. Adding and removing files and committing the
records that name them happen under one lock (``flock(2)`` on ``DIR/.lock``),
so a concurrent delete cannot remove a file that a concurrent create is about
to name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from secfw.errors import StoreError, ValidationError

DEFAULT_DIR = "/var/lib/secfw/images"
CHUNK = 1 << 20


class ByteSource(Protocol):
    """Anything with a binary ``read``: a file, stdin's buffer."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Stored:
    """What was stored: size in bytes, glance's MD5 ``checksum``, the SHA-256 name."""

    size: int
    checksum: str
    sha256: str


def directory_for(store: object) -> Path:
    """The image directory of ``store`` (see the module docstring)."""
    path = getattr(store, "path", None)
    if isinstance(path, str) and path not in ("", ":memory:"):
        return Path(path + "-images")
    return Path(os.environ.get("SECFW_IMAGE_DIR") or DEFAULT_DIR)


class ImageFiles:
    """The content-addressed image files of one store."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, sha256: str) -> Path:
        return self.directory / sha256

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock (created on first use) for the block."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = open(self.directory / ".lock", "a+b")  # noqa: SIM115 (held for the block)
        except OSError as exc:
            raise StoreError(f"image directory {self.directory}: {exc.strerror}") from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def add(self, data: ByteSource, limit: int | None = None) -> Stored:
        """Store everything ``data`` yields; returns its size and digests.

        Call under :meth:`locked`. ``limit``: more bytes than this is a
        ValidationError (nothing is left behind).
        """
        md5 = hashlib.md5(usedforsecurity=False)
        sha = hashlib.sha256()
        size = 0
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
        except OSError as exc:
            raise StoreError(f"image directory {self.directory}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := data.read(CHUNK):
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise ValidationError(f"image data is larger than {limit} bytes")
                    md5.update(chunk)
                    sha.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path(sha.hexdigest()))
            _fsync_dir(self.directory)
        except OSError as exc:
            _unlink(Path(tmp))
            raise StoreError(f"cannot store image data in {self.directory}: {exc}") from exc
        except BaseException:
            _unlink(Path(tmp))
            raise
        return Stored(size, md5.hexdigest(), sha.hexdigest())

    def remove(self, sha256: str) -> None:
        """Remove a file no image names any more (call under :meth:`locked`)."""
        _unlink(self.path(sha256))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the directory entry is data too)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
