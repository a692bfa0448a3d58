"""The mark-dispatch layouts of secfw.bench.layouts, with real packets.

A port's groups are data (tap → group number, or a linked list ``tap . group →
next group``) and one fixed verdict map jumps the group chain named by the
packet mark. These check, in the bench's client → host → server namespaces,
that such a port admits what any of its groups admits and drops the rest (also
after a group is removed by the bench's own delta), and that the ``chainct``
and ``datamapct`` variants hand the packet on with the mark it arrived with.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from secfw.bench import layouts

pytestmark = pytest.mark.netns

#: Group g admits UDP to PORTS[g]; the test tap has groups 0 and 1, not 2.
PORTS = (7001, 7002, 7003)
TAPS = {"tapS0": [0, 1], "tapzz-00": [2, 0, 1]}
FOREIGN_MARK = 0x00C0FFEE
SENDS = 4
_SEND = """
import socket, sys
for port in sys.argv[2:]:
    for _ in range(int(sys.argv[1])):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a new flow each time
        s.sendto(b"x", ("10.91.2.2", int(port)))
        s.close()
"""


def _table(layout: str) -> str:
    """Three group chains, the layout's dispatch for TAPS, and the forward hook."""
    restore = layout in layouts.RESTORING
    verdict = "meta mark set ct mark accept" if restore else "accept"
    chains = [f"chain g{g:03d} {{\nudp dport {port} {verdict}\n}}"
              for g, port in enumerate(PORTS)]
    decls, rules = layouts.dispatch(layout, TAPS, groups=len(PORTS), slots=3)
    body = "\n".join([
        *chains, *decls,
        "chain ingress-filter {\n"
        "ct state vmap { established : accept, related : accept, invalid : drop }\n"
        + "\n".join(rules) + "\ndrop\n}",
        "chain forward-in {\ntype filter hook forward priority 0; policy accept;\n"
        'oifname != "tap*" accept\noifname "tapS0" goto ingress-filter\n}'])
    return f"table inet x {{\n{body}\n}}\n"


#: Another user of the packet mark in the host: sets it before the filter and
#: counts, after it, the packets to the test tap that still carry it.
_MARKER = f"""table inet marker {{
chain pre {{ type filter hook prerouting priority mangle; meta mark set {FOREIGN_MARK}; }}
chain post {{ type filter hook postrouting priority 0;
  oifname "tapS0" meta mark {FOREIGN_MARK} counter name kept; }}
counter kept {{ }}
}}
"""
_ARRIVALS = "table inet arrivals {\n" + "".join(
    f"counter p{port} {{ }}\n" for port in PORTS) + (
    "chain in { type filter hook input priority 0;\n"
    + "".join(f"udp dport {port} counter name p{port}\n" for port in PORTS) + "}\n}\n")


@pytest.fixture
def lab() -> Iterator[layouts.Lab]:
    lab = layouts.Lab()
    try:
        lab.up()
        lab.sh("ip", "netns", "exec", lab.server, "nft", "-f", "-", stdin=_ARRIVALS)
        yield lab
    finally:
        lab.down()


def _packets(lab: layouts.Lab, ns: str, table: str, counter: str) -> int:
    out = lab.sh("ip", "netns", "exec", ns, "nft", "list", "counter", "inet", table, counter)
    return int(out.split("packets ")[1].split()[0])


def _arrived(lab: layouts.Lab) -> dict[int, int]:
    """Datagrams the server received per port, after SENDS new flows to each."""
    before = {port: _packets(lab, lab.server, "arrivals", f"p{port}") for port in PORTS}
    subprocess.run(["ip", "netns", "exec", lab.client, sys.executable, "-c", _SEND,
                    str(SENDS), *map(str, PORTS)], check=True, timeout=60)
    return {port: _packets(lab, lab.server, "arrivals", f"p{port}") - before[port]
            for port in PORTS}


@pytest.mark.parametrize("layout", ["datamap", "datamapct", "chain", "chainct"])
def test_union_of_groups_then_group_removed(lab: layouts.Lab, layout: str) -> None:
    """Groups 0 and 1 admit, group 2 (another port's) does not; after the bench's
    delta removing group 0 from the port, only group 1 admits."""
    lab.sh("ip", "netns", "exec", lab.host, "nft", "-f", "-", stdin=_table(layout))
    assert _arrived(lab) == {7001: SENDS, 7002: SENDS, 7003: 0}
    remove, _ = layouts.group_removal(layout, "tapS0", TAPS["tapS0"])
    lab.sh("ip", "netns", "exec", lab.host, "nft", "-f", "-", stdin=remove)
    assert _arrived(lab) == {7001: 0, 7002: SENDS, 7003: 0}


@pytest.mark.parametrize("layout", sorted(layouts.RESTORING))
def test_restoring_layouts_keep_the_mark(lab: layouts.Lab, layout: str) -> None:
    """Every admitted packet leaves the filter with the mark it had before it
    (the dispatch's scratch value is put back from the conntrack mark)."""
    lab.sh("ip", "netns", "exec", lab.host, "nft", "-f", "-",
           stdin=_table(layout) + _MARKER)
    arrived = _arrived(lab)
    assert arrived == {7001: SENDS, 7002: SENDS, 7003: 0}
    assert _packets(lab, lab.host, "marker", "kept") == 2 * SENDS


@pytest.mark.parametrize("layout", sorted(layouts.RESTORING))
def test_restoring_layouts_drop_untracked(lab: layouts.Lab, layout: str) -> None:
    """Fail-closed, as docs/nftables.md says: an untracked packet has no conntrack
    mark, so the accepting rule's ``meta mark set ct mark`` ends the rule and the
    port drops what its group admits (the slot maps would admit it)."""
    notrack = ("table inet raw {\nchain pre { type filter hook prerouting priority raw;\n"
               f"udp dport {PORTS[0]} notrack; }}\n}}\n")
    lab.sh("ip", "netns", "exec", lab.host, "nft", "-f", "-", stdin=_table(layout) + notrack)
    assert _arrived(lab) == {7001: 0, 7002: SENDS, 7003: 0}
