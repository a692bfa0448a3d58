"""Ingress dispatch layouts side by side: new-flow cost, full apply, port changes.

``python -m secfw.bench.layouts PORTS[,PORTS…] REPS SECONDS LAYOUT[,LAYOUT…]``
(or ``ports-map PORTS REPS``: :func:`port_classes`)
builds three namespaces (client → host → server, the server behind a veth
named like a tap), loads in the host a synthetic ``inet x`` table for each
layout in turn and measures, interleaved REPS times (medians printed, one JSON
line per size and layout; each run's figures on stderr):

* ``udp_new_pps`` — datagrams of one UDP flow the server never answers,
  forwarded per second: conntrack marks a flow established only on a reply, so
  every datagram is ``ct state new`` and walks the whole dispatch;
* ``p50_us``/``p99_us``/``rate`` — :mod:`secfw.bench.connrate`'s client;
* ``new_cpu_us`` — CPU time per datagram of new flows sent by the host itself,
  which its output hook sends through the same dispatch: the steadiest of the
  three on a loaded machine (CPU time, not a rate; see ``_OUTPUT_SENDER``);
* ``apply_s`` — ``nft -f`` of the whole table into an empty ruleset;
  ``elem_add_ms`` — one element into a small unreferenced set (libnftables
  1.0.6 lists every chain first; the kernel validates nothing);
  ``port_add_ms`` — one new port's dispatch elements (all of them, one batch;
  removed again untimed); ``group_rm_ms`` — a port's first group removed (put
  back untimed). Each is wall time, with ``…_cpu`` (CPU time of nft) and
  ``…_kernel`` (its time in ``sendmsg``: the transaction in the kernel,
  commit and validation of the table included; see :meth:`Lab.nft_timed`).

The policy: 500 group chains × 10 rules, 20 random groups per port, the test
port's last group admitting the flow. Layouts (:data:`LAYOUTS`): ``none`` (no
table), ``ctonly`` (conntrack state, then accept), ``sets`` (one ``oifname
@<G>-ports jump <G>`` per group, secfw's former layout), ``slots`` (``oifname
vmap @slot<i>`` per slot, the current one), ``perport`` (a verdict map to a
chain per port that jumps its groups), and four without per-port verdict
elements, which dispatch on the packet mark through one fixed verdict map
``groups`` (group number → ``jump <G>``, O(groups)): ``datamap`` (per slot,
``meta mark set oifname map @dslot<i>``, a data map tap → group number),
``chain`` (the port's groups as a linked list in one data map, ``tap . previous
group → next group``, so a group removed is O(1) elements), and ``datamapct`` /
``chainct``: the same, the packet's mark saved in the conntrack mark before the
dispatch and put back by the accepting rule (:data:`RESTORING`). Used for
docs/nftables.md ("Why slot maps", "Dispatch without per-port verdicts"); not
part of ``make bench``.
"""

from __future__ import annotations

import json
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from itertools import pairwise

from secfw.bench.connrate import CONN_PORT

GROUPS, RULES, PER_PORT = 500, 10, 20
LAYOUTS = ("none", "ctonly", "sets", "slots", "perport", "datamap", "datamapct", "chain",
           "chainct")
#: Layouts whose group chains put the saved mark back (``meta mark set ct mark``)
#: in every accepting rule.
RESTORING = frozenset({"datamapct", "chainct"})
_SAVE = "ct mark set meta mark"  # the first dispatch rule of those layouts
#: strace -T: the time a call took, at the end of its line.
_SYSCALL_TIME = re.compile(r"<([0-9.]+)>$", re.MULTILINE)
#: The port of _OUTPUT_SENDER's datagrams: the group admitting CONN_PORT admits
#: it too (``_group``), and only it goes to the dispatch on output.
OUTPUT_PORT = CONN_PORT + 1
#: The tap the port-change deltas add (absent from every table).
NEW_TAP = "tapfffffffe-00"
_BLAST = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("10.91.2.2", int(sys.argv[2])))
n, end = 0, time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for _ in range(200):
        s.send(bytes(18))
    n += 200
print(n)
"""
#: Sends datagrams of new flows from the host itself through its output hook
#: (where the table sends them to the dispatch, as the forward hook does for
#: forwarded ones) and prints the CPU time per datagram in µs. The output hook
#: runs in the sender's own system call, so that is the filter's cost plus a
#: constant one — CPU time, not wall time: other jobs do not inflate it.
_OUTPUT_SENDER = """
import resource, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n, data, to = int(sys.argv[1]), bytes(18), ("10.91.2.2", int(sys.argv[2]))
used = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(n):
    s.sendto(data, to)
