"""Host-side commands: ``compile``, ``agent`` (and ``agent status``), ``lab`` and ``demo``.

They sit beside the nova-style cloud commands of :mod:`secfw.cli.main` (same group,
same one-line error contract) but act on a compute host rather than on the
cloud model: compile its filter, keep the kernel equal to it, or build and
measure a network-namespace lab of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from secfw.agent import AgentLoop, LoopSettings, SystemdNotifier
from secfw.agent.daemon import configure_logging, log_event, peak_rss_kb
from secfw.agent.filewatch import SqliteWatcher
from secfw.agent.gcsettle import GcSettler
from secfw.agent.host import host_reconciler
from secfw.agent.kernelrecord import KernelRecord, record_path
from secfw.agent.loop import Trigger
from secfw.agent.reconciler import Reconciler
from secfw.agent.status import DEFAULT_STATE_DIR, Report, StatusWriter, read_report, status_path
from secfw.agent.storewatch import ReopeningStore, sqlite_path
from secfw.agent.topology import AUTO, CHOICES
from secfw.backends import BACKENDS, TOPOLOGIES, get_backend
from secfw.cli.main import (
    CliState,
    format_option,
    main,
    pass_state,
    request_fast_exit,
    scope_options,
)
from secfw.cli.output import emit
from secfw.compiler.build import compile_host
from secfw.compiler.metadata import parse_listen, with_metadata
from secfw.config import FLOWTABLE_MODES, Config, load_config
from secfw.constants import DEMO_HOST as HOST
from secfw.errors import BackendError, SecfwError, StoreError
from secfw.model import check_host
from secfw.store import Store, open_store

# The agent's one-shot sync is a whole process per run (bench: start-up included):
# the lab, the demo, the API, rtnetlink's link watcher and the registrar are
# imported by the commands that use them (tests/netns/test_agent_lazy_imports.py).
if TYPE_CHECKING:
    from secfw.agent.etcdwatch import EtcdWatcher
    from secfw.agent.linkwatch import LinkWatcher
    from secfw.lab.demo import Probe

_host_option = click.option("--host", required=True, help="The compute host.")
_config_option = click.option(
    "--config", "config_path", metavar="FILE", help="nova.conf-style INI ($SECFW_CONFIG)."
)
_backend_option = click.option(
    "--backend", type=click.Choice(BACKENDS), default="nftables", show_default=True
)
_topology_option = click.option(
    "--topology", type=click.Choice(TOPOLOGIES), envvar="SECFW_TOPOLOGY", default="routed",
    show_default=True,
    help="routed: taps are routed links; bridged: taps are ports of Linux bridges "
         "(needs br_netfilter) [env SECFW_TOPOLOGY].",
)
_agent_topology_option = click.option(
    "--topology", type=click.Choice(CHOICES), envvar="SECFW_TOPOLOGY", default=AUTO,
    show_default=True,
    help="auto: what the taps show (bridge ports: bridged; else routed); routed: taps "
         "are routed links; bridged: taps are ports of Linux bridges (needs br_netfilter). "
         "Taps that contradict an explicit choice are refused and kept closed "
         "[env SECFW_TOPOLOGY].",
)
_state_dir_option = click.option(
    "--state-dir", metavar="DIR", envvar="SECFW_STATE_DIR", default=DEFAULT_STATE_DIR,
    show_default=True, help="Where the agent writes its status report [env SECFW_STATE_DIR].",
)
_log = logging.getLogger("secfw.agent")


@main.command("compile")
@_host_option
@_config_option
@_backend_option
@_topology_option
@click.option(
    "-f", "--format", "fmt", type=click.Choice(["text", "nft", "json"]), default="text",
    show_default=True,
    help="text: what the backend loads as is (`nft -f` input; for iptables the "
         "ipset/iptables-restore input); nft: the same as text for nftables; "
         "json: libnftables JSON (nftables only).",
)
@scope_options
@pass_state
def compile_command(
    state: CliState, host: str, config_path: str | None, backend: str, topology: str, fmt: str
) -> None:
    """Print HOST's ruleset for a backend and topology (deterministic: same model,
    same bytes)."""
    check_host(host)
    if backend != "nftables" and fmt != "text":
        raise click.UsageError(f"-f {fmt} exists for the nftables backend only")
    config = load_config(config_path)
    hf = with_metadata(compile_host(state.api.snapshot(), host, config.allow_same_net_traffic),
                       config.metadata_listen)
    if backend == "iptables":
        from secfw.backends.iptables import compile_text

        click.echo(compile_text(hf, topology=topology), nl=False)
        return
    from secfw.backends.nftables import render, to_nft_json, to_nft_text

    ruleset = render(hf, topology)
    if fmt == "json":
        click.echo(json.dumps(to_nft_json(ruleset), indent=2, sort_keys=True))
    else:
        click.echo(to_nft_text(ruleset), nl=False)


@main.group("metadata")
def metadata_group() -> None:
    """The metadata service of a compute host (README, "Metadata service")."""


@metadata_group.command("serve")
@_host_option
@_config_option
@click.option(
    "--listen", metavar="ADDR:PORT", envvar="SECFW_METADATA_LISTEN",
    help="The local address the agent redirects 169.254.169.254:80 to (default: config "
         "metadata_listen) [env SECFW_METADATA_LISTEN].",
)
@click.option("--threads", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Requests served at once.")
@scope_options
@pass_state
def metadata_serve_command(state: CliState, host: str, config_path: str | None,
                           listen: str | None, threads: int) -> None:
    """Serve HOST's instances their metadata, user data and public key, each
    recognised by the kernel (the connection's conntrack mark and original
    source), until SIGTERM."""
    from secfw.metadata.server import serve

    check_host(host)
    config = agent_config(config_path, listen, "--listen")
    if config.metadata_listen is None:
        raise click.UsageError("Missing option '--listen' (or metadata_listen in the config).")
    configure_logging()
    url = state.store_url
    serve(lambda: open_store(url), host, config.metadata_listen, threads=threads)


@main.group("agent", invoke_without_command=True, subcommand_metavar="[status]")
@click.option("--host", help="The compute host (required to run the agent).")
@_config_option
@_backend_option
@_agent_topology_option
@click.option("--once", is_flag=True, help="Run one full sync and exit.")
@click.option("--register", is_flag=True,
              help="Register HOST for the scheduler (this machine's vCPUs, memory and "
                   "/var/lib disk) after the first sync, unless it is registered.")
@click.option("--cleanup", is_flag=True,
              help="Remove secfw's table (and nothing else) and exit; 0 when already absent.")
@click.option(
    "--resync-interval", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
    help="Seconds between full syncs (store reloaded, kernel read back, drift repaired).",
)
@click.option(
    "--poll-interval", type=click.FloatRange(min=0.01, max=10), default=0.1, show_default=True,
    help="Seconds between store revision checks.",
)
@click.option(
    "--backoff-max", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
    help="Longest wait between retries after failures (doubling from 0.5 s).",
)
@_state_dir_option
@click.option(
    "--metrics-address", metavar="IP:PORT", envvar="SECFW_METRICS_ADDRESS",
    help="Serve Prometheus metrics on this address, e.g. 127.0.0.1:9468 (default: off) "
         "[env SECFW_METRICS_ADDRESS].",
)
@click.option(
    "--metadata-listen", metavar="ADDR:PORT", envvar="SECFW_METADATA_LISTEN",
    help="Redirect instances' 169.254.169.254:80 to the metadata server on this local "
         "address (`secfw metadata serve`; default: config metadata_listen, else off) "
         "[env SECFW_METADATA_LISTEN].",
)
@click.option(
    "--flowtable", type=click.Choice(FLOWTABLE_MODES), envvar="SECFW_FLOWTABLE",
    help="nftables flowtable fast path for established flows: off, auto (when this "
         "kernel has it) or on (required: ports stay closed without it). Untested on the "
         "development kernel, which has none (default: config flowtable, else off) "
         "[env SECFW_FLOWTABLE].",
)
@scope_options
@click.pass_context
def agent_command(
    ctx: click.Context,
    host: str | None,
    config_path: str | None,
    backend: str,
    topology: str,
    once: bool,
    register: bool,
    cleanup: bool,
    resync_interval: float,
    poll_interval: float,
    backoff_max: float,
    state_dir: str,
    metrics_address: str | None,
    metadata_listen: str | None,
    flowtable: str | None,
) -> None:
    """Keep this network namespace's filter equal to HOST's security groups.

    Runs until SIGTERM (the current transaction finishes, the rules stay);
    SIGHUP forces a full sync. Logs are logfmt lines on stderr; the status
    report goes to --state-dir (read it with `secfw agent status`). See
    docs/agent.md.
    """
    if ctx.invoked_subcommand is not None:
        return
    configure_logging()
    if cleanup:
        _cleanup(backend, "routed" if topology == AUTO else topology)
        return
    if host is None:
        raise click.UsageError("Missing option '--host'.")
    check_host(host)
    state = ctx.find_object(CliState)
    assert state is not None  # always run under main
    config = agent_config(config_path, metadata_listen)
    if flowtable is not None:
        config = replace(config, flowtable=flowtable)
    if config.flowtable != "off" and backend != "nftables":
        raise click.UsageError("--flowtable (or the config's flowtable) needs "
                               "--backend nftables.")
    directory = state_directory(state_dir)
    if once:
        _run_once(state.store_url, host, config, backend, topology, directory,
                  create=register)
        if register:
            _register(state.store_url, host)
        request_fast_exit()  # done: the process ends without its teardown (secfw.cli.main.run)
        return
    settings = LoopSettings(poll_interval, resync_interval, backoff_max=backoff_max)
    _run_loop(state.store_url, host, config, (backend, topology), settings,
              directory, metrics_address, register)


def state_directory(text: str) -> Path:
    """``--state-dir`` as a path, refused before the agent touches anything when
    it cannot be a directory: empty, or naming (or lying under) something that
    is not one. Else the agent would run with neither status report nor restart
    record, and say so only in log lines."""
    if not text.strip():
        raise click.BadParameter("must name a directory", param_hint="'--state-dir'")
    path = Path(text)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise click.BadParameter(f"{existing} is not a directory", param_hint="'--state-dir'")
    return path


def agent_config(config_path: str | None, metadata_listen: str | None,
                 option: str = "--metadata-listen") -> Config:
    """The configuration file's settings, ``metadata_listen`` (given as
    ``option``) over the file's."""
    config = load_config(config_path)
    if not metadata_listen:
        return config
    try:
        return replace(config, metadata_listen=parse_listen(metadata_listen))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{option}'") from exc


