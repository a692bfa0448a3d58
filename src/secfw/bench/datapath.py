"""Data path: packet rate and throughput between two lab instances, N ports loaded.

The lab (:class:`secfw.lab.hostlab.Lab`) holds just the two data-path instances of the
workload, on two networks, routed through the host namespace — or, with
``topology="bridged"``, each on a bridge of the host namespace and routed by the
lab's router namespace, the rulesets rendered for a bridged host and
br_netfilter's switches off for "no filter" only (:func:`set_bridge_netfilter`).
:class:`Settings` may limit what is measured (``kinds``) and leave the iptables
backend out (the new-connections run at 50k ports). The iperf3 server
runs in one instance namespace, the client in the other (``ip netns exec``).
For every repetition, each configuration is measured in turn — so slow drift of
the machine hits them alike:

* ``N = 0``: no filter, nothing of either backend loaded (the baseline);
* ``conntrack only``: one ``ct state`` rule, to tell what any stateful filter
  costs (no conntrack runs in a namespace until a rule needs it) from what
  secfw's ruleset adds;
* ``N > 0``, nftables: the full ruleset of the host with N other ports loaded
  (those ports have no namespaces: they only exist in the ruleset), applied as
  one full transaction into the lab's host namespace;
* ``N > 0``, iptables: the same host filter (the same IR) rendered by the
  iptables backend and loaded by that backend's own ``apply`` of a plan made
  from nothing, in the backend's default variant (:func:`~secfw.backends.
  iptables.detect_variant`: in the empty namespace, whichever plain
  ``iptables`` is). Rendering and planning 10,000 ports takes seconds, so each
  plan is made once and applied in every repetition.

Before each configuration is loaded, both backends remove what they own
(:class:`HostFilters`), so exactly one filter is ever present, and nothing is
left at the end.

Measured: UDP datagrams with a 64-byte payload (``iperf3 -u -b 0 -l 64``),
packets received per second; TCP throughput (``iperf3``, one stream, bits
per second received); and new TCP connections per second with their connect()
time p50/p99 (:mod:`secfw.bench.connrate`: the first packet of every flow walks
the ruleset, the others ride conntrack). Reported: medians over the repetitions, and the median of
the ratios to the baseline measured in the same repetition. One row per N: the
nftables figures, and the iptables figures under ``"iptables"``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secfw.backends.iptables import IptablesBackend, IptPlan
from secfw.backends.nftables import NftablesExecutor, full_transaction, render
from secfw.backends.nftables.flowtable import render_flowtable
from secfw.bench import perfsample
from secfw.bench.common import Row, guarded, median, rounded, timed
from secfw.bench.connrate import ConnProbe
from secfw.compiler.ir import HostFilter
from secfw.lab.hostlab import Lab, LabPort
from secfw.netns import BRIDGE_NF_SYSCTLS, inside_netns

IPERF_PORT = 5201
NFTABLES, IPTABLES = "nftables", "iptables"
NO_FILTER = "no filter (nothing loaded)"
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
#: The nftables tables iptables-nft keeps the ``filter`` tables of iptables and
#: ip6tables in (family, name).
IPTABLES_NFT_TABLES = (("ip", "filter"), ("ip6", "filter"))


def iptables_label(variant: str) -> str:
    """The ``filter`` label of the iptables configurations, e.g. ``secfw (iptables-nft)``."""
    return f"secfw (iptables-{variant})"


#: What a data-path run can measure: UDP 64 B packets/s, TCP bits/s, new connections.
KINDS = ("udp", "tcp", "conn")


@dataclass(frozen=True)
class Settings:
    """How long and how often: iperf3 seconds per run, repetitions; what to
    measure (:data:`KINDS`); whether the iptables backend is measured too."""

    seconds: float
    reps: int
    kinds: tuple[str, ...] = KINDS
    iptables: bool = True
    #: after the repetitions, one more UDP run of the largest N's nftables ruleset
    #: with every CPU sampled by perf (:mod:`.perfsample`): not a measured run
    perf: bool = False


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
class HostRuleset:
    """One size's host filter for the data path: the IR, and the full nftables
    transaction's text rendered from it (the iptables plan is made from ``ir``)."""

    ir: HostFilter
    nft_text: str

    def text_for(self, topology: str) -> str:
        """The full nftables transaction for ``topology`` (the routed one is kept;
        the bridged one is rendered from the IR when asked for: seconds at 10k)."""
        if topology == "routed":
            return self.nft_text
        return full_transaction(render(self.ir, topology)).text


