"""``secfw agent``'s options of the last changes, refused before the agent
touches the kernel or the store: one line ``secfw: error: …``, a non-zero
exit, the store unchanged (the ``cli.fails`` contract). These run in this
process, in the machine's own namespace: the agent's sync and loop are replaced
by a guard, so an option that stops being refused fails the test without
touching the machine's ruleset. A bad ``--state-dir`` is judged with a real
process in a namespace (tests/netns/test_agent_bad_input.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from secfw.cli.host import existing_store
from secfw.errors import StoreError

if TYPE_CHECKING:
    from conftest import Cli, EtcdServer


@pytest.fixture(autouse=True)
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent must not start: its one-shot sync and its loop raise."""
    def started(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the agent started: the option was not refused")

    monkeypatch.setattr("secfw.cli.host._run_once", started)
    monkeypatch.setattr("secfw.cli.host._run_loop", started)


@pytest.mark.parametrize(("args", "says"), [
    (["--flowtable", "bogus"], "--flowtable"),
    (["--flowtable", "auto", "--backend", "iptables"], "needs --backend nftables"),
    (["--flowtable", "on", "--backend", "iptables"], "needs --backend nftables"),
])
def test_a_bad_flowtable_option_is_refused(cli: Cli, args: list[str], says: str) -> None:
    assert says in cli.fails("agent", "--host", "h1", "--once", *args, code=2)


@pytest.mark.parametrize("value", ["sometimes", "", "of"])
def test_a_bad_flowtable_config_key_is_refused(cli: Cli, tmp_path: Path, value: str) -> None:
    config = tmp_path / "agent.conf"
    config.write_text(f"[DEFAULT]\nflowtable = {value}\n", encoding="utf-8")
    assert "flowtable" in cli.fails("agent", "--host", "h1", "--once", "--config", str(config))


def test_the_one_shot_agent_opens_only_an_existing_store(
        tmp_path: Path, etcd_server: EtcdServer) -> None:
    """hostcli.existing_store: a missing SQLite file or an etcd prefix without a
    store is a StoreError, and neither is created."""
    with pytest.raises(StoreError, match="no such file"):
        existing_store(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()
    url = etcd_server.url()
    with pytest.raises(StoreError):
        existing_store(url)
    with pytest.raises(StoreError):
        existing_store(url)  # still nothing there: the first call initialised nothing