def _run_once(
    store_url: str, host: str, config: Config, backend: str, topology: str,
    state_dir: Path | None = None, create: bool = False,
) -> None:
    """One full sync; logs ``sync … commands=N`` (other tools rely on that line).
    The store must exist (:func:`existing_store`) unless ``create`` (``--register``:
    the agent is about to write its host into it anyway).

    Closed first, as the daemon: a kernel without secfw's table gets the closed
    filter before the store is read, and a failed sync leaves the last ruleset or
    the closed filter behind (then the error is raised: exit status non-zero).
    """
    store = open_store(store_url) if create else existing_store(store_url)
    try:
        _sync_once(store, host, config, (backend, topology), state_dir)
    finally:
        store.close()


def _sync_once(store: Store, host: str, config: Config, backend_topology: tuple[str, str],
               state_dir: Path | None) -> None:
    """:func:`_run_once`'s pass over an open ``store``."""
    reconciler = host_reconciler(store, host, config, *backend_topology)
    if state_dir is not None:  # no read-back when the kernel provably holds the ruleset
        reconciler.kernel_record = KernelRecord(record_path(state_dir, host))
    try:
        reconciler.close_if_absent()
        result = reconciler.reconcile(full=True)
        reconciler.remember_kernel()
    except SecfwError as exc:
        held = _hold_after(reconciler, exc)
        log_event(_log, logging.ERROR, "sync_failed", error=str(exc),
                  kernel="closed filter" if held else "last ruleset kept")
        raise
    for port in result.isolated:
        log_event(_log, logging.ERROR, "port_isolated", tap=port.tap, port=port.port_id,
                  reason=port.reason)
    log_event(_log, logging.INFO, "sync", **result.as_fields(), **(result.changes or {}))
    _log_process()
    if result.isolated:
        raise BackendError(f"{len(result.isolated)} port(s) left closed: "
                           + "; ".join(f"{p.tap}: {p.reason}" for p in result.isolated))


