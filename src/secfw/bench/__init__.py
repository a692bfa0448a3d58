"""The benchmark suite: ``python -m secfw.bench`` (``make bench``).

One run measures, on ONE compute host of a generated cloud (see :mod:`.workload`),
and writes ``latest.json``, ``latest.md`` and ``latest.png`` to ``bench/results``:

1. **Control plane** per size (100, 1,000, 10,000, 50,000 ports): compile time,
   ruleset size, full apply into a fresh namespace, and the peak RSS of a real
   agent process doing its full sync (:mod:`.control`).
2. **Incremental** changes with 10,000 ports loaded, store-to-kernel through an
   in-process agent, and the membership change at every size (:mod:`.incremental`).
3. **Data path** in the namespace lab: iperf3 UDP packet rate and TCP throughput
   with N ports loaded, nftables and iptables backends side by side, as ratios to
   no filter (:mod:`.datapath`).
4. **Restart**: a fresh agent process over an unchanged, loaded kernel table.

Benchmarks report, they do not fail: a step that errors or would overrun the
time budget (:mod:`.budget`) is recorded as such and the run goes on. Every
namespace the run creates is removed before it ends (:mod:`.namespaces`).
"""
