"""A normalised snapshot of secfw's tables: what is compared to plan a sync.

:class:`KernelState` holds, per set or map, its declaration and its elements and,
per chain, its hook and its rules in order, each keyed by
``(family, name)`` (``inet`` or ``arp``), and which of secfw's tables exist. Both
sides come to the same normal form:

* :meth:`KernelState.from_ruleset` — the desired state, from a rendered
  :class:`~.render.Ruleset` (no kernel round trip);
* :meth:`KernelState.from_nft_json` — the actual state, from libnftables' JSON
  listing of ``list table inet secfw`` and ``list table arp secfw``.

A rule is its comment (a digest of the rule's text, see
:func:`.syntax.make_rule`) *and* its expressions in the canonical form of
:mod:`.canonical`: nft prints a rule back differently from how it was written
(``meta l4proto 6 th dport 80`` comes back as ``tcp dport 80``), so raw text
would never converge, and the comment alone would not see a rule whose content
was replaced under the same comment (``nft replace rule … accept comment
"<digest>"``). A rule without a comment (added by hand) reads as ``""``; either
difference makes its chain differ, which rewrites the chain.

Elements: interface names stay strings, MAC addresses lower case; addresses
become canonical CIDRs
(``"10.0.0.5"`` → ``10.0.0.5/32``, ``{"prefix": …}`` → ``a/len``, a range that is
exactly one CIDR → that CIDR, any other range → ``lo-hi``; canonical text by
:mod:`ipaddress` on both sides); verdicts become
:class:`~.render.Verdict`. nft 1.0.6 lists interval elements as they were added
(measured: adjacent elements are not merged on output), so this per-element
normal form is exact and a second sync plans nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from secfw.backends.nftables.canonical import Canon, canonical_expr
from secfw.backends.nftables.layout import canonical_cidr
from secfw.backends.nftables.syntax import (
    ADDRESS_TYPES,
    FAMILIES,
    TABLE,
    Chain,
    Datum,
    Element,
    Hook,
    NamedSet,
    Rule,
    Ruleset,
    Statement,
    Verdict,
    hex_text,
    statement_json,
)
from secfw.errors import BackendError

if TYPE_CHECKING:
    from secfw.backends.nftables.render import Delta

_VERDICTS = frozenset({"accept", "drop", "continue", "return", "jump", "goto"})
#: What secfw's maps map to: verdicts, or packet marks (the bridge table's).
_DATA_TYPES = ("verdict", "mark", "ipv4_addr")

#: A set or chain of one of secfw's tables: ``(family, name)``.
ObjectKey = tuple[str, str]


#: A patched set's own frozenset is made at once (not on first read) once its
#: changes outgrow this share of its base (plus :data:`_FOLD_SLACK`): the changes
#: kept stay small, and making it costs O(base) once per O(base) changes.
_FOLD_SHARE = 4
_FOLD_SLACK = 64

#: (base, lost, gained): the base is a frozenset, or a rendered set's own tuple
#: of elements (:meth:`SetState.of_members`) whose frozenset was never built.
_Patch = tuple[frozenset[Element] | tuple[Element, ...], frozenset[Element],
               frozenset[Element]]
_NONE: frozenset[Element] = frozenset()


class SetState:
    """A set or map: its declaration and its elements (normal form). Read-only;
    equal when declaration and elements are.

    Its frozenset of elements may be built only when :attr:`elements` is
    first read:

    * a state made by :meth:`patched` holds its predecessor's frozenset (the
      *base*) and the elements it lost and gained since. An incremental agent
      pass that changes one port's elements in 28 sets of 10,000 then costs the
      change, not 28 copies of 10,000 elements (measured: 26 of 106 ms of
      render_plan at 10k ports, cProfile, load ~5): its planner reads the
      renderer's delta, never these elements; a full pass, a kernel check and
      the restart record do (:attr:`size` does not);
    * a desired state made by :meth:`of_members` holds the rendered set's
      own tuple of elements. A first pass into a fresh namespace plans the
      new sets from the rendered ruleset and reads only the elements of the
      few sets the closed filter already has, so the other frozensets (20 MB
      at 10,000 ports) are not held while libnftables parses the transaction,
      the agent's peak; they are built when first read after it. Patching
      such a state keeps that tuple as the base: the first port change after
      a full pass does not build the frozensets of the sets it touches.
    """

    __slots__ = ("_elements", "_members", "_patch", "data_type", "flags", "is_map", "key_type")

    #: What :mod:`secfw.agent.kernelrecord` digests, in this order (the field
    #: order of the dataclass this class was).
    DIGEST_FIELDS = ("key_type", "flags", "is_map", "elements", "data_type")

    def __init__(self, key_type: tuple[str, ...], flags: tuple[str, ...], is_map: bool,
                 elements: frozenset[Element], data_type: str = "verdict") -> None:
        self.key_type, self.flags, self.is_map, self.data_type = (
            key_type, flags, is_map, data_type)
        self._elements: frozenset[Element] | None = elements
        #: (base, lost, gained): elements = (base - lost) | gained, with lost a
        #: subset of base and gained disjoint from it; None once built.
        self._patch: _Patch | None = None
        #: the elements as a rendered set lists them (:meth:`of_members`);
        #: None once built.
        self._members: tuple[Element, ...] | None = None

    @classmethod
    def of_members(cls, key_type: tuple[str, ...], flags: tuple[str, ...], is_map: bool,
                   members: tuple[Element, ...], data_type: str = "verdict") -> SetState:
        """The state whose elements are ``frozenset(members)``, built when first
        read (class doc). ``members`` must not change: a rendered set's tuple."""
        state = cls(key_type, flags, is_map, _NONE, data_type)
        state._elements, state._members = None, members
        return state

    @property
    def declaration(self) -> tuple[tuple[str, ...], tuple[str, ...], bool, str]:
        """What cannot change in place: a set whose declaration differs is recreated."""
        return self.key_type, self.flags, self.is_map, self.data_type

    @property
    def elements(self) -> frozenset[Element]:
        """The elements (built on first read for a patched or rendered state).
        Safe from any thread: ``_elements`` is set before ``_patch`` and
        ``_members`` are dropped, and a reader that finds none of them finds
        ``_elements`` set."""
        elements = self._elements
        if elements is None:
            patch, members = self._patch, self._members
            if patch is not None:
                base, lost, gained = patch
                elements = _as_set(base).difference(lost).union(gained)
            elif members is not None:
                elements = frozenset(members)
            else:  # another thread built it meanwhile
                return self.elements
            self._elements = elements
            self._patch = self._members = None
        return elements

    @property
    def size(self) -> int:
        """``len(elements)``, without building a patched state's elements."""
        patch = self._patch
        if patch is not None and isinstance(patch[0], frozenset):
            return len(patch[0]) - len(patch[1]) + len(patch[2])
        return len(self.elements)  # a tuple base's length is not trusted: built

    def with_elements(self, elements: frozenset[Element]) -> SetState:
        """The same declaration with ``elements``."""
        return SetState(self.key_type, self.flags, self.is_map, elements, self.data_type)

    def patched(self, lost: frozenset[Element], gained: frozenset[Element]) -> SetState:
        """This set without ``lost`` (a subset of its elements) and with
        ``gained`` (disjoint from them), at the cost of ``lost`` and ``gained``:
        the result shares this state's base and folds both changes into one
        (lost' = (L | (lost - G)) - gained, gained' = (G - lost) | (gained - L)
        for this state's L and G: the invariants hold, and base - lost' | gained'
        is (base - L | G) - lost | gained)."""
        patch = self._patch
        if patch is None:
            # A rendered state not read yet keeps its members tuple as the base:
            # the first port change after a full pass then costs the change, not
            # a frozenset of each touched set (28 of ~10k elements at 10k ports:
            # 120 ms CPU of the bench's "port added", profiled).
            members = self._members
            base: frozenset[Element] | tuple[Element, ...] = (
                members if members is not None and self._elements is None else self.elements)
            was_lost, was_gained = _NONE, _NONE
        else:
            base, was_lost, was_gained = patch
        lost_now = (was_lost | (lost - was_gained)) - gained
        gained_now = (was_gained - lost) | (gained - was_lost)
        state = SetState(self.key_type, self.flags, self.is_map, _NONE, self.data_type)
        if len(lost_now) + len(gained_now) > len(base) // _FOLD_SHARE + _FOLD_SLACK:
            state._elements = _as_set(base).difference(lost_now).union(gained_now)
        else:
            state._elements, state._patch = None, (base, lost_now, gained_now)
        return state

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SetState):
            return NotImplemented
        return self is other or (self.declaration == other.declaration
                                 and self.size == other.size
                                 and self.elements == other.elements)

    def __hash__(self) -> int:
        return hash((self.declaration, self.elements))

    def __repr__(self) -> str:
        return (f"SetState(key_type={self.key_type!r}, flags={self.flags!r}, "
                f"is_map={self.is_map!r}, elements={self.elements!r}, "
                f"data_type={self.data_type!r})")