def existing_store(url: str) -> Store:
    """The store at ``url`` as an agent opens it: never created. A missing SQLite
    file, or an etcd prefix that holds no store, is an error before the kernel
    is touched — from the empty store a mistyped URL would make, the agent would
    compile a host without ports and report success (as the daemon's
    :class:`ReopeningStore` refuses them)."""
    path = sqlite_path(url)
    if path is not None and not os.path.isfile(path):
        raise StoreError(f"store {path}: no such file (the agent never creates a store)")
    return open_store(url, create=False)


def _log_process() -> None:
    """The ``process`` line of a one-shot agent: its peak RSS (VmHWM, see
    :func:`peak_rss_kb`) and CPU seconds, for whoever measures it."""
    peak = peak_rss_kb()
    times = os.times()
    log_event(_log, logging.INFO, "process",
              peak_rss_mb=None if peak is None else round(peak / 1024, 1),
              cpu_s=round(times.user + times.system, 3))


def _register(store_url: str, host: str) -> None:
    from secfw.agent.register import register_host  # the API: only with --register

    store = open_store(store_url)
    try:
        registered = register_host(store, host)
    finally:
        store.close()
    log_event(_log, logging.INFO, "registered" if registered else "already_registered",
              host=host)


def _hold_after(reconciler: Any, exc: SecfwError) -> bool:
    """Keep the last ruleset or close; whether the closed filter was installed."""
    from secfw.agent.loop import failure_reason

    try:
        held = reconciler.hold(failure_reason(exc))
    except SecfwError as hold_exc:
        log_event(_log, logging.ERROR, "hold_failed", error=str(hold_exc))
        return False
    return held is not None and held.closed