class HostFilters:
    """secfw's two backends in one namespace, holding at most one filter at a time."""

    def __init__(self, netns: str, topology: str = "routed") -> None:
        """Both backends in ``netns``, which must be empty of filters: the iptables
        variant is fixed here, while no variant holds a rule, so it is the
        backend's default (what plain ``iptables`` is), never the one a previous
        configuration happened to fill. ``topology``: the lab's."""
        self.netns = netns
        self.topology = topology
        self.nftables = NftablesExecutor(netns=netns)
        self.iptables = IptablesBackend(netns=netns, topology=topology)
        self.variant: str = self.iptables.executor.variant
        self.flowtable_loaded = False

    def iptables_plan(self, ir: HostFilter) -> IptPlan:
        """The iptables backend's plan loading ``ir`` into a namespace without
        secfw's chains and sets (what :meth:`clear` leaves). Pure: make it once,
        apply it in every repetition."""
        return self.iptables.plan(None, ir)

    def load(self, config: Configuration) -> float:
        """:meth:`clear`, then load ``config``'s ruleset, if any; the seconds the
        load took (the clear not counted). Raises what the backend raises."""
        self.clear()
        text, plan = config.nft_text, config.ipt_plan
        if self.topology == "bridged":
            set_bridge_netfilter(self.netns, text is not None or plan is not None)
        if text is not None:
            self.flowtable_loaded = config.flowtable
            return timed(lambda: self.nftables.apply_text(text))[1]
        if plan is not None:
            return timed(lambda: self.iptables.apply(plan))[1]
        return 0.0

    def clear(self) -> None:
        """Remove everything either backend loaded, with the backends' own
        methods: table ``inet secfw``; secfw's iptables jumps, chains and ipsets;
        then, with iptables-nft, its emptied ``filter`` tables
        (:func:`drop_empty_tables`); the flowtable's table when one was loaded.
        Nothing loaded is not an error."""
        self.nftables.delete_table()
        if self.flowtable_loaded:
            self.nftables.apply_text(render_flowtable(()))
            self.flowtable_loaded = False
        self.iptables.cleanup()
        if self.variant == "nft":
            drop_empty_tables(self.netns)


def drop_empty_tables(netns: str) -> None:
    """Delete iptables-nft's ``filter`` tables in ``netns`` when they hold no rule.

    secfw's iptables cleanup removes its own jumps, chains and sets but, rightly,
    not the built-in chains, which are not secfw's. With iptables-nft these stay
    behind as hooked base chains of an nftables table, and every forwarded packet
    would still pass through them — in the baseline too. The lab's host
    namespace belongs to the benchmark, so an empty one is deleted (iptables-nft
    creates it again when it is next needed). RuntimeError when that fails.
    """
    for family, name in IPTABLES_NFT_TABLES:
        listed = _nft(netns, "-j", "list", "table", family, name)
        if listed.returncode != 0:  # no such table
            continue
        objects = json.loads(listed.stdout).get("nftables", [])
        if any("rule" in item for item in objects):
            continue
        deleted = _nft(netns, "delete", "table", family, name)
        if deleted.returncode != 0:
            raise RuntimeError(f"nft delete table {family} {name}: {deleted.stderr.strip()}")


def set_bridge_netfilter(netns: str, on: bool) -> None:
    """Turn br_netfilter's switches of ``netns`` on or off (bridged lab only).

    A bridge without any filter would not hand its frames to the IP hooks at
    all, so the bridged "no filter" baseline runs with the switches off; every
    filter, conntrack only included, needs them on (a new namespace starts with
    them on: br_netfilter's per-namespace defaults, kernel >= 5.3).
    """
    with inside_netns(netns):
        for key in BRIDGE_NF_SYSCTLS:
            Path("/proc/sys", key).write_text("1" if on else "0")


