"""verify's data path for nftables: the fixed skeleton once, each port's elements as data.

A host's ``inet``/``arp``/``bridge secfw`` tables are a fixed *skeleton* — the
base chains, ``ingress-filter``, ``egress-*``, the guard and protection chains,
the sets' declarations, the sets no port keys — plus *elements keyed by one
port*: its tap (routed) or its marks (bridged) as the first key component of
``ingress_ports``/``egress_ports``, the slot maps, ``spoof4/6``, ``nd_targets``,
the ARP sets, ``<N>-ports``, ``egress_marks``/``ingress_marks``,
``metadata_ports`` (docs/nftables.md, "Membership is data, rules are fixed").
:func:`port_data` compares the kernel's listing with the model's own rendering
(the backend's pure renderer) that way: the skeleton once, in normal form
(rules as canonical expression trees, :mod:`secfw.backends.nftables.canonical`;
sets as declarations and normalised elements, :mod:`~secfw.backends.nftables.state`
— never text), then every keyed element by its port.

Why equal skeleton and equal elements of port P mean equal verdicts for every
probe of P. The evaluator (:mod:`.nftkernel`) runs a probe of P through the
skeleton's chains; what it reads of the ruleset is (a) the rules of the chains
it walks, (b) the group chains it jumps to (verify's step 1 compares those),
(c) the address sets its rules look up by the probe's remote address (step 2)
and (d) lookups keyed by an interface or a mark. The probe's interfaces are
P's tap or the uplink/bridge, never another tap; its mark is set only by
lookups keyed by P's tap (``egress_marks``/``ingress_marks``, equal to the
model's) or by an address (``ingress_addrs4/6``, part of the skeleton: no port
keys it), so it is one of P's marks, or a mark the model gives to an address
(the inet forward hook's) which ``to-tap`` — the skeleton's, so the model's —
replaces by P's own element or clears before any lookup keyed by mark, or
none. An element whose first key is another port's tap or mark can therefore
never match, and one keyed by nothing of a port is in the skeleton. A set keyed
by an interface or mark holds exact keys unless its declaration has the
``interval`` flag; then a range could span several ports' keys, so only an
element whose first component is exactly one port's key is attributed to it.
Hence: a differing element is attributed to the port its first key names; any
other difference — a rule, a hook, a declaration, an element keyed by no port
(an address map, a floating-IP map, a range) — is a skeleton difference and
every port is probed (slow, still complete).

A rule present on one side only is attributed to a port, not to the skeleton,
when its first statement is ``iifname``/``oifname == "<P's tap>"``: a rule's
statements run in order and a failed match ends it before anything else runs
(nft(8), "RULES"), and only P's probes carry that name, so for every other
port the rule is inert.

Equal canonical forms mean equal rules (canonical.py's contract, which the
agent's drift detection relies on) with one exception: canonical.py drops a
protocol dependency (``meta l4proto tcp``) that a later statement implies, so a
kernel rule with a statement that acts (``meta mark set``, NAT) between the two
would read as the same rule without the dependency. It could equal only a
model rule that acts before a statement reading a header; the renderer writes
none, and :func:`_model_chains` checks it: such a model rule makes the
skeleton undecided (every port probed). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from secfw.backends.nftables.canonical import Canon, canonical_expr
from secfw.backends.nftables.layout import PortIdentity, port_identity
from secfw.backends.nftables.state import KernelState
from secfw.backends.nftables.syntax import (
    FAMILIES,
    TABLE,
    Element,
    Hook,
    Ruleset,
    hex_text,
    statement_json,
)
from secfw.errors import BackendError

#: Interface keys whose equality with a tap, as a rule's first statement, makes
#: the rule inert for every other port's probes (module docstring).
_GUARD_KEYS = ("iifname", "oifname")
#: A chain: its hook and its rules, each as (canonical form, the tap it is
#: guarded by or None).
_ChainForm = tuple[Hook | None, tuple[tuple[Canon, str | None], ...]]


@dataclass(frozen=True)
class PortData:
    """What :func:`port_data` found: ``skeleton`` None when the skeleton equals the
    model's, else its first difference (words for a log); ``differing``: the
    taps whose own elements or guarded rules differ."""

    skeleton: str | None
    differing: frozenset[str]

    def answers(self, tap: str) -> bool:
        """Whether the port of ``tap`` enforces the model's rendering of it."""
        return self.skeleton is None and tap not in self.differing


