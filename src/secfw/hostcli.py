"""Host-side commands: ``compile``, ``agent``, ``lab`` and ``demo``.

They sit beside the nova-style cloud commands of :mod:`secfw.cli` (same group,
same one-line error contract) but act on a compute host rather than on the
cloud model: compile its filter, keep the kernel equal to it, or build and
measure a network-namespace lab of it.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import click

from secfw.agent import AgentLoop, LoopSettings, Reconciler
from secfw.api import Api
from secfw.backends import BACKENDS, get_backend
from secfw.cli import CliState, main, pass_state, scope_options
from secfw.compiler.build import compile_host
from secfw.config import load_config
from secfw.demo import (
    HOST,
    Probe,
    build_guide_cloud,
    demo_paths,
    lab_for,
    lab_ports,
    reachability,
    run_agent_once,
)
from secfw.errors import SecfwError
from secfw.model import check_host
from secfw.store import open_store

_host_option = click.option("--host", required=True, help="The compute host.")
_config_option = click.option(
    "--config", "config_path", metavar="FILE", help="nova.conf-style INI ($SECFW_CONFIG)."
)
_backend_option = click.option(
    "--backend", type=click.Choice(BACKENDS), default="nftables", show_default=True
)


@main.command("compile")
@_host_option
@_config_option
@_backend_option
@click.option(
    "-f", "--format", "fmt", type=click.Choice(["nft", "json"]), default="nft", show_default=True,
    help="nft: text that `nft -f` loads as is; json: libnftables JSON.",
)
@scope_options
@pass_state
def compile_command(
    state: CliState, host: str, config_path: str | None, backend: str, fmt: str
) -> None:
    """Print HOST's ruleset (deterministic: same model, same bytes)."""
    from secfw.backends.nftables import render, to_nft_json, to_nft_text

    check_host(host)
    config = load_config(config_path)
    ruleset = render(compile_host(state.api.snapshot(), host, config.allow_same_net_traffic))
    if fmt == "json":
        click.echo(json.dumps(to_nft_json(ruleset), indent=2, sort_keys=True))
    else:
        click.echo(to_nft_text(ruleset), nl=False)


@main.command("agent")
@_host_option
@_config_option
@_backend_option
@click.option("--once", is_flag=True, help="Run one full sync and exit.")
@click.option(
    "--resync-interval", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
    help="Seconds between full syncs (kernel read back, drift repaired).",
)
@click.option(
    "--poll-interval", type=click.FloatRange(min=0.01, max=10), default=0.1, show_default=True,
    help="Seconds between store revision checks.",
)
@scope_options
@pass_state
def agent_command(
    state: CliState,
    host: str,
    config_path: str | None,
    backend: str,
    once: bool,
    resync_interval: float,
    poll_interval: float,
) -> None:
    """Keep this network namespace's filter equal to HOST's security groups."""
    check_host(host)
    _configure_logging()
    reconciler = Reconciler(
        open_store(state.store_url), host, load_config(config_path), get_backend(backend)
    )
    if once:
        result = reconciler.reconcile(full=True)
        logging.getLogger("secfw.agent").info(
            "sync %s", " ".join(f"{k}={v}" for k, v in result.as_fields().items())
        )
        return
    loop = AgentLoop(reconciler, LoopSettings(poll_interval, resync_interval))
    loop.install_signal_handlers()
    loop.run()


def _configure_logging() -> None:
    """Structured (logfmt-style) lines on stderr, which journald captures as is."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("level=%(levelname)s logger=%(name)s msg=%(message)s"))
    root = logging.getLogger("secfw")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


@main.group("lab")
def lab_group() -> None:
    """A compute host's instances as network namespaces (see secfw.lab)."""


@lab_group.command("up")
@_host_option
@scope_options
@pass_state
def lab_up(state: CliState, host: str) -> None:
    """Create (or bring in line) the lab of HOST from the store."""
    _lab_sync(state, host)


@lab_group.command("sync")
@_host_option
@scope_options
@pass_state
def lab_sync(state: CliState, host: str) -> None:
    """Add namespaces of new instances of HOST, remove those of deleted ones."""
    _lab_sync(state, host)


def _lab_sync(state: CliState, host: str) -> None:
    check_host(host)
    lab = lab_for(host)
    lab.up(lab_ports(state.api.snapshot(), host))
    click.echo(f"lab of {host}: host namespace {lab.host_ns}, external {lab.external_ns}, "
               f"{len(lab.taps())} instance(s)")


@lab_group.command("down")
@_host_option
def lab_down(host: str) -> None:
    """Remove everything the lab of HOST created, and nothing else."""
    check_host(host)
    lab_for(host).down()


@main.command("demo")
@click.option("--keep", is_flag=True, help="Leave the lab and the store in place.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to keep the demo's store and lab state (default: a temp dir).")
@_config_option
def demo_command(keep: bool, work_dir: Path | None, config_path: str | None) -> None:
    """The operations guide's example cloud, measured with real packets."""
    config = load_config(config_path)
    work = work_dir or Path(tempfile.mkdtemp(prefix="secfw-demo-"))
    store_url, lab_dir = demo_paths(work)
    api = Api(open_store(store_url))
    if not api.snapshot().instances:
        build_guide_cloud(api)
    lab = lab_for(HOST, lab_dir)
    try:
        lab.up(lab_ports(api.snapshot(), HOST))
        run_agent_once(lab, HOST, store_url, config_path)
        probes = reachability(api, lab, config.allow_same_net_traffic)
    finally:
        if not keep:
            lab.down()  # the table lived in the lab's host namespace: gone with it
    _print_matrix(probes, config.allow_same_net_traffic)
    if keep:
        click.echo(f"kept: store {store_url}, lab of {HOST} (secfw lab down --host {HOST} "
                   f"with SECFW_LAB_DIR={lab_dir})")
    elif work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    if not all(p.agrees for p in probes):
        raise SecfwError("the kernel disagreed with the security groups (see MISMATCH rows)")


def _print_matrix(probes: list[Probe], allow_same_net: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Reachability on {HOST}, measured with real packets "
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
