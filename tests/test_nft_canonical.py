"""The canonical form of rule expressions (secfw.backends.nftables.canonical).

Pairs measured with nft 1.0.6 — what secfw writes and what nft lists back — must
be equal; rules that match other packets or decide otherwise must not. The whole
golden clouds are in ``tests/test_golden.py`` (stored kernel listings) and every
rule shape against the kernel in ``tests/netns/test_nft_executor.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from secfw.backends.nftables.canonical import canonical_expr


def match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}

#: (what secfw writes, what nft 1.0.6 lists for it)
SAME = [
    ([match(meta("nfproto"), "ipv4"), match(meta("l4proto"), 6),
      match(payload("th", "dport"), 80), ACCEPT],
     [match(meta("nfproto"), "ipv4"), match(payload("tcp", "dport"), 80), ACCEPT]),
    ([match(meta("nfproto"), "ipv6"), match(meta("l4proto"), 58),
      match(payload("icmpv6", "type"), 128), match(payload("icmpv6", "code"), 0), ACCEPT],
     [match(payload("icmpv6", "type"), "echo-request"),
      match(payload("icmpv6", "code"), "no-route"), ACCEPT]),
    ([match(meta("nfproto"), "ipv4"), match(meta("l4proto"), 1), ACCEPT],
     [match(meta("l4proto"), "icmp"), ACCEPT]),
    ([match(payload("ether", "type"), "arp"),
      match({"concat": [meta("iifname"), payload("arp", "saddr ip")]}, "@arp_hosts"), ACCEPT],
     [match({"concat": [meta("iifname"), payload("arp", "saddr ip")]}, "@arp_hosts"), ACCEPT]),
    ([match(payload("th", "sport"), {"set": ["67", "547"]}, "!="), ACCEPT],
     [match(payload("th", "sport"), {"set": [547, 67]}, "!="), ACCEPT]),
    ([{"vmap": {"key": {"ct": {"key": "state"}}, "data": {"set": [
        ["established", ACCEPT], ["related", ACCEPT], ["invalid", DROP]]}}}],
     [{"vmap": {"key": {"ct": {"key": "state"}}, "data": {"set": [
         ["invalid", DROP], ["established", ACCEPT], ["related", ACCEPT]]}}}]),
    ([match(payload("ip", "saddr"), {"prefix": {"addr": "192.0.2.7", "len": 32}}), DROP],
     [match(payload("ip", "saddr"), "192.0.2.7"), DROP]),
    ([match(payload("ip6", "saddr"), {"prefix": {"addr": "2001:0db8::", "len": 48}}), DROP],
     [match(payload("ip6", "saddr"), {"prefix": {"addr": "2001:db8::", "len": 48}}), DROP]),
]

#: (what secfw writes, a tampered rule that must read as different)
DIFFERENT = [
    ([match(meta("nfproto"), "ipv4"), match(meta("l4proto"), 6),
      match(payload("th", "dport"), 80), ACCEPT], [ACCEPT]),
    ([match(meta("l4proto"), 6), match(payload("th", "dport"), 80), ACCEPT],
     [match(meta("l4proto"), 17), match(payload("th", "dport"), 80), ACCEPT]),
    ([match(meta("l4proto"), 6), match(payload("th", "dport"), 80), ACCEPT],
     [match(payload("tcp", "dport"), 81), ACCEPT]),
    ([match(meta("l4proto"), 17), match(payload("tcp", "dport"), 80), ACCEPT],
     [match(payload("tcp", "dport"), 80), ACCEPT]),
    ([match(meta("nfproto"), "ipv4"), match(payload("tcp", "dport"), 80), ACCEPT],
     [match(payload("tcp", "dport"), 80), ACCEPT]),
    ([match(payload("ip", "saddr"), "0.0.0.0"), DROP],
     [match(payload("ip", "saddr"), "0.0.0.0", "!="), DROP]),
    ([match(payload("ip", "saddr"), {"prefix": {"addr": "10.0.0.0", "len": 24}}), DROP],
     [match(payload("ip", "saddr"), {"prefix": {"addr": "10.0.0.0", "len": 16}}), DROP]),
    ([DROP], [ACCEPT]),
    ([{"jump": {"target": "sg-a-in"}}], [{"goto": {"target": "sg-a-in"}}]),
    ([match(payload("icmpv6", "type"), {"set": ["nd-router-advert", "nd-redirect"]}), DROP],
     [match(payload("icmpv6", "type"), {"set": ["nd-router-advert"]}), DROP]),
]


@pytest.mark.parametrize(("written", "listed"), SAME)
def test_what_nft_lists_back_is_the_same_rule(written: Any, listed: Any) -> None:
    assert canonical_expr(written) == canonical_expr(listed)


@pytest.mark.parametrize(("written", "tampered"), DIFFERENT)
def test_other_content_is_a_different_rule(written: Any, tampered: Any) -> None:
    assert canonical_expr(written) != canonical_expr(tampered)


def test_canonical_form_is_hashable() -> None:
    assert len({canonical_expr(w) for w, _ in SAME} | {canonical_expr(t) for _, t in SAME}) \
        == len(SAME)