def port_data(listing: Mapping[str, Any], desired: Ruleset, topology: str,
              taps: Collection[str], group_chains: Collection[str],
              address_sets: Collection[str]) -> PortData:
    """The kernel's ``listing`` (libnftables JSON of secfw's tables) against
    ``desired`` (the model of the host's ``taps`` rendered for ``topology``), the
    group chains and the address sets left out (verify compares them itself,
    steps 1 and 2). A listing this cannot read is a skeleton difference."""
    try:
        return _port_data(listing, desired, port_identity(topology, taps), taps,
                          group_chains, address_sets)
    except _Undecided as exc:
        return PortData(str(exc), frozenset())
    except (BackendError, KeyError, TypeError, ValueError, AttributeError) as exc:
        return PortData(f"unreadable listing: {exc!r}", frozenset())


def _port_data(listing: Mapping[str, Any], desired: Ruleset, ident: PortIdentity,
               taps: Collection[str], group_chains: Collection[str],
               address_sets: Collection[str]) -> PortData:
    owners = {key: tap for tap in taps for key in (tap, ident.egress(tap), ident.ingress(tap))}
    objects = listing.get("nftables", [])
    differing: set[str] = set()
    why = _foreign(objects)
    if why is None:
        why = _compare_chains(_kernel_chains(objects, group_chains),
                              _model_chains(desired, group_chains), owners, differing)
    if why is None:
        why = _compare_sets(_kernel_sets(objects, address_sets),
                            _model_sets(desired, address_sets), owners, differing)
    if why is None:
        families = {obj["table"]["family"] for obj in objects
                    if "table" in obj and obj["table"].get("name") == TABLE}
        if families != set(desired.families()):
            why = f"tables {sorted(families)}, the model's {sorted(desired.families())}"
    return PortData(why, frozenset(differing))


def _foreign(objects: Iterable[Mapping[str, Any]]) -> str | None:
    """An object of the listing outside secfw's tables (the evaluator would run
    a chain of any table it is given), or None."""
    for obj in objects:
        for kind, body in obj.items():
            if kind == "table" and "flags" in body:  # dormant: no chain of it runs
                return f"table {body.get('family')} {body.get('name')} has flags"
            if kind in ("chain", "rule", "set", "map") and (
                    body.get("table") != TABLE or body.get("family") not in FAMILIES):
                return f"{kind} {body.get('name', '')} in table {body.get('table')}"
    return None


def _kernel_chains(objects: Iterable[Mapping[str, Any]], group_chains: Collection[str]
                   ) -> dict[tuple[str, str], _ChainForm]:
    hooks: dict[tuple[str, str], Hook | None] = {}
    rules: dict[tuple[str, str], list[tuple[Canon, str | None]]] = {}
    for obj in objects:
        if "chain" in obj and obj["chain"]["name"] not in group_chains:
            body = obj["chain"]
            hooks[(body["family"], body["name"])] = None if "hook" not in body else Hook(
                str(body["type"]), str(body["hook"]), int(body["prio"]),
                str(body.get("policy", "accept")))
        elif "rule" in obj and obj["rule"]["chain"] not in group_chains:
            body = obj["rule"]
            rules.setdefault((body["family"], body["chain"]), []).append(
                (canonical_expr(body["expr"]), _guard(body["expr"])))
    return {key: (hook, tuple(rules.get(key, ()))) for key, hook in hooks.items()}


def _model_chains(desired: Ruleset, group_chains: Collection[str]
                  ) -> dict[tuple[str, str], _ChainForm]:
    found: dict[tuple[str, str], _ChainForm] = {}
    for chain in desired.chains:
        if chain.name in group_chains:
            continue
        forms = []
        for rule in chain.rules:
            expr = [statement_json(s) for s in rule.statements]
            if _acts_before_header(expr):
                raise _Undecided(f"chain {chain.name}: a rule acts before reading a header")
            forms.append((canonical_expr(expr), _guard(expr)))
        found[(chain.family, chain.name)] = (chain.hook, tuple(forms))
    return found


class _Undecided(Exception):
    """The skeleton cannot be compared in normal form (module docstring)."""


def _acts_before_header(expr: list[Any]) -> bool:
    """Whether a statement that is not a match comes before one that reads a
    named header (where canonical.py's dropped dependency would matter)."""
    acted = False
    for statement in expr:
        if acted and _reads_header(statement):
            return True
        acted = acted or not (isinstance(statement, dict) and "match" in statement)
    return False


def _reads_header(node: Any) -> bool:
    if isinstance(node, list):
        return any(_reads_header(item) for item in node)
    if isinstance(node, dict):
        payload = node.get("payload")
        if isinstance(payload, dict) and "protocol" in payload:
            return True
        return any(_reads_header(value) for value in node.values())
    return False


