"""The one place secfw runs iptables, ip6tables and ipset.

:class:`IptablesExecutor` reads secfw's objects back (``iptables-save -t
filter``, ``ipset list -o save``), applies an :class:`.plan.IptPlan` phase by
phase and removes everything secfw made. Every command is an argument list —
never a shell string — and inside a network namespace it is prefixed with
``ip netns exec NAME`` (ip-netns(8)). The process boundary is one callable,
:data:`Runner`, that tests can replace.

**Atomicity.** Each ``iptables-restore --noflush`` input is one commit of its
table: when it fails, that table is unchanged (tested for both variants). The
IPv4 and IPv6 tables are two commits, and ipset has no transactions (``ipset
restore`` runs its lines in order and stops at the first error), which is why
the plan orders its phases so that a failure at any point leaves a ruleset
that is at most one step behind, never one that allows what neither the old
nor the new policy allows. After any failure the agent reads back and plans
again (full sync), which also removes chains a failed apply left unused.

**Batches (nft variant only).** iptables-nft-restore 1.8.9 searches linearly,
for every rule, through the chains its batch touches: 200k rules in 10k
chains take 11 s in one batch, 2.7 s in batches of 500 chains (measured). So
with the nft variant, chains that do not exist yet are created and filled in
batches of at most :data:`BATCH_RULES` rules before the commit, and chains
that went away are removed in batches after it. Neither changes a verdict:
nothing jumps to a new chain before the commit, nothing to a removed one
after it. The commit itself is always one restore. The legacy variant
rewrites its whole table on every restore, so there everything is one restore.

**Variant.** iptables comes in two back ends with separate rule sets: legacy
(``ip_tables``) and nft (``nf_tables`` through the compat layer); both are
evaluated by the kernel when both hold rules. ``variant="nft"|"legacy"`` picks
one; by default :func:`detect_variant` picks the one that already holds secfw's
chains, else the one holding more rules, else the one ``iptables`` points to
(the update-alternatives default) — the rule kube-proxy's iptables-wrapper uses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

from secfw.backends.iptables.plan import IptPlan, TableChanges
from secfw.backends.iptables.render import FAMILIES, PREFIX, IptState, restore_text
from secfw.backends.iptables.state import from_save, parse_ipsets, parse_table
from secfw.compiler.ir import Family
from secfw.errors import BackendError

log = logging.getLogger(__name__)
Variant = Literal["nft", "legacy"]
#: The nftables tables iptables-nft keeps secfw's chains in (``-t filter`` of
#: both families; ``-t nat`` for floating IPs and the metadata redirect).
NFT_TABLES = (("ip", "filter"), ("ip6", "filter"), ("ip", "nat"))
VARIANTS: tuple[Variant, ...] = ("nft", "legacy")
#: Runs one command (argument list, optional stdin text); returns the finished process.
Runner = Callable[[Sequence[str], str | None], "subprocess.CompletedProcess[str]"]
#: Where ``ip netns add`` keeps named namespaces (ip-netns(8)).
NETNS_DIR = "/run/netns"
_NETNS = re.compile(r"[A-Za-z0-9_.-]+")
_TOOL = {"ipv4": "iptables", "ipv6": "ip6tables"}
TIMEOUT = 600.0  # seconds; a 10,000-port restore takes seconds, not minutes
#: Rules and chains per iptables-nft-restore batch when creating or removing chains.
BATCH_RULES = 10_000
BATCH_CHAINS = 500


def run_command(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The default :data:`Runner`: no shell, text in and out, never raises for a
    non-zero exit (callers check), BackendError when the tool cannot run."""
    try:
        return subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"iptables: cannot run {argv[0]}: {exc}") from exc


