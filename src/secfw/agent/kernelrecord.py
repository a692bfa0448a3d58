"""What the kernel held when the agent last knew it, kept across restarts.

A restart of a loaded host used to read the whole table back (seconds at
10,000 ports) only to find what the previous agent had left. The agent now
keeps, in its state directory (``/run/secfw``: a tmpfs, gone on reboot, which
is right), a :class:`Record`: the namespace's identity, the nftables
generation at which the kernel held its last committed ruleset (known only
along the chain docs/agent.md, "Resync", describes) and a digest of that
ruleset. A new agent whose namespace is the same one, whose generation is still
that one (nothing committed since, by anyone) and whose newly compiled ruleset
has that digest knows the kernel holds it: its first pass needs no read-back.

The record also names what that ruleset was made from: the store revision and
a digest of everything else the rendering depends on (:func:`inputs_digest`:
the code, the configuration, backend and topology, the host, the store and its
last write). A new agent that finds the same generation, the same revision and
the same inputs knows the kernel holds exactly what it would render, without
loading, compiling or rendering anything: it is in sync at once, and builds
its own state afterwards (docs/agent.md, "Resync").

Any mismatch, or a record that cannot be read or that someone else could
have written (:meth:`KernelRecord.load`), is today's path (a read-back).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from secfw.agent.daemon import log_event
from secfw.gcpause import collector_paused

log = logging.getLogger("secfw.agent")

#: 2: ``revision``, ``inputs`` and ``ports`` added (a version-1 record is
#: not trusted: the agent reads back once and writes a version-2 one).
VERSION = 2


@dataclass(frozen=True)
class Record:
    """``namespace``: the backend's identity of the network namespace
    (boot id + netns cookie); ``backend``: name and topology; ``generation``
    and ``digest``: the kernel held the ruleset of that digest at that
    generation. ``revision`` and ``inputs``: that ruleset is what the agent
    renders from the store at that revision with those inputs
    (:func:`inputs_digest`; "" when that is not vouched for); ``ports``: how
    many ports it filters (for the agent's report)."""

    namespace: str
    backend: str
    generation: int
    digest: str
    revision: int = -1
    inputs: str = ""
    ports: int = 0


def record_path(state_dir: Path | str, host: str) -> Path:
    """Where the record of ``host`` lives in ``state_dir``."""
    digest = hashlib.sha256(host.encode()).hexdigest()[:16]
    return Path(state_dir) / f"kernel-{digest}.json"


class KernelRecord:
    """Reads and writes one :class:`Record` file; digests states cheaply."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._digest = StateDigest()

    def load(self) -> Record | None:
        """The record, or None when absent, unreadable or not provably ours
        (never trusted then: the agent reads the kernel back). Ours: a regular
        file, not a symlink, owned by this process's user and writable by it
        alone, in a directory writable by it alone — anyone else able to write
        the record could make an agent trust a kernel it never verified. A
        refusal for any reason but absence is logged (warning)."""
        try:
            doc = json.loads(_read_own_file(self.path))
            if doc.get("version") != VERSION:
                return None
            return Record(str(doc["namespace"]), str(doc["backend"]),
                          int(doc["generation"]), str(doc["digest"]), int(doc["revision"]),
                          str(doc["inputs"]), int(doc["ports"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log_event(log, logging.WARNING, "kernel_record_refused", path=str(self.path),
                      error=str(exc) or type(exc).__name__, action="read back")
            return None

    def save(self, record: Record | None) -> None:
        """Write ``record`` atomically (a reader sees the old file or the new
        one), mode 0600, never through a symlink; None removes the file. An
        unwritable directory is no error: the next start then reads the
        kernel back."""
        with contextlib.suppress(OSError):
            if record is None:
                self.path.unlink(missing_ok=True)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            text = json.dumps({"version": VERSION, **asdict(record)})
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.unlink(missing_ok=True)  # a leftover (or a planted link) goes first
            fd = os.open(temporary, _CREATE, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(temporary, self.path)

    def digest(self, state: Any) -> str | None:
        """See :class:`StateDigest`."""
        return self._digest(state)

    def vouch(self, state: Any, digest: str) -> None:
        """``state`` is known to have ``digest`` (:meth:`StateDigest.vouch`)."""
        self._digest.vouch(state, digest)


@functools.cache
def code_identity() -> str:
    """A digest of this secfw's code: every module's source (~140 files, a few
    ms) and the Python version. The rendering is a function of the code; a
    record written by other code (an upgrade, a downgrade, a patched module)
    must not stand for what this code renders."""
    root = Path(__file__).resolve().parent.parent
    total = hashlib.sha256(repr(sys.version_info[:2]).encode())
    for path in sorted(root.rglob("*.py")):
        total.update(str(path.relative_to(root)).encode() + b"\0")
        total.update(path.read_bytes())
    return total.hexdigest()


def inputs_digest(parts: Iterable[str]) -> str:
    """One digest of ``parts`` (each length-prefixed, so no two lists of parts
    give the same bytes), prefixed with :func:`code_identity`."""
    total = hashlib.sha256(code_identity().encode())
    for part in parts:
        data = part.encode()
        total.update(len(data).to_bytes(8, "big") + data)
    return total.hexdigest()


#: A new file only (O_EXCL), never through a symlink (O_NOFOLLOW).
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Larger than any record (a few hundred bytes): anything longer is not one.
_MAX_BYTES = 4096


def _read_own_file(path: Path) -> str:
    """``path``'s text when it is a regular file owned by this process's user
    and writable by no one else, in a directory of the same kind; else OSError.
    Opened with O_NOFOLLOW (a symlink is ELOOP) and checked with fstat on the
    open descriptor, so the file checked is the file read."""
    _check_owned(os.stat(path.parent), f"{path.parent}: directory")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path}: not a regular file")
        _check_owned(info, str(path))
        data = file.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES:
        raise ValueError(f"{path}: longer than a record")
    return data.decode("utf-8")


def _check_owned(info: os.stat_result, what: str) -> None:
    """OSError unless ``info`` is owned by this process's user and neither
    group- nor world-writable."""
    if info.st_uid != os.geteuid():
        raise OSError(f"{what} owned by uid {info.st_uid}, not {os.geteuid()}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"{what} writable by others (mode {stat.S_IMODE(info.st_mode):o})")


class StateDigest:
    """A digest of a backend state made of ``sets``, ``chains`` and ``tables``
    (nftables' KernelState), equal across processes for equal states; None
    for any other state. Each set or chain is digested once while the same
    object stays in the state (the backend's state cache keeps unchanged
    objects), so digesting after a change costs the change."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[object, bytes]] = {}
        self._vouched: tuple[object, str] | None = None

    def vouch(self, state: Any, digest: str) -> None:
        """Remember that ``state`` (this very object) has ``digest``, known
        without computing it: the agent rendered it from the inputs a record
        named (:func:`inputs_digest`), whose ruleset had that digest. A later
        call with the same object returns it at no cost."""
        self._vouched = (state, digest)

    def __call__(self, state: Any) -> str | None:
        vouched = self._vouched
        if vouched is not None and vouched[0] is state:
            return vouched[1]
        sets: Any = getattr(state, "sets", None)
        chains: Any = getattr(state, "chains", None)
        tables: Any = getattr(state, "tables", None)
        if sets is None or chains is None or tables is None:
            return None
        with collector_paused():  # ~10^5 short-lived strings (secfw.gcpause)
            return self._digest(sets, chains, tables)

    def _digest(self, sets: Any, chains: Any, tables: Any) -> str:
        total = hashlib.sha256(repr(sorted(tables)).encode())
        known: dict[int, tuple[object, bytes]] = {}
        for kind, objects in (("set", sets), ("chain", chains)):
            for key in sorted(objects):
                item = objects[key]
                hit = self._known.get(id(item))
                value = hit[1] if hit is not None and hit[0] is item else _object_digest(item)
                known[id(item)] = (item, value)
                total.update(repr((kind, key)).encode())
                total.update(value)
        self._known = known
        return total.hexdigest()


def _object_digest(item: Any) -> bytes:
    """A set's or chain's digest: its repr, with every frozenset's members
    sorted (a frozenset's order follows string hashing, which differs between
    processes)."""
    return hashlib.sha256(_stable(item).encode()).digest()


def _stable(value: Any) -> str:
    """``repr(value)`` made independent of hash order: members of sets and
    items of dicts sorted. A member whose own repr shows no set or dict (no
    ``{``, no ``frozenset(``) is taken as its repr — set elements, 300k of
    them at 10,000 ports, are plain tuples of strings."""
    digest_text = getattr(value, "digest_text", None)
    if callable(digest_text):  # a chain: its own stable text (ChainState.digest_text)
        return str(digest_text())
    if isinstance(value, (frozenset, set)):
        return "{" + _members(value) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(sorted(f"{_stable(k)}:{_stable(v)}"
                                     for k, v in value.items())) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_stable(v) for v in value) + ")"
    fields = getattr(value, "__dataclass_fields__", None) or getattr(value, "DIGEST_FIELDS", None)
    if fields is not None:  # a dataclass, or a class naming its fields (nftables' SetState)
        return type(value).__name__ + _stable(tuple(getattr(value, f) for f in fields))
    return repr(value)


def _members(values: frozenset[Any] | set[Any]) -> str:
    """A set's members, sorted, joined. Fast path for the 300k elements of a
    10,000-port host — tuples (NamedTuples) whose repr shows no set or dict —
    in C-level loops only: ``tuple.__repr__`` (a NamedTuple's own repr is a
    Python call printing the same fields in the same order)."""
    try:
        joined = ",".join(sorted(map(tuple.__repr__, values)))
    except TypeError:  # a member that is not a tuple
        joined = None
    if joined is not None and "{" not in joined and "frozenset(" not in joined:
        return joined
    return ",".join(sorted(_stable(v) for v in values))
