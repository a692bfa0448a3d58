"""``secfw audit explain|reach|exposure|lint``: the audit commands.

They read the cloud (one store snapshot) and the ``allow_same_net_traffic``
setting (``--config``, ``$SECFW_CONFIG``), never the kernel; every one prints a
table (``-f table``) or JSON (``-f json``) and is scoped by ``--project`` or
``--all-projects`` like the rest of the CLI. Errors follow the CLI's one-line
contract (:mod:`secfw.cli.main`).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from secfw.api import Api
from secfw.audit.explain import FlowQuery, explain
from secfw.audit.exposure import exposure
from secfw.audit.impact import impact, scope_ports
from secfw.audit.lint import capped, lint
from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import answers_rows, reach
from secfw.audit.report import build_report, render_html, render_markdown
from secfw.audit.space import ICMP_OF, PORT_PROTOCOL_NUMBERS
from secfw.audit.verify import ipt_kernel, nft_kernel, nft_rule_points, verify
from secfw.cli.main import CliState, format_option, main, pass_state, scope_options
from secfw.cli.output import emit
from secfw.cloud import CloudState
from secfw.compiler.ir import Family
from secfw.config import load_config
from secfw.errors import ConflictError, NotFoundError, ValidationError
from secfw.imagefiles import ImageFiles
from secfw.model import (
    Ethertype,
    parse_cidr,
    parse_ethertype,
    parse_icmp_field,
    parse_int,
    parse_protocol,
    protocol_number,
)
from secfw.store.base import Snapshot
from secfw.store.memory import MemoryStore

_config_option = click.option(
    "--config", "config_path", metavar="FILE", help="nova.conf-style INI ($SECFW_CONFIG).")
_all_projects_option = click.option(
    "--all-projects", is_flag=True, help="Every project's instances (and groups).")


@main.group("audit")
def audit() -> None:
    """Firewall rule audits: explain a flow, what reaches an instance, exposure, lint,
    the impact of a change."""


def _policy(state: CliState, config_path: str | None) -> CloudPolicy:
    config = load_config(config_path)
    return CloudPolicy(state.api.snapshot(), config.allow_same_net_traffic)


def _views(cp: CloudPolicy, project: str, all_projects: bool) -> list[PortView]:
    views = [v for v in cp.ports.values() if all_projects or v.instance.project == project]
    return sorted(views, key=lambda v: (v.instance.project, v.instance.name, v.port.id))


def instance_port(cp: CloudPolicy, ref: str, project: str, all_projects: bool) -> PortView:
    """The port of ``INSTANCE[:NETWORK]`` (name or id; the instance's first port
    without a network) in ``project`` (any project with ``all_projects``)."""
    found = _instance_ports(cp, ref, project, all_projects)
    network = None
    if not found and ":" in ref:
        ref, network = ref.rsplit(":", 1)
        found = _instance_ports(cp, ref, project, all_projects)
    if not found:
        where = "any project" if all_projects else f"project {project!r}"
        raise NotFoundError(f"No server with a name or ID of {ref!r} exists in {where}")
    if len({v.instance.id for v in found}) > 1:
        raise ConflictError(f"Multiple servers named {ref!r} exist; use the ID")
    if network is not None:
        found = [v for v in found if network in (v.network.name, v.network.id)]
        if not found:
            raise NotFoundError(f"server {ref!r} has no port on network {network!r}")
    return sorted(found, key=lambda v: v.port.id)[0]


def _instance_ports(cp: CloudPolicy, ref: str, project: str,
                    all_projects: bool) -> list[PortView]:
    return [v for v in cp.ports.values()
            if ref in (v.instance.id, v.instance.name)
            and (all_projects or v.instance.project == project)]


def _family(ethertype: Ethertype) -> Family:
    return "ipv4" if ethertype == "IPv4" else "ipv6"


def _endpoint(cp: CloudPolicy, text: str, state: CliState, all_projects: bool,
              ethertype: Ethertype) -> str:
    """An address, or the address of family ``ethertype`` of an instance's port."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        view = instance_port(cp, text, state.project, all_projects)
        found = view.address(_family(ethertype))
        if found is None:
            raise ValidationError(f"server {view.instance.name!r} has no {ethertype} address "
                                  f"on network {view.network.name!r}") from None
        return found
    if address.version != (4 if ethertype == "IPv4" else 6):
        raise ValidationError(f"{text} is not an {ethertype} address (see --ethertype)")
    return str(address)


