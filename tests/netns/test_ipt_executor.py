"""iptables backend against the real kernel, each test in a fresh network namespace,
with both iptables variants (legacy and nft) where this machine has them.

What only the kernel and the real tools can tell: the rendered text loads; read-back
normalises to exactly what was rendered (so a second sync plans nothing — the
Neutron non-converging diff); incremental plans apply; a failed restore changes no
verdict; other programs' rules, chains, tables and sets are never touched nor
reordered; cleanup removes exactly secfw's objects; and real packets through a
lab host get the verdicts the nftables backend gives them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from secfw.api import Api
from secfw.backends import get_backend
from secfw.backends.iptables import (
    IptablesBackend,
    IptablesExecutor,
    IptPlan,
    detect_variant,
)
from secfw.backends.iptables import executor as executor_module
from secfw.backends.iptables.plan import TableChanges
from secfw.backends.iptables.render import group_chain_name, set_name
from secfw.compiler.build import compile_host
from secfw.compiler.ir import (
    AddressPair,
    AddressSet,
    GroupChain,
    HostFilter,
    IcmpMatch,
    IRRule,
    PortPolicy,
    PortRange,
)
from secfw.errors import BackendError
from secfw.lab import netns_tools
from secfw.lab.demo import lab_ports
from secfw.lab.hostlab import Lab
from secfw.store import open_store

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.timeout(120),
]

VARIANTS = [v for v in ("legacy", "nft") if shutil.which(f"iptables-{v}-restore")]
WEB, SSH, OPS = "sg-0a0a-web-in", "sg-0b0b-ssh-in", "sg-0c0c-ops-out"
WEB_V4, WEB_V6 = "sg-0a0a-web-v4", "sg-0a0a-web-v6"
TAPS = [f"tap{i:08x}-{i:02x}" for i in range(6)]
NET_V4, NET1_V4, NET1_V6 = "net-0d0d-n-v4", "net-0e0e-m-v4", "net-0e0e-m-v6"
#: same-net sets: the addresses of a network's ports (tail of every filter's sets)
NET_SETS = (AddressSet(NET_V4, "n", "ipv4", ("10.0.0.5/32", "10.0.0.6/32", "10.0.0.200/32")),
            AddressSet(NET1_V4, "m", "ipv4", ("10.1.0.7/32",)),
            AddressSet(NET1_V6, "m", "ipv6", ("2001:db8:1::7/128", "2001:db8:1::8/128")))


# --------------------------------------------------------------------------- the IR


def everything() -> HostFilter:
    """Every kind of IR rule in both families, every egress mode, address pairs with a
    MAC of their own, port security off, same-net networks in v4 and v6."""
    web = GroupChain(WEB, "web", "ingress", (
        IRRule("a0000001", "ipv4", 6, PortRange(80, 80)),
        IRRule("a0000002", "ipv4", 17, PortRange(1000, 2000), remote_cidr="10.0.0.0/8"),
        IRRule("a0000003", "ipv4", 1, icmp=IcmpMatch(8)),
        IRRule("a0000004", "ipv4", 1, icmp=IcmpMatch(3, 4)),
        IRRule("a0000005", "ipv6", 58, icmp=IcmpMatch(128)),
        IRRule("a0000006", "ipv4", 132, PortRange(9, 9)),
        IRRule("a0000007", "ipv4", 136, PortRange(7, 70)),
        IRRule("a0000008", "ipv4", 47),
        IRRule("a0000009", "ipv6"),
        IRRule("a000000a", "ipv6", 6, PortRange(443, 443), remote_cidr="2001:db8::/32"),
        IRRule("a000000b", "ipv6", 58, icmp=IcmpMatch(1, 3)),
        IRRule("a000000c", "ipv4", 4),
    ))
    ssh = GroupChain(SSH, "ssh", "ingress", (
        IRRule("b0000001", "ipv4", 6, PortRange(22, 22), remote_set=WEB_V4),
        IRRule("b0000002", "ipv6", 6, PortRange(22, 22), remote_set=WEB_V6),
    ))
    ops = GroupChain(OPS, "ops", "egress", (
        IRRule("c0000001", "ipv4", 6, PortRange(5432, 5432), remote_cidr="192.0.2.0/24"),
        IRRule("c0000002", "ipv4", 17, PortRange(53, 53), remote_set=WEB_V4),
    ))
    sets = (AddressSet(WEB_V4, "web", "ipv4", ("0.0.0.0/0", "10.0.0.5/32", "10.9.0.0/16")),
            AddressSet(WEB_V6, "web", "ipv6", ("2001:db8::5/128", "2001:db8:1::/48")))
    pairs = (AddressPair("10.0.0.100/32", "FA:16:3E:00:00:01"),
             AddressPair("10.8.0.0/16", "fa:16:3e:00:00:99"),
             AddressPair("2001:db8:9::/64", "fa:16:3e:00:00:99"))
    ports = (
        _port(TAPS[0], (WEB,)),
        _port(TAPS[1], (WEB, SSH), (OPS,), egress_open=False, allowed_pairs=pairs,
              ipv6=("2001:db8::5",)),
        _port(TAPS[2], (SSH,), egress_open=False, same_net=(NET1_V4, NET1_V6)),
        _port(TAPS[5], (WEB,), port_security=False),
    )
    return HostFilter("h", ports, (web, ssh, ops), (*sets, *NET_SETS))


def _port(tap: str, ingress: tuple[str, ...] = (), egress: tuple[str, ...] = (),
          egress_open: bool = True, same_net: tuple[str, ...] = (NET_V4,),
          **kw: Any) -> PortPolicy:
    index = TAPS.index(tap)
    return PortPolicy(tap, f"p-{tap}", f"i-{tap}", f"fa:16:3e:00:01:{index:02x}",
                      (f"10.0.0.{5 + index}",), same_net, ingress, egress, egress_open, **kw)


def changes() -> list[tuple[str, HostFilter]]:
    """A sequence of desired states, each a typical change from the previous one."""
    hf = everything()
    web, ssh, ops = hf.chains
    steps = [("initial", hf)]
    hf = replace(hf, ports=(_port(TAPS[0], (WEB, SSH)), *hf.ports[1:]))
    steps.append(("port joins a group", hf))
    hf = replace(hf, ports=(*hf.ports, _port(TAPS[3], (SSH,)), _port(TAPS[4], (WEB,))))
    steps.append(("two ports boot", hf))
    hf = replace(hf, sets=(replace(hf.sets[0], elements=("10.0.0.5/32", "10.9.0.0/16",
                                                         "10.20.0.1/32")), *hf.sets[1:]))
    steps.append(("members change", hf))
    hf = replace(hf, chains=(replace(web, rules=web.rules[:3]), ssh, ops))
    steps.append(("rules removed", hf))
    hf = replace(hf, ports=tuple(p for p in hf.ports if p.tap != TAPS[3]))
    steps.append(("a port goes", hf))
    hf = replace(hf, chains=(replace(web, rules=web.rules[:3]), ssh),
                 ports=tuple(replace(p, egress_chains=()) for p in hf.ports))
    steps.append(("the egress group goes", hf))
    hf = replace(hf, sets=(hf.sets[0], *hf.sets[2:]), chains=(replace(web, rules=web.rules[:3]),
                                                 replace(ssh, rules=ssh.rules[:1])))
    steps.append(("an address set goes", hf))
    hf = replace(hf, ports=tuple(replace(p, same_net_sets=(), port_security=True,
                                         allowed_pairs=()) for p in hf.ports))
    steps.append(("same-net off, port security back on, pairs gone", hf))
    big = tuple(f"10.{i // 256}.{i % 256}.1/32" for i in range(300))
    hf = replace(hf, sets=(replace(hf.sets[0], elements=big), *hf.sets[1:]))
    steps.append(("an address set replaced wholesale (swap)", hf))
    hf = HostFilter("h", (), (), ())
    steps.append(("every port gone (closed filter)", hf))
    return steps


# --------------------------------------------------------------------------- tools


def sh(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60,
                          check=False)
    if check:
        assert done.returncode == 0, (argv, done.stderr)
    return done.stdout


def in_ns(ns: str, *argv: str, stdin: str | None = None) -> str:
    return sh("ip", "netns", "exec", ns, *argv, stdin=stdin)


def everything_saved(ns: str, variant: str) -> str:
    """Every table of both families and every ipset, without counters and comments
    lines: what "nothing else changed" compares."""
    out = []
    for tool in (f"iptables-{variant}-save", f"ip6tables-{variant}-save"):
        text = in_ns(ns, tool)
        out += [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in text.splitlines()
                if not line.startswith("#")]
    out += in_ns(ns, "ipset", "list", "-o", "save").splitlines()
    return "\n".join(out)


def without_secfw(saved: str) -> str:
    """``saved`` minus every line that names a secfw chain or set."""
    return "\n".join(line for line in saved.splitlines() if "secfw-" not in line)


FOREIGN_V4 = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o eth9 -j MASQUERADE
COMMIT
*filter
:DOCKER - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -m set --match-set keep src -j ACCEPT
-A FORWARD -j LOG --log-prefix "fwd "
-A DOCKER -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j ACCEPT
COMMIT
"""
FOREIGN_V6 = """*filter
-A INPUT -p ipv6-icmp -j ACCEPT
-A FORWARD -o docker0 -j DROP
COMMIT
"""