def _run_loop(
    store_url: str, host: str, config: Config, backend_topology: tuple[str, str],
    settings: LoopSettings, state_dir: Path, metrics_address: str | None,
    register: bool = False,
) -> None:
    """The daemon: the loop with its observers and link watcher, until stopped.

    Only a bad --metrics-address or a backend that cannot be opened end it with
    an error; a store that cannot be read is a failing pass, retried.
    """
    from secfw.agent.metrics import AgentMetrics  # prometheus_client: the daemon's only
    from secfw.agent.register import HostRegistrar

    backend, topology = backend_topology
    store = ReopeningStore(store_url)
    reconciler = host_reconciler(store, host, config, backend, topology)
    reconciler.kernel_record = KernelRecord(record_path(state_dir, host))
    metrics = AgentMetrics()
    if metrics_address:
        metrics.serve(metrics_address)
    notifier = SystemdNotifier(settings.max_pass_seconds)
    observers = [StatusWriter(state_dir, host), metrics, notifier, GcSettler()]
    if register:
        observers.append(HostRegistrar(store, host))
    loop = AgentLoop(reconciler, settings, observers=observers)
    watcher = _start_link_watcher(loop)
    loop.taps = watcher.taps if watcher is not None else None
    store_watcher = _start_store_watcher(store_url, loop, reconciler)
    loop.install_signal_handlers()
    log_event(_log, logging.INFO, "started", backend=backend, topology=topology,
              store=store_url,
              resync_interval=settings.resync_interval, metrics=metrics_address or "off",
              status=str(status_path(state_dir, host)))
    try:
        loop.run()
    finally:
        if watcher is not None:
            watcher.stop()
        if store_watcher is not None:
            store_watcher.stop()
        metrics.close()
        store.close()