def _as_set(base: frozenset[Element] | tuple[Element, ...]) -> frozenset[Element]:
    return base if isinstance(base, frozenset) else frozenset(base)


class RuleState(NamedTuple):
    """A rule: the comment it carries and its expressions (:mod:`.canonical`)."""

    comment: str
    expr: Canon


class ChainState:
    """A chain: its hook (None for a regular chain) and its rules in order.
    Read-only; equal when hook and rules are.

    The desired side's (:meth:`of`) rules are canonicalised on first access:
    the planner reads ``rules`` only for a chain the kernel already holds (a new
    chain is added from the rendered rules' text), so a sync into an empty table
    canonicalises nothing (measured: 2.7 s of a 10 s one-shot agent pass at 1k
    ports under cProfile, for 5,116 rules).
    """

    __slots__ = ("_chain", "_rules", "hook")

    def __init__(self, hook: Hook | None, rules: tuple[RuleState, ...]) -> None:
        self.hook = hook
        self._rules: tuple[RuleState, ...] | None = rules
        self._chain: Chain | None = None

    @classmethod
    def of(cls, chain: Chain) -> ChainState:
        """The state of a rendered chain, its rules canonicalised when first read."""
        state = cls(chain.hook, ())
        state._rules, state._chain = None, chain
        return state

    @property
    def rules(self) -> tuple[RuleState, ...]:
        """The rules' states (:func:`rule_state`), in order."""
        if self._rules is None:
            assert self._chain is not None
            self._rules = tuple(rule_state(r) for r in self._chain.rules)
            self._chain = None
        return self._rules

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChainState):
            return NotImplemented
        return self is other or (self.hook == other.hook and self.rules == other.rules)

    def __hash__(self) -> int:
        return hash((self.hook, self.rules))

    def __repr__(self) -> str:
        return f"ChainState(hook={self.hook!r}, rules={self.rules!r})"

    def digest_text(self) -> str:
        """The chain as the agent's kernel record digests it
        (:mod:`secfw.agent.kernelrecord`): its hook and its rules' comments.

        A rendered rule's comment is a digest of its statements
        (:func:`.syntax.make_rule`: equal comments, equal rules), so for the
        rendered states the record digests this names the chain's content as
        :attr:`rules` would, without canonicalising a rule (that was 2.5 s of a
        one-shot agent at 1k ports under cProfile). It trusts the comments: it
        is no way to compare a state read back from the kernel.
        """
        rules = self._chain.rules if self._rules is None and self._chain else self._rules
        return repr((self.hook, tuple(rule.comment for rule in rules or ())))


