"""A table read back with a flag (``dormant``: its chains see no packet) is not
secfw's table: the read-back state differs from the desired one, the planner
replaces the tables whole, and a listing cut short is a BackendError — never "in
sync" (the packets: tests/netns/test_drift_dormant_packets.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_nft_render import listing_from, small

from secfw.agent.resync import by_object
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