def _start_store_watcher(
    store_url: str, loop: AgentLoop, reconciler: Reconciler
) -> EtcdWatcher | SqliteWatcher | None:
    """A watch that wakes the loop on every write, the revision poll slowed to a
    safety net while it is in place: on etcd, a watch whose documents feed the
    passes (:class:`ChangeFeed`); on SQLite, inotify on the file. Without
    inotify (an unusual file system) the poll alone notices changes."""
    if store_url.startswith("etcd://"):
        from secfw.agent.etcdwatch import ChangeFeed, EtcdWatcher  # its thread

        feed = ChangeFeed()
        reconciler.feed = feed
        etcd = EtcdWatcher(store_url, lambda _revision: loop.wakeup.notify(Trigger("store")),
                           feed)
        loop.store_watched = etcd.watching.is_set
        etcd.start()
        return etcd
    path = sqlite_path(store_url)
    if path is None:
        return None
    sqlite = SqliteWatcher(path, loop.store_changed)
    try:
        sqlite.start()
    except OSError as exc:
        log_event(_log, logging.WARNING, "store_watch_unavailable", error=str(exc),
                  action=f"polling every {loop.settings.poll_interval} s")
        return None
    loop.store_watched = sqlite.watching.is_set
    return sqlite


def _start_link_watcher(loop: AgentLoop) -> LinkWatcher | None:
    """Follow tap events into the loop; without netlink the agent still works
    (resync and store triggers), so a failure is logged, not fatal."""
    from secfw.agent.linkwatch import LinkWatcher  # pyroute2

    watcher = LinkWatcher(loop.link_changed, on_move=loop.link_moved)
    try:
        watcher.start()
    except OSError as exc:
        log_event(_log, logging.ERROR, "linkwatch_unavailable", error=str(exc))
        return None
    return watcher


def _cleanup(backend_name: str, topology: str) -> None:
    """Delete secfw's table in this namespace, touch nothing else (exit 0 if absent)."""
    backend = get_backend(backend_name, topology=topology)
    try:
        present = backend.read() is not None
    except BackendError:  # there, but not in a shape we parse: it goes all the same
        present = True
    backend.cleanup()
    log_event(_log, logging.INFO, "cleanup", backend=backend_name, removed=present)


@agent_command.command("status")
@click.option("--host", required=True, help="The compute host.")
@_state_dir_option
@format_option
def agent_status_command(host: str, state_dir: str, fmt: str) -> None:
    """Show the last report of HOST's agent: health, last sync, revision, ports,
    drift repairs, errors — and say when it stopped, died or went quiet."""
    check_host(host)
    report = read_report(state_dir, host)
    if fmt == "json":
        emit(report.as_dict(), None, "json")
    else:
        emit(_status_rows(report), None, "table")


def _status_rows(report: Report) -> dict[str, Any]:
    """The report as ``Property | Value`` rows, most important first."""
    doc = report.doc
    drift = doc.get("last_drift") or {}
    return {
        "state": report.state.upper(),
        "why": report.reason,
        "host": doc.get("host"),
        "pid": doc.get("pid"),
        "report age": f"{report.age:.1f} s",
        "last sync": _when(doc.get("last_sync")),
        "last full sync": _when(doc.get("last_full_sync")),
        "revision applied": doc.get("revision"),
        "store revision": doc.get("store_revision"),
        "kernel holds": doc.get("enforcing"),
        "topology": doc.get("topology"),
        "ports": doc.get("ports"),
        "ports left closed": doc.get("isolated_ports") or None,
        "set elements": doc.get("set_elements"),
        "syncs": doc.get("syncs"),
        "transactions": doc.get("transactions"),
        "drift repairs": doc.get("drift_repairs"),
        "last drift": {k: v for k, v in drift.items() if k != "at"} if drift else None,
        "last drift at": _when(drift.get("at")),
        "errors": doc.get("errors"),
        "consecutive errors": doc.get("consecutive_errors"),
        "last error": doc.get("last_error"),
        "last error at": _when(doc.get("last_error_at")),
        "unknown taps (dropped)": doc.get("unknown_taps"),
        "ports without tap": doc.get("missing_taps"),
        "started": _when(doc.get("started_at")),
    }


