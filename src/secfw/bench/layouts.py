"""Ingress dispatch layouts side by side: new-flow cost, full apply, element add.

``python -m secfw.bench.layouts PORTS[,PORTS…] REPS SECONDS LAYOUT[,LAYOUT…]``
builds three namespaces (client → host → server, the server behind a veth
named like a tap), loads in the host a synthetic ``inet x`` table for each
layout in turn and measures, interleaved REPS times (medians printed, one JSON
line per size and layout):

* ``udp_new_pps`` — datagrams of one UDP flow the server never answers,
  forwarded per second: conntrack marks a flow established only on a reply, so
  every datagram is ``ct state new`` and walks the whole dispatch;
* ``p50_us``/``p99_us``/``rate`` — :mod:`secfw.bench.connrate`'s client;
* ``apply_s`` — ``nft -f`` of the whole table; ``elem_add_ms`` — one ``nft add
  element`` into a small set (libnftables 1.0.6 lists every chain first).

The policy: 500 group chains × 10 rules, 20 random groups per port, the test
port's last group admitting the flow. Layouts: ``none`` (no table), ``ctonly``
(conntrack state, then accept), ``sets`` (one ``oifname @<G>-ports jump <G>``
per group, secfw's former layout), ``slots`` (``oifname vmap @slot<i>`` per slot,
the current one), ``perport`` (a verdict map to a chain per port that jumps its
groups). Used for docs/nftables.md ("Why slot maps"); not part of ``make bench``.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
import uuid

from secfw.bench.connrate import CONN_PORT

GROUPS, RULES, PER_PORT = 500, 10, 20
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


def membership(ports: int, rng: random.Random) -> dict[str, list[int]]:
    """Tap → its group indexes; the test tap ``tapS0`` has the admitting group last."""
    taps = {f"tap{i:08x}-00": rng.sample(range(GROUPS), PER_PORT) for i in range(ports)}
    taps["tapS0"] = [*sorted(rng.sample(range(GROUPS - 1), PER_PORT - 1)), GROUPS - 1]
    return taps


def _group(g: int) -> str:
    rules = [f"meta nfproto ipv4 meta l4proto 6 th dport {1000 + g * RULES + r} accept"
             for r in range(RULES - 1)]
    last = CONN_PORT if g == GROUPS - 1 else 999
    rules.append(f"meta nfproto ipv4 meta l4proto {{ 6, 17 }} th dport {last} accept")
    return f"chain g{g:03d} {{\n" + "\n".join(rules) + "\n}"


def _dispatch(layout: str, taps: dict[str, list[int]]) -> tuple[list[str], list[str]]:
    """(declarations, ingress-filter rules) of ``layout``."""
    decls: list[str] = []
    rules: list[str] = []
    if layout == "sets":
        members: dict[int, list[str]] = {g: [] for g in range(GROUPS)}
        for tap, groups in taps.items():
            for g in groups:
                members[g].append(f'"{tap}"')
        for g, names in members.items():
            elements = f"elements = {{ {', '.join(names)} }}" if names else ""
            decls.append(f"set g{g:03d}-ports {{ type ifname; {elements} }}")
            rules.append(f"oifname @g{g:03d}-ports jump g{g:03d}")
    elif layout == "slots":
        for i in range(PER_PORT):
            elements = ", ".join(f'"{t}" : jump g{gs[i]:03d}' for t, gs in taps.items())
            decls.append(f"map slot{i} {{ type ifname : verdict; elements = {{ {elements} }} }}")
            rules.append(f"oifname vmap @slot{i}")
    elif layout == "perport":
        for tap, groups in taps.items():
            jumps = "\n".join(f"jump g{g:03d}" for g in groups)
            decls.append(f"chain p-{tap} {{\n{jumps}\ndrop\n}}")
        elements = ", ".join(f'"{t}" : goto p-{t}' for t in taps)
        decls.append(f"map port_chain {{ type ifname : verdict; elements = {{ {elements} }} }}")
        rules.append("oifname vmap @port_chain")
    elif layout == "ctonly":
        rules.append("accept")
    return decls, rules


def ruleset(layout: str, taps: dict[str, list[int]]) -> str:
    """The host's table for ``layout`` ("" for ``none``)."""
    if layout == "none":
        return ""
    decls, rules = _dispatch(layout, taps)
    body = [  # the group chains in every layout (conntrack-only loads them unused)
        *(_group(g) for g in range(GROUPS)), *decls,
        "chain ingress-filter {\n"
        "ct state vmap { established : accept, related : accept, invalid : drop }\n"
        "tcp flags & (fin | syn | rst | ack) != syn drop\n" + "\n".join(rules) + "\ndrop\n}",
        "chain forward-in {\ntype filter hook forward priority 0; policy accept;\n"
        'oifname != "tap*" accept\noifname "tapS0" goto ingress-filter\n}',
        "set probe { type inet_service; }",
    ]
    return "add table inet x\ndelete table inet x\ntable inet x {\n" + "\n".join(body) + "\n}\n"


def _measure(lab: Lab, text: str, seconds: float, probe: int) -> dict[str, float]:
    """Load ``text`` and measure it once (see the module doc)."""
    nft = ("ip", "netns", "exec", lab.host, "nft")
    started = time.perf_counter()
    lab.sh(*nft, "-f", "-", stdin=text) if text else lab.sh(*nft, "flush", "ruleset")
    row = {"apply_s": time.perf_counter() - started}
    if text:
        started = time.perf_counter()
        lab.sh(*nft, "add", "element", "inet", "x", "probe", "{", str(probe), "}")
        row["elem_add_ms"] = (time.perf_counter() - started) * 1000
    rx = ("ip", "netns", "exec", lab.server, "cat", "/sys/class/net/s0/statistics/rx_packets")
    before = int(lab.sh(*rx))
    lab.sh("ip", "netns", "exec", lab.client, sys.executable, "-c", _BLAST, str(seconds),
           str(CONN_PORT))
    row["udp_new_pps"] = (int(lab.sh(*rx)) - before) / seconds
    found = json.loads(lab.sh("ip", "netns", "exec", lab.client, sys.executable, "-m",
                              "secfw.bench.connrate", "client", "10.91.2.2", str(CONN_PORT),
                              str(seconds), "2"))
    row |= {"rate": found["rate"], "p50_us": found["p50_us"], "p99_us": found["p99_us"]}
    return row


def main(argv: list[str]) -> int:
    """See the module doc."""
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    sizes, reps, seconds = [int(p) for p in argv[0].split(",")], int(argv[1]), float(argv[2])
    layouts = argv[3].split(",")
    lab = Lab()
    lab.up()
    servers = [subprocess.Popen(["ip", "netns", "exec", lab.server, sys.executable, *args])
               for args in (["-m", "secfw.bench.connrate", "serve", str(CONN_PORT)],
                            ["-c", _SINK, str(CONN_PORT)])]
    try:
        time.sleep(1)
        for size in sizes:
            taps = membership(size, random.Random(size))
            texts = {layout: ruleset(layout, taps) for layout in layouts}
            runs: dict[str, list[dict[str, float]]] = {layout: [] for layout in layouts}
            for rep in range(reps):
                for layout in layouts:
                    runs[layout].append(_measure(lab, texts[layout], seconds, 1000 + rep))
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
