"""What each base chain costs an established packet: CPU samples per packet.

``python -m secfw.bench.hookcost PORTS TOPOLOGY REPS PACKETS``
builds the bench cloud (:mod:`secfw.bench.workload`) at PORTS ports, brings up a
lab of its two data-path instances (``routed`` or ``bridged``) and measures, for
each configuration in turn, REPS times interleaved (A B C … A B C …): one UDP
flow made established (the server answers its first datagram), then PACKETS
datagrams of 64 bytes sent as fast as one Python process can, under ``perf
record -e cpu-clock``. Forwarding runs in the sender's context (veth hands the
packet to the backlog, and the softirq runs when the sender re-enables bottom
halves), so the sender's samples cover the host's netfilter hooks. Reported per
configuration (one JSON line, medians over the repetitions): ``nft_ns`` — CPU
time per packet in nf_tables and the hook dispatcher (``nft_*``,
``nf_hook_slow``); ``ct_ns`` — in conntrack; ``work_us`` — everything the
process ran per packet except scheduler samples (``finish_task_switch``, …, which
count time spent waiting on a shared machine); ``nft_share`` — ``nft_ns`` over
``work_us``; and the load average before and after.

Configurations: no filter; conntrack only (:data:`~secfw.bench.datapath.
CONNTRACK_ONLY_TEXT`); secfw's full ruleset; and that ruleset without one of its
``inet`` base chains at a time (``without <chain>``: what that chain costs,
semantics aside). Not part of ``make bench``: a tool for layout changes
(docs/nftables.md, "Established packets, measured"). On a loaded machine only
the ratios of one run mean anything; perf's cpu-clock samples also count time a
virtual CPU was stolen, so repeat the run and compare the medians.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from secfw.api import Api
from secfw.backends.nftables import NftablesExecutor, Ruleset, full_transaction, render
from secfw.bench.datapath import CONNTRACK_ONLY_TEXT, set_bridge_netfilter
from secfw.bench.workload import DP_PORT, BenchCloud
from secfw.cloud import CloudState
from secfw.compiler.build import compile_host
from secfw.lab.hostlab import Lab, LabPort
from secfw.store import open_store

FREQUENCY = 5000  # perf samples per second of CPU time: one every 200 µs
_BLAST = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"hello")
s.recv(64)
payload, send = bytes(64), s.send
for _ in range(int(sys.argv[3]) // 100):
    for _ in range(100):
        send(payload)
"""
_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    if data == b"hello":
        s.sendto(b"hi", peer)
"""
_NFT = ("nft_", "__nft", "nf_tables", "nf_hook_slow")
_CONNTRACK = ("nf_conntrack", "__nf_conntrack", "nf_ct_", "__nf_ct", "nf_confirm",
              "ipv4_conntrack", "ipv6_conntrack")
_SCHEDULER = ("finish_task_switch", "_raw_spin_unlock_irq", "__schedule", "schedule")


@dataclass(frozen=True)
class Samples:
    """One perf run: samples in nf_tables, in conntrack, and all but the scheduler's."""

    nft: int
    conntrack: int
    work: int


def configurations(ruleset: Ruleset) -> dict[str, str | None]:
    """Name → full transaction text (None: nothing loaded); see the module doc."""
    found: dict[str, str | None] = {"no filter": None, "conntrack only": CONNTRACK_ONLY_TEXT,
                                    "secfw": full_transaction(ruleset).text}
    for chain in ruleset.chains:
        if chain.hook is not None and chain.family == "inet":
            rest = tuple(c for c in ruleset.chains if c is not chain)
            found[f"without {chain.name}"] = full_transaction(
                replace(ruleset, chains=rest)).text
    return found


def classify(report: str) -> Samples:
    """``perf report --sort sym`` output (samples, then the symbol) in groups."""
    symbols: Counter[str] = Counter()
    for line in report.splitlines():
        found = re.match(r"\s*(\d+)\s+\[.\]\s+(\S+)", line)
        if found:
            symbols[found.group(2)] += int(found.group(1))

    def total(prefixes: tuple[str, ...]) -> int:
        return sum(n for name, n in symbols.items() if name.startswith(prefixes))

    return Samples(total(_NFT), total(_CONNTRACK), sum(symbols.values()) - total(_SCHEDULER))


