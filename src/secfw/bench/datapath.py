"""Data path: packet rate and throughput between two lab instances, N ports loaded.

The lab (:class:`secfw.lab.Lab`) holds just the two data-path instances of the
workload, on two networks, routed through the host namespace. The iperf3 server
runs in one instance namespace, the client in the other (``ip netns exec``).
For every repetition, each configuration is measured in turn — so slow drift of
the machine hits them alike:

* ``N = 0``: no filter, table ``inet secfw`` absent (the baseline);
* ``conntrack only``: one ``ct state`` rule, to tell what any stateful filter
  costs (no conntrack runs in a namespace until a rule needs it) from what
  secfw's ruleset adds;
* ``N > 0``: the full ruleset of the host with N other ports loaded (those ports
  have no namespaces: they only exist in the ruleset), applied as one full
  transaction into the lab's host namespace.

Measured: UDP datagrams with a 64-byte payload (``iperf3 -u -b 0 -l 64``),
packets received per second; and TCP throughput (``iperf3``, one stream, bits
per second received). Reported: medians over the repetitions, and the median of
the ratios to the baseline measured in the same repetition.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secfw.backends.nftables import NftablesExecutor
from secfw.bench.common import Row, median, rounded
from secfw.lab import Lab, LabPort

IPERF_PORT = 5201
IPTABLES = "not yet implemented"
NO_FILTER = "no filter (table absent)"
CONNTRACK_ONLY = "conntrack only"
SECFW = "secfw (nftables)"
#: Only what every stateful filter pays: conntrack on, one ``ct state`` rule on the
#: forward hook (conntrack is registered in a namespace only once a rule needs it).
CONNTRACK_ONLY_TEXT = (
    "add table inet secfw\ndelete table inet secfw\ntable inet secfw {\n"
    "  chain forward {\n"
    "    type filter hook forward priority filter; policy accept;\n"
    "    ct state established,related accept\n"
    "  }\n"
    "}\n"
)


@dataclass(frozen=True)
class Settings:
    """How long and how often: iperf3 seconds per run, repetitions."""

    seconds: float
    reps: int


class Iperf:
    """An iperf3 server in ``server_ns`` and one-shot clients in ``client_ns``."""

    def __init__(self, server_ns: str, client_ns: str, server_ip: str) -> None:
        self.server_ns, self.client_ns, self.server_ip = server_ns, client_ns, server_ip
        self.server: subprocess.Popen[bytes] | None = None

    @contextmanager
    def serving(self) -> Iterator[Iperf]:
        """Run the server for the duration of the block (terminated by its pid)."""
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.server_ns, "iperf3", "-s", "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)  # let it bind before the first client connects
            yield self
        finally:
            self.server.terminate()
            try:
                self.server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()

    def udp_pps(self, seconds: float) -> float:
        """Datagrams per second the server received (64-byte payload, no rate limit)."""
        report = self._client(["-u", "-b", "0", "-l", "64"], seconds)
        total = report["end"]["sum"]
        received = total["packets"] - total["lost_packets"]
        return float(received / total["seconds"])

    def tcp_bps(self, seconds: float) -> float:
        """Bits per second the server received over one TCP stream."""
        report = self._client([], seconds)
        return float(report["end"]["sum_received"]["bits_per_second"])

    def _client(self, args: list[str], seconds: float) -> Mapping[str, Any]:
        """Run one client (one retry: the server may still be finishing a test)."""
        command = ["ip", "netns", "exec", self.client_ns, "iperf3", "-c", self.server_ip,
                   "-p", str(IPERF_PORT), "-J", "-t", f"{seconds:g}",
                   "--connect-timeout", "3000", *args]
        for attempt in range(2):
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  timeout=seconds + 30)
            report: Mapping[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
            if done.returncode == 0 and "error" not in report:
                return report
            if attempt == 0:
                time.sleep(1.0)
        reason = report.get("error") or done.stderr.strip() or f"exit {done.returncode}"
        raise RuntimeError(f"iperf3 client: {reason}")


@dataclass(frozen=True)
class Configuration:
    """One filter setting of the host namespace: ``text`` applied (None: no table)."""

    filter: str
    ports: int
    text: str | None


def configurations(texts: Mapping[int, str]) -> list[Configuration]:
    """No filter, conntrack only, then the secfw ruleset at every N of ``texts``."""
    return [
        Configuration(NO_FILTER, 0, None),
        Configuration(CONNTRACK_ONLY, 0, CONNTRACK_ONLY_TEXT),
        *(Configuration(SECFW, n, texts[n]) for n in sorted(texts)),
    ]


def run_datapath(pair: tuple[LabPort, LabPort], host: str, texts: Mapping[int, str],
                 settings: Settings) -> Row:
    """Measure every configuration (see :func:`configurations`); see the module doc."""
    if shutil.which("iperf3") is None:
        return {"skipped": "iperf3 is not installed"}
    server, client = pair
    configs = configurations(texts)
    with tempfile.TemporaryDirectory(prefix="secfw-bench-lab-") as state_dir:
        lab = Lab(host, Path(state_dir))
        try:
            lab.up([server, client])
            runs = _measure(lab, pair, configs, settings)
        finally:
            lab.down()
    return _summarise(configs, runs, settings)


Runs = list[dict[str, list[float]]]


def _measure(lab: Lab, pair: tuple[LabPort, LabPort], configs: list[Configuration],
             settings: Settings) -> Runs:
    """Every repetition, every configuration in turn: per configuration, its values."""
    server, client = pair
    executor = NftablesExecutor(netns=lab.host_ns)
    iperf = Iperf(lab.instance_ns(server.tap), lab.instance_ns(client.tap), server.ip)
    runs: Runs = [{"udp_pps": [], "tcp_bps": []} for _ in configs]
    with iperf.serving():
        iperf.udp_pps(1.0)  # warm-up, not counted: neighbours resolved, caches hot
        for _ in range(settings.reps):
            for config, measured in zip(configs, runs, strict=True):
                _load(executor, config.text)
                measured["udp_pps"].append(iperf.udp_pps(settings.seconds))
                measured["tcp_bps"].append(iperf.tcp_bps(settings.seconds))
    executor.delete_table()
    return runs


def _load(executor: NftablesExecutor, text: str | None) -> None:
    """No filter (table absent) for None, else the full transaction ``text``."""
    if text is None:
        executor.delete_table()
    else:
        executor.apply_text(text)


def _summarise(configs: list[Configuration], runs: Runs, settings: Settings) -> Row:
    """Per configuration: medians, and the median of its ratios to the baseline run
    of the same repetition (paired, so drift of the machine between repetitions
    cancels out)."""
    rows = []
    for config, measured in zip(configs, runs, strict=True):
        row: Row = {"ports": config.ports, "filter": config.filter}
        for key, values in measured.items():
            paired = [v / b for v, b in zip(values, runs[0][key], strict=True) if b]
            row[key] = rounded(median(values), 1)
            row[f"{key}_runs"] = [round(v, 1) for v in values]
            row[f"{key.split('_')[0]}_ratio"] = rounded(median(paired), 4)
            row[f"{key.split('_')[0]}_ratio_runs"] = [round(r, 3) for r in paired]
        row["iptables"] = IPTABLES
        rows.append(row)
    return {
        "method": "iperf3 between two lab instances, routed through the host namespace; "
                  "UDP 64-byte payload (-u -b 0 -l 64), received packets/s; TCP one "
                  "stream, received bits/s; every configuration measured in turn in each "
                  "repetition; value: median; ratio: median of the per-repetition ratios "
                  "to no filter",
        "seconds": settings.seconds,
        "reps": settings.reps,
        "iptables": IPTABLES,
        "rows": rows,
    }
