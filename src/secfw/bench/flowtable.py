"""The flowtable fast path, on and off, where this kernel has it.

:func:`secfw.backends.nftables.flowtable.probe` tells whether a flowtable can be
created at all. Where it cannot (the development kernel: no ``nf_flow_table``,
``flowtable … hook ingress`` fails with ENOENT), the report says so with the
probe's error and nothing else is measured. Where it can, the routed data path
is measured at the largest data-path size with secfw's nftables ruleset alone
and with the flowtable's table (:func:`~secfw.backends.nftables.flowtable.
render_flowtable` on the two lab taps) added, each repetition in turn, beside
the two baselines.
"""

from __future__ import annotations

from collections.abc import Mapping

from secfw.backends.nftables.flowtable import probe, render_flowtable
from secfw.bench.common import Row
from secfw.bench.datapath import NFTABLES, Configuration, HostRuleset, Settings, run_datapath
from secfw.lab.hostlab import LabPort

WITH_FLOWTABLE = "secfw (nftables) + flowtable"


def measure(pair: tuple[LabPort, LabPort] | None, host: str,
            rulesets: Mapping[int, HostRuleset], settings: Settings) -> Row:
    """The probe's answer; where available and ``pair`` is given (the data path
    runs), the data path without and with the flowtable (see the module doc)."""
    support = probe()
    row: Row = {"available": support.available, "reason": support.reason}
    if not support.available or pair is None or not rulesets:
        return row
    n = max(rulesets)
    text = rulesets[n].nft_text + render_flowtable(port.tap for port in pair)
    extra = (Configuration(WITH_FLOWTABLE, n, NFTABLES, nft_text=text, flowtable=True),)
    return row | {"datapath": run_datapath(pair, host, {n: rulesets[n]}, settings,
                                           extra=extra)}