@audit.command("explain")
@click.option("--to", "to_ref", required=True, metavar="INSTANCE[:NETWORK]|IP")
@click.option("--from", "from_ref", required=True, metavar="IP|INSTANCE[:NETWORK]")
@click.option("--protocol", required=True, help="tcp, udp, icmp or a protocol name/number.")
@click.option("--port", help="Destination port (tcp, udp, sctp, udplite).")
@click.option("--icmp-type", help="ICMP type (default: echo request).")
@click.option("--icmp-code", help="ICMP code (default 0).")
@click.option("--egress", is_flag=True,
              help="The flow goes the other way: from --to's end to --from's end.")
@click.option("--ethertype", default="IPv4", show_default=True, help="IPv4 or IPv6.")
@_config_option
@_all_projects_option
@scope_options
@format_option
@pass_state
def explain_command(state: CliState, fmt: str, to_ref: str, from_ref: str, protocol: str,
                    port: str | None, icmp_type: str | None, icmp_code: str | None,
                    egress: bool, ethertype: str, config_path: str | None,
                    all_projects: bool) -> None:
    """The verdict on one flow (allow/deny) and why: the rules that admit it on
    each end, or same-net, port security off, …; for a deny, the near misses."""
    ether = parse_ethertype(ethertype)
    flow_proto = _protocol(protocol, ether)
    cp = _policy(state, config_path)
    dst = _endpoint(cp, to_ref, state, all_projects, ether)
    src = _endpoint(cp, from_ref, state, all_projects, ether)
    if egress:
        src, dst = dst, src
    flow = FlowQuery(src, dst, flow_proto, *_selector(flow_proto, ether, port, icmp_type,
                                                      icmp_code))
    result = explain(cp, flow)
    if fmt == "json":
        emit(result, None, fmt)
        return
    emit(_explain_table(result), None, fmt)


def _protocol(text: str, ethertype: Ethertype) -> int:
    name = parse_protocol(text, ethertype)
    number = protocol_number(name)
    if number is None:
        raise ValidationError("--protocol must name one protocol")
    return number


def _selector(protocol: int, ethertype: Ethertype, port: str | None, icmp_type: str | None,
              icmp_code: str | None) -> tuple[int | None, int | None, int | None]:
    if protocol in PORT_PROTOCOL_NUMBERS:
        if port is None:
            raise ValidationError("--port is required for a protocol with ports")
        number = parse_int(port, "port")
        if not 0 <= number <= 65535:
            raise ValidationError(f"port {number} is not in the range 0..65535")
        return number, None, None
    if protocol == ICMP_OF[_family(ethertype)]:
        kind = parse_icmp_field(icmp_type, "ICMP type") if icmp_type is not None else (
            8 if ethertype == "IPv4" else 128)
        code = parse_icmp_field(icmp_code, "ICMP code") if icmp_code is not None else 0
        return None, kind, code
    return None, None, None


def _explain_table(result: dict[str, Any]) -> dict[str, Any]:
    flow = result["flow"]
    what = (f"port {flow['port']}" if flow["port"] is not None else
            f"icmp type {flow['icmp_type']} code {flow['icmp_code']}"
            if flow["icmp_type"] is not None else "")
    misses = [f"{m['group']}: {m['rule']} (wrong {m['mismatch']})"
              for side in (result["egress"], result["ingress"]) if side
              for m in side["near_misses"]]
    return {
        "verdict": result["verdict"],
        "flow": f"{flow['src']} -> {flow['dst']} protocol {flow['protocol']} {what}".strip(),
        "source": result["source"]["instance"] or "outside the cloud",
        "destination": result["destination"]["instance"] or "outside the cloud",
        "rules": [f"{r['direction']} {r['group']}: {r['rule']} ({r['rule_id']})"
                  for r in result["rules"]],
        "reasons": result["reasons"],
        "near_misses": misses,
    }


REACH_COLUMNS = (("Instance", "instance"), ("Address", "address"), ("Remote", "remote"),
                 ("Protocol", "protocol"), ("Ports/ICMP", "service"), ("Rules", "why"))


@audit.command("reach")
@click.option("--to", "to_ref", metavar="INSTANCE[:NETWORK]",
              help="What may reach this instance (its ingress).")
