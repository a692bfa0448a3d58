"""The compute model through the API: flavor seeding, image bytes on failure, key checks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secfw import keypairs
from secfw.api import Api
from secfw.errors import StoreError, ValidationError, WriteConflictError


def test_default_flavors_are_read_without_writing(api: Api) -> None:
    assert [f.name for f in api.flavor_list("alpha")][:1] == ["m1.tiny"]
    assert api.flavor_show("alpha", "2").ram_mb == 2048
    assert api.store.revision() == 0  # reads never write
    api.flavor_create("admin", "xl", "6", "1024", "1", "1")
    assert api.store.revision() == 1  # the defaults, the marker and the new one: one commit
    docs = api.store.load().docs
    assert sorted(docs["flavor"]) == ["1", "2", "3", "4", "5", "6"]
    api.flavor_delete("admin", "1")
    assert "1" not in {f.id for f in api.flavor_list()}


class _Broken(io.BytesIO):
    """A stream that fails after its first chunk, like a pipe whose writer died."""

    def __init__(self) -> None:
        super().__init__(b"x" * (2 << 20))
        self.calls = 0

    def read(self, size: int | None = -1, /) -> bytes:
        self.calls += 1
        if self.calls > 1:
            raise OSError(5, "Input/output error")
        return super().read(size)


def test_a_failed_upload_leaves_no_file_and_no_record(api: Api, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot store image data"):
        api.image_create("p", "img", data=_Broken())
    files = sorted(p.name for p in Path(str(tmp_path / "secfw.db-images")).iterdir())
    assert files == [".lock"]  # no temporary file left behind
    assert api.image_list("p") == []
    assert api.store.revision() == 0


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_ssh_keygen_public_keys_are_accepted(tmp_path: Path, key_type: str) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", "me@host", "-f",
                    str(key)], check=True)
    public = (tmp_path / "id.pub").read_text()
    assert keypairs.check_public_key(public) == public.strip()
    out = subprocess.run(["ssh-keygen", "-l", "-E", "md5", "-f", str(tmp_path / "id.pub")],
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == "MD5:" + keypairs.fingerprint(public)
    with pytest.raises(ValidationError, match="not a valid OpenSSH public key"):
        keypairs.check_public_key(key.read_text().splitlines()[0])  # a private key


@pytest.mark.parametrize("text", [
    "", "ssh-rsa", "ssh-rsa not-base64!", "ssh-dss AAAAB3NzaC1kc3M= x", "\u00e9t\u00e9",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GK",
])
def test_malformed_public_keys_are_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        keypairs.check_public_key(text)


def test_a_lost_race_rewrites_the_record_not_the_bytes(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On etcd a transaction that lost a race is re-run; the image's bytes were read
    from a stream that cannot be read twice, so only the record may be re-run."""
    real_write = api.store.write
    lost = []

    class Abort(Exception):
        """Leaves the real transaction without committing."""

    @contextlib.contextmanager
    def write_losing_once() -> Iterator[Any]:
        if lost:
            with real_write() as txn:
                yield txn
            return
        lost.append(True)
        try:
            with real_write() as txn:
                yield txn
                raise Abort
        except Abort:
            raise WriteConflictError("another writer committed first") from None

    monkeypatch.setattr(api.store, "write", write_losing_once)
    image = api.image_create("p", "img", data=io.BytesIO(b"read once"))
    assert lost and image.size == len(b"read once")
    assert api.image_show("p", "img").checksum == hashlib.md5(b"read once").hexdigest()
    assert api.store.revision() == 1