done = resource.getrusage(resource.RUSAGE_SELF)
print((done.ru_utime + done.ru_stime - used.ru_utime - used.ru_stime) / n * 1e6)
"""
#: Datagrams per run of _OUTPUT_SENDER.
OUTPUT_DATAGRAMS = 30_000
_SINK = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
time.sleep(86400)
"""


class Lab:
    """Client, host and server namespaces with unique names."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.client, self.host, self.server = f"lc{tag}", f"lh{tag}", f"ls{tag}"

    def sh(self, *args: str, stdin: str | None = None) -> str:
        """Run a command; RuntimeError with its stderr when it fails."""
        done = subprocess.run(args, capture_output=True, text=True, input=stdin,
                              timeout=600, check=False)
        if done.returncode:
            raise RuntimeError(done.stderr[-600:])
        return done.stdout

    def up(self) -> None:
        for ns in (self.client, self.host, self.server):
            self.sh("ip", "netns", "add", ns)
        self.sh("ip", "link", "add", "c0", "netns", self.client, "type", "veth", "peer",
                "name", "h0", "netns", self.host)
        self.sh("ip", "link", "add", "s0", "netns", self.server, "type", "veth", "peer",
                "name", "tapS0", "netns", self.host)
        for ns, dev, addr in ((self.client, "c0", "10.91.1.2/24"),
                              (self.host, "h0", "10.91.1.1/24"),
                              (self.host, "tapS0", "10.91.2.1/24"),
                              (self.server, "s0", "10.91.2.2/24")):
            self.sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            self.sh("ip", "-n", ns, "link", "set", dev, "up")
        self.sh("ip", "-n", self.client, "route", "add", "default", "via", "10.91.1.1")
        self.sh("ip", "-n", self.server, "route", "add", "default", "via", "10.91.2.1")
        self.sh("ip", "netns", "exec", self.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def down(self) -> None:
        for ns in (self.client, self.host, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def nft_timed(self, text: str) -> tuple[float, float, float]:
        """``nft -f -`` of ``text`` in the host: (wall ms, CPU ms, kernel ms).

        CPU is user + system time of nft (and of the strace watching it): their
        sum is the tasks' exact run time, their split only sampled by the tick
        (getrusage(2), cputime_adjust), so it is not used. The kernel's part is
        the time nft spends in ``sendmsg``: nfnetlink processes the batch —
        every command, then the commit and its validation of the table — in
        the sender's context before the call returns (nfnetlink_rcv_batch), so
        strace's ``-T`` of those calls is the transaction's kernel time; a
        seccomp filter stops nft at ``sendmsg`` alone (the cache listing runs
        unwatched)."""
        with tempfile.NamedTemporaryFile(mode="r", suffix=".strace") as trace:
            before = _children_cpu()
            started = time.perf_counter()
            self.sh("strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=sendmsg", "-T",
                    "-s", "0", "-o", trace.name, "ip", "netns", "exec", self.host,
                    "nft", "-f", "-", stdin=text)
            wall = time.perf_counter() - started
            cpu = _children_cpu() - before
            kernel = sum(float(t) for t in _SYSCALL_TIME.findall(trace.read()))
        return wall * 1000, cpu * 1000, kernel * 1000


def _children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def membership(ports: int, rng: random.Random) -> dict[str, list[int]]:
    """Tap → its group indexes; the test tap ``tapS0`` has the admitting group last."""
    taps = {f"tap{i:08x}-00": rng.sample(range(GROUPS), PER_PORT) for i in range(ports)}
    taps["tapS0"] = [*sorted(rng.sample(range(GROUPS - 1), PER_PORT - 1)), GROUPS - 1]
    return taps


def _group(g: int, restore: bool) -> str:
    """Group chain ``g``: RULES rules, the last admitting CONN_PORT if ``g`` is the
    last group; with ``restore`` each accept first puts the saved mark back."""
    verdict = "meta mark set ct mark accept" if restore else "accept"
    rules = [f"meta nfproto ipv4 meta l4proto 6 th dport {1000 + g * RULES + r} {verdict}"
             for r in range(RULES - 1)]
    last = f"{{ {CONN_PORT}, {OUTPUT_PORT} }}" if g == GROUPS - 1 else "999"
    rules.append(f"meta nfproto ipv4 meta l4proto {{ 6, 17 }} th dport {last} {verdict}")
    return f"chain g{g:03d} {{\n" + "\n".join(rules) + "\n}"


def group_mark(g: int) -> int:
    """The mark that stands for group chain ``g`` in the mark layouts (never 0)."""
    return g + 1


def groups_vmap(groups: int) -> str:
    """The fixed verdict map of the mark layouts: group mark → ``jump <G>``."""
    elements = ", ".join(f"{group_mark(g)} : jump g{g:03d}" for g in range(groups))
    return f"map groups {{ type mark : verdict; elements = {{ {elements} }} }}"


def _map(name: str, key: str, value: str, elements: Sequence[str]) -> str:
    body = f"elements = {{ {', '.join(elements)} }}" if elements else ""
    return f"map {name} {{ type {key} : {value}; {body} }}"


def _sets(taps: dict[str, list[int]], groups: int) -> tuple[list[str], list[str]]:
    members: dict[int, list[str]] = {g: [] for g in range(groups)}
    for tap, gs in taps.items():
        for g in gs:
            members[g].append(f'"{tap}"')
    decls, rules = [], []
    for g, names in members.items():
        elements = f"elements = {{ {', '.join(names)} }}" if names else ""
        decls.append(f"set g{g:03d}-ports {{ type ifname; {elements} }}")
        rules.append(f"oifname @g{g:03d}-ports jump g{g:03d}")
    return decls, rules


def _slots(taps: dict[str, list[int]], slots: int) -> tuple[list[str], list[str]]:
    decls, rules = [], []
    for i in range(slots):
        elements = [f'"{t}" : jump g{gs[i]:03d}' for t, gs in taps.items() if i < len(gs)]
        decls.append(_map(f"slot{i}", "ifname", "verdict", elements))
        rules.append(f"oifname vmap @slot{i}")
    return decls, rules


def _perport(taps: dict[str, list[int]]) -> tuple[list[str], list[str]]:
    decls = []
    for tap, gs in taps.items():
        jumps = "\n".join(f"jump g{g:03d}" for g in gs)
        decls.append(f"chain p-{tap} {{\n{jumps}\ndrop\n}}")
    decls.append(_map("port_chain", "ifname", "verdict", [f'"{t}" : goto p-{t}' for t in taps]))
    return decls, ["oifname vmap @port_chain"]


def _datamap(taps: dict[str, list[int]], slots: int, groups: int,
             save: bool) -> tuple[list[str], list[str]]:
    decls, rules = [groups_vmap(groups)], [_SAVE] if save else []
    for i in range(slots):
        elements = [f'"{t}" : {group_mark(gs[i])}' for t, gs in taps.items() if i < len(gs)]
        decls.append(_map(f"dslot{i}", "ifname", "mark", elements))
        # A tap without an i-th group misses the data map: the lookup breaks the
        # rule, so the vmap after it is not reached (nft_lookup: NFT_BREAK).
        rules.append(f"meta mark set oifname map @dslot{i} meta mark vmap @groups")
    return decls, rules


def chain_elements(tap: str, gs: Sequence[int]) -> tuple[str, list[str]]:
    """(the ``first`` element, the ``next`` elements) of ``tap`` with groups ``gs``."""
    first = f'"{tap}" : {group_mark(gs[0])}'
    links = [f'"{tap}" . {group_mark(a)} : {group_mark(b)}' for a, b in pairwise(gs)]
    return first, links


def _chain(taps: dict[str, list[int]], slots: int, groups: int,
           save: bool) -> tuple[list[str], list[str]]:
    firsts, links = [], []
    for tap, gs in taps.items():
        first, more = chain_elements(tap, gs)
        firsts.append(first)
        links.extend(more)
    decls = [groups_vmap(groups), _map("first", "ifname", "mark", firsts),
             _map("next", "ifname . mark", "mark", links)]
    # Each rule moves one step along the port's list: the mark holds the group
    # just tried, and `tap . mark` finds the next one (a miss ends the walk).
    rules = [_SAVE] if save else []
    rules.append("meta mark set oifname map @first meta mark vmap @groups")
    rules += ["meta mark set oifname . meta mark map @next meta mark vmap @groups"] * (slots - 1)
    return decls, rules


def dispatch(layout: str, taps: dict[str, list[int]], groups: int = GROUPS,
             slots: int = PER_PORT) -> tuple[list[str], list[str]]:
    """(declarations, ingress-filter rules) of ``layout`` for ``taps`` (tap → its
    group indexes, at most ``slots``, each below ``groups``)."""
    if layout == "sets":
        return _sets(taps, groups)
    if layout == "slots":
        return _slots(taps, slots)
    if layout == "perport":
        return _perport(taps)
    if layout in ("datamap", "datamapct"):
        return _datamap(taps, slots, groups, save=layout in RESTORING)
    if layout in ("chain", "chainct"):
        return _chain(taps, slots, groups, save=layout in RESTORING)
    if layout == "ctonly":
        return [], ["accept"]
    raise ValueError(f"unknown layout {layout!r}")


def ruleset(layout: str, taps: dict[str, list[int]]) -> str:
    """The host's table for ``layout`` ("" for ``none``)."""
    if layout == "none":
        return ""
    decls, rules = dispatch(layout, taps)
    body = [  # the group chains in every layout (conntrack-only loads them unused)
        *(_group(g, layout in RESTORING) for g in range(GROUPS)), *decls,
        "chain ingress-filter {\n"
        "ct state vmap { established : accept, related : accept, invalid : drop }\n"
        "tcp flags & (fin | syn | rst | ack) != syn drop\n" + "\n".join(rules) + "\ndrop\n}",
        "chain forward-in {\ntype filter hook forward priority 0; policy accept;\n"
        'oifname != "tap*" accept\noifname "tapS0" goto ingress-filter\n}',
        "chain output-in {\ntype filter hook output priority 0; policy accept;\n"
        f'oifname "tapS0" udp dport {OUTPUT_PORT} goto ingress-filter\n}}',
        "set probe { type inet_service; }",
    ]
    return "add table inet x\ndelete table inet x\ntable inet x {\n" + "\n".join(body) + "\n}\n"


