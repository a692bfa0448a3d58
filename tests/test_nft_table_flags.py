"""Table flags are kernel state. nftables: a table read back with a flag
(``dormant``: its chains see no packet) is not secfw's table — the read-back
state differs from the desired one, the planner replaces the tables whole, and a
listing cut short is a BackendError, never "in sync". iptables-nft: the flagged
``ip``/``ip6 filter`` tables are found (the packets:
tests/netns/test_drift_dormant_packets.py, test_drift_dormant_ipt_packets.py)."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest
from test_nft_render import listing_from, small

from secfw.agent.resync import by_object
from secfw.backends.iptables.executor import IptablesExecutor
from secfw.backends.nftables import KernelState, plan, render, to_nft_json
from secfw.backends.nftables.executor import NftablesExecutor
from secfw.errors import BackendError


def flagged(listing: dict[str, Any], family: str, flags: Any) -> dict[str, Any]:
    """``listing`` with ``flags`` on the table of ``family``."""
    flagged_listing = copy.deepcopy(listing)
    for obj in flagged_listing["nftables"]:
        table = obj.get("table")
        if table is not None and table["family"] == family:
            table["flags"] = flags
            return flagged_listing
    raise AssertionError(f"no {family} table in the listing")


# nft 1.0.6 lists ``flags dormant`` as the table's name (measured); a later
# nft as the flag's name, or a list of names.
@pytest.mark.parametrize("flags", ["secfw", "dormant", ["dormant"], ["owner"], 1])
@pytest.mark.parametrize("family", ["inet", "arp"])
def test_a_flagged_table_differs_and_is_replaced(family: str, flags: Any) -> None:
    ruleset = render(small())
    listing = listing_from(to_nft_json(ruleset))
    want = KernelState.from_ruleset(ruleset)
    assert KernelState.from_nft_json(listing) == want  # the same listing without flags
    actual = KernelState.from_nft_json(flagged(listing, family, flags))
    assert actual != want and family not in actual.tables
    assert plan(actual, ruleset).full
    assert by_object(actual, want, want) == "differs"  # the kernel check's by-object path


@pytest.mark.parametrize("flags", ["", [], None])
def test_an_empty_flags_member_is_no_flag(flags: Any) -> None:
    ruleset = render(small())
    listing = flagged(listing_from(to_nft_json(ruleset)), "inet", flags)
    assert KernelState.from_nft_json(listing) == KernelState.from_ruleset(ruleset)


class _CutShort:
    """A libnftables context whose listing stops after ``"flags": `` (as the
    verify helper saw ``nft -j list table`` print for a flagged table)."""

    @staticmethod
    def cmd(_command: str) -> tuple[int, str, str]:
        return 0, ('{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"table": '
                   '{"family": "inet", "name": "secfw", "handle": 1, "flags": '), ""


def test_a_listing_cut_short_is_a_backend_error() -> None:
    executor = NftablesExecutor.__new__(NftablesExecutor)
    executor.netns = None
    executor._nft = _CutShort()  # type: ignore[assignment]
    with pytest.raises(BackendError, match="not JSON"):
        executor.read_state()


# --------------------------------------------------------------------------- iptables-nft

_TABLES = ('{"nftables": [{"metainfo": {"version": "1.0.6"}}, '
           '{"table": {"family": "ip", "name": "filter", "handle": 1%s}}, '
           '{"table": {"family": "ip6", "name": "filter", "handle": 2}}, '
           '{"table": {"family": "inet", "name": "other", "handle": 3, "flags": "x"}}]}')


def _executor(stdout: str | None, variant: str = "nft") -> IptablesExecutor:
    """An executor whose runner answers every command with ``stdout`` (None:
    the tool cannot run)."""
    def runner(argv: Sequence[str], _stdin: str | None) -> subprocess.CompletedProcess[str]:
        if stdout is None:
            raise BackendError(f"iptables: cannot run {argv[0]}: not found")
        return subprocess.CompletedProcess(list(argv), 0, stdout, "")
    return IptablesExecutor(variant=variant, runner=runner)  # type: ignore[arg-type]


@pytest.mark.parametrize(("stdout", "variant", "flagged"), [
    (_TABLES % ', "flags": "Lester Gooch #5"', "nft", [("ip", "filter")]),  # nft 1.0.6
    (_TABLES % ', "flags": ["dormant"]', "nft", [("ip", "filter")]),
    (_TABLES % "", "nft", []),  # another table's flag is not ours to judge
    (_TABLES % ', "flags": "', "nft", [("ip", "filter"), ("ip6", "filter")]),  # cut short
    (_TABLES % ', "flags": "x"', "legacy", []),  # legacy keeps no nftables table
    (None, "nft", []),  # no nft tool: nothing can be checked
])
def test_iptables_nft_flagged_tables(stdout: str | None, variant: str,
                                     flagged: list[tuple[str, str]]) -> None:
    assert _executor(stdout, variant).flagged_tables() == flagged
