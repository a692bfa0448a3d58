"""nftables backend against the real kernel, each test in a fresh network namespace.

What only the kernel can tell: the rendered text and JSON load; read-back parses
to exactly the state that was planned (so a second sync plans nothing); the
incremental transactions apply in their order; a failed batch changes nothing;
another program's table is never touched.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from secfw.backends import get_backend
from secfw.backends.nftables import (
    KernelState,
    NftablesBackend,
    NftablesExecutor,
    Transaction,
    canonical,
    plan,
    render,
    to_nft_json,
)
from secfw.backends.nftables.syntax import Match, Rule, Ruleset, SetRef
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

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.timeout(60),
]

WEB, SSH, OPS = "sg-0a0a-web-in", "sg-0b0b-ssh-in", "sg-0c0c-ops-out"
WEB_V4, WEB_V6 = "sg-0a0a-web-v4", "sg-0a0a-web-v6"
TAPS = [f"tap{i:08x}-{i:02x}" for i in range(6)]
NET_V4, NET1_V4, NET1_V6 = "net-0d0d-n-v4", "net-0e0e-m-v4", "net-0e0e-m-v6"
#: same-net sets: the addresses of a network's ports (tail of every filter's sets)
NET_SETS = (AddressSet(NET_V4, "n", "ipv4", ("10.0.0.5/32", "10.0.0.6/32", "10.0.0.200/32")),
            AddressSet(NET1_V4, "m", "ipv4", ("10.1.0.7/32",)),
            AddressSet(NET1_V6, "m", "ipv6", ("2001:db8:1::7/128", "2001:db8:1::8/128")))
FOREIGN = """table inet other {
	set keep { type ipv4_addr; elements = { 192.0.2.1 }; }
	chain input { type filter hook input priority 10; policy accept; tcp dport 22 accept; }
}
"""


def everything() -> HostFilter:
    """Every kind of IR rule, both families, every egress mode, same-net in v4 and v6."""
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
    ))
    ssh = GroupChain(SSH, "ssh", "ingress", (
        IRRule("b0000001", "ipv4", 6, PortRange(22, 22), remote_set=WEB_V4),
        IRRule("b0000002", "ipv6", 6, PortRange(22, 22), remote_set=WEB_V6),
    ))
    ops = GroupChain(OPS, "ops", "egress", (
        IRRule("c0000001", "ipv4", 6, PortRange(5432, 5432), remote_cidr="192.0.2.0/24"),
        IRRule("c0000002", "ipv4", 17, PortRange(53, 53), remote_set=WEB_V4),
    ))
    sets = (AddressSet(WEB_V4, "web", "ipv4", ("10.0.0.5/32", "10.0.0.6/32", "10.9.0.0/16")),
            AddressSet(WEB_V6, "web", "ipv6", ("2001:db8::5/128",)))
    pairs = (AddressPair("10.0.0.200/32", "fa:16:3e:00:00:01"),
             AddressPair("10.7.0.0/28", "fa:16:3e:00:00:77"),
             AddressPair("2001:db8:7::/120", "fa:16:3e:00:00:01"))
    ports = (
        _port(TAPS[0], (WEB,), ipv6=("2001:db8::10",), allowed_pairs=pairs),
        _port(TAPS[1], (WEB, SSH), (OPS,), egress_open=False),
        _port(TAPS[2], (SSH,), egress_open=False, same_net=(NET1_V4, NET1_V6)),
        _port(TAPS[5], (SSH,), port_security=False),
    )
    return HostFilter("h", ports, (web, ssh, ops), (*sets, *NET_SETS))


def _port(tap: str, ingress: tuple[str, ...] = (), egress: tuple[str, ...] = (),
          egress_open: bool = True, same_net: tuple[str, ...] = (NET_V4,),
          mac: str | None = None, ip: str | None = None, **kw: Any) -> PortPolicy:
    """A port; by default its MAC and address derive from the tap's index."""
    index = int(tap[3:11], 16) % 200 + 1
    return PortPolicy(tap, f"p-{tap}", f"i-{tap}", mac or f"fa:16:3e:00:01:{index:02x}",
                      (ip or f"10.0.0.{index}",), same_net, ingress, egress, egress_open, **kw)


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
    steps.append(("the egress group goes (vmap element and chain in one batch)", hf))
    hf = replace(hf, sets=(hf.sets[0], *hf.sets[2:]), chains=(replace(web, rules=web.rules[:3]),
                                                 replace(ssh, rules=ssh.rules[:1])))
    steps.append(("an address set goes", hf))
    hf = replace(hf, ports=tuple(replace(p, same_net_sets=()) for p in hf.ports))
    steps.append(("same-net traffic turned off", hf))
    first = hf.ports[0]
    hf = replace(hf, ports=(replace(first, allowed_pairs=(
        *first.allowed_pairs, AddressPair("2001:db8:8::/64", "fa:16:3e:00:00:88"))),
        *hf.ports[1:]))
    steps.append(("an address pair is added", hf))
    hf = replace(hf, ports=tuple(replace(p, port_security=True) for p in hf.ports))
    steps.append(("port security turned on", hf))
    hf = replace(hf, ports=(replace(hf.ports[0], port_security=False), *hf.ports[1:]))
    steps.append(("port security turned off", hf))
    return steps