def _elements(verb: str, target: str, elements: Sequence[str]) -> list[str]:
    return [f"{verb} element inet x {target} {{ {', '.join(elements)} }}"] if elements else []


def _port_lines(verb: str, layout: str, tap: str, gs: Sequence[int]) -> list[str]:
    """``add``/``delete`` commands of ``tap``'s dispatch elements (and chain, for
    ``perport``) with groups ``gs`` in slots 0…."""
    if layout == "sets":
        return [line for g in gs for line in _elements(verb, f"g{g:03d}-ports", [f'"{tap}"'])]
    if layout in ("slots", "datamap", "datamapct"):
        def value(g: int) -> str:
            return f"jump g{g:03d}" if layout == "slots" else str(group_mark(g))
        prefix = "slot" if layout == "slots" else "dslot"
        keyed = verb == "delete"
        return [line for i, g in enumerate(gs) for line in _elements(
            verb, f"{prefix}{i}", [f'"{tap}"' if keyed else f'"{tap}" : {value(g)}'])]
    if layout in ("chain", "chainct"):
        first, links = chain_elements(tap, gs)
        if verb == "delete":  # a delete names keys only
            first, links = first.rsplit(" : ", 1)[0], [k.rsplit(" : ", 1)[0] for k in links]
        return _elements(verb, "first", [first]) + _elements(verb, "next", links)
    if layout == "perport":
        return _perport_lines(verb, tap, gs)
    return []