@dataclass(frozen=True)
class KernelState:
    """The content of secfw's tables in normal form. Treat as read-only.

    ``sets`` and ``chains`` are keyed by ``(family, name)``; ``tables`` are the
    families whose table exists (a table can exist empty) as secfw writes it:
    without flags. A table read back with a flag (``dormant``: none of its
    chains sees a packet) is left out, so the state differs from every desired
    one and the planner replaces the tables whole (fail-closed: the
    replacement's ``delete table`` drops the flag with the table). Two states
    are equal exactly when the kernel would hold the same tables, sets,
    elements, chains, hooks (type, hook, priority, policy) and rules (comments
    and expressions).
    """

    sets: Mapping[ObjectKey, SetState]
    chains: Mapping[ObjectKey, ChainState]
    tables: frozenset[str] = frozenset(FAMILIES)

    @classmethod
    def from_ruleset(cls, ruleset: Ruleset) -> KernelState:
        """The state the kernel holds once ``ruleset`` was applied."""
        return cls(
            sets={(s.family, s.name): _set_state(s) for s in ruleset.sets},
            chains={(c.family, c.name): _chain_state(c) for c in ruleset.chains},
            tables=frozenset(ruleset.families()),
        )

    @classmethod
    def from_nft_json(cls, listing: Mapping[str, Any]) -> KernelState:
        """Parse libnftables' JSON output of ``list table`` for secfw's tables (one
        listing, or the objects of several concatenated).

        Objects of any other table are ignored. Raises BackendError when the
        listing is not shaped as libnftables-json(5) describes.
        """
        try:
            return _parse_listing(listing.get("nftables", []))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackendError(f"nftables: unexpected listing: {exc!r}") from exc


