"""``secfw audit verify`` on a host with NAT: a floating IP and the metadata redirect.

On every backend × topology the host verifies clean — the nat chains are evaluated
(DNAT at prerouting, the filter on the translated packet, the metadata server's
packets to ``input``) and the floating and metadata addresses are probed. Then the
floating IP's DNAT is tampered with behind the agent's back (its map element or
rule deleted; then pointed at the other server's fixed address): verify must name
the port and give a packet to the floating address, which is then sent for real
and does not reach the server — and does again once the agent has repaired it.
Last, the metadata redirect is flushed: both ports' requests to 169.254.169.254:80
are named, and a real request gets no answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from secfw.audit.policy import CloudPolicy
from secfw.audit.verify import (
    Difference,
    KernelVerdict,
    ipt_kernel,
    model_verdict,
    nft_kernel,
    verify,
)
from secfw.compiler.evaluate import Packet
from secfw.lab import netns_tools as nt
from secfw.lab.hostlab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

POOL = "192.0.2.0/24"
EXTERNAL_IP = Lab.external_addresses[0]


def build(cloud: Any) -> str:
    """vm (web: tcp 80 from anywhere, egress only tcp 443) with a floating IP,
    peer (web too), the metadata server; the floating address."""
    api = cloud.api
    api.net_create("p", "nat-net", "10.1.0.0/24")
    api.floating_pool_create("admin", "public", POOL)
    api.secgroup_create("p", "web", "")
    api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    api.rule_create("p", "web", "egress", "IPv4", "tcp", dst_port="443",
                    remote_ip="0.0.0.0/0")
    cloud.boot("vm", ["web"], "nat-net")
    cloud.boot("peer", ["web"], "nat-net")
    address = api.floating_ip_create("p", "public").id
    api.add_floating_ip("p", "vm", address)
    cloud.configure(allow_same_net=False)
    cloud.serve_metadata()
    cloud.sync()
    return str(address)


def run_verify(cloud: Any) -> list[Difference]:
    return verified(cloud)[0]


def verified(cloud: Any) -> tuple[list[Difference], KernelVerdict]:
    cp = CloudPolicy(cloud.api.snapshot(), allow_same_net=cloud.allow_same_net)
    listen = cloud.metadata_listen
    local = (listen[0],)
    if cloud.backend_name == "nftables":
        from secfw.backends.nftables.executor import NftablesExecutor

        listing = NftablesExecutor(cloud.lab.host_ns).read_json() or {"nftables": []}
        judge, addresses, ports = nft_kernel(listing, cloud.topology, local)
    else:
        from secfw.audit.iptkernel import read_iptables

        judge, addresses, ports = ipt_kernel(read_iptables(cloud.lab.host_ns),
                                             cloud.topology, local)
    found, probes = verify(cp, cloud.host, judge, addresses, ports, listen)
    assert probes > 0
    return found, judge


def rows(found: list[Difference]) -> list[Any]:
    return [d.row() for d in found]


def arrives(cloud: Any, p: Packet) -> bool:
    """A TCP handshake from the external namespace, from the packet's source to its
    destination (the floating address) and port, completes with a listener in vm:
    the connection the packet opens reaches vm's service. (A frame that still
    reaches vm's eth0 untranslated — a bridged host's router sends the floating
    address to vm's MAC — carries an address vm does not have: no connection.)"""
    assert p.protocol == 6 and p.dport is not None, p  # web opens tcp 80 only
    with nt.listen(cloud.ns("vm"), "tcp", p.dport):
        return nt.tcp_connect(cloud.lab.external_ns, p.dst, p.dport, 0.5, p.src)