def _perport_lines(verb: str, tap: str, gs: Sequence[int]) -> list[str]:
    if verb == "delete":
        return [f'delete element inet x port_chain {{ "{tap}" }}', f"delete chain inet x p-{tap}"]
    return [f"add chain inet x p-{tap}",
            *(f"add rule inet x p-{tap} jump g{g:03d}" for g in gs),
            f"add rule inet x p-{tap} drop",
            f'add element inet x port_chain {{ "{tap}" : goto p-{tap} }}']


def port_delta(layout: str, tap: str, gs: Sequence[int]) -> tuple[str, str]:
    """(the batch adding port ``tap`` with groups ``gs``, the one removing it)."""
    return ("\n".join(_port_lines("add", layout, tap, gs)) + "\n",
            "\n".join(_port_lines("delete", layout, tap, gs)) + "\n")


def group_removal(layout: str, tap: str, gs: Sequence[int]) -> tuple[str, str]:
    """(the batch removing ``tap``'s first group of ``gs``, the one putting it back).

    Slot layouts shift the later slots (O(groups of the port) elements); the
    linked list relinks one element; per-port chains are rewritten."""
    rest = list(gs[1:])
    if layout == "sets":
        return (f'delete element inet x g{gs[0]:03d}-ports {{ "{tap}" }}\n',
                f'add element inet x g{gs[0]:03d}-ports {{ "{tap}" }}\n')
    if layout == "perport":
        def body(kept: Sequence[int]) -> str:
            return "\n".join([f"flush chain inet x p-{tap}",
                              *(f"add rule inet x p-{tap} jump g{g:03d}" for g in kept),
                              f"add rule inet x p-{tap} drop"]) + "\n"
        return body(rest), body(gs)
    old_add, old_del = port_delta(layout, tap, gs)
    new_add, new_del = port_delta(layout, tap, rest)
    if layout in ("chain", "chainct"):
        first_old, _ = chain_elements(tap, gs)
        first_new, _ = chain_elements(tap, rest)
        link = f'"{tap}" . {group_mark(gs[0])}'
        return (f'delete element inet x first {{ "{tap}" }}\n'
                f"add element inet x first {{ {first_new} }}\n"
                f"delete element inet x next {{ {link} }}\n",
                f'delete element inet x first {{ "{tap}" }}\n'
                f"add element inet x first {{ {first_old} }}\n"
                f"add element inet x next {{ {link} : {group_mark(gs[1])} }}\n")
    return old_del + new_add, new_del + old_add