def _guard(expr: list[Any]) -> str | None:
    """The interface name a rule's first statement requires (``iifname ==
    "tap…"``), or None."""
    first = expr[0] if expr else None
    match = first.get("match") if isinstance(first, dict) else None
    if not isinstance(match, dict) or match.get("op") != "==":
        return None
    left, right = match.get("left"), match.get("right")
    key = left.get("meta", {}).get("key") if isinstance(left, dict) else None
    if key in _GUARD_KEYS and isinstance(right, str) and not right.endswith("*"):
        return right
    return None


def _compare_chains(kernel: Mapping[tuple[str, str], _ChainForm],
                    model: Mapping[tuple[str, str], _ChainForm],
                    owners: Mapping[str, str], differing: set[str]) -> str | None:
    """Each chain's hook and rules, the rules guarded by a port's tap set apart
    (their ports added to ``differing``); the first skeleton difference, or None."""
    for key in sorted(kernel.keys() | model.keys()):
        if key not in kernel or key not in model:
            return f"chain {key[0]} {key[1]} only in the {'kernel' if key in kernel else 'model'}"
        (hook, rules), (model_hook, model_rules) = kernel[key], model[key]
        if hook != model_hook:
            return f"chain {key[1]}: hook {hook}, the model's {model_hook}"
        if rules == model_rules:
            continue
        guarded = [r for r in (*rules, *model_rules) if r[1] is not None]
        if any(guard not in owners for _, guard in guarded):
            return f"chain {key[1]}: a rule for an interface that is no port's"
        if [r for r in rules if r[1] is None] != [r for r in model_rules if r[1] is None]:
            return f"chain {key[1]}: rules differ"
        differing.update(owners[guard] for _, guard in guarded if guard is not None)
    return None


#: The model's set: its declaration (:attr:`SetState.declaration`) and its
#: elements — for a verdict map keyed by an interface or a mark, ``(key,
#: verdict kind, target)`` tuples (built faster than :class:`Element`\ s: the
#: slot maps hold most of a big host's elements); for any other set its
#: :class:`Element`\ s; None for an address set (verify's step 2 compares it).
_SetForm = tuple[tuple[Any, ...], frozenset[Any] | None]


@dataclass
class _KernelSet:
    """A set of the listing: its declaration, its JSON object and, when every
    element is plain, its elements read quickly as text (:func:`_quick`)."""

    declared: tuple[Any, ...]
    obj: Mapping[str, Any]
    quick: frozenset[Any] | None

    def exact(self) -> frozenset[Any]:
        """The elements in state.py's normal form (as :data:`_SetForm`)."""
        ((_kind, body),) = self.obj.items()
        state = KernelState.from_nft_json({"nftables": [self.obj]}).sets[
            (str(body["family"]), str(body["name"]))]
        if _is_verdict_map(self.declared):
            return frozenset((e.key[0], e.verdict.kind, e.verdict.target)  # type: ignore[union-attr]
                             for e in state.elements)
        return state.elements


def _compare_sets(kernel: Mapping[tuple[str, str], _KernelSet],
                  model: Mapping[tuple[str, str], _SetForm],
                  owners: Mapping[str, str], differing: set[str]) -> str | None:
    """Each set's declaration, then its elements: a differing element whose first
    key is a port's tap or mark is that port's (added to ``differing``), any
    other is a skeleton difference (returned). Elements read quickly that equal
    the model's are equal; any other difference is judged on the exact form."""
    for key in sorted(kernel.keys() | model.keys()):
        if key not in kernel or key not in model:
            return f"set {key[1]} only in the {'kernel' if key in kernel else 'model'}"
        found, (declared, wanted) = kernel[key], model[key]
        if found.declared != declared:
            return f"set {key[1]}: declared {found.declared}, the model {declared}"
        if wanted is None or found.quick == wanted:
            continue
        for element in found.exact() ^ wanted:
            owner = owners.get(_first_key(element))
            if owner is None:
                return f"set {key[1]}: element {element} is keyed by no port"
            differing.add(owner)
    return None


def _first_key(element: Any) -> Any:
    return element.key[0] if isinstance(element, Element) else element[0]


def _model_sets(desired: Ruleset, address_sets: Collection[str]
                ) -> dict[tuple[str, str], _SetForm]:
    found: dict[tuple[str, str], _SetForm] = {}
    for named in desired.sets:
        declared = (named.key_type, tuple(sorted(named.flags)), named.is_map,
                    named.data_type if named.is_map else "verdict")
        if named.name in address_sets:
            found[(named.family, named.name)] = (declared, None)
        elif _is_verdict_map(declared):
            found[(named.family, named.name)] = (declared, frozenset(
                (e.key[0], e.verdict.kind, e.verdict.target)  # type: ignore[union-attr]
                for e in named.elements))
        else:
            found[(named.family, named.name)] = (declared, frozenset(named.elements))
    return found