def add_foreign(ns: str, variant: str) -> None:
    """Another program's rules, chains, tables and set."""
    in_ns(ns, "ipset", "create", "keep", "hash:ip")
    in_ns(ns, "ipset", "add", "keep", "192.0.2.1")
    in_ns(ns, f"iptables-{variant}-restore", "--noflush", stdin=FOREIGN_V4)
    in_ns(ns, f"ip6tables-{variant}-restore", "--noflush", stdin=FOREIGN_V6)


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh, empty network namespace, always deleted afterwards."""
    name = f"secfw-t-{uuid.uuid4().hex[:10]}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30,
                       check=False)


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(ns: str, variant: str) -> IptablesBackend:
    return get_backend("iptables", netns=ns, variant=variant)


def test_this_machine_has_both_variants() -> None:
    """Every test here runs once per variant; say so when one is missing."""
    if VARIANTS != ["legacy", "nft"]:
        pytest.skip(f"only {VARIANTS or 'no'} iptables variant(s) on this machine")


# --------------------------------------------------------------------------- convergence


def test_full_apply_reads_back_equal_and_plans_nothing(backend: IptablesBackend) -> None:
    hf = everything()
    assert backend.read() is None
    backend.apply(backend.plan(None, hf))
    read = backend.read()
    assert read == backend.committed(hf)
    assert backend.plan(read, hf).empty


def test_every_change_converges(backend: IptablesBackend) -> None:
    committed = None
    for what, hf in changes():
        tx = backend.plan(committed if committed is not None else backend.read(), hf)
        backend.apply(tx)
        committed = backend.committed(hf)
        read = backend.read()
        assert read == committed, what
        assert backend.plan(read, hf).empty, what


def test_membership_change_is_only_ipset_commands(backend: IptablesBackend,
                                                  ns: str, variant: str) -> None:
    hf = everything()
    backend.apply(backend.plan(None, hf))
    grown = replace(hf, sets=(replace(hf.sets[0], elements=(*hf.sets[0].elements,
                                                            "10.30.0.7/32")), *hf.sets[1:]))
    before = everything_saved(ns, variant)
    tx = backend.plan(backend.read(), grown)
    assert tx.commands == (f"add {set_name(WEB_V4)} 10.30.0.7",)
    assert all(t.size == 0 for t in tx.tables.values())
    backend.apply(tx)
    after = everything_saved(ns, variant)
    assert [line for line in after.splitlines() if line not in before.splitlines()] == [
        f"add {set_name(WEB_V4)} 10.30.0.7"]
    assert backend.plan(backend.read(), grown).empty


def test_changed_group_rewrites_only_its_chain(backend: IptablesBackend) -> None:
    hf = everything()
    backend.apply(backend.plan(None, hf))
    web = hf.chains[0]
    changed = replace(hf, chains=(replace(web, rules=web.rules[1:]), *hf.chains[1:]))
    tx = backend.plan(backend.read(), changed)
    assert tx.summary["chains"] == [group_chain_name(WEB)]
    backend.apply(tx)
    assert backend.read() == backend.committed(changed)


def test_drift_is_repaired_by_rewriting_what_differs(backend: IptablesBackend, ns: str,
                                                     variant: str) -> None:
    hf = everything()
    backend.apply(backend.plan(None, hf))
    in_ns(ns, f"iptables-{variant}", "-w", "-I", "secfw-egress", "1", "-j", "RETURN")
    in_ns(ns, f"iptables-{variant}", "-w", "-D", "FORWARD", "-j", "secfw-fwd")
    tx = backend.plan(backend.read(), hf)
    assert tx.summary["chains"] == ["secfw-egress"]
    assert tx.tables["ipv4"].ensure_jumps == (("FORWARD", "-j secfw-fwd"),)
    backend.apply(tx)
    assert backend.read() == backend.committed(hf)
    forward = in_ns(ns, f"iptables-{variant}", "-w", "-S", "FORWARD").splitlines()
    assert forward.count("-A FORWARD -j secfw-fwd") == 1


def test_jumps_are_inserted_once_at_the_top(backend: IptablesBackend, ns: str,
                                            variant: str) -> None:
    add_foreign(ns, variant)
    hf = everything()
    for _ in range(3):  # plan from nothing every time: -C finds the jump after the first
        backend.apply(backend.plan(None, hf))
    for tool in (f"iptables-{variant}", f"ip6tables-{variant}"):
        for builtin, target in (("FORWARD", "secfw-fwd"), ("INPUT", "secfw-in")):
            rules = in_ns(ns, tool, "-w", "-S", builtin).splitlines()
            assert rules[1] == f"-A {builtin} -j {target}", rules  # [0] is the policy
            assert sum(target in r for r in rules) == 1


# --------------------------------------------------------------------------- others' rules


def test_foreign_rules_survive_every_apply_and_cleanup(backend: IptablesBackend, ns: str,
                                                       variant: str) -> None:
    add_foreign(ns, variant)
    before = everything_saved(ns, variant)
    committed = None
    for what, hf in changes():
        backend.apply(backend.plan(committed if committed is not None else backend.read(), hf))
        committed = backend.committed(hf)
        assert without_secfw(everything_saved(ns, variant)) == before, what
    backend.cleanup()
    assert everything_saved(ns, variant) == before
    assert backend.read() is None


def test_cleanup_removes_exactly_secfw_objects(backend: IptablesBackend, ns: str,
                                               variant: str) -> None:
    for tool in (f"iptables-{variant}", f"ip6tables-{variant}"):
        # the filter tables exist (empty) before, as they stay after: iptables never
        # deletes a table, and secfw must not either (it is not secfw's)
        in_ns(ns, tool, "-w", "-A", "FORWARD", "-j", "ACCEPT")
        in_ns(ns, tool, "-w", "-D", "FORWARD", "-j", "ACCEPT")
    before = everything_saved(ns, variant)
    backend.apply(backend.plan(None, everything()))
    assert "secfw-" in everything_saved(ns, variant)
    backend.cleanup()
    assert everything_saved(ns, variant) == before
    backend.cleanup()  # nothing left: not an error


# --------------------------------------------------------------------------- failures


def _broken(tx: IptPlan) -> IptPlan:
    """``tx`` with a commit line iptables-restore refuses (a jump to no chain)."""
    v4 = tx.tables["ipv4"]
    broken = replace(v4, commit=(*v4.commit, "-A secfw-fwd -j secfw-no-such-chain"))
    return replace(tx, tables={**tx.tables, "ipv4": broken})


def test_a_failed_restore_leaves_the_previous_ruleset(backend: IptablesBackend) -> None:
    first, second = changes()[0][1], changes()[2][1]
    backend.apply(backend.plan(None, first))
    previous = backend.read()
    with pytest.raises(BackendError, match="iptables"):
        backend.apply(_broken(backend.plan(previous, second)))
    assert backend.read() == previous


def test_a_failed_batched_apply_changes_no_verdict_and_is_repaired(
        backend: IptablesBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """With creation batches (nft), the new chains of a failed apply stay, unused;
    every chain a packet can reach is as before, and the next plan removes them."""
    monkeypatch.setattr(executor_module, "BATCH_RULES", 5)
    first, second = changes()[0][1], changes()[2][1]
    backend.apply(backend.plan(None, first))
    previous = backend.read()
    assert previous is not None
    with pytest.raises(BackendError):
        backend.apply(_broken(backend.plan(previous, second)))
    now = backend.read()
    assert now is not None
    for family in ("ipv4", "ipv6"):
        old, new = previous.tables[family], now.tables[family]  # type: ignore[index]
        assert {n: r for n, r in new.chains.items() if n in old.chains} == dict(old.chains)
        assert new.jumps == old.jumps
    backend.apply(backend.plan(now, second))
    assert backend.read() == backend.committed(second)


def test_bad_ipset_input_fails_before_any_rule_changes(backend: IptablesBackend) -> None:
    hf = everything()
    backend.apply(backend.plan(None, hf))
    previous = backend.read()
    tx = backend.plan(previous, changes()[2][1])
    with pytest.raises(BackendError, match="ipset"):
        backend.apply(replace(tx, ipset_before=("create secfw-a-x hash:net family bogus",)))
    assert backend.read() == previous


# --------------------------------------------------------------------------- variants


def test_variant_detection_follows_the_rules_present(ns: str) -> None:
    runner = IptablesExecutor(ns, "nft").runner

    def in_namespace(argv: Any, stdin: str | None) -> subprocess.CompletedProcess[str]:
        return runner(["ip", "netns", "exec", ns, *argv], stdin)

    in_ns(ns, "iptables-legacy", "-w", "-A", "FORWARD", "-o", "docker0", "-j", "ACCEPT")
    assert detect_variant(in_namespace) == "legacy"
    in_ns(ns, "iptables-nft", "-w", "-N", "secfw-fwd")
    assert detect_variant(in_namespace) == "nft"  # secfw's own chains win
    assert IptablesExecutor(ns).variant == "nft"


def test_both_variants_side_by_side_do_not_see_each_other(ns: str) -> None:
    legacy = get_backend("iptables", netns=ns, variant="legacy")
    nft = get_backend("iptables", netns=ns, variant="nft")
    hf = everything()
    legacy.apply(legacy.plan(None, hf))
    state = nft.read()
    assert state is not None and not any(t.chains for t in state.tables.values())
    legacy.cleanup()
    assert legacy.read() is None


def test_table_changes_sizes_add_up() -> None:
    t = TableChanges(created=(("a", ("x", "y")),), commit=("-F b",), removed=("c",))
    assert t.size == 3 + 1 + 2 and len(t.lines()) == 1 + 2 + 1 + 2


# --------------------------------------------------------------------------- real packets

PROBE_TIMEOUT = 0.3
NETS = (("n0", "10.1.0.0/24"), ("n1", "10.2.0.0/24"))
EXTERNAL = "external"


def build_cloud(api: Api, host: str) -> None:
    """web (tcp 80 + any ICMP from anywhere), ssh (tcp 22 from web members),
    lock (egress only tcp 5432 to n1): five instances over two networks."""
    with api.batch():
        api.image_create("admin", "cirros", "qcow2", "public")
        for name, cidr in NETS:
            api.net_create("p", name, cidr)
        for group in ("web", "ssh", "lock"):
            api.secgroup_create("p", group, group)
        api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
        api.secgroup_add_rule("p", "web", "icmp", "-1", "-1", "0.0.0.0/0")
        api.secgroup_add_group_rule("p", "ssh", "web", "tcp", "22", "22")
        api.rule_create("p", "lock", "egress", "IPv4", "tcp", "5432",
                        remote_ip=NETS[1][1])
        for name, net, groups in (("vm0", "n0", ["web"]), ("vm1", "n0", ["ssh"]),
                                  ("vm2", "n1", ["web", "ssh"]), ("vm3", "n1", ["lock"]),
                                  ("vm4", "n0", None)):
            api.boot("p", name, "m1.tiny", "cirros", host, groups, [net])


PROBES: tuple[tuple[str, str, str, int | None], ...] = (
    (EXTERNAL, "vm0", "tcp", 80), (EXTERNAL, "vm0", "tcp", 81), (EXTERNAL, "vm0", "icmp", None),
    (EXTERNAL, "vm1", "tcp", 22), (EXTERNAL, "vm1", "icmp", None),
    (EXTERNAL, "vm2", "tcp", 22), (EXTERNAL, "vm2", "tcp", 80),
    ("vm0", "vm2", "tcp", 22),   # a web member: ssh allowed
    ("vm4", "vm2", "tcp", 22),   # not a web member
    ("vm0", "vm1", "tcp", 9999),  # same network
    ("vm3", "vm2", "tcp", 80),   # egress closed: only 5432 to n1
    ("vm3", "vm2", "tcp", 5432),  # egress allows it, same-net ingress lets it in
    ("vm3", EXTERNAL, "tcp", 80),
    ("vm2", EXTERNAL, "tcp", 80),  # egress open
    (EXTERNAL, "vm4", "tcp", 80),  # default group: nothing in
)


class Site:
    """A lab host with a cloud on it; probes by instance name."""

    def __init__(self, lab: Lab, api: Api, host: str) -> None:
        self.lab, self.api, self.host = lab, api, host
        state = api.snapshot()
        self.ports = {p.name: p for p in lab_ports(state, host)}

    def ns(self, name: str) -> str:
        return self.lab.external_ns if name == EXTERNAL else self.lab.instance_ns(
            self.ports[name].tap)

    def ip(self, name: str) -> str:
        return Lab.external_addresses[0] if name == EXTERNAL else self.ports[name].ip

    def probe(self, src: str, dst: str, proto: str, port: int | None) -> bool:
        if proto == "icmp":
            return netns_tools.ping(self.ns(src), self.ip(dst), 1, PROBE_TIMEOUT)
        assert port is not None
        with netns_tools.listen(self.ns(dst), "tcp", port):
            return netns_tools.tcp_connect(self.ns(src), self.ip(dst), port, PROBE_TIMEOUT)

    def verdicts(self) -> dict[tuple[str, str, str, int | None], bool]:
        in_ns(self.lab.host_ns, "conntrack", "-F")
        return {probe: self.probe(*probe) for probe in PROBES}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("ipt-lab")
    host = f"ipt-{uuid.uuid4().hex[:8]}"
    api = Api(open_store(f"sqlite:///{work}/cloud.db"))
    lab = Lab(host, work / "lab")
    try:
        build_cloud(api, host)
        lab.up(lab_ports(api.snapshot(), host))
        yield Site(lab, api, host)
    finally:
        lab.down()
        api.store.close()


@pytest.fixture(scope="module")
def nft_verdicts(site: Site) -> dict[tuple[str, str, str, int | None], bool]:
    """What the nftables backend lets through on the same cloud (the reference)."""
    return dict(_with_nftables(site, site.verdicts))


def _with_nftables(site: Site, fn: Callable[[], Any]) -> Any:
    backend = get_backend("nftables", netns=site.lab.host_ns)
    backend.apply(backend.plan(None, compile_host(site.api.snapshot(), site.host)))
    try:
        return fn()
    finally:
        backend.cleanup()


def _with_iptables(site: Site, variant: str, fn: Callable[[], Any]) -> Any:
    backend = get_backend("iptables", netns=site.lab.host_ns, variant=variant)
    hf = compile_host(site.api.snapshot(), site.host)
    backend.apply(backend.plan(None, hf))
    try:
        assert backend.plan(backend.read(), hf).empty
        return fn()
    finally:
        backend.cleanup()


def test_real_packets_get_the_nftables_backends_verdicts(
        site: Site, variant: str,
        nft_verdicts: dict[tuple[str, str, str, int | None], bool]) -> None:
    got = _with_iptables(site, variant, site.verdicts)
    differ = {p: (got[p], nft_verdicts[p]) for p in PROBES if got[p] != nft_verdicts[p]}
    assert not differ, f"(iptables, nftables) verdicts differ: {differ}"
    # the scenario exercises both verdicts in every direction
    assert got[(EXTERNAL, "vm0", "tcp", 80)] and not got[(EXTERNAL, "vm0", "tcp", 81)]
    assert got[("vm0", "vm2", "tcp", 22)] and not got[("vm4", "vm2", "tcp", 22)]
    assert got[("vm3", "vm2", "tcp", 5432)] and not got[("vm3", "vm2", "tcp", 80)]


def _spoofed_arrives(site: Site, src: str, src_ip: str, mac: str | None = None,
                     sport: int = 40000, dport: int = 80) -> bool:
    """A UDP datagram from ``src``'s namespace with source ``src_ip`` (and, when
    given, source MAC ``mac``) is seen in the external namespace."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Packet, Raw

    token = b"secfw-ipt-" + uuid.uuid4().hex.encode()
    packet: Packet = IP(src=src_ip, dst=site.ip(EXTERNAL)) / UDP(sport=sport, dport=dport) / Raw(
        token)
    if mac is not None:
        tap_mac = in_ns(site.lab.host_ns, "cat",
                        f"/sys/class/net/{site.ports[src].tap}/address").strip()
        packet = Ether(src=mac, dst=tap_mac) / packet
    frame = netns_tools.send_and_sniff(
        packet, src_ns=site.ns(src), dst_ns=site.lab.external_ns,
        bpf=f"udp and src host {src_ip}", match=lambda f: token in bytes(f),
        timeout=PROBE_TIMEOUT, sniff_iface="eth0")
    return frame is not None