class IptablesExecutor:
    """Reads, applies and removes secfw's iptables chains and ipsets."""

    def __init__(self, netns: str | None = None, variant: Variant | None = None,
                 runner: Runner | None = None) -> None:
        """Work in the current namespace or in ``netns`` (which must exist: it is
        never created), with ``variant`` or the detected one. BackendError for a
        bad namespace or variant name."""
        if netns is not None:
            if netns in (".", "..") or not _NETNS.fullmatch(netns):
                raise BackendError(f"iptables: {netns!r} is not a network namespace name")
            if runner is None and not os.path.exists(os.path.join(NETNS_DIR, netns)):
                raise BackendError(f"iptables: no network namespace {netns!r}")
        if variant is not None and variant not in VARIANTS:
            raise BackendError(f"iptables: unknown variant {variant!r} (nft or legacy)")
        self.netns = netns
        self.runner: Runner = runner or run_command
        self._variant = variant
        self._nft_missing = False

    # ---- tools

    @property
    def variant(self) -> Variant:
        """The iptables back end in use (detected once, on first use)."""
        if self._variant is None:
            self._variant = detect_variant(self._try)
        return self._variant

    def tool(self, family: Family, suffix: str = "") -> str:
        """``iptables-nft``, ``ip6tables-legacy-save``, … for this variant."""
        return f"{_TOOL[family]}-{self.variant}{suffix}"

    def _argv(self, argv: Sequence[str]) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, *argv]

    def _try(self, argv: Sequence[str], stdin: str | None = None
             ) -> subprocess.CompletedProcess[str]:
        return self.runner(self._argv(argv), stdin)

    def _run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        """stdout of a command that must succeed; BackendError with its first
        error line otherwise."""
        done = self._try(argv, stdin)
        if done.returncode != 0:
            raise BackendError(f"{argv[0]} failed ({done.returncode}): {first_error(done)}")
        return done.stdout

    # ---- reading

    def read_state(self) -> IptState | None:
        """secfw's chains, jumps and sets as the kernel holds them; None when
        there is none of them."""
        saves = {family: self._run([self.tool(family, "-save"), "-t", "filter"])
                 for family in FAMILIES}
        return from_save(saves, self._run(["ipset", "list", "-o", "save"]), self._nat_save())

    def _nat_save(self) -> str:
        """``iptables-save -t nat``, or nothing when the variant is legacy and the
        namespace has no nat table: iptables-legacy creates (and hooks into the
        kernel) any table it is asked to list (measured: ``/proc/net/ip_tables_names``
        gains ``nat``), which would give every host nat hooks for reading its state.
        iptables-nft lists a missing table without creating it."""
        if self.variant == "legacy":
            names = self._try(["cat", "/proc/net/ip_tables_names"]).stdout.split()
            if "nat" not in names:
                return ""
        return self._run([self.tool("ipv4", "-save"), "-t", "nat"])

    def flagged_tables(self) -> list[tuple[str, str]]:
        """The nftables tables of iptables-nft that secfw fills (:data:`NFT_TABLES`)
        and that carry a flag, as ``(family, name)``; always empty for legacy.

        ``dormant`` unhooks every chain of its table (nft(8), TABLES: "table is
        not evaluated any more") while ``iptables-nft-save`` prints the same
        rules, so the save alone would call such a table in sync. nft 1.0.6
        lists the flag's value wrong (measured: a stale string, such as the
        release name), so any ``flags`` member counts; output that is not JSON
        counts as every such table flagged (fail-closed: clearing an absent
        flag changes nothing). Without the ``nft`` tool nothing can be
        checked: logged once, and empty."""
        if self.variant != "nft":
            return []
        done = self._try_nft(["nft", "-j", "list", "tables"])
        if done is None:
            return []
        out = done.stdout
        try:
            objects = json.loads(out)["nftables"]
            tables = [obj["table"] for obj in objects if "table" in obj]
            return [(str(t["family"]), str(t["name"])) for t in tables
                    if (t["family"], t["name"]) in NFT_TABLES and t.get("flags")]
        except (ValueError, KeyError, TypeError):
            return [table for table in NFT_TABLES if table[1] != "nat"]

    def _try_nft(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
        """``argv`` (an ``nft`` command) run; None when nft cannot run here."""
        try:
            done = self._try(argv)
        except BackendError as exc:
            if not self._nft_missing:
                self._nft_missing = True
                log.warning("%s: iptables-nft's table flags (dormant) go unchecked", exc)
            return None
        if done.returncode != 0:
            raise BackendError(f"nft failed ({done.returncode}): {first_error(done)}")
        return done

    def clear_table_flags(self, tables: Sequence[tuple[str, str]]) -> None:
        """Take the flags off ``tables`` (:meth:`flagged_tables`): nft's ``add
        table`` without flags sets the table's flags to none (measured, nft
        1.0.6: it clears ``dormant``), in one atomic batch."""
        if tables:
            self._run(["nft", "-f", "-"],
                      "".join(f"add table {family} {name}\n" for family, name in tables))

    # ---- applying

    def apply(self, plan: IptPlan) -> None:
        """Apply ``plan``'s phases in order; BackendError at the first failure
        (see the module docstring for what a failure leaves)."""
        if plan.empty:
            return
        if plan.ipset_before:
            self.ipset_restore(plan.ipset_before)
        for family, changes in plan.tables.items():
            self._apply_table(family, changes)
        # The floating IPs' NAT right after the filter commit (its own restore:
        # iptables-restore commits each table separately, iptables-restore(8)).
        self._apply_table("ipv4", plan.nat, "nat")
        if plan.ipset_after:
            self.ipset_restore(plan.ipset_after)

    def _apply_table(self, family: Family, changes: TableChanges, table: str = "filter") -> None:
        """One restore (legacy, or a small change), or: creation batches, the
        commit, removal batches (nft; see the module docstring)."""
        jumps = self._missing_jumps(family, changes.ensure_jumps, table)
        if self.variant == "legacy" or changes.size <= BATCH_RULES:
            lines = changes.lines(jumps)
            if lines:
                self.restore(family, lines, table)
            return
        if changes.created:
            self.restore(family, changes.declarations(), table)
        for batch in batched(changes.created):
            self.restore(family, changes.fill_lines(batch), table)
        if changes.commit or jumps:
            self.restore(family, [*changes.commit, *jumps], table)
        removed = [(name, ("",)) for name in changes.removed]
        for verb in ("-F", "-X"):  # every chain flushed before any is deleted
            for batch in batched(removed):
                self.restore(family, [f"{verb} {name}" for name, _ in batch], table)

    def _missing_jumps(self, family: Family, jumps: Sequence[tuple[str, str]],
                       table: str = "filter") -> list[str]:
        """``-I CHAIN 1 RULE`` for each jump ``iptables -C`` does not find.

        -C exits 1 when the rule is absent and 2 when its target chain does not
        exist yet (then it is absent too); the restore creates the chain first.
        """
        lines = []
        for builtin, rule in jumps:
            done = self._try([self.tool(family), "-w", "-t", table, "-C", builtin,
                              *rule.split()])
            if done.returncode != 0:
                lines.append(f"-I {builtin} 1 {rule}")
        return lines

    def restore(self, family: Family, lines: Sequence[str], table: str = "filter") -> None:
        """One atomic ``iptables-restore --noflush`` commit of ``lines`` in ``table``."""
        self._run([self.tool(family, "-restore"), "-w", "--noflush"], restore_text(lines, table))

    def ipset_restore(self, lines: Sequence[str]) -> None:
        """``ipset -exist restore`` of ``lines`` (-exist: creating an identical set
        or adding a present / deleting an absent member is not an error)."""
        self._run(["ipset", "-exist", "restore"], "".join(f"{line}\n" for line in lines))

    # ---- removing

    def cleanup(self) -> None:
        """Remove secfw's jumps and chains (one commit per family), then its
        sets; nothing else. Nothing to remove is not an error."""
        for family in FAMILIES:
            table = parse_table(self._run([self.tool(family, "-save"), "-t", "filter"]), family)
            unhook = tuple(f"-D {builtin} {rule}" for (builtin, rule), count
                           in table.jumps.items() for _ in range(count))
            self._apply_table(family, TableChanges(commit=unhook, removed=tuple(table.chains)))
        nat = parse_table(self._nat_save(), "ipv4", "nat")
        unhook = tuple(f"-D {builtin} {rule}" for (builtin, rule), count
                       in nat.jumps.items() for _ in range(count))
        self._apply_table("ipv4", TableChanges(commit=unhook, removed=tuple(nat.chains)), "nat")
        names = sorted(parse_ipsets(self._run(["ipset", "list", "-o", "save"])))
        if names:
            self.ipset_restore([f"destroy {name}" for name in names])


def batched(chains: Sequence[tuple[str, tuple[str, ...]]], rules: int | None = None,
            count: int | None = None) -> Iterator[list[tuple[str, tuple[str, ...]]]]:
    """(chain, rules) pairs in order, in runs of at most ``count`` chains and
    ``rules`` rules (default :data:`BATCH_CHAINS`, :data:`BATCH_RULES`); a
    chain is never split: a bigger one is a run of its own."""
    rules = BATCH_RULES if rules is None else rules
    count = BATCH_CHAINS if count is None else count
    batch: list[tuple[str, tuple[str, ...]]] = []
    size = 0
    for chain in chains:
        if batch and (size + len(chain[1]) > rules or len(batch) >= count):
            yield batch
            batch, size = [], 0
        batch.append(chain)
        size += len(chain[1])
    if batch:
        yield batch


def first_error(done: subprocess.CompletedProcess[str]) -> str:
    """The first meaningful lines of a tool's error output (iptables-nft-restore
    puts its name on one line and the reason on the next)."""
    lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines()]
    useful = [line for line in lines
              if line and not line.startswith(("#", "Try `", "Warning: "))]
    return " ".join(useful[:2]) if useful else "no error message"