def _is_verdict_map(declared: tuple[Any, ...]) -> bool:
    return declared in ((("ifname",), (), True, "verdict"), (("mark",), (), True, "verdict"))


def _kernel_sets(objects: Iterable[Mapping[str, Any]], address_sets: Collection[str]
                 ) -> dict[tuple[str, str], _KernelSet]:
    """The listing's sets and maps: declarations as ``KernelState`` reads them,
    elements read quickly (but for ``address_sets``)."""
    found: dict[tuple[str, str], _KernelSet] = {}
    for obj in objects:
        for kind in ("set", "map"):
            body = obj.get(kind)
            if body is None:
                continue
            key = (str(body["family"]), str(body["name"]))
            bare = {kind: {k: v for k, v in body.items() if k != "elem"}}
            declared = KernelState.from_nft_json({"nftables": [bare]}).sets[key].declaration
            quick = None if key[1] in address_sets else _quick(body, declared)
            found[key] = _KernelSet(declared, {kind: body}, quick)
    return found


def _quick(body: Mapping[str, Any], declared: tuple[Any, ...]) -> frozenset[Any] | None:
    r"""A set's elements as their text says, when every one is plain (None:
    another shape): a verdict map's ``[key, verdict]`` as ``(key, kind,
    target)`` — exactly as state.py reads them — and a set's keys (concatenated
    or not) as :class:`Element`\ s with an address given ``/32`` or ``/128``, a
    MAC in lower case, a 128-bit integer in ``0x`` and 32 digits. For an address
    that is the canonical text only when nft printed it canonically; a set read
    so that equals the model's canonical elements is therefore equal, and one
    that does not is read again exactly (:meth:`_KernelSet.exact`)."""
    if _is_verdict_map(declared):
        return _verdict_items(body)
    key_type, flags, is_map, _ = declared
    if is_map or flags:
        return None
    readers = [_READERS.get(t, _plain) for t in key_type]
    items = []
    for raw in body.get("elem", ()):
        parts = raw["concat"] if isinstance(raw, dict) and "concat" in raw else [raw]
        if len(parts) != len(readers):
            return None
        key = tuple([read(part) for read, part in zip(readers, parts, strict=True)])
        if None in key:
            return None
        items.append(_new_element(Element, (key, None)))
    return frozenset(items)


#: ``Element(key)`` without the NamedTuple's Python-level ``__new__`` (as the
#: renderer builds its elements: a big host has ~100k of them here).
_new_element = tuple.__new__


def _plain(raw: Any) -> str | None:
    """An interface name, a mark, any key state.py keeps as its text."""
    return str(raw) if isinstance(raw, str | int) and not isinstance(raw, bool) else None


def _mac(raw: Any) -> str | None:
    return raw.lower() if isinstance(raw, str) else None


def _address(bits: int) -> Callable[[Any], str | None]:
    def read(raw: Any) -> str | None:
        return f"{raw}/{bits}" if isinstance(raw, str) and "/" not in raw else None
    return read


def _integer(raw: Any) -> str | None:
    """A 128-bit integer as rendered (``0x`` and 32 hex digits)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return hex_text(raw, 128)
    if isinstance(raw, str) and raw.startswith("0x"):
        try:
            return hex_text(int(raw, 16), 128)
        except ValueError:
            return None
    return None


#: How :func:`_quick` reads a key component of each type.
_READERS: dict[str, Callable[[Any], str | None]] = {
    "ether_addr": _mac, "ipv4_addr": _address(32), "ipv6_addr": _address(128),
    "integer": _integer}


def _verdict_items(body: Mapping[str, Any]) -> frozenset[tuple[str, str, str | None]] | None:
    """A verdict map's plain ``[key, verdict]`` elements as ``(key, kind,
    target)``, read as state.py reads them (None: an element of another shape)."""
    items = []
    for raw in body.get("elem", ()):
        if not isinstance(raw, list) or len(raw) != 2 or not isinstance(raw[0], str | int) \
                or isinstance(raw[0], bool) or not isinstance(raw[1], dict) or len(raw[1]) != 1:
            return None
        ((verb, arg),) = raw[1].items()
        target = arg.get("target") if isinstance(arg, dict) else None
        if verb not in _VERDICTS or (target is None) != (verb not in ("jump", "goto")) \
                or not isinstance(target, str | None):
            return None
        items.append((str(raw[0]), verb, target))
    return frozenset(items)


#: The verdicts a map element may hold (as :func:`.state.parse_verdict`).
_VERDICTS = frozenset({"accept", "drop", "continue", "return", "jump", "goto"})