def _protection_checks(site: Site) -> dict[str, bool]:
    vm0 = site.ports["vm0"]
    return {
        "own address": _spoofed_arrives(site, "vm0", vm0.ip),
        "other address": _spoofed_arrives(site, "vm0", "10.1.0.200"),
        "own address, own MAC": _spoofed_arrives(site, "vm0", vm0.ip, vm0.mac),
        "own address, other MAC": _spoofed_arrives(site, "vm0", vm0.ip, "fa:16:3e:99:99:99"),
        "DHCP server reply": _spoofed_arrives(site, "vm0", vm0.ip, sport=67, dport=68),
        "DHCP client request": _spoofed_arrives(site, "vm0", vm0.ip, sport=68, dport=67),
    }


def test_anti_spoofing_and_dhcp_with_real_packets(site: Site, variant: str) -> None:
    expected = {"own address": True, "other address": False, "own address, own MAC": True,
                "own address, other MAC": False, "DHCP server reply": False,
                "DHCP client request": True}
    assert _with_iptables(site, variant, lambda: _protection_checks(site)) == expected
    assert _with_nftables(site, lambda: _protection_checks(site)) == expected


def test_unknown_tap_is_dropped_and_port_security_off_is_open(site: Site, variant: str) -> None:
    """vm4's port leaves the IR (its tap stays): dropped both ways; then with port
    security off it takes anything in and may send from any address."""
    state = site.api.snapshot()
    hf = compile_host(state, site.host)
    vm4 = site.ports["vm4"]
    backend = get_backend("iptables", netns=site.lab.host_ns, variant=variant)
    try:
        backend.apply(backend.plan(None, replace(hf, ports=tuple(
            p for p in hf.ports if p.tap != vm4.tap))))
        in_ns(site.lab.host_ns, "conntrack", "-F")
        assert not site.probe("vm4", EXTERNAL, "tcp", 80)
        assert not site.probe(EXTERNAL, "vm4", "tcp", 80)
        open_ = replace(hf, ports=tuple(replace(p, port_security=False) if p.tap == vm4.tap
                                        else p for p in hf.ports))
        backend.apply(backend.plan(backend.read(), open_))
        assert site.probe(EXTERNAL, "vm4", "tcp", 4444)
        assert _spoofed_arrives(site, "vm4", "10.1.0.201")
    finally:
        backend.cleanup()