def _when(timestamp: Any) -> str | None:
    """A Unix time as UTC ISO 8601 plus how long ago."""
    if not isinstance(timestamp, int | float):
        return None
    moment = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
    return f"{moment} ({time.time() - timestamp:.1f} s ago)"


@main.group("lab")
def lab_group() -> None:
    """A compute host's instances as network namespaces (see secfw.lab.hostlab)."""


_lab_topology_option = click.option(
    "--topology", type=click.Choice(TOPOLOGIES), envvar="SECFW_TOPOLOGY", default="routed",
    show_default=True,
    help="routed: every tap a routed link (Calico style); bridged: taps are ports of one "
         "Linux bridge per network and a router namespace routes (nova-network style). "
         "A lab keeps its topology until `lab down` [env SECFW_TOPOLOGY].",
)


_lab_gateway_option = click.option(
    "--gateway-on-bridge", is_flag=True, envvar="SECFW_LAB_GATEWAY_ON_BRIDGE",
    help="With --topology bridged: the host namespace holds each network's gateway on its "
         "bridge and routes (nova-network's layout) instead of a router namespace "
         "[env SECFW_LAB_GATEWAY_ON_BRIDGE].",
)


_lab_host_option = click.option("--host", help="The compute host (one-host lab).")
_lab_hosts_option = click.option(
    "--hosts", type=click.IntRange(1, 200), metavar="N",
    help="A multi-host lab instead: hosts NAME1..NAMEN on an underlay with its own etcd "
         "and one agent per host (see secfw.lab.multihost).")
_lab_name_option = click.option(
    "--name", default="compute", show_default=True,
    help="With --hosts: the lab's name, and the hosts' names without their number.")


@lab_group.command("up")
@_lab_host_option
@_lab_hosts_option
@_lab_name_option
@_lab_topology_option
@_lab_gateway_option
@click.option("--no-agents", is_flag=True, help="With --hosts: do not start the agents.")
@scope_options
@pass_state
def lab_up(state: CliState, host: str | None, hosts: int | None, name: str, topology: str,
           gateway_on_bridge: bool, no_agents: bool) -> None:
    """Create (or bring in line) the lab of HOST from the store, or with --hosts N a
    multi-host lab: underlay, etcd, the hosts' labs from that etcd, their agents."""
    if hosts is not None:
        _multihost_up(name, hosts, topology, gateway_on_bridge, agents=not no_agents)
        return
    _lab_sync(state, _one_host(host), topology, gateway_on_bridge)


@lab_group.command("sync")
@_lab_host_option
@_lab_hosts_option
@_lab_name_option
@_lab_topology_option
@_lab_gateway_option
@scope_options
@pass_state
def lab_sync(state: CliState, host: str | None, hosts: int | None, name: str, topology: str,
             gateway_on_bridge: bool) -> None:
    """Add namespaces of new instances of HOST (or of every host of a --hosts lab),
    remove those of deleted ones."""
    if hosts is not None:
        _multihost_up(name, hosts, topology, gateway_on_bridge, agents=False)
        return
    _lab_sync(state, _one_host(host), topology, gateway_on_bridge)


def _one_host(host: str | None) -> str:
    if host is None:
        raise click.UsageError("give --host HOST (or --hosts N for a multi-host lab)")
    return host


