"""secfw.bench.hookcost's pure parts: the configurations it loads and how it
reads perf's report (the measurement itself needs root, perf and a lab)."""

from __future__ import annotations

from secfw.backends.nftables import render
from secfw.bench.datapath import CONNTRACK_ONLY_TEXT
from secfw.bench.hookcost import Samples, classify, configurations
from secfw.compiler.ir import HostFilter


def test_one_configuration_per_inet_base_chain_removed_and_nothing_else_touched() -> None:
    ruleset = render(HostFilter("h", (), (), ()), "bridged")
    configs = configurations(ruleset)
    assert configs["no filter"] is None
    assert configs["conntrack only"] == CONNTRACK_ONLY_TEXT
    full = configs["secfw"]
    assert full is not None
    removed = {name.removeprefix("without ") for name in configs if name.startswith("without ")}
    assert removed == {"forward-egress", "forward-ingress", "input-egress",
                       "postrouting-ingress"}  # the bridge table's chains stay
    for name in removed:
        text = configs[f"without {name}"]
        assert text is not None and f"chain {name} {{" not in text
        assert f"chain {name} {{" in full
        assert "chain from-tap {" in text and "chain to-tap {" in text


def test_perf_report_is_grouped_by_symbol_prefix() -> None:
    report = "\n".join([
        "   120  [k] nft_do_chain",
        "    30  [k] nf_hook_slow",
        "    10  [k] __nft_set_lookup",
        "    25  [k] nf_conntrack_in",
        "     5  [k] __nf_conntrack_find_get",
        "   400  [k] finish_task_switch.isra.0",
        "   700  [.] _PyEval_EvalFrameDefault",
        "# a comment line",
    ])
    assert classify(report) == Samples(nft=160, conntrack=30, work=890)
