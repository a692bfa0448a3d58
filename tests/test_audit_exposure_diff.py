"""``exposure`` against ``explain`` and ``reach`` on the same random clouds.

On hypothesis clouds (those of ``test_audit.py``: two hosts, IPv4 and IPv6,
ingress and egress rules, source groups, address pairs, port security off,
same-net on and off):

* every ``internet`` / ``broad`` exposure row is confirmed: from an address of
  one of its broad prefixes that no port owns (a host outside the cloud, which
  has no egress filter of its own), the row's corner flows and one inside it
  are allowed by ``explain`` and lie in the port's ``reach --to`` answer;
* nothing is missing: every region of ``reach --to`` that is open to every
  address outside the cloud (all of ``0.0.0.0/0`` or ``::/0`` but the ports'
  own addresses) has its corner and middle flows in an ``internet`` or
  ``broad`` row of the port. (Not always ``internet``: a router advertisement
  reaches a port from everywhere but the filtered ports, which may never send
  one, and exposure calls that ``broad`` — a row listing the CIDRs of ``::/0``
  minus those addresses.)
"""

from __future__ import annotations

from typing import Any

import netaddr
from hypothesis import HealthCheck, given, note, settings
from test_audit import build as build_cloud
from test_audit import cloud_specs, fresh_api

from secfw.audit.explain import FlowQuery, explain
from secfw.audit.exposure import exposure
from secfw.audit.policy import CloudPolicy, PortView, everywhere
from secfw.audit.reach import Answer, reach
from secfw.audit.space import ICMP_OF, PORT_PROTOCOL_NUMBERS, Box, Region, contains
from secfw.compiler.ir import Family
from secfw.model import PROTOCOL_NUMBERS

#: Addresses outside the test clouds' ports, tried in turn as "a host outside".
OUTSIDE = {"ipv4": ("203.0.113.9", "198.51.100.7", "192.0.2.1", "10.200.0.1", "10.1.0.77",
                    "1.2.3.4", "100.64.0.1"),
           "ipv6": ("2001:db8:ffff::9", "2001:db8:99::1", "2001:db8:1::77", "2400::1",
                    "fd00::1")}


def row_box(row: dict[str, Any], family: Family) -> Box:
    """The protocols × selectors of an exposure row (as ``region_fields`` wrote them)."""
    text = row["protocol"]
    if text == "any":
        low, high = 0, 255
    elif text.replace("-", "").isdigit():
        first, _, last = text.partition("-")
        low, high = int(first), int(last or first)
    else:
        low = high = PROTOCOL_NUMBERS[text]
    if row["icmp_type"] is not None:  # whole types icmp_type..icmp_type_last, or codes of one
        first, last = row["icmp_type"], row["icmp_type_last"]
        codes = (0, 255) if row["icmp_code"] == "any" else _span(row["icmp_code"])
        return Box(low, high, first * 256 + codes[0], last * 256 + codes[1])
    ports = (0, 65535) if row["ports"] in (None, "any") else _span(row["ports"])
    return Box(low, high, *ports)


