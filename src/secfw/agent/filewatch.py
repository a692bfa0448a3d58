"""Wake the agent when a SQLite store's file is written, instead of polling it.

SQLite has no change notification across processes; its files do. Every commit
of a writer in WAL mode appends frames to ``FILE-wal`` (and a checkpoint writes
``FILE``); replacing the store renames onto ``FILE``; removing it deletes it.
:class:`SqliteWatcher` watches the store's directory with inotify(7) for
those names and calls ``on_change()`` from its own thread; the agent turns
that into a ``poll`` trigger: read the revision (and check the file is still
the one opened), then a pass if it moved.

A write to the WAL is seen before the writer updates the WAL index in shared
memory (``FILE-shm`` is written through mmap(2), which inotify does not
report), so a revision read at once may not see the commit yet: each burst of
events is followed by a second wake-up :data:`SETTLE_S` later. A writer process
that exits closes the WAL after its commit (``IN_CLOSE_WRITE``): a third. The
agent keeps a slow poll as a safety net
(:attr:`~secfw.agent.loop.LoopSettings.watched_poll_interval`).

A watch can end: the directory is removed, renamed or unmounted (the kernel
then drops the watch: ``IN_IGNORED``), or reading the events fails. The watcher
then clears :attr:`SqliteWatcher.watching` — the agent polls at its normal
interval again — wakes the agent once and logs ``store_watch_lost`` once. A
queue overflow (``IN_Q_OVERFLOW``: events were dropped) is taken for a change.

inotify through ctypes (libc's ``inotify_init1`` and ``inotify_add_watch``):
the standard library has no binding and this needs nothing else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from secfw.agent.daemon import log_event

log = logging.getLogger("secfw.agent")

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCHED = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
           | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)
#: Events after which the directory at the store's path is no longer watched.
LOST = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

#: Seconds after a burst of events when the agent is woken once more (see above).
SETTLE_S = 0.1
STOP_TIMEOUT_S = 5.0


class SqliteWatcher:
    """inotify on a SQLite store's files (see the module docstring)."""

    def __init__(self, path: str, on_change: Callable[[], None]) -> None:
        self.path = Path(path)
        self.on_change = on_change
        self._names = {self.path.name, f"{self.path.name}-wal", f"{self.path.name}-journal"}
        #: Set while the watch is in place: a write is reported without polling.
        self.watching = threading.Event()
        self._stop_read, self._stop_write = os.pipe2(os.O_CLOEXEC)
        self._fd = -1
        self._thread = threading.Thread(target=self._run, name="sqlite-watch", daemon=True)

    def start(self) -> None:
        """Watch the store's directory; OSError when inotify is unavailable
        (then the agent polls as it would without a watch)."""
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        directory = os.fsencode(self.path.parent)
        if libc.inotify_add_watch(fd, directory, WATCHED) < 0:
            errno = ctypes.get_errno()
            os.close(fd)
            raise OSError(errno, f"inotify_add_watch {self.path.parent}")
        self._fd = fd
        self.watching.set()
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_write, b"\0")
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)
        self.watching.clear()
        for fd in (self._fd, self._stop_read, self._stop_write):
            if fd >= 0:
                os.close(fd)
        self._fd = -1

    def _run(self) -> None:
        """Follow the events until stopped or the watch is lost (module docstring)."""
        try:
            lost = self._follow()
        except Exception as exc:  # the thread ends: the agent must poll again
            lost = f"{type(exc).__name__}: {exc}"
        if lost:
            self.watching.clear()
            log_event(log, logging.WARNING, "store_watch_lost", path=str(self.path),
                      reason=lost, action="polling at the normal interval")
            self.on_change()

    def _follow(self) -> str:
        """Report changes until stopped (``""``) or the watch is lost (why)."""
        settle: float | None = None
        while True:
            ready, _, _ = select.select([self._fd, self._stop_read], [], [], settle)
            if self._stop_read in ready:
                return ""
            if not ready:  # the burst is over: once more, the commit is now visible
                settle = None
                self.on_change()
                continue
            ours, lost = self._events(os.read(self._fd, 65536))
            if lost:
                return lost
            if ours:
                self.on_change()
                settle = SETTLE_S

    def _events(self, data: bytes) -> tuple[bool, str]:
        """Whether any event of ``data`` is about the store's files (or may have
        been: an overflow), and why the watch is lost (``""``: it is not)."""
        offset = 0
        found = False
        while offset + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            if mask & LOST:
                return True, "the store's directory was removed, moved or unmounted"
            name = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
            found |= bool(mask & IN_Q_OVERFLOW) or os.fsdecode(name) in self._names
            offset += _EVENT.size + length
        return found, ""
