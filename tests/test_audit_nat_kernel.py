"""The kernel evaluators' NAT (pure): nft ``dnat``/``ct mark`` and iptables' nat table."""

from __future__ import annotations

from secfw.audit import iptkernel, nftkernel

FLOATING, FIXED = "192.0.2.7", "10.1.0.3"


def _nft(elements: list[object]) -> nftkernel.NftRuleset:
    daddr = {"payload": {"protocol": "ip", "field": "daddr"}}
    return nftkernel.NftRuleset({"nftables": [
        {"map": {"family": "inet", "name": "floating_dnat", "elem": elements}},
        {"chain": {"family": "inet", "name": "floating-dnat", "type": "nat",
                   "hook": "prerouting", "prio": -100, "policy": "accept"}},
        {"rule": {"family": "inet", "chain": "floating-dnat", "expr": [
            {"dnat": {"family": "ip", "addr": {"map": {"key": daddr,
                                                       "data": "@floating_dnat"}}}}]}},
        {"chain": {"family": "inet", "name": "pre", "type": "filter", "hook": "prerouting",
                   "prio": 0, "policy": "accept"}},
        {"rule": {"family": "inet", "chain": "pre", "expr": [
            {"mangle": {"key": {"ct": {"key": "mark"}}, "value": 7}}]}},
    ]})


def _probe(state: str = "new") -> nftkernel.Probe:
    return nftkernel.Probe("uplink", "", "203.0.113.10", FLOATING, 6, dport=80,
                           ct_state=nftkernel.CT_STATES[state])


def test_nft_dnat_through_a_map_translates_and_a_missing_key_leaves_the_packet() -> None:
    stage = [nftkernel.Stage("inet", "prerouting", "uplink", "")]
    verdict, after = _nft([[FLOATING, FIXED]]).run(stage, _probe())
    assert (verdict, after.dst, after.src, after.ct_mark) == ("accept", FIXED, "203.0.113.10", 7)
    assert _nft([]).run(stage, _probe())[1].dst == FLOATING
    # no conntrack entry (invalid), no NAT: the nat chain is not run
    assert _nft([[FLOATING, FIXED]]).run(stage, _probe("invalid"))[1].dst == FLOATING


TO_SERVER = "--to-destination 192.0.2.254:8775"
NAT_SAVE = f"""*nat
:PREROUTING ACCEPT [0:0]
:secfw-float-dnat - [0:0]
:secfw-metadata - [0:0]
-A PREROUTING -j secfw-float-dnat
-A PREROUTING -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j secfw-metadata
-A secfw-float-dnat -d {FLOATING}/32 -j DNAT --to-destination {FIXED}
-A secfw-metadata -s {FIXED}/32 -i tapA -j CONNMARK --set-xmark 0x5e000001/0xffffffff
-A secfw-metadata -p tcp -m connmark --mark 0x5e000000/0xff000000 -j DNAT {TO_SERVER}
COMMIT
"""


def _ipt(src: str, dst: str, iif: str = "tapA") -> iptkernel.IptProbe:
    return iptkernel.IptProbe(iif=iif, oif="up", src=src, dst=dst, protocol=6, mac="",
                              sport=40000, dport=80)


def test_ipt_nat_table_dnat_and_connmark_not_mark() -> None:
    nat = iptkernel.nat_of({"ipv4_nat": NAT_SAVE})
    assert nat.run("PREROUTING", _ipt("203.0.113.10", FLOATING))[1].dst == FIXED
    verdict, after = nat.run("PREROUTING", _ipt(FIXED, "169.254.169.254"))
    assert (verdict, after.dst, after.dport, after.ctmark) == (
        "accept", "192.0.2.254", 8775, 0x5E000001)
    assert after.mark == 0  # -m connmark --mark is the connection's mark, not the packet's
    # another tap with that source: no connmark, no DNAT
    other = nat.run("PREROUTING", _ipt(FIXED, "169.254.169.254", iif="tapB"))[1]
    assert (other.dst, other.ctmark) == ("169.254.169.254", 0)
    assert FIXED in iptkernel.named_values({"ipv4_nat": NAT_SAVE})[0]
