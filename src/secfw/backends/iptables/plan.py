"""The minimal change from one :class:`IptState` to another, as an :class:`IptPlan`.

A plan has three phases, applied in order by :mod:`.executor`:

1. ``ipset_before`` — sets that do not exist yet are created and filled, and
   scratch sets for replacements are built. Nothing refers to them yet, so
   this changes no verdict.
2. ``tables`` — per family, a :class:`TableChanges`: chains that do not exist
   yet are created and filled (nothing jumps to them yet, so this changes no
   verdict either); then ONE ``iptables-restore --noflush`` commit rewrites
   the chains that changed (a declaration of an existing chain flushes it in
   --noflush mode, measured with both variants; an explicit ``-F`` follows
   anyway), deletes surplus jumps, moves a jump that another rule precedes
   back to position 1 (delete and insert; the other rule is left, below it),
   and inserts at position 1 the jumps from
   FORWARD/INPUT that ``iptables -C`` does not find (never twice); last,
   chains that went away are flushed and deleted, after every rule that
   pointed at them is gone. The commit is atomic (iptables-restore(8); both
   variants build the whole change before committing it); the executor may
   send the creation and the removal in several smaller batches (see
   :mod:`.executor`), because they change no verdict.
3. ``ipset_after`` — replacements swapped in (``ipset swap``: atomic), new
   members added, then old members deleted (so for a moment the set holds old
   ∪ new: nothing either policy denies gets through, nothing both allow is
   dropped), then scratch sets and sets that went away destroyed, after the
   rules that used them.

A set is replaced through a scratch set and ``swap`` when its header changes
(it outgrew its ``maxelem``) or when most of it changes; otherwise its members
are added and deleted one by one — a member joining a group is one ``add``.
Equal states give an empty plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from secfw.backends.iptables.render import (
    FAMILIES,
    IpSet,
    IptState,
    Table,
    element_key,
    ipset_lines,
    temp_set_name,
)
from secfw.backends.iptables.state import empty_state
from secfw.compiler.ir import Family

#: Replace a set through a scratch set when more than this many of its
#: elements change and the change is larger than what the set will hold.
SWAP_MIN_CHANGES = 64


@dataclass(frozen=True)
class TableChanges:
    """What changes in one family's filter table, in the order it is applied.

    ``created`` chains are new: declared, then filled with their rules;
    ``commit`` is the one atomic step that changes verdicts (rewritten chains,
    surplus jumps deleted); ``ensure_jumps`` are (built-in chain, rule) the
    executor inserts in that commit unless ``iptables -C`` finds them;
    ``removed`` chains are flushed and deleted afterwards.
    """

    created: tuple[tuple[str, tuple[str, ...]], ...] = ()
    commit: tuple[str, ...] = ()
    ensure_jumps: tuple[tuple[str, str], ...] = ()
    removed: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Lines sent (declarations, rules, commit lines, removals) and jump checks."""
        return (sum(1 + len(rules) for _, rules in self.created) + len(self.commit)
                + len(self.ensure_jumps) + 2 * len(self.removed))

    def lines(self, jumps: Sequence[str] = ()) -> list[str]:
        """Everything as ONE iptables-restore input, with the jump lines
        ``jumps`` (``-I …``) the executor found missing."""
        return [*self.declarations(), *self.fill_lines(self.created), *self.commit, *jumps,
                *self.removal_lines(self.removed)]

    def declarations(self) -> list[str]:
        return [f":{name} - [0:0]" for name, _ in self.created]

    @staticmethod
    def fill_lines(chains: Iterable[tuple[str, tuple[str, ...]]]) -> list[str]:
        return [f"-A {name} {rule}" for name, rules in chains for rule in rules]

    @staticmethod
    def removal_lines(names: Sequence[str]) -> list[str]:
        """Flush all first, then delete: a removed chain may jump to another."""
        return [*(f"-F {name}" for name in names), *(f"-X {name}" for name in names)]


@dataclass(frozen=True)
class IptPlan:
    """What to send to the tools, phase by phase (see the module docstring).

    ``summary`` says what changes in a few words (for logs); ``full`` is set when
    the plan was made without knowing the kernel's state.
    """

    ipset_before: tuple[str, ...] = ()
    tables: Mapping[Family, TableChanges] = field(default_factory=dict)
    ipset_after: tuple[str, ...] = ()
    summary: Mapping[str, Any] = field(default_factory=dict)
    full: bool = False
    nat: TableChanges = field(default_factory=TableChanges)

    @property
    def empty(self) -> bool:
        """True when the kernel already holds the desired state."""
        return self.size == 0

    @property
    def size(self) -> int:
        """How many commands (ipset lines, iptables-restore lines, jump checks)."""
        return (len(self.ipset_before) + len(self.ipset_after) + self.nat.size
                + sum(changes.size for changes in self.tables.values()))

    @property
    def commands(self) -> tuple[str, ...]:
        """Every command in order, for people and tests (restore lines prefixed
        with their family, jump checks as ``ensure CHAIN RULE``)."""
        restore = [f"{family}: {line}" for family, changes in self.tables.items()
                   for line in changes.lines(
                       [f"ensure {chain} {rule}" for chain, rule in changes.ensure_jumps])]
        restore += [f"nat: {line}" for line in self.nat.lines(
            [f"ensure {chain} {rule}" for chain, rule in self.nat.ensure_jumps])]
        return (*self.ipset_before, *restore, *self.ipset_after)


