"""The ``secfw`` command line: nova-style commands over :class:`secfw.api.Api`.

The CLI is a thin layer: each command parses its arguments, calls one API
method (which validates and stores everything, or nothing), and prints the
result with :func:`secfw.cli.output.emit`.

Output contract
    Read commands print a table (``-f table``, the default) or JSON
    (``-f json``: an array of snake_case objects for lists, one object for
    ``show``). Commands that create or change an object print it the way its
    list prints it (the guide's ``secgroup-create`` and ``secgroup-add-rule``
    tables) and accept ``-f`` too. Deletions and membership changes
    (``delete``, ``secgroup-delete*``, ``add-secgroup``, ``remove-secgroup``)
    print nothing.

Error contract
    Every error, usage errors included, is exactly one line on stderr,
    ``secfw: error: <message>``, and a non-zero exit status: 2 for usage
    errors, the :class:`~secfw.errors.SecfwError` subclass's ``exit_code``
    otherwise, 1 for an unexpected exception (``SECFW_DEBUG=1`` also prints
    its traceback). A failed command changes nothing in the store.

Extending (how other modules add commands)
    ``main`` is the click group. ``@output_command("name")`` registers a
    command on it that prints (the function gets ``state, fmt, ...``);
    ``@silent_command("name")`` one that does not (``state, ...``); or build a
    command with click and ``main.add_command(cmd)``, using the pieces:
    ``@pass_state`` gives the :class:`CliState` (``state.api`` opens the store
    lazily, ``state.project`` is validated, ``state.store_url``);
    ``@format_option`` adds ``-f/--format`` and passes the resolved ``fmt``;
    ``@scope_options`` accepts ``--project``/``--store`` after the command
    name. Print with ``emit(rows_or_row, columns, fmt)`` (see
    :mod:`secfw.cli.output`). Report a failure by raising any
    :class:`~secfw.errors.SecfwError` (or ``click.UsageError``): the group
    turns every exception into the one-line error above.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict
from typing import Any, TypeVar

import click

from secfw.api import Api
from secfw.cli.output import FORMATS, Columns, cell_text, emit
from secfw.errors import SecfwError, ValidationError
from secfw.model import (
    Instance,
    Network,
    Rule,
    SecurityGroup,
    check_name,
)
from secfw.store.base import open_store, store_url

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_PROJECT = "admin"
#: The rows of a page asked for with ``--marker`` and no ``--limit``: the rest.
PAGE_ALL = 2**31 - 1
ERROR_PREFIX = "secfw: error: "

# --------------------------------------------------------------------------- state


class CliState:
    """What every command needs: the project, the store URL, the API, the format.

    The store is opened on first use of :attr:`api` (``flavor-list`` and
    ``--help`` never touch it) and closed when the command ends.
    """

    def __init__(self, project: str, store: str | None, fmt: str = "table",
                 api: Api | None = None) -> None:
        self.project_arg = project
        self.store_url = store_url(store) if api is None else api.store.url
        self.fmt = fmt
        self._api: Api | None = api

    @property
    def project(self) -> str:
        """The validated project name (``--project``, ``$SECFW_PROJECT``, ``admin``)."""
        return check_name(self.project_arg, "project")

    @property
    def api(self) -> Api:
        """The API over the store at :attr:`store_url`, opened on first use."""
        if self._api is None:
            self._api = Api(open_store(self.store_url))
        return self._api

    def close(self) -> None:
        """Close the store if it was opened."""
        if self._api is not None:
            self._api.store.close()
            self._api = None


pass_state = click.make_pass_decorator(CliState)


def _state(ctx: click.Context) -> CliState:
    state = ctx.find_object(CliState)
    if state is None:
        raise RuntimeError("secfw commands must run under the secfw group (secfw.cli.main.main)")
    return state


# --------------------------------------------------------------------------- errors


class CliError(click.ClickException):
    """An error already reduced to the one line the user sees."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(one_line(message))
        # click declares exit_code a class attribute; each CliError carries its own.
        self.exit_code = exit_code  # type: ignore[misc]

    def show(self, file: Any = None) -> None:
        click.echo(ERROR_PREFIX + self.message, file=file, err=True)


def one_line(text: str) -> str:
    """``text`` on one line: line breaks become spaces, control characters escapes."""
    joined = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return cell_text(joined)


def _debug() -> bool:
    return os.environ.get("SECFW_DEBUG", "") not in ("", "0")