def _sh(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, (argv, done.stderr)
    return done.stdout


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh, empty network namespace, always deleted afterwards."""
    name = f"secfw-t-{uuid.uuid4().hex[:10]}"
    _sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30,
                       check=False)


@pytest.fixture
def executor(ns: str) -> NftablesExecutor:
    return NftablesExecutor(ns)


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    return _sh("ip", "netns", "exec", ns, "nft", *args, stdin=stdin)


def sync(executor: NftablesExecutor, hf: HostFilter) -> Transaction:
    """One full sync: read back, plan, apply; then check it converged."""
    tx = plan(executor.read_state(), render(hf))
    executor.apply(tx)
    assert_converged(executor, hf)
    return tx


def assert_converged(executor: NftablesExecutor, hf: HostFilter) -> None:
    state = executor.read_state()
    assert state == KernelState.from_ruleset(render(hf))
    assert plan(state, render(hf)).empty


def test_full_apply_reads_back_exactly_and_second_sync_is_empty(
        executor: NftablesExecutor) -> None:
    assert executor.read_state() is None
    tx = sync(executor, everything())
    assert tx.full
    assert tx.full
    assert sync(executor, everything()).empty


def every_rule_shape() -> HostFilter:
    """One group chain holding every rule the renderer can emit for one remote:
    each IP protocol 0..255 over IPv4 and IPv6, each ICMP and ICMPv6 type (with
    no code, and with each code for one type), each port protocol with one port,
    a range and every port — so every symbol nft may print back is met."""
    rules: list[IRRule] = []

    def add(family: str, *args: Any, **kw: Any) -> None:
        rules.append(IRRule(f"{len(rules):08x}", family, *args, **kw))  # type: ignore[arg-type]

    for family in ("ipv4", "ipv6"):
        for proto in range(256):
            add(family, proto)
        for proto in (6, 17, 132, 136):
            for low, high in ((1, 1), (1000, 2000), (0, 65535)):
                add(family, proto, PortRange(low, high))
    for family, proto, with_codes in (("ipv4", 1, 3), ("ipv6", 58, 1)):
        for icmp_type in range(256):
            add(family, proto, icmp=IcmpMatch(icmp_type))
        for code in range(256):
            add(family, proto, icmp=IcmpMatch(with_codes, code))
    add("ipv4", 6, PortRange(22, 22), remote_cidr="192.0.2.7/32")
    add("ipv6", 17, PortRange(53, 53), remote_cidr="2001:db8::/48")
    add("ipv4", 6, PortRange(22, 22), remote_set=WEB_V4)
    chain = GroupChain(WEB, "web", "ingress", tuple(rules))
    sets = (AddressSet(WEB_V4, "web", "ipv4", ("10.0.0.5/32",)), NET_SETS[0])
    return HostFilter("h", (_port(TAPS[0], (WEB,)),), (chain,), sets)


@pytest.mark.parametrize("topology", ["routed", "bridged"])
def test_every_rule_shape_lists_back_equal(ns: str, topology: str) -> None:
    """Drift is judged by content (:mod:`secfw.backends.nftables.canonical`): each
    rule the renderer emits must list back, after nft's own rewriting, to the
    same canonical expressions — else every full pass would rewrite it."""
    backend = NftablesBackend(netns=ns, topology=topology)
    hf = every_rule_shape()
    backend.apply(backend.plan(None, hf))
    read, want = backend.read(), backend.committed(hf)
    assert read is not None
    differing = [(have, need) for key, chain in want.chains.items()
                 for have, need in zip(read.chains[key].rules, chain.rules, strict=True)
                 if have != need]
    assert not differing, differing[:3]
    assert read == want and backend.plan(read, hf).empty


@pytest.mark.parametrize(("expression", "table"), [
    ("icmp type", canonical.ICMP_TYPES), ("icmp code", canonical.ICMP_CODES),
    ("icmpv6 type", canonical.ICMPV6_TYPES), ("icmpv6 code", canonical.ICMPV6_CODES),
    ("ether type", canonical.ETHER_TYPES),
])
def test_symbol_tables_are_the_installed_nfts(expression: str, table: dict[str, int]) -> None:
    """The names the canonical form turns back into numbers are exactly those
    ``nft describe`` lists (a name nft knows but secfw did not would read as a
    difference and be rewritten on every full pass)."""
    out = _sh("nft", "describe", *expression.split())
    _, _, constants = out.partition("symbolic constants")
    words = constants.split(":", 1)[1].split()
    described = {name: int(value, 0) for name, value in zip(words[::2], words[1::2],
                                                            strict=True)}
    assert described == table


@pytest.mark.parametrize("step", range(1, len(changes())))
def test_each_incremental_change_applies_and_converges(
        executor: NftablesExecutor, step: int) -> None:
    (_, before), (what, after) = changes()[step - 1], changes()[step]
    sync(executor, before)
    tx = plan(executor.read_state(), render(after))
    assert not tx.full and not tx.empty, what
    assert "delete table" not in tx.text
    executor.apply(tx)
    assert_converged(executor, after)


def test_a_port_going_is_element_deletions_only(executor: NftablesExecutor) -> None:
    """No chain per port (its NA targets are elements of nd_targets): the kernel
    accepts the deletions read back, NA targets included, in one transaction."""
    (_, before), (what, after) = changes()[4], changes()[5]
    assert what == "a port goes"
    sync(executor, before)
    tx = plan(executor.read_state(), render(after))
    assert all(c.startswith("delete element ") for c in tx.commands)
    assert f'delete element inet secfw nd_targets {{ "{TAPS[3]}" . 0x' in tx.text
    executor.apply(tx)
    assert_converged(executor, after)


def test_both_tables_are_ours_and_go_together(ns: str, executor: NftablesExecutor) -> None:
    sync(executor, everything())
    assert nft(ns, "list", "tables").split() == [  # bridge: closes bridge-port taps
        "table", "inet", "secfw", "table", "arp", "secfw", "table", "bridge", "secfw"]
    nft(ns, "delete", "table", "arp", "secfw")
    tx = plan(executor.read_state(), render(everything()))
    assert tx.full  # a table missing: both are rewritten in one batch
    executor.apply(tx)
    assert_converged(executor, everything())
    executor.delete_table()
    assert nft(ns, "list", "tables") == ""


def test_another_programs_table_survives_every_apply(ns: str, executor: NftablesExecutor) -> None:
    nft(ns, "-f", "-", stdin=FOREIGN)
    before = nft(ns, "list", "table", "inet", "other")
    for _, hf in changes():
        sync(executor, hf)
        assert nft(ns, "list", "table", "inet", "other") == before
    executor.apply(plan(None, render(everything())))  # full replacement
    executor.delete_table()
    assert nft(ns, "list", "table", "inet", "other") == before
    assert "secfw" not in nft(ns, "list", "tables")
    assert "inet other" in nft(ns, "list", "tables")


def test_failed_transaction_leaves_the_previous_ruleset(
        ns: str, executor: NftablesExecutor) -> None:
    sync(executor, everything())
    listed = nft(ns, "list", "table", "inet", "secfw")
    good = plan(executor.read_state(), render(changes()[2][1]))
    broken = Transaction((*good.commands, "add rule inet secfw no-such-chain accept"))
    with pytest.raises(BackendError, match="No such file or directory") as err:
        executor.apply(broken)
    assert "\n" not in str(err.value)
    assert nft(ns, "list", "table", "inet", "secfw") == listed
    assert_converged(executor, everything())
    with pytest.raises(BackendError):
        executor.apply(replace(plan(None, render(changes()[2][1])),
                               commands=("add table inet secfw", "delete table inet secfw",
                                         "table inet secfw { chain x { bogus; } }")))
    assert nft(ns, "list", "table", "inet", "secfw") == listed


def _without_nd_targets(ruleset: Ruleset) -> Ruleset:
    """``ruleset`` without the NA-target sets and the rules that use them: their
    ``typeof … @th,64,128`` declaration has no libnftables 1.0.6 JSON input form
    (docs/protection.md), so only the native form is ever applied."""
    sets = tuple(s for s in ruleset.sets if not s.typeof)
    names = {SetRef(s.name) for s in ruleset.sets if s.typeof}

    def kept(rule: Rule) -> bool:
        return not any(isinstance(s, Match) and s.right in names for s in rule.statements)

    chains = tuple(replace(c, rules=tuple(filter(kept, c.rules))) for c in ruleset.chains)
    return Ruleset(sets, chains)


def test_json_and_text_give_the_same_kernel_state(ns: str, executor: NftablesExecutor) -> None:
    hf = everything()
    ruleset = _without_nd_targets(render(hf))
    assert len(ruleset.sets) == len(render(hf).sets) - 2
    executor.apply(plan(None, ruleset))
    other = f"{ns}-j"
    _sh("ip", "netns", "add", other)
    try:
        NftablesExecutor(other).apply_json(to_nft_json(ruleset))
        for family in ("inet", "arp"):
            assert nft(other, "list", "table", family, "secfw") == nft(
                ns, "list", "table", family, "secfw")
        assert NftablesExecutor(other).read_state() == KernelState.from_ruleset(ruleset)
    finally:
        subprocess.run(["ip", "netns", "del", other], capture_output=True, timeout=30,
                       check=False)


def test_hand_made_drift_is_repaired(ns: str, executor: NftablesExecutor) -> None:
    hf = everything()
    sync(executor, hf)
    nft(ns, "add", "rule", "inet", "secfw", "ingress-filter", "accept")
    nft(ns, "delete", "element", "inet", "secfw", "ingress_ports", f'{{ "{TAPS[0]}" }}')
    nft(ns, "add", "chain", "inet", "secfw", "stray-1")
    tx = plan(executor.read_state(), render(hf))
    assert not tx.full and tx.count > 0
    executor.apply(tx)
    assert_converged(executor, hf)


def test_names_secfw_cannot_print_are_removed_by_full_replacement(
        executor: NftablesExecutor) -> None:
    hf = everything()
    sync(executor, hf)
    chain = {"family": "inet", "table": "secfw", "name": 'tcp"\ndelete table inet other'}
    executor.apply_json({"nftables": [{"add": {"chain": chain}}]})
    state = executor.read_state()
    assert state is not None and ("inet", chain["name"]) in state.chains
    assert sync(executor, hf).full


def test_delete_table_is_idempotent(executor: NftablesExecutor) -> None:
    executor.delete_table()
    executor.apply(plan(None, render(everything())))
    executor.delete_table()
    executor.delete_table()
    assert executor.read_state() is None


def test_missing_namespace_is_a_backend_error() -> None:
    with pytest.raises(BackendError):
        NftablesExecutor(f"secfw-t-missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(BackendError):
        NftablesExecutor("../etc")


def test_backend_as_the_agent_drives_it(ns: str) -> None:
    backend = get_backend("nftables", netns=ns)
    assert isinstance(backend, NftablesBackend)
    committed = None
    for _, hf in changes():
        tx = backend.plan(committed if committed is not None else backend.read(), hf)
        backend.apply(tx)
        committed = backend.committed(hf)
        assert backend.read() == committed
        assert backend.plan(committed, hf).empty
    with pytest.raises(BackendError, match="cannot apply"):
        backend.apply(object())
    backend.cleanup()
    assert backend.read() is None


# ------------------------------------------------------------ real packets --

VM_TAPS = ("tapd0000001-01", "tapd0000002-02")
VM_MACS = ("fa:16:3e:0d:00:01", "fa:16:3e:0d:00:02")
SERVER = """import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
while True:
    s.accept()[0].close()
"""
CLIENT = """import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError:
    sys.exit(1)
"""


@pytest.fixture
def routed(ns: str) -> Iterator[tuple[str, str]]:
    """Two instances routed through host namespace ``ns`` (a tap per instance, the
    design doc's routed topology), each running TCP servers on 8080 and 8081."""
    vms = (f"{ns}-1", f"{ns}-2")
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for i, (vm, tap) in enumerate(zip(vms, VM_TAPS, strict=True), start=1):
            _sh("ip", "netns", "add", vm)
            _sh("ip", "-n", ns, "link", "add", tap, "type", "veth", "peer", "name", "eth0",
                "address", VM_MACS[i - 1], "netns", vm)
            _sh("ip", "-n", ns, "addr", "add", f"10.0.{i}.254/24", "dev", tap)
            _sh("ip", "-n", ns, "link", "set", tap, "up")
            _sh("ip", "-n", vm, "addr", "add", f"10.0.{i}.1/24", "dev", "eth0")
            _sh("ip", "-n", vm, "link", "set", "eth0", "up")
            _sh("ip", "-n", vm, "link", "set", "lo", "up")
            _sh("ip", "-n", vm, "route", "add", "default", "via", f"10.0.{i}.254")
            for port in ("8080", "8081"):
                servers.append(subprocess.Popen(
                    ["ip", "netns", "exec", vm, sys.executable, "-c", SERVER, port]))
                assert _wait(functools.partial(connects, vm, "127.0.0.1", port, 0.2))
        _sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield vms
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=10)
        for vm in vms:
            subprocess.run(["ip", "netns", "del", vm], capture_output=True, timeout=30,
                           check=False)


def _wait(probe: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.05)
    return False


def connects(src_ns: str, ip: str, port: str, timeout: float = 1.0) -> bool:
    done = subprocess.run(["ip", "netns", "exec", src_ns, sys.executable, "-c", CLIENT, ip,
                           port, str(timeout)], capture_output=True, timeout=30, check=False)
    return done.returncode == 0


def two_vms(*, web_rules: tuple[IRRule, ...] = (), same_net: tuple[str, ...] = (),
            vm1_egress_open: bool = True, vm1_known: bool = True) -> HostFilter:
    """vm1 (no groups) and vm2 (group WEB with ``web_rules``, and a same-net set of
    the addresses ``same_net`` when given), with their real MAC and address
    (anti-spoofing checks both)."""
    sets = (AddressSet(NET_V4, "n", "ipv4", same_net),) if same_net else ()
    ports = [_port(VM_TAPS[1], (WEB,), same_net=tuple(s.name for s in sets), mac=VM_MACS[1],
                   ip="10.0.2.1")]
    if vm1_known:
        ports.insert(0, _port(VM_TAPS[0], egress_open=vm1_egress_open, same_net=(),
                              mac=VM_MACS[0], ip="10.0.1.1"))
    return HostFilter("h", tuple(ports), (GroupChain(WEB, "web", "ingress", web_rules),), sets)


def test_packets_follow_the_ruleset(ns: str, executor: NftablesExecutor,
                                    routed: tuple[str, str]) -> None:
    vm1, vm2 = routed
    assert connects(vm1, "10.0.2.1", "8081")  # no filter yet
    web_8080 = (IRRule("d0000001", "ipv4", 6, PortRange(8080, 8080), remote_cidr="10.0.1.0/24"),)
    sync(executor, two_vms(web_rules=web_8080))
    assert connects(vm1, "10.0.2.1", "8080")  # allowed; the reply passes as established
    assert not connects(vm1, "10.0.2.1", "8081")  # next port stays closed
    assert not connects(vm2, "10.0.1.1", "8080")  # vm1 has no ingress rule
    sync(executor, two_vms(web_rules=web_8080, same_net=("10.0.2.9/32",)))
    assert not connects(vm1, "10.0.2.1", "8081")  # vm1's address is not in the set
    sync(executor, two_vms(web_rules=web_8080, same_net=("10.0.1.1/32", "10.0.2.9/32")))
    assert connects(vm1, "10.0.2.1", "8081")  # same-net traffic is not filtered
    sync(executor, two_vms(web_rules=web_8080, vm1_egress_open=False))
    assert not connects(vm1, "10.0.2.1", "8080")  # vm1's egress closed, no egress rule
    sync(executor, two_vms(web_rules=web_8080, vm1_known=False))
    assert not connects(vm1, "10.0.2.1", "8080")  # a tap secfw does not know: dropped
    sync(executor, two_vms(web_rules=web_8080))
    assert connects(vm1, "10.0.2.1", "8080")
    executor.delete_table()
    assert connects(vm1, "10.0.2.1", "8081")