def _lab_sync(state: CliState, host: str, topology: str, gateway_on_bridge: bool) -> None:
    from secfw.lab.demo import lab_for, lab_ports
    from secfw.lab.hostlab import Lab

    check_host(host)
    lab = Lab(host, lab_for(host).state_dir, topology=topology,  # lab_for: the state dir
              gateway_on_bridge=gateway_on_bridge)
    lab.up(lab_ports(state.api.snapshot(), host))
    router = f", router {lab.router_ns}" if topology == "bridged" and not gateway_on_bridge \
        else ""
    layout = f"{topology}, gateway on the bridge" if gateway_on_bridge else topology
    click.echo(f"lab of {host} ({layout}): host namespace {lab.host_ns}{router}, "
               f"external {lab.external_ns}, {len(lab.taps())} instance(s)")


def _multihost(name: str, hosts: int, topology: str) -> Any:
    from secfw.lab.demo import lab_for
    from secfw.lab.multihost import MultiHostLab, host_names

    for host in host_names(name, hosts):
        check_host(host)
    return MultiHostLab(name, host_names(name, hosts), lab_for(name).state_dir / "multihost",
                        topology)


def _multihost_up(name: str, hosts: int, topology: str, gateway_on_bridge: bool,
                  agents: bool) -> None:
    """Underlay and etcd first (the hosts' ports are read from that etcd), then the
    hosts' labs, then an agent per host that is not running yet."""
    from secfw.lab.demo import lab_ports, secfw_executable

    if gateway_on_bridge:
        raise click.UsageError("--gateway-on-bridge is for one-host labs")
    lab = _multihost(name, hosts, topology)
    lab.up({})
    if not lab.running("etcd"):
        lab.start_etcd()
    url = lab.store_url
    snapshot = lab.in_fabric(lambda: _snapshot(url))
    lab.up({h: lab_ports(snapshot, h) for h in lab.hosts})
    logs = lab.state_dir / "agents"
    if agents:
        logs.mkdir(parents=True, exist_ok=True)
        for host in lab.hosts:
            if not lab.running(f"agent:{host}"):
                lab.start_agent(host, secfw_executable(), url, logs, log=logs / f"{host}.log")
    for host in lab.hosts:
        click.echo(f"{host}: host namespace {lab.labs[host].host_ns}, underlay "
                   f"{lab.underlay_ip(host)}, {len(lab.labs[host].taps())} instance(s)"
                   + (f", agent log {logs / host}.log" if agents else ""))
    click.echo(f"store {url} in {lab.fabric_ns}: ip netns exec {lab.fabric_ns} secfw "
               f"--store {url} ...")


def _snapshot(url: str) -> Any:
    from secfw.api import Api

    store = open_store(url)
    try:
        return Api(store).snapshot()
    finally:
        store.close()


@lab_group.command("down")
@_lab_host_option
@_lab_hosts_option
@_lab_name_option
def lab_down(host: str | None, hosts: int | None, name: str) -> None:
    """Remove everything the lab of HOST (or the --hosts lab) created, and nothing else
    (a --hosts lab: its agents and etcd stopped first)."""
    from secfw.lab.demo import lab_for

    if hosts is not None:
        _multihost(name, hosts, "routed").down()
        return
    check_host(_one_host(host))
    lab_for(_one_host(host)).down()


@main.command("demo")
@click.option("--keep", is_flag=True, help="Leave the lab and the store in place.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to keep the demo's store and lab state (default: a temp dir).")
@click.option("--hosts", type=click.IntRange(3, 3), metavar="3",
              help="Spread the cloud over 3 hosts of a multi-host lab on its own etcd, "
                   "one agent per host (started and stopped by the demo).")
@click.option("--topology", type=click.Choice(TOPOLOGIES), default="routed", show_default=True,
              help="With --hosts: the multi-host lab's topology.")