@click.option("--from", "from_ref", metavar="INSTANCE[:NETWORK]",
              help="What this instance may reach (its egress).")
@click.option("--protocol", help="Only this protocol.")
@click.option("--port", help="Only this destination port (port protocols).")
@click.option("--from-prefix", help="Only sources in this CIDR (with --to).")
@click.option("--to-prefix", help="Only destinations in this CIDR (with --from).")
@_config_option
@_all_projects_option
@scope_options
@format_option
@pass_state
def reach_command(state: CliState, fmt: str, to_ref: str | None, from_ref: str | None,
                  protocol: str | None, port: str | None, from_prefix: str | None,
                  to_prefix: str | None, config_path: str | None, all_projects: bool) -> None:
    """The exact flow space that reaches an instance (--to) or leaves it (--from),
    as regions (remote prefixes × protocol × ports or ICMP type/code), each with the
    rules that open it. No row: nothing can."""
    if (to_ref is None) == (from_ref is None):
        raise click.UsageError("give exactly one of --to INSTANCE and --from INSTANCE")
    if (from_prefix and from_ref) or (to_prefix and to_ref):
        raise click.UsageError("--from-prefix goes with --to, --to-prefix with --from")
    direction = "ingress" if to_ref else "egress"
    prefix_text = from_prefix or to_prefix
    prefix = None
    if prefix_text is not None:
        version = ipaddress.ip_network(prefix_text.strip(), strict=False).version \
            if _parses(prefix_text) else 4
        prefix = parse_cidr(prefix_text, "IPv4" if version == 4 else "IPv6")
    cp = _policy(state, config_path)
    view = instance_port(cp, to_ref or from_ref or "", state.project, all_projects)
    answers = [a for f in ("ipv4", "ipv6")
               if (a := reach(cp, view, direction, f)) is not None]
    rows = []
    for answer in answers:
        proto = _protocol(protocol, "IPv4" if answer.family == "ipv4" else "IPv6") \
            if protocol else None
        number = parse_int(port, "port") if port is not None else None
        rows += answers_rows([answer], proto, number, prefix)
    if fmt == "json":
        emit(rows, None, fmt)
        return
    emit([_reach_cells(r) for r in rows], REACH_COLUMNS, fmt)


def _parses(text: str) -> bool:
    try:
        ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return False
    return True


def _reach_cells(row: dict[str, Any]) -> dict[str, Any]:
    service = row["ports"] if row["ports"] is not None else (
        f"type {_types(row)} code {row['icmp_code']}" if row["icmp_type"] is not None
        else "")
    return {**row, "remote": row.get("sources", row.get("destinations")), "service": service,
            "why": [_label_text(lab) for lab in row["rules"]]}


def _types(row: dict[str, Any]) -> str:
    """``8``, or ``18-255`` for a row of several whole ICMP types."""
    last = row.get("icmp_type_last")
    return str(row["icmp_type"]) if last in (None, row["icmp_type"]) else \
        f"{row['icmp_type']}-{last}"


def _label_text(label: dict[str, Any]) -> str:
    if "rule_id" in label:
        return f"{label['group']}: {label['rule']}"
    if "network" in label:
        return f"same-net {label['network']}"
    return str(label.get("reason", ""))


EXPOSURE_COLUMNS = (("Instance", "instance"), ("Kind", "kind"), ("Protocol", "protocol"),
                    ("Ports/ICMP", "service"), ("Sources", "sources"),
                    ("Admin ports", "admin_ports"), ("Rules", "why"))


@audit.command("exposure")
@_config_option
@_all_projects_option
@scope_options
@format_option
@pass_state
def exposure_command(state: CliState, fmt: str, config_path: str | None,
                     all_projects: bool) -> None:
    """Per instance: what is open to the internet or very broad prefixes, and to
    other projects (source groups, a flat network's same-net); admin ports first."""
    cp = _policy(state, config_path)
    rows = exposure(cp, _views(cp, state.project, all_projects))
    if fmt == "json":
        emit(rows, None, fmt)
        return
    emit([{**r, "service": _reach_cells({"icmp_type": None, **r})["service"],
           "admin_ports": capped([str(p) for p in r["admin_ports"]]),
           "why": [_label_text(lab) for lab in r["rules"]]} for r in rows],
         EXPOSURE_COLUMNS, fmt)


