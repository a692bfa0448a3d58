"""agent.filewatch: when the watch on the store's directory ends — the
directory removed or renamed — the watcher says so (``watching`` cleared, so
the agent polls at its normal interval again), wakes the agent once and logs
``store_watch_lost``; a queue overflow counts as a change."""

from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path

import pytest

from secfw.agent import filewatch
from secfw.agent.filewatch import SqliteWatcher

WAIT_S = 10.0


def _started(path: Path) -> tuple[SqliteWatcher, threading.Event]:
    woken = threading.Event()
    watcher = SqliteWatcher(str(path), woken.set)
    watcher.start()
    assert watcher.watching.is_set()
    return watcher, woken


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_a_lost_directory_ends_the_watch_and_the_agent_polls_again(
        tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "store"
    directory.mkdir()
    watcher, woken = _started(directory / "secfw.db")
    try:
        with caplog.at_level(logging.WARNING, logger="secfw.agent"):
            if how == "removed":
                directory.rmdir()
            else:
                directory.rename(tmp_path / "elsewhere")
            assert woken.wait(WAIT_S)
            watcher._thread.join(WAIT_S)
        assert not watcher.watching.is_set()
        assert not watcher._thread.is_alive()
        assert [r for r in caplog.records if r.getMessage() == "store_watch_lost"]
    finally:
        watcher.stop()


def test_a_failing_read_ends_the_watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    watcher, woken = _started(tmp_path / "secfw.db")
    try:
        def broken(_data: bytes) -> tuple[bool, str]:
            raise ValueError("garbled event")

        monkeypatch.setattr(watcher, "_events", broken)
        (tmp_path / "secfw.db-wal").write_bytes(b"x")
        assert woken.wait(WAIT_S)
        watcher._thread.join(WAIT_S)
        assert not watcher.watching.is_set()
    finally:
        watcher.stop()


def test_an_overflow_counts_as_a_change(tmp_path: Path) -> None:
    watcher = SqliteWatcher(str(tmp_path / "secfw.db"), lambda: None)
    overflow = struct.pack("iIII", -1, filewatch.IN_Q_OVERFLOW, 0, 0)
    other = struct.pack("iIII", 1, filewatch.IN_MODIFY, 0, 16) + b"unrelated.txt".ljust(16, b"\0")
    assert watcher._events(other) == (False, "")
    assert watcher._events(other + overflow) == (True, "")
    for fd in (watcher._stop_read, watcher._stop_write):
        os.close(fd)