def detect_variant(run: Runner) -> Variant:
    """The iptables variant to use here (see the module docstring).

    ``run`` runs a command in the right namespace and returns the process
    (a non-zero exit or a missing tool counts as "no rules").
    """
    saves = {variant: _saves(run, variant) for variant in VARIANTS}
    with_secfw = [v for v in VARIANTS if f":{PREFIX}" in saves[v]]
    if len(with_secfw) == 1:
        return with_secfw[0]
    counts = {v: sum(line.startswith("-A ") for line in saves[v].splitlines())
              for v in VARIANTS}
    if counts["nft"] != counts["legacy"]:
        return max(VARIANTS, key=lambda v: counts[v])
    return _default_variant(run)


def _saves(run: Runner, variant: Variant) -> str:
    """Both families' ``-save`` output of ``variant`` (empty when it cannot run)."""
    text = []
    for family in FAMILIES:
        try:
            done = run([f"{_TOOL[family]}-{variant}-save"], None)
        except BackendError:
            continue
        if done.returncode == 0:
            text.append(done.stdout)
    return "".join(text)


def _default_variant(run: Runner) -> Variant:
    """What plain ``iptables`` is: ``iptables v1.8.9 (nf_tables)`` or ``(legacy)``."""
    try:
        done = run(["iptables", "-V"], None)
    except BackendError:
        return "nft"
    return "legacy" if "legacy" in done.stdout else "nft"