@_config_option
def demo_command(keep: bool, work_dir: Path | None, hosts: int | None, topology: str,
                 config_path: str | None) -> None:
    """The operations guide's example cloud, measured with real packets."""
    from secfw.api import Api
    from secfw.lab.demo import (
        add_floating_ips,
        build_guide_cloud,
        demo_paths,
        lab_for,
        lab_ports,
        reachability,
        run_agent_once,
    )

    config = load_config(config_path)
    if hosts is not None:
        _demo_hosts(hosts, topology, work_dir, keep, config_path)
        return
    work = work_dir or Path(tempfile.mkdtemp(prefix="secfw-demo-"))
    store_url, lab_dir = demo_paths(work)
    api = Api(open_store(store_url))
    if not api.snapshot().instances:
        build_guide_cloud(api)
        add_floating_ips(api)
    lab = lab_for(HOST, lab_dir)
    try:
        lab.up(lab_ports(api.snapshot(), HOST))
        run_agent_once(lab, HOST, store_url, config_path)
        probes = reachability(api, lab, config.allow_same_net_traffic)
    finally:
        if not keep:
            lab.down()  # the table lived in the lab's host namespace: gone with it
    _print_matrix(probes, config.allow_same_net_traffic)
    _finish_demo(probes, work, None if not keep else
                 f"kept: store {store_url}, lab of {HOST} (secfw lab down --host {HOST} "
                 f"with SECFW_LAB_DIR={lab_dir})", remove=work_dir is None)


def _demo_hosts(hosts: int, topology: str, work_dir: Path | None, keep: bool,
                config_path: str | None) -> None:
    """``demo --hosts 3``: :mod:`secfw.lab.demohosts` on a multi-host lab named
    ``demo`` (its etcd and agents stopped, its namespaces removed, unless --keep)."""
    from secfw.lab import demohosts
    from secfw.lab.multihost import MultiHostLab, host_names

    config = load_config(config_path)
    work = work_dir or Path(tempfile.mkdtemp(prefix="secfw-demo-"))
    lab = MultiHostLab("demo", host_names("demo", hosts), work / "lab" / "multihost", topology)
    try:
        probes, placement = demohosts.run(lab, work, config.allow_same_net_traffic,
                                          config_path)
    finally:
        if not keep:
            lab.down()
    where = ", ".join(f"{name} on {host}" for name, host in sorted(placement.items()))
    _print_matrix(probes, config.allow_same_net_traffic,
                  f"{hosts} hosts ({topology}, etcd; {where})")
    _finish_demo(probes, work, None if not keep else
                 f"kept: store {lab.store_url} in {lab.fabric_ns}; remove with "
                 f"SECFW_LAB_DIR={work / 'lab'} secfw lab down --hosts {hosts} --name demo",
                 remove=work_dir is None)


def _finish_demo(probes: list[Probe], work: Path, kept: str | None, remove: bool) -> None:
    """Say what ``--keep`` kept (``kept``), else remove a temporary work dir; fail
    when any probe disagreed with the security groups."""
    if kept is not None:
        click.echo(kept)
    elif remove:
        shutil.rmtree(work, ignore_errors=True)
    if not all(p.agrees for p in probes):
        raise SecfwError("the kernel disagreed with the security groups (see MISMATCH rows)")


def _print_matrix(probes: list[Probe], allow_same_net: bool, where: str = HOST) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Reachability on {where}, measured with real packets "
                        f"(allow_same_net_traffic={str(allow_same_net).lower()})")
    for header in ("source", "destination", "service", "result", "why (security groups)"):
        table.add_column(header)
    for probe in probes:
        result = "allowed" if probe.measured else "blocked"
        if not probe.agrees:
            result += " MISMATCH"
        table.add_row(probe.source, probe.destination, probe.service, result,
                      probe.reason if probe.expected else "")
    Console(soft_wrap=False, width=140).print(table)
    allowed = sum(p.measured for p in probes)
    click.echo(f"{len(probes)} probes: {allowed} allowed, {len(probes) - allowed} blocked, "
               f"{sum(not p.agrees for p in probes)} mismatches")