LINT_COLUMNS = (("Kind", "kind"), ("Group", "group"), ("Rule ID", "rule_id"),
                ("Rule", "rule"), ("Detail", "detail"))


@audit.command("lint")
@_config_option
@_all_projects_option
@scope_options
@format_option
@pass_state
def lint_command(state: CliState, fmt: str, config_path: str | None,
                 all_projects: bool) -> None:
    """Findings about the rules: shadowed, duplicate, unused_group,
    empty_source_group, never_matches, broad_admin_port, self_reference."""
    cp = _policy(state, config_path)
    groups = sorted((g for g in cp.state.groups.values()
                     if all_projects or g.project == state.project),
                    key=lambda g: (g.project, g.name, g.id))
    emit(lint(cp, groups), LINT_COLUMNS, fmt)


IMPACT_COLUMNS = (("Change", "change"), ("Instance", "instance"), ("Direction", "direction"),
                  ("Address", "address"), ("Remote", "remote"), ("Protocol", "protocol"),
                  ("Ports/ICMP", "service"), ("Rules", "why"))
#: Commands that act on the host or only read: never run by ``audit impact``.
NOT_MODEL_WRITES = frozenset({"agent", "audit", "compile", "demo", "lab"})


@audit.command("impact", context_settings={"ignore_unknown_options": True})
@click.option("--from-revision", type=int, help="Compare the store at this revision …")
@click.option("--to-revision", type=int, help="… with this one (default: now).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@_config_option
@_all_projects_option
@scope_options
@format_option
@pass_state
def impact_command(state: CliState, fmt: str, from_revision: int | None,
                   to_revision: int | None, command: tuple[str, ...],
                   config_path: str | None, all_projects: bool) -> None:
    """Flows a change newly allows and newly denies, per instance, as regions:
    ``impact -- WRITE-COMMAND ARGS…`` runs the command on an in-memory copy of
    the store (nothing changes), ``--from-revision R1 [--to-revision R2]``
    compares two revisions of a store that keeps history (etcd). No row: the
    change opens and closes nothing."""
    config = load_config(config_path)
    if command and from_revision is not None:
        raise click.UsageError("give a command or --from-revision, not both")
    if command:
        before_snapshot = state.api.store.load()
        after_snapshot = _run_in_memory(state, command)
    elif from_revision is not None:
        before_snapshot = state.api.store.load_at(from_revision)
        after_snapshot = state.api.store.load() if to_revision is None else \
            state.api.store.load_at(to_revision)
    else:
        raise click.UsageError("give a write command after '--', or --from-revision R1")
    before = CloudPolicy(CloudState.from_snapshot(before_snapshot),
                         config.allow_same_net_traffic)
    after = CloudPolicy(CloudState.from_snapshot(after_snapshot), config.allow_same_net_traffic)
    rows = impact(before, after, scope_ports(before, after, state.project, all_projects))
    if fmt == "json":
        emit(rows, None, fmt)
        return
    emit([_reach_cells(r) for r in rows], IMPACT_COLUMNS, fmt)


def _run_in_memory(state: CliState, command: tuple[str, ...]) -> Snapshot:
    """The store after ``command`` ran on an in-memory copy of it (its output
    discarded; its errors are this command's)."""
    name = next((a for a in command if not a.startswith("-")), "")
    if name in NOT_MODEL_WRITES:
        raise ValidationError(f"audit impact runs commands that change the model, not {name!r}")
    store = MemoryStore(state.api.store.load())
    with tempfile.TemporaryDirectory(prefix="secfw-impact-") as images:
        api = Api(store, image_files=ImageFiles(Path(images)))
        with contextlib.redirect_stdout(io.StringIO()):
            main.main(args=["--project", state.project_arg, *command], prog_name="secfw",
                      standalone_mode=False, obj=api)
    return store.load()


VERIFY_COLUMNS = (("Instance", "instance"), ("Port", "port"), ("Direction", "direction"),
                  ("Packet", "probe"), ("Model", "model"), ("Kernel", "kernel"))
#: ``audit verify``'s exit status when the kernel differs from the model (as diff(1)
#: says "different" apart from its errors, and beyond every error's status).
VERIFY_DIFFERS = 12


@audit.command("verify")
@click.option("--host", required=True, help="The compute host whose kernel is read.")
@click.option("--netns", help="Read the kernel of this network namespace (default: ours).")
@click.option("--backend", type=click.Choice(["nftables", "iptables"]), default="nftables",
              show_default=True)
@click.option("--topology", type=click.Choice(["routed", "bridged"]),
              help="Default: bridged when secfw has bridge-family state, else routed.")
@_config_option
@scope_options
@format_option
@pass_state
def verify_command(state: CliState, fmt: str, host: str, netns: str | None, backend: str,
                   topology: str | None, config_path: str | None) -> None:
    """The live kernel against the model: the ruleset secfw's backend holds on
    HOST is read back and evaluated, at the boundaries of every port's flow space,
    against the model's verdicts. Prints each differing port with a packet that
    shows it; exit status 12 when there is one, 0 when the kernel enforces the model.
    Every port on HOST is checked, whatever its project: the kernel filters them
    all (--project does not narrow it)."""
    config = load_config(config_path)
    cp = CloudPolicy(state.api.snapshot(), config.allow_same_net_traffic)
    # the metadata server's address is the host's own: what is DNATed to it goes to input
    local = () if config.metadata_listen is None else (config.metadata_listen[0],)
    if backend == "nftables":
        judge, addresses, ports, pairs = _nft_kernel(netns, topology, local)
    else:
        judge, addresses, ports, pairs = _ipt_kernel(netns, topology, local)
    differences, probes = verify(cp, host, judge, addresses, ports, config.metadata_listen,
                                 pairs)
    rows = [d.row() for d in differences]
    if fmt == "json":
        emit({"host": host, "probes": probes, "differences": rows}, None, fmt)
    elif rows:
        emit([{**r, "probe": _probe_text(r["packet"])} for r in rows], VERIFY_COLUMNS, fmt)
    else:
        click.echo(f"{host}: the kernel enforces the model ({probes} probes, no difference)")
    if rows:
        raise click.exceptions.Exit(VERIFY_DIFFERS)


def _nft_kernel(netns: str | None, topology: str | None, local: tuple[str, ...]
                ) -> tuple[Any, Iterable[str], Iterable[int], Iterable[tuple[str, int, int]]]:
    from secfw.backends.nftables.executor import NftablesExecutor

    listing = NftablesExecutor(netns).read_json() or {"nftables": []}
    return (*nft_kernel(listing, topology, local), nft_rule_points(listing))


def _ipt_kernel(netns: str | None, topology: str | None, local: tuple[str, ...]
                ) -> tuple[Any, Iterable[str], Iterable[int], Iterable[tuple[str, int, int]]]:
    from secfw.audit.iptkernel import read_iptables, rule_points

    saves = read_iptables(netns)
    return (*ipt_kernel(saves, topology or "routed", local), rule_points(saves))


def _probe_text(packet: dict[str, Any]) -> str:
    what = f"dport {packet['dport']}" if packet["dport"] is not None else (
        f"type {packet['icmp_type']} code {packet['icmp_code']}"
        if packet["icmp_type"] is not None else "")
    return f"{packet['src']} -> {packet['dst']} proto {packet['protocol']} {what}".strip()


@audit.command("report")
@click.option("--html", "html_path", metavar="FILE", help="Write the HTML page here.")
@click.option("--markdown", "markdown_path", metavar="FILE", help="Write Markdown here.")
@_config_option
@_all_projects_option
@scope_options
@pass_state
def report_command(state: CliState, html_path: str | None, markdown_path: str | None,
                   config_path: str | None, all_projects: bool) -> None:
    """One page for an auditor: the instance x instance reachability matrix per
    service class, the exposure table and the lint findings — a self-contained
    HTML file (--html) and/or Markdown (--markdown; printed when neither is given)."""
    cp = _policy(state, config_path)
    groups = sorted((g for g in cp.state.groups.values()
                     if all_projects or g.project == state.project),
                    key=lambda g: (g.project, g.name, g.id))
    scope = "all projects" if all_projects else f"project {state.project}"
    report = build_report(cp, _views(cp, state.project, all_projects), groups,
                          f"secfw audit report: {scope}")
    outputs = [(html_path, render_html), (markdown_path, render_markdown)]
    for path, render in outputs:
        if path is not None:
            _write(path, render(report))
    if html_path is None and markdown_path is None:
        click.echo(render_markdown(report), nl=False)


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"cannot write {path}: {exc.strerror}") from exc