class StateCache:
    """:meth:`KernelState.from_ruleset` for successive rulesets that share objects.

    A set or chain that is the same object (``is``) as one of the previous ruleset
    keeps the same :class:`SetState` / :class:`ChainState` object, so a planner
    comparing two states skips it by identity instead of comparing its elements.
    """

    def __init__(self) -> None:
        self._sets: dict[int, tuple[NamedSet, SetState]] = {}
        self._chains: dict[int, tuple[Chain, ChainState]] = {}
        self._last: KernelState | None = None

    def state(self, ruleset: Ruleset, delta: Delta | None = None) -> KernelState:
        """Equal to ``KernelState.from_ruleset(ruleset)``. With ``delta`` (what
        ``ruleset`` changed relative to the one of the previous call, see
        :class:`.render.Delta`) only the changed objects are looked at."""
        if delta is not None and self._last is not None:
            self._last = _patched(self._last, delta)
            return self._last
        sets: dict[int, tuple[NamedSet, SetState]] = {}
        for named in ruleset.sets:
            hit = self._sets.get(id(named))
            sets[id(named)] = hit if hit and hit[0] is named else (named, _set_state(named))
        chains: dict[int, tuple[Chain, ChainState]] = {}
        for chain in ruleset.chains:
            hit_chain = self._chains.get(id(chain))
            chains[id(chain)] = (hit_chain if hit_chain and hit_chain[0] is chain
                                 else (chain, _chain_state(chain)))
        self._sets, self._chains = sets, chains
        self._last = KernelState(
            sets={(n.family, n.name): state for n, state in sets.values()},
            chains={(c.family, c.name): state for c, state in chains.values()},
            tables=frozenset(ruleset.families()),
        )
        return self._last


def _patched(base: KernelState, delta: Delta) -> KernelState:
    """``base`` with the objects of ``delta`` replaced (copies: ``base`` stays as it
    is, it may be what the kernel holds)."""
    sets, chains = dict(base.sets), dict(base.chains)
    for key, named in delta.sets.items():
        if named is None:
            sets.pop(key, None)
        elif key in delta.elements and key in sets:  # O(change): no whole-set hashing
            lost, gained = delta.elements[key]
            sets[key] = sets[key].patched(lost, gained)
        else:
            sets[key] = _set_state(named)
    for key, chain in delta.chains.items():
        if chain is None:
            chains.pop(key, None)
        else:
            chains[key] = _chain_state(chain)
    removed = any(v is None for v in (*delta.sets.values(), *delta.chains.values()))
    if removed:  # a table may have lost its last object
        tables = frozenset(k[0] for k in sets) | frozenset(k[0] for k in chains)
    else:
        tables = base.tables | {k[0] for k in (*delta.sets, *delta.chains)}
    return KernelState(sets=sets, chains=chains, tables=tables)