def _timed(lab: Lab, name: str, text: str) -> dict[str, float]:
    """``name_ms``, ``name_cpu_ms``, ``name_kernel_ms`` of ``text`` applied."""
    wall, cpu, kernel = lab.nft_timed(text)
    return {f"{name}_ms": wall, f"{name}_cpu_ms": cpu, f"{name}_kernel_ms": kernel}


def _measure_changes(lab: Lab, layout: str, taps: dict[str, list[int]],
                     rng: random.Random) -> dict[str, float]:
    """Port add and group removal of ``layout`` (already loaded), each undone."""
    row: dict[str, float] = {}
    add, remove = port_delta(layout, NEW_TAP, rng.sample(range(GROUPS), PER_PORT))
    row |= _timed(lab, "port_add", add)
    lab.nft_timed(remove)
    tap = rng.choice([t for t in taps if t != "tapS0"])
    drop, restore = group_removal(layout, tap, taps[tap])
    row |= _timed(lab, "group_rm", drop)
    lab.nft_timed(restore)
    return row


def _measure(lab: Lab, layout: str, texts: dict[str, str], taps: dict[str, list[int]],
             seconds: float, probe: int) -> dict[str, float]:
    """Load ``layout``'s table and measure it once (see the module doc)."""
    # The previous layout's table goes first, untimed: deleting it in the same
    # transaction would charge its teardown to this layout's apply. The kernel
    # frees a deleted table's objects later, in a work item
    # (nf_tables_trans_destroy_work): give it a moment off the clock.
    lab.sh("ip", "netns", "exec", lab.host, "nft", "flush", "ruleset")
    time.sleep(1)
    text = texts[layout]
    row: dict[str, float] = {}
    if text:
        wall, cpu, kernel = lab.nft_timed(text)
        row |= {"apply_s": wall / 1000, "apply_cpu_s": cpu / 1000, "apply_kernel_s": kernel / 1000}
        row |= _timed(lab, "elem_add", f"add element inet x probe {{ {probe} }}\n")
    if layout not in ("none", "ctonly"):
        row |= _measure_changes(lab, layout, taps, random.Random(probe))
    row |= _traffic(lab, seconds)
    return row


def _traffic(lab: Lab, seconds: float) -> dict[str, float]:
    """CPU per new datagram on the output hook, new UDP datagrams forwarded per
    second, then connrate's TCP connects."""
    row = {"new_cpu_us": float(lab.sh("ip", "netns", "exec", lab.host, sys.executable, "-c",
                                      _OUTPUT_SENDER, str(OUTPUT_DATAGRAMS),
                                      str(OUTPUT_PORT)))}
    rx = ("ip", "netns", "exec", lab.server, "cat", "/sys/class/net/s0/statistics/rx_packets")
    before = int(lab.sh(*rx))
    lab.sh("ip", "netns", "exec", lab.client, sys.executable, "-c", _BLAST, str(seconds),
           str(CONN_PORT))
    row["udp_new_pps"] = (int(lab.sh(*rx)) - before) / seconds
    found = json.loads(lab.sh("ip", "netns", "exec", lab.client, sys.executable, "-m",
                              "secfw.bench.connrate", "client", "10.91.2.2", str(CONN_PORT),
                              str(seconds), "2"))
    return row | {"rate": found["rate"], "p50_us": found["p50_us"], "p99_us": found["p99_us"]}


