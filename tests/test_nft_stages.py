"""How a big nftables plan is cut into batches (backends/nftables/stages.py):
only commands that create objects nothing refers to yet go ahead of the last
batch, and the last one holds everything that changes a verdict. The kernel's
side (the batches apply, a refused last batch opens nothing) is
tests/netns/test_nft_staged_apply.py."""

from __future__ import annotations

from dataclasses import replace

from test_nft_render import plan_between, small

from secfw.backends.nftables import plan, render
from secfw.backends.nftables.stages import batches, split
from secfw.compiler.ir import HostFilter


def closed() -> HostFilter:
    return replace(small(), ports=(), chains=(), sets=())


def commands_of(texts: list[str]) -> list[str]:
    return [line for text in texts for line in text.splitlines()]


def test_a_small_plan_is_one_batch() -> None:
    tx = plan_between(closed(), small())
    assert list(batches(tx)) == [tx.text]


def test_a_full_replacement_is_never_split() -> None:
    tx = plan(None, render(small()))
    assert list(batches(tx, budget=1)) == [tx.text]


def test_creating_commands_go_first_and_the_rest_keeps_its_order() -> None:
    tx = plan_between(closed(), small())
    texts = list(batches(tx, budget=1))
    creating, rest = split(tx.commands)
    assert len(texts) == len(creating) + 1  # one creating command per batch here
    assert commands_of(texts) == [*creating, *rest]
    assert sorted(commands_of(texts)) == sorted(tx.commands)
    assert texts[-1] == "".join(c + "\n" for c in rest)
    for command in creating:  # new regular chains, new sets and maps, their rules
        assert command.startswith(("add chain ", "add set ", "add map ", "add rule "))
        assert "hook" not in command
    assert any(c.startswith("add element ") for c in rest)  # into existing maps
    base_chains = [c for c in tx.commands if c.startswith("add chain ") and "hook" in c]
    assert all(c in rest for c in base_chains)


def test_rules_of_existing_chains_stay_in_the_last_batch() -> None:
    hf = small()
    web_in = hf.chains[0]
    more = replace(web_in, rules=(*web_in.rules, web_in.rules[0]))
    tx = plan_between(hf, replace(hf, chains=(more, *hf.chains[1:])))
    assert tx.commands[0].startswith("flush chain ")
    creating, rest = split(tx.commands)
    assert creating == [] and rest == list(tx.commands)
    assert list(batches(tx, budget=1)) == [tx.text]


def test_batches_hold_at_most_the_budget_unless_one_command_is_longer() -> None:
    tx = plan_between(closed(), small())
    creating, _ = split(tx.commands)
    budget = max(len(c) for c in creating) + 1
    texts = list(batches(tx, budget=budget))
    assert all(len(text) <= budget + 1 for text in texts[:-1])
    assert len(texts) < len(creating) + 1  # several commands share a batch
