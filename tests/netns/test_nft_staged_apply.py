"""A big nftables plan sent in batches (backends/nftables/stages.py), with real
packets: the batches before the last only create objects nothing reaches, so
when the last one is refused the kernel filters exactly as before — a group
added with a rule that would open tcp/80 opens nothing — and the next (full)
pass completes the change from what it reads back."""

from __future__ import annotations

import os
from typing import Any

import pytest
from test_drift import EXT

from secfw.backends.nftables import executor as executor_module
from secfw.backends.nftables.stages import batches
from secfw.errors import BackendError

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.backends("nftables", reason="nftables batches"),
]

REFUSED = "add rule inet secfw no-such-chain accept\n"


def nft_executor(cloud: Any) -> Any:
    """The in-process agent's executor, staging every plan that creates anything."""
    executor = cloud.backend.inner.executor
    executor.batch_budget = 1
    return executor


def test_a_refused_last_batch_leaves_the_filter_as_it_was(
        cloud: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cloud.api.net_create("p", "net", "10.1.0.0/24")
    cloud.api.secgroup_create("p", "ssh", "ssh only")
    cloud.api.secgroup_add_rule("p", "ssh", "tcp", "22", "22", "0.0.0.0/0")
    cloud.boot("web", ["ssh"], "net")
    cloud.sync()
    nft_executor(cloud)  # stage every plan that creates anything
    assert cloud.tcp(EXT, "web", 22) and not cloud.tcp(EXT, "web", 80)

    cloud.api.secgroup_create("p", "web80", "http")
    cloud.api.secgroup_add_rule("p", "web80", "tcp", "80", "80", "0.0.0.0/0")
    cloud.api.add_secgroup("p", "web", "web80")
    sent: list[list[str]] = []

    def refuse_the_last(tx: Any, budget: int) -> list[str]:
        texts = list(batches(tx, budget))
        sent.append(texts)
        return [*texts[:-1], texts[-1] + REFUSED]

    monkeypatch.setattr(executor_module, "batches", refuse_the_last)
    with pytest.raises(BackendError, match="No such file or directory"):
        cloud.sync()
    assert len(sent[0]) >= 2  # staged: the new group's chain and set went first
    group_chain = cloud.group_chain("p", "web80")
    assert group_chain in cloud.nft("list", "chains", "inet")  # created, unreachable
    assert not cloud.tcp(EXT, "web", 80)  # the new group's rule opens nothing
    assert cloud.tcp(EXT, "web", 22)

    monkeypatch.setattr(executor_module, "batches", batches)
    result = cloud.sync()  # full after the failure: reads back, plans the rest
    assert result.full and result.commands > 0
    assert cloud.tcp(EXT, "web", 80) and cloud.tcp(EXT, "web", 22)
    assert cloud.sync(full=True).commands == 0


def test_a_staged_pass_filters_and_keeps_the_generation_chain(cloud: Any) -> None:
    """A pass that creates a group's chain is sent in batches, each one commit,
    chained: the agent still knows the generation its ruleset was committed at
    (its next kernel check needs no read-back)."""
    cloud.api.net_create("p", "net", "10.1.0.0/24")
    cloud.sync()  # no port yet
    executor = nft_executor(cloud)
    known = cloud._reconciler.known_generation(cloud._reconciler.epoch())
    assert known is not None
    cloud.api.secgroup_create("p", "web80", "http")
    cloud.api.secgroup_add_rule("p", "web80", "tcp", "80", "80", "0.0.0.0/0")
    cloud.boot("web", ["web80"], "net")
    assert cloud.sync().commands > 0
    first, last = executor.last_commit
    assert first == known and last - first >= 2  # several commits, all ours
    assert cloud._reconciler.known_generation(cloud._reconciler.epoch()) == last
    assert cloud.tcp(EXT, "web", 80) and not cloud.tcp(EXT, "web", 22)
    assert cloud.sync(full=True).commands == 0