def _chain_state(chain: Chain) -> ChainState:
    return ChainState.of(chain)


#: Rendered rules' states by comment (a rendered comment is a digest of the
#: rule's text, :func:`.syntax.make_rule`), each with the statements it was
#: computed from, checked on a hit. Bounded: a long-lived agent's churn only
#: costs recomputing.
_RULE_STATES: dict[str, tuple[tuple[Statement, ...], RuleState]] = {}
_RULE_STATES_MAX = 1 << 18


def rule_state(rule: Rule) -> RuleState:
    """The state of a rendered rule: its comment and its JSON rendering in
    canonical form (computed once per rule content)."""
    known = _RULE_STATES.get(rule.comment)
    if known is not None and (known[0] is rule.statements or known[0] == rule.statements):
        return known[1]
    if len(_RULE_STATES) >= _RULE_STATES_MAX:
        _RULE_STATES.clear()
    state = RuleState(rule.comment,
                      canonical_expr([statement_json(s) for s in rule.statements]))
    _RULE_STATES[rule.comment] = (rule.statements, state)
    return state


def _set_state(named: NamedSet) -> SetState:
    return SetState.of_members(named.key_type, tuple(sorted(named.flags)), named.is_map,
                               named.elements, named.data_type if named.is_map else "verdict")


def _parse_listing(objects: Iterable[Mapping[str, Any]]) -> KernelState:
    sets: dict[ObjectKey, SetState] = {}
    hooks: dict[ObjectKey, Hook | None] = {}
    rules: dict[ObjectKey, list[RuleState]] = {}
    tables: set[str] = set()
    interned: dict[str, Element] = {}
    shared: dict[RuleState, RuleState] = {}  # equal rules read back share one object
    for obj in objects:
        for kind, body in obj.items():
            if not isinstance(body, Mapping) or not _ours(kind, body):
                continue
            family = str(body["family"])
            if kind == "table":
                if not _flagged(body):
                    tables.add(family)
            elif kind in ("set", "map"):
                sets[(family, body["name"])] = _parse_set(kind == "map", body, interned)
            elif kind == "chain":
                hooks[(family, body["name"])] = _parse_hook(body)
            elif kind == "rule":
                rule = RuleState(str(body.get("comment", "")), canonical_expr(body["expr"]))
                rules.setdefault((family, body["chain"]), []).append(shared.setdefault(rule, rule))
    chains = {key: ChainState(hook, tuple(rules.get(key, ()))) for key, hook in hooks.items()}
    return KernelState(sets=sets, chains=chains, tables=frozenset(tables))


def _ours(kind: str, body: Mapping[str, Any]) -> bool:
    table = body.get("name") if kind == "table" else body.get("table")
    return body.get("family") in FAMILIES and table == TABLE


def _flagged(table: Mapping[str, Any]) -> bool:
    """Whether a listed table carries a flag. secfw writes its tables without
    any; ``dormant`` unregisters every base chain of the table (nft(8),
    TABLES: the table "is not evaluated any more": all traffic passes), and
    ``owner`` ties it to another process. nft 1.0.6 does not even list the
    flag right (measured: ``"flags": "secfw"``, the table's name, for
    ``dormant``), so any ``flags`` member that is not empty counts."""
    return bool(table.get("flags"))


def _parse_hook(body: Mapping[str, Any]) -> Hook | None:
    if "hook" not in body:
        return None
    return Hook(str(body["type"]), str(body["hook"]), int(body["prio"]),
                str(body.get("policy", "accept")))