def _print_traceback() -> None:
    """The current exception's traceback on stderr (``SECFW_DEBUG=1`` only:
    traceback and what it pulls in are not loaded by a command that succeeds)."""
    import traceback

    traceback.print_exc()


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn every exception raised inside into a :class:`CliError` (see module doc)."""
    try:
        yield
    except (click.exceptions.Exit, click.Abort, CliError, BrokenPipeError):
        raise
    except click.exceptions.NoArgsIsHelpError as exc:  # bare ``secfw``: help, not an error
        click.echo(exc.ctx.get_help())
        raise click.exceptions.Exit(0) from exc
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        raise CliError(exc.format_message() + hint, exc.exit_code) from exc
    except click.ClickException as exc:
        raise CliError(exc.format_message(), exc.exit_code) from exc
    except SecfwError as exc:
        if _debug():
            _print_traceback()
        raise CliError(str(exc), exc.exit_code) from exc
    except KeyboardInterrupt as exc:
        raise CliError("interrupted", 130) from exc
    except Exception as exc:
        if _debug():
            _print_traceback()
        raise CliError(f"internal error: {type(exc).__name__}: {exc}", 1) from exc


class SecfwCommand(click.Command):
    """A command whose negative-integer arguments are arguments, not options.

    The guide types ``secgroup-add-rule open icmp -1 255 0.0.0.0/0``: click
    would read ``-1`` as an unknown short option. Unknown options are let
    through to the argument list (``ignore_unknown_options``) only after
    :meth:`parse_args` has checked that each of them is a negative integer, so
    ``--bogus`` is still a usage error.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = dict(kwargs.pop("context_settings", None) or {})
        settings["ignore_unknown_options"] = True
        kwargs["context_settings"] = settings
        super().__init__(*args, **kwargs)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _reject_unknown_options(self.get_params(ctx), args, ctx)
        return super().parse_args(ctx, args)


_NEGATIVE_INT = re.compile(r"-\d+")


def _reject_unknown_options(
    params: Iterable[click.Parameter], args: Sequence[str], ctx: click.Context
) -> None:
    """Raise NoSuchOption for the first option-like token (not a value, not ``-N``) unknown."""
    takes_value: dict[str, bool] = {}
    for param in params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                takes_value[name] = not (param.is_flag or param.count)
    tokens = iter(args)
    for token in tokens:
        if token == "--":
            return
        if len(token) < 2 or not token.startswith("-") or _NEGATIVE_INT.fullmatch(token):
            continue
        name = token.split("=", 1)[0] if token.startswith("--") else token[:2]
        if name not in takes_value:
            raise click.NoSuchOption(name, ctx=ctx)
        if takes_value[name] and token == name:
            next(tokens, None)  # the option's value, whatever it looks like


#: The module that registers each command not defined in this one. A command line
#: imports only its own command's module: ``secfw secgroup-add-rule`` must not pay
#: for pyroute2, etcd's client, the agent, the audit and the HTTP servers, which
#: took 1 s of CPU of every command's start-up when everything was imported
#: eagerly. tests/test_cli_lazy.py checks that this table names every command.
COMMAND_MODULES: dict[str, str] = {
    **dict.fromkeys(
        ("boot", "flavor-access-add", "flavor-access-list", "flavor-access-remove",
         "flavor-create", "flavor-delete", "flavor-key", "flavor-list", "flavor-show",
         "host-add", "host-delete", "host-list", "host-show", "image-create",
         "image-delete", "image-list", "image-show", "image-update", "keypair-add",
         "keypair-delete", "keypair-list", "keypair-show", "meta", "show"),
        "secfw.cli.compute"),
    **dict.fromkeys(
        ("add-floating-ip", "floating-ip-create", "floating-ip-delete", "floating-ip-list",
         "floating-ip-pool-create", "floating-ip-pool-delete", "floating-ip-pool-list",
         "remove-floating-ip"),
        "secfw.cli.floating"),
    **dict.fromkeys(
        ("snapshot-create", "snapshot-delete", "snapshot-list", "snapshot-show",
         "volume-attach", "volume-create", "volume-delete", "volume-detach", "volume-list",
         "volume-show"),
        "secfw.cli.volume"),
    **dict.fromkeys(("agent", "compile", "demo", "lab", "metadata"), "secfw.cli.host"),
    "store": "secfw.cli.store",
    "audit": "secfw.audit.cli",
    "api": "secfw.neutron_api.serve",
}


