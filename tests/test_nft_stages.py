"""How a big nftables plan is cut into batches (backends/nftables/stages.py):
only commands that create objects nothing refers to yet go ahead of the last
batch, and the last one holds everything that changes a verdict. The kernel's
side (the batches apply, a refused last batch opens nothing) is
tests/netns/test_nft_staged_apply.py."""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
from test_nft_render import plan_between, small

from secfw.backends.nftables import KernelState, Transaction, plan, render
from secfw.backends.nftables.stages import batches, split
from secfw.compiler.ir import HostFilter

plan_module = importlib.import_module("secfw.backends.nftables.plan")


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


def detached_first_pass(topology: str = "routed") -> Transaction:
    """The plan of a first pass into the closed filter, detaching whatever it
    fills (without address pairs: on a bridged host they make a map interval, a
    declaration the closed filter's lacks, and the plan a full replacement)."""
    before = KernelState.from_ruleset(render(closed(), topology))
    hf = small()
    hf = replace(hf, ports=tuple(replace(p, allowed_pairs=()) for p in hf.ports))
    return plan(before, render(hf, topology), detach_from=1)


def test_a_first_pass_detaches_the_closed_filters_sets_without_changing_a_verdict() -> None:
    """The detaching batch deletes the empty sets the pass fills and rewrites the
    chains that look them up without those rules; no rule left names them, and
    each rule taken out is a positive lookup (inert while the set is empty)."""
    tx = detached_first_pass()
    deleted = {c.split()[4] for c in tx.detach if c.startswith("delete ")}
    assert {"spoof4", "spoof6", "arp_hosts", "nd_targets", "ingress_ports",
            "egress_ports"} <= deleted
    assert all(c.startswith(("flush chain ", "add rule ", "delete set ", "delete map "))
               for c in tx.detach)
    kept_rules = [c for c in tx.detach if c.startswith("add rule ")]
    assert not [c for c in kept_rules for name in deleted if f"@{name} " in c + " "]
    assert 'add rule inet secfw forward-egress iifname "tap*" drop' in "\n".join(kept_rules)
    creating, rest = split(tx.commands)
    assert {f"add {'map' if n.endswith('_ports') else 'set'} inet secfw {n} "
            for n in ("spoof4", "ingress_ports")} <= {c.split("{")[0] for c in creating}
    assert not any(c.startswith("add element ") for c in rest)  # all into fresh sets
    texts = list(batches(tx))
    assert texts[0] == "".join(c + "\n" for c in tx.detach)
    assert texts[-1] == "".join(c + "\n" for c in rest)


def test_a_negated_lookup_keeps_its_set_attached() -> None:
    """The bridged from-tap drops every tap frame whose MAC is not in
    ``port_macs`` (the closed filter's drop): that set must not be detached and
    the rule stays in the rewritten chain; the chain's other sets are detached."""
    tx = detached_first_pass("bridged")
    assert "delete set bridge secfw port_macs" not in tx.detach
    assert "delete set bridge secfw arp_hosts" in tx.detach
    from_tap = [c for c in tx.detach if c.startswith("add rule bridge secfw from-tap ")]
    assert any("!= @port_macs drop" in c for c in from_tap)
    assert not any("@arp_hosts" in c for c in from_tap)
    assert any(c.startswith("add element bridge secfw port_macs ") for c in tx.commands)
    assert "delete set inet secfw spoof4" in tx.detach


def test_no_detaching_below_the_threshold_nor_from_a_filled_set() -> None:
    before = KernelState.from_ruleset(render(closed()))
    assert plan(before, render(small()), detach_from=10_000).detach == ()
    assert plan(before, render(small())).detach == ()
    filled = KernelState.from_ruleset(render(small()))
    assert plan(filled, render(small()), detach_from=1).empty


def test_a_big_new_set_is_created_in_chunks_that_all_go_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A new set with more than SET_CHUNK elements is created with the first
    chunk and filled by ``add element`` commands, all preparatory; an interval
    set is created whole."""
    monkeypatch.setattr(plan_module, "SET_CHUNK", 1)
    tx = plan(KernelState.from_ruleset(render(closed())), render(small()), detach_from=1)
    creating, rest = split(tx.commands)
    spoof4 = [c for c in creating if " inet secfw spoof4 " in c]
    assert len(spoof4) == 5 and spoof4[0].startswith("add set ")  # 5 elements
    assert all(c.startswith("add element ") and c.count(",") == 0 for c in spoof4[1:])
    interval = [c for c in tx.commands if " spoof4_nets " in c]
    assert len(interval) == 1 and interval[0].startswith("add set ")
    assert not any(c.startswith("add element ") for c in rest)


def test_the_sets_of_a_chain_the_plan_changes_stay_attached() -> None:
    """forward-egress differs in the kernel (a rule more): the plan rewrites it
    in the last batch anyway, so the sets it looks up are filled there too;
    the sets only other chains use are still detached."""
    ruleset = render(closed())
    chains = tuple(replace(c, rules=(*c.rules, c.rules[-1])) if c.name == "forward-egress"
                   else c for c in ruleset.chains)
    before = KernelState.from_ruleset(replace(ruleset, chains=chains))
    tx = plan(before, render(small()), detach_from=1)
    assert not any("forward-egress" in c for c in tx.detach)
    for name in ("spoof4", "spoof6", "egress_ports"):
        assert not any(c.endswith(f" {name}") for c in tx.detach)
    assert "delete set inet secfw nd_targets" in tx.detach
    assert "delete map inet secfw ingress_ports" in tx.detach