def cli_verify(cloud: Any, tmp_path: Path) -> int:
    """``secfw audit verify`` in the host's namespace, the metadata server named in
    its config file: the exit status."""
    config = tmp_path / "verify.conf"
    address, port = cloud.metadata_listen
    config.write_text(f"[DEFAULT]\nallow_same_net_traffic = false\n"
                      f"metadata_listen = {address}:{port}\n")
    done = subprocess.run(
        ["ip", "netns", "exec", cloud.lab.host_ns, str(Path(sys.executable).parent / "secfw"),
         "--store", cloud.store_url, "-f", "json", "audit", "verify", "--host", cloud.host,
         "--backend", cloud.backend_name, "--topology", cloud.topology,
         "--config", str(config)], capture_output=True, text=True, check=False)
    assert done.returncode in (0, 12), (done.stdout, done.stderr)
    assert json.loads(done.stdout)["probes"] > 0
    return done.returncode


def only_vm_floating(cloud: Any, address: str) -> Packet:
    """The one difference verify finds (vm's ingress, a packet to the floating
    address the model lets in and the kernel does not) — as a packet that
    :func:`arrives` can send: from the lab's external address when verify's
    comes from elsewhere (an instance of the host, whose answer would not go back
    to the external namespace), checked to be judged the same by both."""
    found, judge = verified(cloud)
    assert [(d.view.instance.name, d.direction) for d in found] == [("vm", "ingress")], \
        rows(found)
    diff = found[0]
    assert (diff.packet.dst, diff.model, diff.kernel) == (address, "accept", "drop"), diff.row()
    packet = diff.packet
    if packet.src != EXTERNAL_IP:
        packet = replace(packet, src=EXTERNAL_IP)
        assert judge(diff.view, "ingress", packet) == "drop"
        assert model_verdict(diff.view, "ingress", replace(packet, dst=cloud.ip("vm"))) == \
            "accept"
    return packet


def test_nat_host_verifies_clean_then_tampered_dnat(cloud: Any, tmp_path: Path) -> None:
    address = build(cloud)
    assert run_verify(cloud) == [], rows(run_verify(cloud))
    assert cli_verify(cloud, tmp_path) == 0  # the auditor's command, the server in --config
    fixed, peer = cloud.ip("vm"), cloud.ip("peer")

    # 1. the floating IP's DNAT is gone: nothing for the floating address reaches vm
    if cloud.backend_name == "nftables":
        cloud.tamper("nft", "delete", "element", "inet", "secfw", "floating_dnat",
                     f"{{ {address} }}")
    else:
        cloud.tamper("iptables", "-t", "nat", "-D", "secfw-float-dnat", "-d", f"{address}/32",
                     "-j", "DNAT", "--to-destination", fixed)
    packet = only_vm_floating(cloud, address)
    assert cli_verify(cloud, tmp_path) == 12
    assert not arrives(cloud, packet)
    cloud.sync(full=True)
    assert run_verify(cloud) == []
    assert arrives(cloud, packet)  # the same packet, the NAT repaired: it does

    # 2. the DNAT points at peer's fixed address instead of vm's
    if cloud.backend_name == "nftables":
        cloud.tamper("nft", "delete", "element", "inet", "secfw", "floating_dnat",
                     f"{{ {address} }}")
        cloud.tamper("nft", "add", "element", "inet", "secfw", "floating_dnat",
                     f"{{ {address} : {peer} }}")
    else:
        cloud.tamper("iptables", "-t", "nat", "-R", "secfw-float-dnat", "1", "-d",
                     f"{address}/32", "-j", "DNAT", "--to-destination", peer)
    assert not arrives(cloud, only_vm_floating(cloud, address))
    cloud.sync(full=True)

    # 3. the metadata redirect is flushed: the ports' egress rules (tcp 443 only) now
    # judge 169.254.169.254:80, and drop it
    if cloud.backend_name == "nftables":
        cloud.tamper("nft", "flush", "chain", "inet", "secfw", "metadata-redirect")
    else:
        cloud.tamper("iptables", "-t", "nat", "-F", "secfw-metadata")
    found = run_verify(cloud)
    assert sorted((d.view.instance.name, d.direction) for d in found) == [
        ("peer", "egress"), ("vm", "egress")], rows(found)
    assert all((d.packet.dst, d.packet.dport, d.model, d.kernel) ==
               ("169.254.169.254", 80, "accept", "drop") for d in found), rows(found)
    assert cloud.metadata("vm", "/openstack") is None  # sent for real: no answer