def _span(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    return int(first), int(last or first)


def corner_points(box: Box, family: Family) -> list[tuple[int, int]]:
    """(protocol, selector) at the box's corners and middle; not the other
    family's ICMP (the audits treat it as a plain protocol, see test_audit)."""
    other = ICMP_OF["ipv6" if family == "ipv4" else "ipv4"]
    protocols = {box.proto_lo, box.proto_hi, (box.proto_lo + box.proto_hi) // 2}
    protocols |= {p for p in (*PORT_PROTOCOL_NUMBERS, ICMP_OF[family])
                  if box.proto_lo <= p <= box.proto_hi}
    selectors = {box.sel_lo, box.sel_hi, (box.sel_lo + box.sel_hi) // 2}
    return sorted((p, s) for p in protocols - {other} for s in selectors)


def query(src: str, dst: str, protocol: int, sel: int, family: Family) -> FlowQuery:
    if protocol in PORT_PROTOCOL_NUMBERS:
        return FlowQuery(src, dst, protocol, sel)
    if protocol == ICMP_OF[family]:
        return FlowQuery(src, dst, protocol, None, *divmod(sel, 256))
    return FlowQuery(src, dst, protocol)


def outsider(cp: CloudPolicy, cidrs: list[str], family: Family) -> str | None:
    """An address of one of ``cidrs`` that no port owns (None if none is tried)."""
    for cidr in cidrs:
        network = netaddr.IPNetwork(cidr)
        for address in (*OUTSIDE[family], str(network[1]), str(network[-2])):
            if netaddr.IPAddress(address) in network and cp.owner(address) is None:
                return address
    return None


def confirmed(cp: CloudPolicy, view: PortView, row: dict[str, Any],
              answers: dict[tuple[str, Family], Answer]) -> list[str]:
    """What ``explain`` or ``reach`` disputes in an internet/broad exposure row
    (``answers``: reach answers computed so far, by port id and family)."""
    family: Family = "ipv4" if row["ethertype"] == "IPv4" else "ipv6"
    src = outsider(cp, row["sources"], family)
    assert src is not None, row
    answer = answers.get((view.port.id, family)) or reach(cp, view, "ingress", family)
    assert answer is not None
    answers[view.port.id, family] = answer
    wrong = []
    for protocol, sel in corner_points(row_box(row, family), family):
        flow = query(src, row["address"], protocol, sel, family)
        verdict = explain(cp, flow)["verdict"]
        inside = contains(answer.regions, src, Box(protocol, protocol, sel, sel))
        if verdict != "allow" or not inside:
            wrong.append(f"{row['instance']} {row['kind']} row {row['protocol']} "
                         f"{row['ports'] or row['icmp_type']}: {flow} explain {verdict}, "
                         f"reach {'holds' if inside else 'lacks'} it")
    return wrong


def missing(cp: CloudPolicy, view: PortView, rows: list[dict[str, Any]],
            family: Family) -> list[str]:
    """The points of ``view``'s reach regions open to everything outside the
    cloud that no internet or broad row of the port covers."""
    answer = reach(cp, view, "ingress", family)
    if answer is None:
        return []
    owned = netaddr.IPSet()
    for addresses in cp.attributed(family).values():
        owned |= addresses
    ethertype = "IPv4" if family == "ipv4" else "IPv6"
    boxes = [row_box(r, family) for r in rows if r["kind"] in ("internet", "broad")
             and r["port"] == view.port.tap and r["ethertype"] == ethertype]
    wrong = []
    for region in answer.regions:
        if not open_to_outside(region, owned, family):
            continue
        for protocol, sel in corner_points(region.box, family):
            point = Box(protocol, protocol, sel, sel)
            if not any(box.covers(point) for box in boxes):
                wrong.append(f"{view.instance.name} {family}: reach holds protocol {protocol} "
                             f"selector {sel} from everywhere, exposure has no internet/broad row")
    return wrong


def open_to_outside(region: Region, owned: netaddr.IPSet, family: Family) -> bool:
    return (everywhere(family) - owned).issubset(region.addresses)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=cloud_specs())
def test_exposure_is_what_explain_and_reach_say(spec: Any) -> None:
    with fresh_api() as api:
        state = build_cloud(api, spec)
        note(str(spec))
        cp = CloudPolicy(state, spec.allow_same_net)
        views = sorted(cp.ports.values(), key=lambda v: v.instance.name)
        rows = exposure(cp, views)
        by_tap = {v.port.tap: v for v in views}
        answers: dict[tuple[str, Family], Answer] = {}
        wrong = [line for row in rows if row["kind"] in ("internet", "broad")
                 for line in confirmed(cp, by_tap[row["port"]], row, answers)]
        wrong += [line for view in views for family in ("ipv4", "ipv6")
                  for line in missing(cp, view, rows, family)]
        assert not wrong, "\n".join(wrong)
