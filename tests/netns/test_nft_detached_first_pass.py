"""A first pass into the closed filter with its big sets *detached*
(backends/nftables/plan.py, "Detached sets"; stages.py), with real packets.

The pass first commits, alone, the closed filter without the rules that look up
its empty sets and without those sets (no verdict changes: a lookup in an empty
set never matches), then creates the sets afresh, filled, while nothing refers
to them, and only the last batch brings the rules back. Every tap must stay
dropped after each batch but the last, and a refused preparatory batch must
leave the closed filter in force; the next full pass completes the change."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from agentproc import poll
from test_drift import EXT

from secfw.agent.reconciler import closed_filter
from secfw.backends.nftables import backend as backend_module
from secfw.backends.nftables import executor as executor_module
from secfw.backends.nftables.stages import batches
from secfw.errors import BackendError
from secfw.lab.demo import lab_ports

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.backends("nftables", reason="nftables batches"),
]

REFUSED = "add rule inet secfw no-such-chain accept\n"


def web_behind_the_closed_filter(cloud: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A web instance (ssh open to the world, nothing else) whose host's kernel
    holds the closed filter, as the agent leaves it before its first pass; every
    later plan detaches whatever it fills (threshold 1 element)."""
    monkeypatch.setattr(backend_module, "DETACH_ELEMENTS", 1)
    cloud.api.net_create("p", "net", "10.1.0.0/24")
    cloud.api.secgroup_create("p", "ssh", "ssh only")
    cloud.api.secgroup_add_rule("p", "ssh", "tcp", "22", "22", "0.0.0.0/0")
    cloud.boot("web", ["ssh"], "net")
    cloud.lab.up(lab_ports(cloud.api.snapshot(), cloud.host))
    backend = cloud.make_backend()
    backend.apply(backend.plan(None, closed_filter(cloud.host)))
    assert all_closed(cloud)


def all_closed(cloud: Any) -> bool:
    """Nothing reaches web or leaves it: its tap is dropped both ways."""
    return not cloud.tcp(EXT, "web", 22) and not cloud.tcp("web", EXT, 22)


def inet_sets(cloud: Any) -> set[str]:
    """The names of the sets and maps of ``inet secfw`` in the kernel."""
    return {line.split()[1] for line in cloud.nft("list", "sets", "inet").splitlines()
            if line.strip().startswith(("set ", "map "))}


def probing(texts: Iterable[str], after_each: Any) -> Iterator[str]:
    """``texts`` in order; ``after_each(i, text)`` runs once batch ``i`` was
    committed (the executor asks for the next text only then), except the last."""
    previous: tuple[int, str] | None = None
    for index, text in enumerate(texts):
        if previous is not None:
            after_each(*previous)
        previous = (index, text)
        yield text


def filters_web(cloud: Any) -> None:
    """web:22 reachable from outside (polled: the host's neighbour entry for web
    failed while its tap was closed, and resolving it again takes a try), web:80
    not."""
    poll(lambda: cloud.tcp(EXT, "web", 22), "web:22 from outside once filtered")
    assert not cloud.tcp(EXT, "web", 80)


def test_taps_stay_closed_between_the_batches_and_the_last_one_filters(
        cloud: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    web_behind_the_closed_filter(cloud, monkeypatch)
    sent: list[str] = []
    states: list[bool] = []

    def check(index: int, text: str) -> None:
        sent.append(text)
        states.append(all_closed(cloud))
        if index == 0:  # the detaching batch: the closed filter without its sets
            assert not {"spoof4", "ingress_ports"} & inet_sets(cloud)

    monkeypatch.setattr(executor_module, "batches",
                        lambda tx, budget: probing(batches(tx, budget), check))
    result = cloud.sync()
    assert result.full and result.commands > 0
    assert len(sent) >= 2 and all(states)  # detach + at least one preparatory batch
    assert "delete set inet secfw spoof4" in sent[0]
    assert any("add set inet secfw spoof4 " in text for text in sent[1:])
    filters_web(cloud)
    assert cloud.sync(full=True).commands == 0  # the kernel reads back as planned


def test_a_refused_preparatory_batch_leaves_the_closed_filter(
        cloud: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    web_behind_the_closed_filter(cloud, monkeypatch)

    def refuse_the_second(tx: Any, budget: int) -> Iterator[str]:
        for index, text in enumerate(batches(tx, budget)):
            yield text + REFUSED if index == 1 else text

    monkeypatch.setattr(executor_module, "batches", refuse_the_second)
    with pytest.raises(BackendError, match="No such file or directory"):
        cloud.sync()
    assert "spoof4" not in inet_sets(cloud)  # detached, not refilled
    assert all_closed(cloud)

    monkeypatch.setattr(executor_module, "batches", batches)
    result = cloud.sync()  # full after the failure: reads back, plans the rest
    assert result.full and result.commands > 0
    filters_web(cloud)
    assert cloud.sync(full=True).commands == 0