def _parse_set(is_map: bool, body: Mapping[str, Any], interned: dict[str, Element]) -> SetState:
    raw_type = body["type"]
    key_type = (raw_type,) if isinstance(raw_type, str) else tuple(raw_type)
    data_type = str(body.get("map", "verdict"))
    if is_map and data_type not in _DATA_TYPES:
        raise ValueError(f"map {body['name']} maps to {data_type}, not to {_DATA_TYPES}")
    flags = tuple(sorted(str(f) for f in body.get("flags", ())))
    raws = body.get("elem", ())
    if key_type == ("ifname",) and not is_map:
        elements = frozenset(_ifname_element(raw, interned) for raw in raws)
    else:
        elements = frozenset(_parse_element(raw, key_type, is_map) for raw in raws)
    return SetState(key_type, flags, is_map, elements, data_type if is_map else "verdict")


def _ifname_element(raw: Any, interned: dict[str, Element]) -> Element:
    """Fast path for the <G>-ports sets (most elements of a big table): a tap is in
    ~20 of them and shares one Element, as in :func:`.render.render`."""
    if not isinstance(raw, str):
        return _parse_element(raw, ("ifname",), False)
    element = interned.get(raw)
    if element is None:
        element = interned[raw] = Element((raw,))
    return element


def _parse_element(raw: Any, key_type: tuple[str, ...], is_map: bool) -> Element:
    """One listed element (a map element is ``[key, verdict]``) in normal form."""
    verdict = None
    if is_map:
        raw, data = raw
        verdict = (Datum(str(int(data))) if isinstance(data, int)
                   else Datum(str(ipaddress.IPv4Address(data))) if isinstance(data, str)
                   else parse_verdict(data))
    raw = _unwrap(raw)
    if len(key_type) == 1:  # fast path: no concatenation
        return Element((_component(raw, key_type[0]),), verdict)
    parts = raw["concat"] if isinstance(raw, dict) and "concat" in raw else [raw]
    if len(parts) != len(key_type):
        raise ValueError(f"element {raw!r} does not match type {key_type}")
    key = tuple(_component(_unwrap(p), t) for p, t in zip(parts, key_type, strict=True))
    return Element(key, verdict)


def _unwrap(raw: Any) -> Any:
    """An element with attributes (timeout, comment, counter) is ``{"elem": {"val": …}}``."""
    while isinstance(raw, dict) and "elem" in raw:  # JSON objects are dicts
        raw = raw["elem"]["val"]
    return raw


def _component(raw: Any, key_type: str) -> str:
    if key_type == "ether_addr":
        return str(raw).lower()
    if key_type == "integer":  # the 128-bit NA targets (protect.nd_sets)
        return _integer_component(raw)
    if key_type not in ADDRESS_TYPES:
        return str(raw)
    if isinstance(raw, str):
        return canonical_cidr(raw)
    if "prefix" in raw:
        return canonical_cidr(f"{raw['prefix']['addr']}/{raw['prefix']['len']}")
    low, high = (ipaddress.ip_address(a) for a in raw["range"])
    cidrs = list(ipaddress.summarize_address_range(low, high))
    return canonical_cidr(str(cidrs[0])) if len(cidrs) == 1 else f"{low}-{high}"


def _integer_component(raw: Any) -> str:
    """A listed 128-bit integer (a small one lists as a JSON number, a big one as a
    ``0x…`` string; a range as ``{"range": [low, high]}``) as rendered: ``0x`` and
    32 hex digits, a range as ``low-high``."""
    if isinstance(raw, dict) and "range" in raw:
        low, high = raw["range"]
        return f"{_integer_component(low)}-{_integer_component(high)}"
    value = raw if isinstance(raw, int) else int(str(raw), 0)
    return hex_text(value, 128)


def parse_verdict(data: Any) -> Verdict:
    """``{"goto": {"target": "x"}}`` → ``Verdict("goto", "x")``; ``{"accept": null}`` → accept."""
    ((kind, arg),) = data.items()
    if kind not in _VERDICTS:
        raise ValueError(f"unknown verdict {data!r}")
    return Verdict(kind, None if arg is None else str(arg["target"]))
