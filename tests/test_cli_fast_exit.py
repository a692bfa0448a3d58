"""``secfw.cli.main.run``, the console script: a command that succeeded and asked
for it (``agent --once``) ends the process with ``os._exit(0)`` after flushing
its output; anything else ends as click's standalone ``main`` does. Here
``main`` and ``os._exit`` are stand-ins, so nothing ends this process; the real
``agent --once`` process is run in tests/netns/test_agent_cli.py."""

from __future__ import annotations

import io
import os
import sys

import pytest

import secfw.cli.main as cli


class Exited(Exception):
    """What the stand-in ``os._exit`` raises instead of ending the process."""


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The statuses ``os._exit`` was called with; the fast-exit request cleared."""
    calls: list[int] = []

    def fake_exit(status: int) -> None:
        calls.append(status)
        raise Exited

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(cli, "_FAST_EXIT", False)
    return calls


def command(status: int | None, fast: bool, say: str = "") -> object:
    """A stand-in for click's standalone ``main``: writes ``say`` to stderr,
    requests the fast exit when ``fast``, and raises SystemExit(status)."""
    def main() -> None:
        print(say, end="", file=sys.stderr)
        if fast:
            cli.request_fast_exit()
        raise SystemExit(status)
    return main


def test_a_command_that_asked_ends_at_once_with_its_output_flushed(
        monkeypatch: pytest.MonkeyPatch, exits: list[int]) -> None:
    buffered = io.TextIOWrapper(io.BytesIO(), write_through=False)
    monkeypatch.setattr(sys, "stderr", buffered)
    monkeypatch.setattr(cli, "main", command(0, fast=True, say="msg=sync commands=3\n"))
    with pytest.raises(Exited):
        cli.run()
    assert exits == [0]
    assert buffered.buffer.getvalue() == b"msg=sync commands=3\n"  # flushed before the end


@pytest.mark.parametrize("status", [None, 0])
def test_without_the_request_the_process_ends_as_usual(
        monkeypatch: pytest.MonkeyPatch, exits: list[int], status: int | None) -> None:
    monkeypatch.setattr(cli, "main", command(status, fast=False))
    with pytest.raises(SystemExit) as ended:
        cli.run()
    assert ended.value.code == status
    assert exits == []


@pytest.mark.parametrize("status", [1, 2])
def test_a_failure_keeps_its_status_even_after_the_request(
        monkeypatch: pytest.MonkeyPatch, exits: list[int], status: int) -> None:
    monkeypatch.setattr(cli, "main", command(status, fast=True))
    with pytest.raises(SystemExit) as ended:
        cli.run()
    assert ended.value.code == status
    assert exits == []