def with_port_classes(text: str, taps: dict[str, list[int]], kind: str) -> str:
    """``text`` with the test tap's fixed ``goto ingress-filter`` replaced by a
    per-port class as secfw has it: ``vmap`` (every tap → ``goto
    ingress-filter`` in a verdict map, like ``ingress_ports``) or ``set`` (the
    taps in a set tested by one ``goto`` rule)."""
    fixed = 'oifname "tapS0" goto ingress-filter'
    if kind == "vmap":
        decl = _map("ports", "ifname", "verdict", [f'"{t}" : goto ingress-filter' for t in taps])
        rule = "oifname vmap @ports"
    else:
        names = ", ".join(f'"{t}"' for t in taps)
        decl = f"set ports {{ type ifname; elements = {{ {names} }} }}"
        rule = "oifname @ports goto ingress-filter"
    return text.replace(fixed, rule).replace("set probe {", decl + "\nset probe {")


def port_classes(size: int, reps: int) -> int:
    """``ports-map SIZE REPS``: a port added (dispatch elements and its class
    element, one batch) under slots and datamapct, the class a ``goto`` verdict
    element or a set element; medians of nft's CPU and kernel ms, one JSON line
    each."""
    taps = membership(size, random.Random(size))
    lab = Lab()
    lab.up()
    runs: dict[str, list[tuple[float, float]]] = {}
    try:
        for rep in range(reps):
            for layout in ("slots", "datamapct"):
                for kind in ("vmap", "set"):
                    lab.sh("ip", "netns", "exec", lab.host, "nft", "flush", "ruleset")
                    lab.nft_timed(with_port_classes(ruleset(layout, taps), taps, kind))
                    add, remove = port_delta(layout, NEW_TAP,
                                             random.Random(rep).sample(range(GROUPS), PER_PORT))
                    value = " : goto ingress-filter" if kind == "vmap" else ""
                    _, cpu, kernel = lab.nft_timed(
                        add + f'add element inet x ports {{ "{NEW_TAP}"{value} }}\n')
                    lab.nft_timed(remove + f'delete element inet x ports {{ "{NEW_TAP}" }}\n')
                    runs.setdefault(f"{layout}/{kind}", []).append((cpu, kernel))
    finally:
        lab.down()
    for name, rows in runs.items():
        print(json.dumps({"ports": size, "layout": name,
                          "port_add_cpu_ms": round(statistics.median(r[0] for r in rows), 2),
                          "port_add_kernel_ms": round(statistics.median(r[1] for r in rows), 2)}))
    return 0


def _exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    """See the module doc."""
    if len(argv) == 3 and argv[0] == "ports-map":
        return port_classes(int(argv[1]), int(argv[2]))
    if len(argv) != 4 or not set(argv[3].split(",")) <= set(LAYOUTS):
        print(__doc__, file=sys.stderr)
        return 2
    sizes, reps, seconds = [int(p) for p in argv[0].split(",")], int(argv[1]), float(argv[2])
    layouts = argv[3].split(",")
    lab = Lab()
    lab.up()
    servers = [subprocess.Popen(["ip", "netns", "exec", lab.server, sys.executable, *args])
               for args in (["-m", "secfw.bench.connrate", "serve", str(CONN_PORT)],
                            ["-c", _SINK, str(CONN_PORT)])]
    # A TERM still tears the lab down (a background job ignores INT).
    signal.signal(signal.SIGTERM, _exit)
    try:
        time.sleep(1)
        for size in sizes:
            taps = membership(size, random.Random(size))
            texts = {layout: ruleset(layout, taps) for layout in layouts}
            runs: dict[str, list[dict[str, float]]] = {layout: [] for layout in layouts}
            for rep in range(reps):
                for layout in layouts:
                    row = _measure(lab, layout, texts, taps, seconds, 1000 + rep)
                    runs[layout].append(row)
                    print(json.dumps({"ports": size, "layout": layout, "rep": rep} | row),
                          file=sys.stderr, flush=True)  # each run, for paired ratios
            for layout, rows in runs.items():
                medians = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
                print(json.dumps({"ports": size, "layout": layout} | medians), flush=True)
    finally:
        for server in servers:
            server.terminate()
            server.wait()
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