def sampled(client_ns: str, server_ip: str, packets: int) -> Samples:
    """One blast of ``packets`` under perf (see the module doc)."""
    with tempfile.TemporaryDirectory(prefix="secfw-hookcost-") as work:
        data = str(Path(work) / "perf.data")
        subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQUENCY),
                        "-o", data, "--", "ip", "netns", "exec", client_ns, sys.executable,
                        "-c", _BLAST, server_ip, str(DP_PORT), str(packets)],
                       check=True, capture_output=True, timeout=600)
        report = subprocess.run(["perf", "report", "-i", data, "--stdio", "-q", "--sort",
                                 "sym", "-F", "sample,sym"], check=True, capture_output=True,
                                text=True, timeout=600).stdout
    return classify(report)


def host_filter_and_pair(ports: int, work: Path) -> tuple[Ruleset, Ruleset, tuple[LabPort,
                                                                                LabPort], str]:
    """The bench cloud at ``ports``: the host's routed and bridged rulesets, its
    data-path pair (server, client) and its host name."""
    api = Api(open_store(f"sqlite:///{work / 'bench.db'}"))
    cloud = BenchCloud(api, f"bench-{uuid.uuid4().hex[:6]}")
    cloud.build_base()
    cloud.grow_to(ports)
    host_filter = compile_host(CloudState.from_snapshot(api.store.load()), cloud.host)
    pair = cloud.data_path_ports(api.snapshot())
    api.store.close()
    return render(host_filter, "routed"), render(host_filter, "bridged"), pair, cloud.host


@contextmanager
def echo_server(ns: str) -> Iterator[None]:
    """The flow's server in ``ns`` for the duration of the block."""
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _ECHO,
                               str(DP_PORT)])
    try:
        time.sleep(0.5)
        yield
    finally:
        server.terminate()
        server.wait()


def measure(ruleset: Ruleset, pair: tuple[LabPort, LabPort], host: str, topology: str,
            reps: int, packets: int) -> list[dict[str, object]]:
    """Every configuration, interleaved ``reps`` times; one summary per configuration."""
    server, client = pair
    configs = configurations(ruleset)
    runs: dict[str, list[Samples]] = {name: [] for name in configs}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="secfw-hookcost-lab-") as state:
        lab = Lab(host, Path(state), topology=topology)
        try:
            lab.up([server, client])
            executor = NftablesExecutor(netns=lab.host_ns)
            with echo_server(lab.instance_ns(server.tap)):
                for _ in range(reps):
                    for name, text in configs.items():
                        executor.delete_table()
                        if topology == "bridged":
                            set_bridge_netfilter(lab.host_ns, text is not None)
                        if text is not None:
                            executor.apply_text(text)
                        runs[name].append(sampled(lab.instance_ns(client.tap), server.ip,
                                                  packets))
            executor.delete_table()
        finally:
            lab.down()
    loads.append(os.getloadavg()[0])
    return [_summary(name, rows, packets, loads) for name, rows in runs.items()]


def _summary(name: str, rows: list[Samples], packets: int,
             loads: list[float]) -> dict[str, object]:
    ns = 1e9 / FREQUENCY / packets  # one sample per packet, in ns
    return {
        "config": name,
        "nft_ns": round(statistics.median(r.nft for r in rows) * ns, 1),
        "ct_ns": round(statistics.median(r.conntrack for r in rows) * ns, 1),
        "work_us": round(statistics.median(r.work for r in rows) * ns / 1000, 2),
        "nft_share": round(statistics.median(r.nft / r.work for r in rows if r.work), 4),
        "nft_runs": [r.nft for r in rows],
        "work_runs": [r.work for r in rows],
        "load": [round(v, 1) for v in loads],
    }


def main(argv: list[str]) -> int:
    """See the module doc."""
    if len(argv) != 4 or argv[1] not in ("routed", "bridged"):
        print(__doc__, file=sys.stderr)
        return 2
    if shutil.which("perf") is None:
        print(json.dumps({"skipped": "perf is not installed"}))
        return 0
    ports, topology, reps, packets = int(argv[0]), argv[1], int(argv[2]), int(argv[3])
    with tempfile.TemporaryDirectory(prefix="secfw-hookcost-") as work:
        routed, bridged, pair, host = host_filter_and_pair(ports, Path(work))
    ruleset = routed if topology == "routed" else bridged
    for row in measure(ruleset, pair, host, topology, reps, packets):
        print(json.dumps({"ports": ports, "topology": topology} | row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
