"""agent.kernelrecord: the digest is the same in every process (set order
follows string hashing, which differs between processes) and differs for a
different state; a record round-trips, and a damaged one is never trusted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from secfw.agent.kernelrecord import KernelRecord, Record, StateDigest

PROGRAM = """
from secfw.agent.kernelrecord import StateDigest
from secfw.backends.nftables.state import ChainState, KernelState, SetState
from secfw.backends.nftables.syntax import Element
elements = frozenset(Element((f"10.0.{i // 250}.{i % 250}/32",), "accept") for i in range(2000))
state = KernelState(
    sets={("inet", "s"): SetState(("ipv4_addr",), ("interval",), True, elements)},
    chains={("inet", "c"): ChainState(None, ())},
    tables=frozenset({"inet", "arp"}))
print(StateDigest()(state))
"""


def _digest_in_a_process(seed: str, program: str = PROGRAM) -> str:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run([sys.executable, "-c", program], env=env, check=True,
                          capture_output=True, text=True)
    return done.stdout.strip()


def test_the_digest_is_the_same_in_every_process_and_follows_the_content() -> None:
    digests = {_digest_in_a_process(seed) for seed in ("1", "2")}
    assert len(digests) == 1
    other = _digest_in_a_process("1", PROGRAM.replace("range(2000)", "range(1999)"))
    assert other not in digests


def test_a_state_without_objects_has_no_digest() -> None:
    assert StateDigest()(frozenset({"x"})) is None


def test_a_record_round_trips_and_a_damaged_one_is_not_trusted(tmp_path: Path) -> None:
    keeper = KernelRecord(tmp_path / "sub" / "kernel.json")
    assert keeper.load() is None
    record = Record("boot:42", "nftables/routed", 7, "ab" * 32)
    keeper.save(record)
    assert keeper.load() == record
    vouched = Record("boot:42", "nftables/routed", 7, "ab" * 32, 12, "cd" * 32, 1002)
    keeper.save(vouched)
    assert keeper.load() == vouched
    keeper.path.write_text('{"version": 1, "namespace": "x"}', encoding="utf-8")
    assert keeper.load() is None
    keeper.path.write_text("not json", encoding="utf-8")
    assert keeper.load() is None
    keeper.save(None)
    assert not keeper.path.exists()


def _saved(tmp_path: Path) -> KernelRecord:
    keeper = KernelRecord(tmp_path / "state" / "kernel.json")
    keeper.save(Record("boot:42", "nftables/routed", 7, "ab" * 32))
    assert keeper.load() is not None
    return keeper


def test_a_record_someone_else_could_have_written_is_not_trusted(tmp_path: Path) -> None:
    """Owned by another user, writable by group or others, in a directory
    others can write to, a symlink, too long: refused (the agent reads back)."""
    keeper = _saved(tmp_path)
    assert os.stat(keeper.path).st_mode & 0o777 == 0o600
    os.chown(keeper.path, 65534, 65534)
    assert keeper.load() is None
    os.chown(keeper.path, os.geteuid(), os.getegid())
    assert keeper.load() is not None
    for mode in (0o620, 0o602):
        os.chmod(keeper.path, mode)
        assert keeper.load() is None
    os.chmod(keeper.path, 0o600)
    os.chmod(keeper.path.parent, 0o777)
    assert keeper.load() is None
    os.chmod(keeper.path.parent, 0o755)
    assert keeper.load() is not None


def test_a_symlinked_or_oversized_record_is_not_trusted(tmp_path: Path) -> None:
    keeper = _saved(tmp_path)
    real = keeper.path.with_name("elsewhere.json")
    os.replace(keeper.path, real)
    keeper.path.symlink_to(real)
    assert keeper.load() is None
    keeper.path.unlink()
    os.replace(real, keeper.path)
    text = keeper.path.read_text(encoding="utf-8")
    keeper.path.write_text(text[:-1] + ", " + '"pad": "' + "x" * 5000 + '"}', encoding="utf-8")
    assert keeper.load() is None


def test_saving_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    """A symlink planted at the temporary name or at the record's name is
    replaced, never followed: the file it points to stays as it was."""
    keeper = _saved(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("keep me", encoding="utf-8")
    keeper.path.with_suffix(f".{os.getpid()}.tmp").symlink_to(victim)
    keeper.path.unlink()
    keeper.path.symlink_to(victim)
    keeper.save(Record("boot:42", "nftables/routed", 8, "cd" * 32))
    assert victim.read_text(encoding="utf-8") == "keep me"
    assert not keeper.path.is_symlink()
    loaded = keeper.load()
    assert loaded is not None and loaded.generation == 8


def test_a_rendered_chain_is_digested_by_its_comments_without_canonicalising() -> None:
    from secfw.backends.nftables.state import KernelState
    from secfw.backends.nftables.syntax import (
        Chain,
        Match,
        Meta,
        Ruleset,
        Symbol,
        Verdict,
        make_rule,
    )

    def state(protocol: str) -> KernelState:
        rule = make_rule((Match(Meta("l4proto"), Symbol("tcp")), Verdict("accept")), "r1")
        other = make_rule((Match(Meta("l4proto"), Symbol(protocol)), Verdict("accept")))
        chain = Chain("sg-x-in", None, (rule, other))
        return KernelState.from_ruleset(Ruleset(sets=(), chains=(chain,)))

    lazy = state("udp")
    digest = StateDigest()(lazy)
    chain = lazy.chains[("inet", "sg-x-in")]
    assert chain._rules is None  # nothing was canonicalised
    resolved = state("udp")
    assert resolved.chains[("inet", "sg-x-in")].rules  # canonicalised first: same digest
    assert StateDigest()(resolved) == digest
    assert StateDigest()(state("sctp")) != digest  # another rule, another comment
