"""A big plan sent as several transactions, without an intermediate ruleset.

libnftables holds a whole batch in memory while it parses, evaluates and sends
it — about 1.2 KB per set element (measured with nft 1.0.6: +366 MB of C heap
for the 6,048 commands of a first 10,000-port pass against the closed filter,
~320k elements), on top of what the agent itself holds. Most of such a plan only
*creates* objects: chains that are not base chains, sets and maps with their
elements, and the rules of those new chains. Nothing in the kernel can refer to
an object that does not exist yet (the kernel refuses a jump, goto or ``@set``
naming one), so until the plan's *other* commands link them in — an element
added to a set or map that exists, a base chain, a changed chain rewritten —
they are unreachable and change no packet's verdict. They can therefore go
first, in transactions of their own, bounded in size; the last transaction holds
every command that changes what the kernel does, so the switch stays atomic
(nft(8): a batch is committed whole or not at all).

If a later transaction fails, the kernel keeps its ruleset plus some unreachable
new objects; the agent's next pass is full, reads them back and plans only what
is still missing (or deletes them, when no longer wanted).

A plan with *detaching* commands (:attr:`.plan.Transaction.detach`: a first pass
into the closed filter) sends them first, in a batch of their own: they take the
closed filter's empty sets out of its rules, which changes no verdict, so the
plan's elements for those sets are created afresh in preparatory batches too and
the last batch holds little more than the chains' rules. If a later batch
fails, the kernel keeps the detached closed filter (every tap still dropped).

Only worth it for big plans: below ``budget`` characters of such commands the
plan stays one transaction (an incremental pass costs one round trip, as before).
A full replacement (``Transaction.full``: the tables deleted and recreated in the
batch) is never split.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from secfw.backends.nftables.plan import Transaction

#: Characters of object-creating commands per preparatory transaction: ~1 MB of
#: text is ~15k set elements, ~20 MB of libnftables heap.
BUDGET = 1 << 20

_CREATING = ("add set ", "add map ")


def batches(tx: Transaction, budget: int = BUDGET) -> Iterator[str]:
    """The texts to commit in order, each one atomic (module doc): ``tx.text``
    alone when ``tx`` is full or small (and detaches nothing), else its
    detaching batch if any, preparatory batches of at most
    ``budget`` characters (a single longer command goes alone) followed by the
    rest. Each text is made when asked for, so only the one being sent is held
    (they add up to the plan's size: 20 MB at 10,000 ports)."""
    if tx.full:
        yield tx.text
        return
    prepare, rest = split(tx.commands)
    if tx.detach:
        yield _text(tx.detach)
    elif sum(len(c) for c in prepare) <= budget:
        yield tx.text
        return
    yield from _chunks(prepare, budget)
    if rest:  # (a plan that only creates would link nothing in: not seen in practice)
        yield _text(rest)


def split(commands: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(creating, rest)``: the commands that only create unreachable objects —
    ``add chain`` of a regular chain (no ``{`` hook block), ``add set``/``add
    map`` (the planner emits them for new sets only, with their elements),
    ``add element`` into such a new set (a big one's further elements) and
    ``add rule`` into a chain created by this plan — and the others, each list
    in the plan's order. Objects are named by safe names (layout.is_safe_name:
    no spaces), so a command's words are its family, table and name."""
    creating: list[str] = []
    rest: list[str] = []
    new_chains: set[tuple[str, str]] = set()
    new_sets: set[tuple[str, str]] = set()
    for command in commands:
        words = command.split(" ", 5)
        if command.startswith("add chain ") and "{" not in command:
            new_chains.add((words[2], words[4]))
            creating.append(command)
        elif command.startswith(_CREATING):
            new_sets.add((words[2], words[4]))
            creating.append(command)
        elif (command.startswith("add rule ") and (words[2], words[4]) in new_chains) or (
                command.startswith("add element ") and (words[2], words[4]) in new_sets):
            creating.append(command)
        else:
            rest.append(command)
    return creating, rest


def _chunks(commands: list[str], budget: int) -> Iterator[str]:
    """``commands`` in order, as texts of at most ``budget`` characters each."""
    batch: list[str] = []
    size = 0
    for command in commands:
        if batch and size + len(command) > budget:
            yield _text(batch)
            batch, size = [], 0
        batch.append(command)
        size += len(command) + 1
    if batch:
        yield _text(batch)


def _text(commands: Iterable[str]) -> str:
    return "".join(c + "\n" for c in commands)