def import_all_commands() -> None:
    """Register every command on :data:`main` (help listings, tests)."""
    for module in sorted(set(COMMAND_MODULES.values())):
        importlib.import_module(module)


class SecfwGroup(click.Group):
    """A click group whose errors are one line (see :func:`one_line_errors`).

    Parsing happens in :meth:`make_context` (this group's options) and in
    :meth:`invoke` (the subcommand's arguments, then its body), so wrapping
    both covers every error a command line can produce.
    """

    command_class = SecfwCommand

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, importing the module that registers it on first use."""
        module = COMMAND_MODULES.get(cmd_name)
        if module is not None and cmd_name not in self.commands:
            importlib.import_module(module)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command (``--help`` lists them all, so it imports every module)."""
        import_all_commands()
        return super().list_commands(ctx)

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with one_line_errors():
            return super().invoke(ctx)


# --------------------------------------------------------------------------- options

FORMAT_CHOICE = click.Choice(FORMATS, case_sensitive=False)


def _resolve_format(ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    return value.lower() if value else _state(ctx).fmt


def format_option(func: F) -> F:
    """Add ``-f/--format table|json``; the command receives the resolved ``fmt``.

    Without the option the global ``secfw -f`` applies (default ``table``).
    """
    return click.option(
        "-f", "--format", "fmt", type=FORMAT_CHOICE, default=None, callback=_resolve_format,
        help="Output format (default: the global -f, else table).",
    )(func)


def _set_project(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        _state(ctx).project_arg = value


def _set_store(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        _state(ctx).store_url = store_url(value)


def scope_options(func: F) -> F:
    """Accept ``--project`` and ``--store`` after the subcommand, overriding the global ones."""
    func = click.option("--project", expose_value=False, callback=_set_project,
                        help="Project to act in (overrides the global --project).")(func)
    return click.option("--store", expose_value=False, callback=_set_store,
                        help="Store URL (overrides the global --store).")(func)


def paging_options(func: F) -> F:
    """Add ``--limit N`` and ``--marker ID`` (nova's and neutron's paging;
    :mod:`secfw.paging`); the command receives ``limit`` and ``marker``."""
    func = click.option("--marker", metavar="ID",
                        help="Start after the row of this ID (the previous page's last).")(func)
    return click.option("--limit", type=int, metavar="N",
                        help="At most N rows; the next page's marker goes to stderr.")(func)


def paged(limit: int | None, marker: str | None) -> bool:
    """Whether a listing was asked for a page (either option given)."""
    return limit is not None or marker is not None


def page_size(limit: int | None) -> int:
    """``--limit``, or every remaining row when only ``--marker`` was given."""
    return PAGE_ALL if limit is None else limit


def emit_page(rows: Sequence[Mapping[str, Any]], columns: Columns, fmt: str,
              next_marker: str | None) -> None:
    """Print a page like the whole listing; when another page follows, say so
    on stderr (stdout keeps the listing's exact shape, table or JSON array)."""
    emit(rows, columns, fmt)
    if next_marker is not None:
        click.echo(f"secfw: next page: --marker {next_marker}", err=True)


def output_command(name: str) -> Callable[[F], click.Command]:
    """Register a command of ``main`` that prints: scope options, ``-f``, the state.

    The function receives ``(state: CliState, fmt: str, *its own parameters)``.
    """

    def decorate(func: F) -> click.Command:
        return main.command(name)(scope_options(format_option(pass_state(func))))

    return decorate


def silent_command(name: str) -> Callable[[F], click.Command]:
    """Register a command of ``main`` that prints nothing: scope options, the state.

    The function receives ``(state: CliState, *its own parameters)``.
    """

    def decorate(func: F) -> click.Command:
        return main.command(name)(scope_options(pass_state(func)))

    return decorate


# --------------------------------------------------------------------------- the group


@click.group(name="secfw", cls=SecfwGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--project", envvar="SECFW_PROJECT", default=DEFAULT_PROJECT, show_default=True,
              help="Project to act in [env SECFW_PROJECT].")
@click.option("--store", envvar="SECFW_STORE", default=None,
              help="Store URL, e.g. sqlite:////var/lib/secfw/secfw.db [env SECFW_STORE].")
@click.option("-f", "--format", "fmt", type=FORMAT_CHOICE, default="table", show_default=True,
              help="Output format of every command that prints.")
@click.version_option(package_name="secfw")
@click.pass_context
def main(ctx: click.Context, project: str, store: str | None, fmt: str) -> None:
    """secfw: OpenStack-style security groups compiled into nftables rules.

    Global options go before the command; --project, --store and -f are also
    accepted after it. Errors are one line on stderr with a non-zero status.
    """
    # ``secfw audit impact`` runs a command over an in-memory copy of the store:
    # it passes that store's Api as the context object.
    preset = ctx.obj if isinstance(ctx.obj, Api) else None
    state = CliState(project, store, fmt.lower(), api=preset)
    ctx.obj = state
    ctx.call_on_close(state.close)


#: Set by a command whose process may end without the interpreter's teardown
#: once it succeeded (:func:`request_fast_exit`); read by :func:`run` only.
_FAST_EXIT = False


def request_fast_exit() -> None:
    """Let :func:`run` end this process with ``os._exit`` when the command
    succeeds. For a one-shot command whose work is done and written out (the
    agent's ``--once``: its ruleset is in the kernel, its record on disk):
    the interpreter's teardown frees every object one by one — ~0.1-0.2 s of
    CPU after a 1,000-port sync (the 10^5 records, rules and set elements it
    built) — for a process about to end. Only :func:`run`, the console script,
    acts on it: a command run in-process (tests' CliRunner, ``main(...,
    standalone_mode=False)``) returns as usual."""
    global _FAST_EXIT
    _FAST_EXIT = True


def run() -> None:
    """The ``secfw`` console script: :func:`main` in click's standalone mode,
    which ends by raising SystemExit. A successful command that asked for it
    (:func:`request_fast_exit`) then ends the process at once: stdout and
    stderr flushed (the logs are lines on stderr), exit status 0, without
    ``atexit`` handlers or object teardown (os._exit(2)). Anything else —
    a failure, another status — exits as before."""
    try:
        main()
    except SystemExit as exc:
        if _FAST_EXIT and exc.code in (None, 0):
            _flush_standard_streams()
            os._exit(0)
        raise


def _flush_standard_streams() -> None:
    """Flush stdout and stderr, ignoring a closed or broken stream (the exit
    status stays the command's: its work is done)."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()


# --------------------------------------------------------------------------- rows

GROUP_COLUMNS: Columns = (("Name", "name"), ("Description", "description"))
RULE_COLUMNS: Columns = (
    ("IP Protocol", "ip_protocol"),
    ("From Port", "from_port"),
    ("To Port", "to_port"),
    ("IP Range", "ip_range"),
    ("Source Group", "source_group"),
)
NETWORK_COLUMNS: Columns = (
    ("ID", "id"),
    ("Name", "name"),
    ("CIDR", "cidr"),
    ("IPv6 CIDR", "cidr6"),
    ("VLAN", "vlan"),
)
NEUTRON_RULE_COLUMNS: Columns = (
    ("ID", "id"),
    ("Direction", "direction"),
    ("Ethertype", "ethertype"),
    ("IP Protocol", "protocol"),
    ("Port Range", "port_range"),
    ("Remote IP Prefix", "remote_ip_prefix"),
    ("Remote Security Group", "remote_group"),
    ("Security Group", "security_group"),
)
SERVER_COLUMNS: Columns = (
    ("ID", "id"),
    ("Name", "name"),
    ("Status", "status"),
    ("Host", "host"),
    ("Networks", "networks"),
)
PORT_COLUMNS: Columns = (
    ("ID", "id"),
    ("Instance", "instance"),
    ("Host", "host"),
    ("Network", "network"),
    ("Tap", "tap"),
    ("MAC", "mac"),
    ("IP", "ip"),
    ("IPv6", "ip6"),
    ("Security Groups", "security_groups"),
)
PROJECT_COLUMN = ("Project", "project")


def with_project(columns: Columns, wanted: bool) -> Columns:
    """``columns`` plus a Project column when the listing may span projects."""
    return (*columns, PROJECT_COLUMN) if wanted else columns


def group_row(group: SecurityGroup) -> dict[str, Any]:
    return {"id": group.id, "name": group.name, "description": group.description,
            "project": group.project}


def nova_ports(rule: Rule) -> tuple[int | None, int | None]:
    """The (From Port, To Port) nova shows: ICMP "any" is -1, ``icmp -1 255`` stays 255."""
    if rule.protocol is None:
        return None, None
    if rule.protocol == "icmp":
        low = -1 if rule.port_min is None else rule.port_min
        if rule.port_min is None and rule.display_max is not None:
            return low, rule.display_max
        return low, -1 if rule.port_max is None else rule.port_max
    return rule.port_min, rule.port_max


def rule_row(rule: Rule, group_names: Mapping[str, str]) -> dict[str, Any]:
    """A rule as nova lists it; a source-group rule shows the group's name, no IP range."""
    low, high = nova_ports(rule)
    source = rule.remote_group_id
    any_source = "0.0.0.0/0" if rule.ethertype == "IPv4" else "::/0"
    return {
        "id": rule.id,
        "ip_protocol": rule.protocol,
        "from_port": low,
        "to_port": high,
        "ip_range": None if source else (rule.remote_cidr or any_source),
        "source_group": group_names.get(source, source) if source else None,
        "direction": rule.direction,
        "ethertype": rule.ethertype,
    }


def network_row(network: Network) -> dict[str, Any]:
    return {"id": network.id, "name": network.name, "cidr": network.cidr,
            "gateway": network.gateway, "cidr6": network.cidr6, "gateway6": network.gateway6,
            "vlan": network.vlan, "project": network.project}


def _group_names(api: Api, rule: Rule) -> dict[str, str]:
    """The names of the groups ``rule`` names (its own and its source), read by key:
    printing one rule must not load the cloud (the whole store: seconds at 50k ports)."""
    return api.group_names(g for g in (rule.group_id, rule.remote_group_id) if g)


def _split_groups(values: Iterable[str]) -> list[str]:
    """``--security-groups A,B`` (repeatable) → [A, B], verbatim; an empty item is an error.

    Items are not stripped: a group name may begin or end with a space.
    """
    names = [name for value in values for name in value.split(",")]
    if any(not name for name in names):
        raise ValidationError("--security-groups: empty security group name")
    return names


# --------------------------------------------------------------------------- security groups


@output_command("secgroup-list")
@click.option("--all-projects", is_flag=True, help="List the groups of every project.")
@paging_options
def secgroup_list(state: CliState, fmt: str, all_projects: bool, limit: int | None,
                  marker: str | None) -> None:
    """List security groups: Name | Description (+ Project with --all-projects)."""
    columns = with_project(GROUP_COLUMNS, all_projects)
    # Unpaged, every row is one page: Api.secgroup_list's rows and order, read
    # from the ordered index by key instead of from the whole store.
    page = state.api.secgroup_page(state.project, all_projects, page_size(limit), marker)
    emit_page([group_row(g) for g in page.rows], columns, fmt, page.next_marker)


@output_command("secgroup-create")
@click.argument("name")
@click.argument("description")
def secgroup_create(state: CliState, fmt: str, name: str, description: str) -> None:
    """Create a security group; print it."""
    group = state.api.secgroup_create(state.project, name, description)
    emit(group_row(group), GROUP_COLUMNS, fmt)


@output_command("secgroup-update")
@click.argument("group")
@click.argument("name")
@click.argument("description")
def secgroup_update(state: CliState, fmt: str, group: str, name: str, description: str) -> None:
    """Rename GROUP to NAME and set its DESCRIPTION (the default group keeps its name)."""
    updated = state.api.secgroup_update(state.project, group, name, description)
    emit(group_row(updated), GROUP_COLUMNS, fmt)


@silent_command("secgroup-delete")
@click.argument("group")
def secgroup_delete(state: CliState, group: str) -> None:
    """Delete a security group and its rules (not default, not one in use)."""
    state.api.secgroup_delete(state.project, group)


@output_command("secgroup-list-rules")
@click.argument("group")
@paging_options
def secgroup_list_rules(state: CliState, fmt: str, group: str, limit: int | None,
                        marker: str | None) -> None:
    """List a group's rules: IP Protocol | From Port | To Port | IP Range | Source Group."""
    # Unpaged, every rule is one page (Api.secgroup_list_rules' rows and order).
    page, names = state.api.rule_page(state.project, group, page_size(limit), marker)
    emit_page([rule_row(r, names) for r in page.rows], RULE_COLUMNS, fmt, page.next_marker)


def _emit_rule(state: CliState, rule: Rule, fmt: str) -> None:
    names = _group_names(state.api, rule) if rule.remote_group_id else {}
    emit(rule_row(rule, names), RULE_COLUMNS, fmt)


@output_command("secgroup-add-rule")
@click.argument("group")
@click.argument("proto")
@click.argument("from_port", metavar="FROM")
@click.argument("to_port", metavar="TO")
@click.argument("cidr")
def secgroup_add_rule(
    state: CliState, fmt: str, group: str, proto: str, from_port: str, to_port: str, cidr: str
) -> None:
    """Allow PROTO (tcp, udp, icmp) to local ports FROM..TO from CIDR; print the rule.

    For icmp, FROM is the type and TO the code; -1 means any.
    """
    rule = state.api.secgroup_add_rule(state.project, group, proto, from_port, to_port, cidr)
    _emit_rule(state, rule, fmt)


@silent_command("secgroup-delete-rule")
@click.argument("group")
@click.argument("proto")
@click.argument("from_port", metavar="FROM")
@click.argument("to_port", metavar="TO")
@click.argument("cidr")
def secgroup_delete_rule(
    state: CliState, group: str, proto: str, from_port: str, to_port: str, cidr: str
) -> None:
    """Delete the rule added with the same arguments."""
    state.api.secgroup_delete_rule(state.project, group, proto, from_port, to_port, cidr)


@output_command("secgroup-add-group-rule")
@click.argument("group")
@click.argument("source_group")
@click.argument("proto", required=False)
@click.argument("from_port", metavar="[FROM]", required=False)
@click.argument("to_port", metavar="[TO]", required=False)
def secgroup_add_group_rule(
    state: CliState,
    fmt: str,
    group: str,
    source_group: str,
    proto: str | None,
    from_port: str | None,
    to_port: str | None,
) -> None:
    """Allow traffic from every instance using SOURCE_GROUP (optionally PROTO FROM TO only)."""
    rule = state.api.secgroup_add_group_rule(
        state.project, group, source_group, proto, from_port, to_port
    )
    _emit_rule(state, rule, fmt)


@silent_command("secgroup-delete-group-rule")
@click.argument("group")
@click.argument("source_group")
@click.argument("proto", required=False)
@click.argument("from_port", metavar="[FROM]", required=False)
@click.argument("to_port", metavar="[TO]", required=False)
def secgroup_delete_group_rule(
    state: CliState,
    group: str,
    source_group: str,
    proto: str | None,
    from_port: str | None,
    to_port: str | None,
) -> None:
    """Delete the source-group rule added with the same arguments."""
    state.api.secgroup_delete_group_rule(
        state.project, group, source_group, proto, from_port, to_port
    )


# --------------------------------------------------------------------------- networks


@output_command("net-create")
@click.argument("name")
@click.argument("cidr")
@click.option("--vlan", metavar="ID", help="VLAN id 1-4094: a network of this project only "
              "(default: flat, shared by every project).")
@click.option("--ipv6-cidr", "cidr6", metavar="CIDR", help="An IPv6 subnet beside the IPv4 one.")
def net_create(
    state: CliState, fmt: str, name: str, cidr: str, vlan: str | None, cidr6: str | None
) -> None:
    """Create a network (IPv4, optionally also IPv6); print it."""
    network = state.api.net_create(state.project, name, cidr, vlan, cidr6)
    emit(network_row(network), with_project(NETWORK_COLUMNS, network.vlan is not None), fmt)


@output_command("net-list")
@click.option("--all-projects", is_flag=True, help="Include other projects' VLAN networks.")
@paging_options
def net_list(state: CliState, fmt: str, all_projects: bool, limit: int | None,
             marker: str | None) -> None:
    """List the networks usable by the project: ID | Name | CIDR | VLAN."""
    columns = with_project(NETWORK_COLUMNS, all_projects)
    # Unpaged, every network is one page (Api.net_list's rows and order).
    page = state.api.network_page(state.project, all_projects, page_size(limit), marker)
    emit_page([network_row(n) for n in page.rows], columns, fmt, page.next_marker)


# --------------------------------------------------------------------------- servers


@silent_command("delete")
@click.argument("server")
def delete(state: CliState, server: str) -> None:
    """Delete an instance and its ports."""
    state.api.delete(state.project, server)


@output_command("list")
@click.option("--host", help="Only instances on this host (of every project).")
@click.option("--all-projects", is_flag=True, help="Instances of every project.")
@paging_options
def list_servers(state: CliState, fmt: str, host: str | None, all_projects: bool,
                 limit: int | None, marker: str | None) -> None:
    """List instances: ID | Name | Status | Host | Networks (+ Project across projects)."""
    columns = with_project(SERVER_COLUMNS, all_projects or host is not None)
    # Unpaged, every instance is one page (Api.list_instances' rows and order, each
    # with its fixed addresses), read by key from the ordered index.
    page = state.api.server_page(state.project, host, all_projects, page_size(limit), marker)
    emit_page([server_row(i, n) for i, n in page.rows], columns, fmt, page.next_marker)


def server_row(instance: Instance, networks: dict[str, list[str]]) -> dict[str, Any]:
    return {"id": instance.id, "name": instance.name, "status": instance.state,
            "host": instance.host, "networks": networks, "project": instance.project}


@output_command("list-secgroup")
@click.argument("server")
def list_secgroup(state: CliState, fmt: str, server: str) -> None:
    """List an instance's security groups: Name | Description."""
    groups = state.api.list_secgroup(state.project, server)
    emit([group_row(g) for g in groups], GROUP_COLUMNS, fmt)


@silent_command("add-secgroup")
@click.argument("server")
@click.argument("group")
def add_secgroup(state: CliState, server: str, group: str) -> None:
    """Add a security group to a (running) instance."""
    state.api.add_secgroup(state.project, server, group)


@silent_command("remove-secgroup")
@click.argument("server")
@click.argument("group")
def remove_secgroup(state: CliState, server: str, group: str) -> None:
    """Remove a security group from a (running) instance."""
    state.api.remove_secgroup(state.project, server, group)


@output_command("port-list")
@click.option("--host", help="Every port on this host, whatever its project.")
@paging_options
def port_list(state: CliState, fmt: str, host: str | None, limit: int | None,
              marker: str | None) -> None:
    """List ports: id, instance, host, network, tap, mac, ip, security groups."""
    if paged(limit, marker):
        page = state.api.port_page(state.project, host, page_size(limit), marker)
        emit_page([asdict(v) for v in page.rows], PORT_COLUMNS, fmt, page.next_marker)
        return
    views = state.api.port_list(state.project, host)
    emit([asdict(v) for v in views], PORT_COLUMNS, fmt)


@output_command("port-update")
@click.argument("port")
@click.option("--allowed-address-pair", "pairs", multiple=True, metavar="IP[,MAC]",
              help="An extra address (or CIDR) the port may send from; repeatable; replaces "
                   "the port's list.")
@click.option("--no-allowed-address-pairs", "clear_pairs", is_flag=True,
              help="Remove every allowed address pair.")
@click.option("--port-security/--no-port-security", "port_security", default=None,
              help="Turn all filtering and anti-spoofing of the port on or off.")
def port_update(
    state: CliState, fmt: str, port: str, pairs: tuple[str, ...], clear_pairs: bool,
    port_security: bool | None,
) -> None:
    """Change a port (by id or tap name): allowed address pairs, port security."""
    if pairs and clear_pairs:
        raise ValidationError("give --allowed-address-pair or --no-allowed-address-pairs, "
                              "not both")
    new_pairs = () if clear_pairs else (pairs or None)
    updated = state.api.port_update(state.project, port, new_pairs, port_security)
    emit(asdict(state.api.port_view(updated.id)), None, fmt)


# --------------------------------------------------------------------------- openstack form


def neutron_rule_row(rule: Rule, group_names: Mapping[str, str]) -> dict[str, Any]:
    """A rule as the openstack client lists it."""
    if rule.protocol in ("icmp", "icmpv6") and rule.port_min is not None:
        span = f"type {rule.port_min}" + (f" code {rule.port_max}"
                                           if rule.port_max is not None else "")
    elif rule.port_min is not None:
        span = f"{rule.port_min}:{rule.port_max}"
    else:
        span = ""
    remote_group = rule.remote_group_id
    return {
        "id": rule.id,
        "direction": rule.direction,
        "ethertype": rule.ethertype,
        "protocol": rule.protocol or "any",
        "port_range": span,
        "port_range_min": rule.port_min,
        "port_range_max": rule.port_max,
        "remote_ip_prefix": rule.remote_cidr,
        "remote_group": group_names.get(remote_group, remote_group) if remote_group else None,
        "remote_group_id": remote_group,
        "security_group": group_names.get(rule.group_id, rule.group_id),
        "security_group_id": rule.group_id,
    }


@main.group("security", cls=SecfwGroup)
def security() -> None:
    """openstack-client style commands (security group rule …)."""


@security.group("group", cls=SecfwGroup)
def security_group() -> None:
    """Security groups."""


@security_group.group("rule", cls=SecfwGroup)
def security_group_rule() -> None:
    """Security group rules: direction, ethertype, any protocol, ports or ICMP, remote."""


@security_group_rule.command("create")
@click.argument("group")
@click.option("--ingress", "direction", flag_value="ingress", default=True,
              help="Rule for incoming traffic (default).")
@click.option("--egress", "direction", flag_value="egress", help="Rule for outgoing traffic.")
@click.option("--ethertype", default="IPv4", show_default=True, help="IPv4 or IPv6.")
@click.option("--protocol", help="Name (tcp, udp, icmp, …), number 0-255, or any.")
@click.option("--dst-port", metavar="N[:M]", help="Destination port or range (tcp, udp, sctp, "
              "udplite).")
@click.option("--icmp-type", metavar="T", help="ICMP type 0-255 (icmp/icmpv6 only).")
@click.option("--icmp-code", metavar="C", help="ICMP code 0-255 (needs --icmp-type).")
@click.option("--remote-ip", metavar="CIDR", help="Remote address range (source for ingress, "
              "destination for egress).")
@click.option("--remote-group", metavar="GROUP", help="Remote security group of the project.")
@scope_options
@format_option
@pass_state
def rule_create(
    state: CliState, fmt: str, group: str, direction: str, ethertype: str,
    protocol: str | None, dst_port: str | None, icmp_type: str | None, icmp_code: str | None,
    remote_ip: str | None, remote_group: str | None,
) -> None:
    """Create a rule in GROUP; print it."""
    rule = state.api.rule_create(state.project, group, direction, ethertype, protocol, dst_port,
                                 icmp_type, icmp_code, remote_ip, remote_group)
    emit(neutron_rule_row(rule, _group_names(state.api, rule)), NEUTRON_RULE_COLUMNS, fmt)


@security_group_rule.command("list")
@click.argument("group", required=False)
@scope_options
@format_option
@pass_state
@paging_options
def rule_list(state: CliState, fmt: str, group: str | None, limit: int | None,
              marker: str | None) -> None:
    """List the rules of GROUP, or of every group of the project."""
    # Unpaged, every rule is one page (Api.rule_list's rows and order).
    page, names = state.api.rule_page(state.project, group, page_size(limit), marker)
    rows = [neutron_rule_row(r, names) for r in page.rows]
    emit_page(rows, NEUTRON_RULE_COLUMNS, fmt, page.next_marker)


@security_group_rule.command("delete")
@click.argument("rule_id", metavar="ID")
@scope_options
@pass_state
def rule_delete(state: CliState, rule_id: str) -> None:
    """Delete a rule by ID."""
    state.api.rule_delete(state.project, rule_id)


# --------------------------------------------------------------------------- quotas


@output_command("quota-show")
def quota_show(state: CliState, fmt: str) -> None:
    """Show the project's quotas (-1 = unlimited)."""
    emit(state.api.quota_show(state.project), None, fmt)


@output_command("quota-update")
@click.option("--security-groups", metavar="N", help="Groups per project (-1 = unlimited).")
@click.option("--security-group-rules", metavar="N", help="Rules per group (-1 = unlimited).")
@click.option("--instances", metavar="N", help="Instances per project.")
@click.option("--cores", metavar="N", help="vCPUs of the project's instances.")
@click.option("--ram", metavar="MB", help="Memory of the project's instances.")
@click.option("--volumes", metavar="N", help="Volumes per project.")
@click.option("--gigabytes", metavar="GB", help="Size of the project's volumes and snapshots.")
@click.option("--snapshots", metavar="N", help="Volume snapshots per project.")
@click.option("--floating-ips", metavar="N", help="Floating IPs per project (-1 = unlimited).")
def quota_update(
    state: CliState, fmt: str, security_groups: str | None, security_group_rules: str | None,
    instances: str | None, cores: str | None, ram: str | None, volumes: str | None,
    gigabytes: str | None, snapshots: str | None, floating_ips: str | None,
) -> None:
    """Change the project's quotas (not below what is used); print them."""
    quota = state.api.quota_update(
        state.project, security_groups, security_group_rules, instances=instances,
        cores=cores, ram=ram, volumes=volumes, gigabytes=gigabytes, snapshots=snapshots,
        floating_ips=floating_ips)
    emit(quota, None, fmt)


__all__ = [
    "COMMAND_MODULES",
    "CliError",
    "CliState",
    "SecfwCommand",
    "SecfwGroup",
    "emit",
    "format_option",
    "import_all_commands",
    "main",
    "one_line_errors",
    "output_command",
    "pass_state",
    "scope_options",
    "silent_command",
]

