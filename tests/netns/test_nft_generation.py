"""The nftables generation id (secfw.backends.nftables.generation) in a real
namespace: it moves on every commit — secfw's, someone's ``nft``, an
iptables-nft change — and on nothing else (a listing, an iptables-legacy
change, a failed transaction, another namespace's commit)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest

from secfw.backends.nftables.executor import NftablesExecutor
from secfw.backends.nftables.generation import GenerationReader, next_generation


def _in(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=check,
                          capture_output=True, text=True)


def test_the_generation_moves_on_every_commit_and_only_then(
        scratch_ns: Callable[[], str]) -> None:
    ns, other = scratch_ns(), scratch_ns()
    reader = GenerationReader(ns)
    start = reader.read()
    assert reader.read() == start  # asking moves nothing

    NftablesExecutor(ns).apply_text("add table inet secfw\n")  # ours
    assert reader.read() == next_generation(start)
    ours = reader.read()

    _in(ns, "nft", "list", "ruleset")  # a listing is no commit
    NftablesExecutor(ns).read_json()
    assert reader.read() == ours

    failed = _in(ns, "nft", "add", "rule", "inet", "secfw", "nochain", "accept", check=False)
    assert failed.returncode != 0  # a refused transaction commits nothing
    assert reader.read() == ours

    _in(other, "nft", "add", "table", "inet", "elsewhere")  # another namespace
    assert reader.read() == ours

    _in(ns, "nft", "add", "table", "ip", "someone")  # someone else's table
    assert reader.read() == next_generation(ours)


@pytest.mark.skipif(shutil.which("iptables-nft") is None, reason="no iptables-nft")
def test_iptables_nft_moves_it_and_iptables_legacy_does_not(
        scratch_ns: Callable[[], str]) -> None:
    ns = scratch_ns()
    reader = GenerationReader(ns)
    before = reader.read()
    _in(ns, "iptables-nft", "-A", "INPUT", "-s", "192.0.2.1", "-j", "DROP")
    after = reader.read()
    assert after != before
    if shutil.which("iptables-legacy") is not None:
        _in(ns, "iptables-legacy", "-A", "INPUT", "-s", "192.0.2.1", "-j", "DROP")
        assert reader.read() == after


def test_each_namespace_has_its_own_identity(scratch_ns: Callable[[], str]) -> None:
    one, two = GenerationReader(scratch_ns()), GenerationReader(scratch_ns())
    assert one.namespace() and two.namespace()
    assert one.namespace() != two.namespace()
    assert one.namespace() == one.namespace()


def test_next_generation_wraps_past_zero() -> None:
    assert next_generation(1) == 2
    assert next_generation(0xFFFFFFFF) == 1


class _Interleaved:
    """libnftables' context, with someone's ``nft`` commit made just before or
    just after each of ours (``when``)."""

    def __init__(self, inner: object, ns: str, when: str) -> None:
        self.inner, self.ns, self.when = inner, ns, when
        self.count = 0

    def cmd(self, text: str) -> tuple[int, str, str]:
        if self.when == "before":
            self._someone()
        done: tuple[int, str, str] = self.inner.cmd(text)  # type: ignore[attr-defined]
        if self.when == "after":
            self._someone()
        return done

    def _someone(self) -> None:
        self.count += 1
        _in(self.ns, "nft", "add", "table", "ip", f"someone{self.count}")


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_commit_beside_ours_is_never_taken_for_ours(
        scratch_ns: Callable[[], str], when: str) -> None:
    """Between our generation readings and our commit, someone commits too: the
    executor reports no commit of its own (``last_commit`` None), so the agent
    does not vouch for a generation whose content it did not make."""
    ns = scratch_ns()
    executor = NftablesExecutor(ns)
    executor.apply_text("add table inet secfw\n")
    assert executor.last_commit is not None  # alone: exactly one commit, ours
    before, after = executor.last_commit
    assert after == next_generation(before)
    executor._nft = _Interleaved(executor._nft, ns, when)  # type: ignore[assignment]
    executor.apply_text("add chain inet secfw c\n")
    assert executor.last_commit is None
    assert executor.generation() == next_generation(next_generation(after))


def test_a_json_commit_leaves_no_bracket_behind(scratch_ns: Callable[[], str]) -> None:
    """``last_commit`` describes the executor's last commit only: after a JSON
    batch (not bracketed) it is None, not the text commit's before it."""
    executor = NftablesExecutor(scratch_ns())
    executor.apply_text("add table inet secfw\n")
    assert executor.last_commit is not None
    executor.apply_json({"nftables": [{"add": {"table": {"family": "ip", "name": "j"}}}]})
    assert executor.last_commit is None