def _open_tcp(site: Site, dst: str, port: int) -> tuple[Any, Any, Any]:
    """(server, client, accepted) sockets of a TCP connection external → ``dst``."""
    import socket

    server = netns_tools.socket_in_netns(site.ns(dst), socket.AF_INET, socket.SOCK_STREAM)
    client = netns_tools.socket_in_netns(site.ns(EXTERNAL), socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the other variant's run
    server.bind(("0.0.0.0", port))
    server.listen(1)
    client.settimeout(1.0)
    client.connect((site.ip(dst), port))
    conn, _ = server.accept()
    conn.settimeout(0.5)
    return server, client, conn


def _carries(client: Any, conn: Any, data: bytes) -> bool:
    client.sendall(data)
    try:
        return bool(conn.recv(100) == data)
    except TimeoutError:
        return False


def test_revocation_cuts_established_connections_the_change_revoked(
        site: Site, variant: str) -> None:
    """vm0 leaves every group: its established port-80 connection stops at once;
    vm2's, still allowed, carries on (conntrack entries judged on the IR, as with
    the nftables backend)."""
    hf = compile_host(site.api.snapshot(), site.host)
    vm0 = site.ports["vm0"].tap
    backend = get_backend("iptables", netns=site.lab.host_ns, variant=variant)
    sockets: list[Any] = []
    try:
        backend.apply(backend.plan(None, hf))
        in_ns(site.lab.host_ns, "conntrack", "-F")
        cut, kept = _open_tcp(site, "vm0", 80), _open_tcp(site, "vm2", 80)
        sockets += [*cut, *kept]
        assert _carries(cut[1], cut[2], b"before") and _carries(kept[1], kept[2], b"before")
        new = replace(hf, ports=tuple(replace(p, ingress_chains=()) if p.tap == vm0 else p
                                      for p in hf.ports))
        backend.apply(backend.plan(backend.committed(hf), new))
        result = backend.revoke(hf, new)
        assert result is not None and result.deleted >= 1
        assert not _carries(cut[1], cut[2], b"after")
        assert _carries(kept[1], kept[2], b"after")
    finally:
        for sock in sockets:
            sock.close()
        backend.cleanup()