def _nft(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``nft ARGS`` in ``netns`` (the CLI: table ``ip filter`` is not secfw's,
    so not the nftables executor's business); never raises for an exit status."""
    return subprocess.run(["ip", "netns", "exec", netns, "nft", *args], capture_output=True,
                          text=True, timeout=60, check=False)


@dataclass(frozen=True, eq=False)
class Configuration:
    """One filter setting of the host namespace.

    ``filter`` labels it, ``ports`` is N (0 for the baselines), ``backend`` is
    the secfw backend whose ruleset it is (None for the baselines). What is
    loaded: ``nft_text``, a full nftables transaction, or ``ipt_plan``, the
    iptables backend's plan from nothing; neither: no filter.
    """

    filter: str
    ports: int
    backend: str | None = None
    nft_text: str | None = None
    ipt_plan: IptPlan | None = None
    flowtable: bool = False  # nft_text adds table inet secfw_flow (bench.flowtable)


def configurations(rulesets: Mapping[int, HostRuleset],
                   iptables_plan: Callable[[HostFilter], IptPlan] | None,
                   variant: str, topology: str = "routed") -> list[Configuration]:
    """No filter, conntrack only, secfw's nftables ruleset for ``topology`` at
    every N of ``rulesets``, then — unless ``iptables_plan`` is None — its
    iptables ruleset at every N (``iptables_plan`` of the same IR, labelled with
    ``variant``). The no-filter baseline is first."""
    sizes = sorted(rulesets)
    nft = [Configuration(SECFW, n, NFTABLES, nft_text=rulesets[n].text_for(topology))
           for n in sizes]
    ipt = [] if iptables_plan is None else [
        Configuration(iptables_label(variant), n, IPTABLES, ipt_plan=iptables_plan(rulesets[n].ir))
        for n in sizes]
    return [Configuration(NO_FILTER, 0),
            Configuration(CONNTRACK_ONLY, 0, nft_text=CONNTRACK_ONLY_TEXT), *nft, *ipt]


@dataclass
class Measured:
    """One configuration's values, one per repetition."""

    udp_pps: list[float] = field(default_factory=list)
    tcp_bps: list[float] = field(default_factory=list)
    conn_rate: list[float] = field(default_factory=list)
    conn_p50_us: list[float] = field(default_factory=list)
    conn_p99_us: list[float] = field(default_factory=list)
    load_s: list[float] = field(default_factory=list)


def run_datapath(pair: tuple[LabPort, LabPort], host: str,
                 rulesets: Mapping[int, HostRuleset], settings: Settings,
                 topology: str = "routed", extra: tuple[Configuration, ...] = ()) -> Row:
    """Measure every configuration (see :func:`configurations`), then ``extra``,
    in a lab of ``topology``; see the module doc.

    Whatever happens, both backends' filters are removed and the lab is torn down.
    """
    if ("udp" in settings.kinds or "tcp" in settings.kinds) and shutil.which("iperf3") is None:
        return {"skipped": "iperf3 is not installed"}
    server, client = pair
    with tempfile.TemporaryDirectory(prefix="secfw-bench-lab-") as state_dir:
        lab = Lab(host, Path(state_dir), topology=topology)
        try:
            lab.up([server, client])
            filters = HostFilters(lab.host_ns, topology)
            try:
                plan = filters.iptables_plan if settings.iptables else None
                configs = [*configurations(rulesets, plan, filters.variant, topology), *extra]
                ends = (lab.instance_ns(server.tap), lab.instance_ns(client.tap), server.ip)
                runs, perf = _measure(Iperf(*ends), ConnProbe(*ends), filters, configs,
                                      settings)
            finally:
                filters.clear()
        finally:
            lab.down()
    summary = _summarise(configs, runs, settings, filters.variant)
    return summary | {"topology": topology, "kinds": list(settings.kinds),
                      "method": method(filters.variant, topology)} | (
                          {"perf": perf} if perf else {})


def _measure(iperf: Iperf, conns: ConnProbe, filters: HostFilters,
             configs: list[Configuration], settings: Settings
             ) -> tuple[list[Measured], Row | None]:
    """Every repetition, every configuration in turn: per configuration, its
    values; then the perf sample when ``settings.perf`` (else None)."""
    runs = [Measured() for _ in configs]
    kinds = settings.kinds
    with iperf.serving(), conns.serving():
        if "udp" in kinds:
            iperf.udp_pps(1.0)  # warm-up, not counted: neighbours resolved, caches hot
        conns.measure(1.0)
        for _ in range(settings.reps):
            for config, measured in zip(configs, runs, strict=True):
                measured.load_s.append(filters.load(config))
                if "udp" in kinds:
                    measured.udp_pps.append(iperf.udp_pps(settings.seconds))
                if "tcp" in kinds:
                    measured.tcp_bps.append(iperf.tcp_bps(settings.seconds))
                if "conn" in kinds:
                    _measure_connections(conns, settings, measured)
        perf = _perf_sample(iperf, filters, configs, settings) if settings.perf else None
    return runs, perf


def _perf_sample(iperf: Iperf, filters: HostFilters, configs: list[Configuration],
                 settings: Settings) -> Row | None:
    """One UDP run of the largest N's nftables ruleset under ``perf record -a``
    (:func:`perfsample.during`), or None when there is no such configuration."""
    secfw = [c for c in configs if c.filter == SECFW]
    if not secfw or "udp" not in settings.kinds:
        return None
    config = max(secfw, key=lambda c: c.ports)
    filters.load(config)
    row = guarded(lambda: perfsample.during(lambda: iperf.udp_pps(settings.seconds),
                                            settings.seconds))
    return {"ports": config.ports, "run": f"UDP 64 B, {settings.seconds:g} s"} | row


def _measure_connections(conns: ConnProbe, settings: Settings, measured: Measured) -> None:
    """One connection-rate run into ``measured``."""
    found = conns.measure(settings.seconds)
    measured.conn_rate.append(found.rate)
    measured.conn_p50_us.append(found.p50_us)
    measured.conn_p99_us.append(found.p99_us)


def _summarise(configs: list[Configuration], runs: list[Measured], settings: Settings,
               variant: str) -> Row:
    """One row per baseline and per N (``runs[0]`` is the no-filter baseline): the
    nftables figures, and the iptables ones of the same N under ``"iptables"``
    (None in the baseline rows, which both backends share)."""
    figures = [_figures(measured, runs[0], runs[1]) for measured in runs]
    rows: list[Row] = [{"ports": config.ports, "filter": config.filter, **found,
                        "iptables": None}
                       for config, found in zip(configs, figures, strict=True)
                       if config.backend != IPTABLES]
    for config, found in zip(configs, figures, strict=True):
        if config.backend == IPTABLES:
            row = next(r for r in rows if r["ports"] == config.ports and r["filter"] == SECFW)
            row["iptables"] = {"filter": config.filter, **found}
    return {
        "method": method(variant),
        "seconds": settings.seconds,
        "reps": settings.reps,
        "iptables_variant": variant,
        "rows": rows,
    }


def _figures(measured: Measured, baseline: Measured, conntrack: Measured) -> Row:
    """Medians of ``measured``, and the median of its ratios to the ``baseline``
    run of the same repetition (paired, so drift of the machine between
    repetitions cancels out); the per-repetition values too; the median load time.
    New connections are also compared with the ``conntrack`` only run (a stateful
    filter's floor: every new flow makes a conntrack entry whatever the rules)."""
    row: Row = {}
    for key, values, base in (("udp_pps", measured.udp_pps, baseline.udp_pps),
                              ("tcp_bps", measured.tcp_bps, baseline.tcp_bps),
                              ("conn_rate", measured.conn_rate, baseline.conn_rate)):
        kind = key.split("_")[0]
        row[key] = rounded(median(values), 1)
        row[f"{key}_runs"] = [round(v, 1) for v in values]
        row[f"{kind}_ratio"] = rounded(median(_paired(values, base)), 4)
        row[f"{kind}_ratio_runs"] = [round(r, 3) for r in _paired(values, base)]
    row["conn_ct_ratio"] = rounded(median(_paired(measured.conn_rate, conntrack.conn_rate)), 4)
    row["conn_p50_us"] = rounded(median(measured.conn_p50_us), 1)
    row["conn_p99_us"] = rounded(median(measured.conn_p99_us), 1)
    row["load_s"] = rounded(median(measured.load_s), 3)
    return row


def _paired(values: list[float], base: list[float]) -> list[float]:
    """Per repetition, ``values`` over ``base`` (repetitions without a base skipped)."""
    return [v / b for v, b in zip(values, base, strict=True) if b]


#: Where the two lab instances' packets are filtered, per topology.
PATHS = {
    "routed": "routed through the host namespace",
    "bridged": ("bridged: each instance on a Linux bridge of the host namespace (br_netfilter "
                "hands the frames to the IP hooks; its switches off for no filter, on for "
                "every filter), routed between the two networks by the router namespace"),
}


def method(variant: str, topology: str = "routed") -> str:
    """How the data path was measured, for the report (``variant``: iptables')."""
    return (
        f"iperf3 between two lab instances, {PATHS[topology]}; UDP 64-byte "
        "payload (-u -b 0 -l 64), received packets/s; TCP one stream, received bits/s; "
        "new TCP connections/s from 2 client processes and their connect() time "
        "(secfw.bench.connrate: SYN to SYN-ACK as the client sees it); "
        "every configuration measured in turn in each repetition; value: median; ratio: "
        "median of the per-repetition ratios to no filter; nftables: the full transaction; "
        f"iptables: the same IR through the iptables backend in its default variant, "
        f"iptables-{variant} here (no variant holds rules in the fresh namespace, so the "
        "backend takes the one plain `iptables` is), loaded by the backend's apply of a "
        "plan from nothing, made once per N; before each configuration both backends' "
        "cleanup runs (and iptables-nft's emptied filter tables are deleted), so only one "
        "filter is ever loaded"
    )