def plan(current: IptState | None, desired: IptState) -> IptPlan:
    """The minimal plan from ``current`` (None: nothing of secfw is known to
    exist) to ``desired``. Pure."""
    base = current if current is not None else empty_state()
    tables: dict[Family, TableChanges] = {}
    chains: set[str] = set()
    for family in FAMILIES:
        tables[family] = table_changes(base.tables[family], desired.tables[family], chains)
    nat = table_changes(base.nat, desired.nat, chains)
    before, after, counts = set_changes(base.sets, desired.sets)
    summary = _summary(chains, counts, {**tables, "nat": nat})
    return IptPlan(before, tables, after, summary, full=current is None, nat=nat)


def table_changes(old: Table, new: Table, touched: set[str]) -> TableChanges:
    """The changes turning ``old`` into ``new``. Adds the names of the chains
    written or deleted to ``touched``."""
    created = tuple((name, rules) for name, rules in new.chains.items()
                    if name not in old.chains)
    changed = [name for name, rules in new.chains.items()
               if name in old.chains and old.chains[name] != rules]
    removed = tuple(name for name in old.chains if name not in new.chains)
    commit = [f":{name} - [0:0]" for name in changed]
    for name in changed:
        commit += [f"-F {name}", *(f"-A {name} {rule}" for rule in new.chains[name])]
    moved = [j for j in new.jumps if j[0] in old.buried and old.jumps.get(j, 0) > 0]
    for (builtin, rule), count in old.jumps.items():
        wanted = 0 if (builtin, rule) in moved else new.jumps.get((builtin, rule), 0)
        surplus = count - wanted
        commit += [f"-D {builtin} {rule}"] * max(surplus, 0)
    # Back to the top, in the same commit (atomic: no moment without the jump);
    # the rule that was above stays, now below: it is not secfw's to delete.
    commit += [f"-I {builtin} 1 {rule}" for builtin, rule in reversed(moved)]
    ensure = tuple(j for j in new.jumps if old.jumps.get(j, 0) == 0)
    touched.update(name for name, _ in created)
    touched.update(changed, removed)
    touched.update(builtin for builtin, _ in moved)
    return TableChanges(created, tuple(commit), ensure, removed)


@dataclass
class _SetLines:
    """The ipset lines of a plan, by kind, in the order they are sent."""

    before: list[str] = field(default_factory=list)  # create + fill (new, scratch)
    swaps: list[str] = field(default_factory=list)
    adds: list[str] = field(default_factory=list)
    dels: list[str] = field(default_factory=list)
    destroy: list[str] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    added: int = 0
    deleted: int = 0

    def after(self) -> tuple[str, ...]:
        return (*self.swaps, *self.adds, *self.dels,
                *(f"destroy {name}" for name in self.destroy))


def set_changes(
    old: Mapping[str, IpSet], new: Mapping[str, IpSet]
) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, Any]]:
    """(before, after) ipset lines turning ``old`` into ``new``, and counts."""
    lines = _SetLines()
    for name, wanted in new.items():
        _set_change(lines, old.get(name), wanted)
    gone = [name for name in old if name not in new and name not in lines.destroy]
    lines.destroy += gone
    lines.touched.update(gone)
    counts = {"sets": lines.touched, "added": lines.added, "deleted": lines.deleted}
    return tuple(lines.before), lines.after(), counts


def _set_change(lines: _SetLines, have: IpSet | None, wanted: IpSet) -> None:
    """Add to ``lines`` what turns ``have`` (None: absent) into ``wanted``."""
    name = wanted.name
    if have is None:
        lines.before += ipset_lines([wanted])
    elif _replace(have, wanted):
        temp = replace(wanted, name=temp_set_name(name))
        lines.before += ipset_lines([temp])
        lines.swaps.append(f"swap {temp.name} {name}")
        lines.destroy.append(temp.name)
    elif wanted.elements != have.elements:
        lines.adds += _element_lines("add", name, wanted.elements, have.elements)
        lines.dels += _element_lines("del", name, have.elements, wanted.elements)
        lines.added += len(set(wanted.elements) - set(have.elements))
        lines.deleted += len(set(have.elements) - set(wanted.elements))
    else:
        return
    lines.touched.add(name)


def _replace(have: IpSet, wanted: IpSet) -> bool:
    """Build anew and swap: the header differs, or most of the set changes."""
    if have.header() != wanted.header():
        return True
    old, new = set(have.elements), set(wanted.elements)
    changes = len(old ^ new)
    return bool(old - new) and changes > SWAP_MIN_CHANGES and changes > len(new)


def _element_lines(verb: str, name: str, elements: tuple[str, ...],
                   other: tuple[str, ...]) -> list[str]:
    """``verb`` lines for the elements of ``elements`` not in ``other`` (the
    address only: options an element was read back with are not part of it)."""
    missing = set(elements) - set(other)
    return [f"{verb} {name} {e.split(' ', 1)[0]}" for e in sorted(missing, key=element_key)]


def _summary(chains: set[str], counts: dict[str, Any],
             tables: Mapping[Any, TableChanges]) -> dict[str, Any]:
    """What the plan changes, without the empty entries (for logs)."""
    rules = sum(sum(len(r) for _, r in t.created)
                + sum(1 for line in t.commit if line.startswith("-A ")) for t in tables.values())
    found: dict[str, Any] = {
        "chains": sorted(chains), "sets": sorted(counts["sets"]),
        "elements_added": counts["added"], "elements_deleted": counts["deleted"],
        "rules": rules,
    }
    return {key: value for key, value in found.items() if value}
