"""Floating IPs at scale: the cost of N associated floating IPs on one host.

``python -m secfw.bench.floating [--count 1000] [--out DIR]`` builds a cloud of
``count`` instances on one host, each with a floating IP from one pool, and for
each backend (nftables, iptables-nft) in a fresh namespace measures: compiling
the host, rendering, the full apply, the read-back and re-plan (must be empty),
and one association change from the store to the kernel (an address moved from
one instance to another: the API's transaction, then one agent pass — the
incremental compile, the plan, the apply and the conntrack revocation).
Writes ``floating.json`` and ``floating.md``. Single runs: they report, they
never assert.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secfw.api import Api
from secfw.backends import get_backend
from secfw.bench.common import Row, guarded, rounded, timed
from secfw.bench.machine import REPO, machine_info
from secfw.bench.namespaces import scratch_netns
from secfw.cloud import CloudState
from secfw.compiler.build import compile_host
from secfw.config import Config
from secfw.store import open_store

HOST = "fip-bench"
BACKENDS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("nftables", "nftables", {}),
    ("iptables-nft", "iptables", {"variant": "nft"}),
)


def build(api: Api, count: int) -> list[str]:
    """``count`` instances on :data:`HOST` (one /16 network, group ``web``: tcp 80
    from anywhere), each with its own floating IP from a /16 pool; returns the
    floating addresses in instance order."""
    with api.batch():
        api.net_create("bench", "fip-net", "10.200.0.0/16")
        api.floating_pool_create("admin", "fip-pool", "100.64.0.0/16")
        # every quota a thousand instances need: nova's defaults allow 10 instances
        api.quota_update("bench", floating_ips=-1, instances=-1, cores=-1, ram=-1)
        api.image_create("admin", "cirros", visibility="public")
        api.secgroup_create("bench", "web", "web")
        api.secgroup_add_rule("bench", "web", "tcp", "80", "80", "0.0.0.0/0")
        addresses = []
        for i in range(count):
            api.boot("bench", f"vm{i}", "m1.tiny", "cirros", HOST, ["web"], ["fip-net"])
            address = api.floating_ip_create("bench", "fip-pool").id
            api.add_floating_ip("bench", f"vm{i}", address)
            addresses.append(address)
        api.boot("bench", "spare", "m1.tiny", "cirros", HOST, ["web"], ["fip-net"])
    return addresses


def measure(api: Api, store_url: str, addresses: list[str], name: str,
            options: dict[str, Any]) -> Row:
    """One backend: compile, render, full apply, read back, re-plan, and one
    reassignment store → kernel (see the module doc)."""
    from secfw.agent import Reconciler

    state = CloudState.from_snapshot(api.store.load())
    hf, compile_s = timed(lambda: compile_host(state, HOST))
    with scratch_netns() as ns:
        backend: Any = get_backend(name, netns=ns, **options)
        _, render_s = timed(lambda: backend.render(hf))
        plan = backend.plan(None, hf)
        _, apply_s = timed(lambda: backend.apply(plan))
        current, read_s = timed(backend.read)
        again = len(backend.plan(current, hf).commands)
        agent_store = open_store(store_url)
        try:
            agent = Reconciler(agent_store, HOST, Config(True), backend)
            _, first_s = timed(agent.reconcile)
            moved = addresses[0]
            _, store_s = timed(lambda: reassign(api, moved, "vm0", "spare"))
            sync, change_s = timed(agent.reconcile)
            reassign(api, moved, "spare", "vm0")  # back, for the next backend
        finally:
            agent_store.close()
        backend.cleanup()
    return {"floating_ips": len(hf.floating), "compile_s": rounded(compile_s),
            "render_s": rounded(render_s), "full_apply_s": rounded(apply_s),
            "read_back_s": rounded(read_s), "commands_after": again,
            "first_pass_s": rounded(first_s), "reassign_store_s": rounded(store_s),
            "reassign_pass_s": rounded(change_s), "reassign_commands": sync.commands}


def reassign(api: Api, address: str, old: str, new: str) -> None:
    """Move a floating IP from server ``old`` to ``new`` in one transaction."""
    with api.batch():
        api.remove_floating_ip("bench", old, address)
        api.add_floating_ip("bench", new, address)


def run(count: int) -> Row:
    rows = []
    with tempfile.TemporaryDirectory(prefix="secfw-bench-") as work:
        store_url = f"sqlite:///{work}/bench.db"
        api = Api(open_store(store_url))
        try:
            addresses, build_s = timed(lambda: build(api, count))
            for label, name, options in BACKENDS:
                row = {"backend": label, "count": count, "build_s": rounded(build_s),
                       **guarded(_bound(api, store_url, addresses, name, options))}
                print(f"  {label:<14} {row}", flush=True)
                rows.append(row)
        finally:
            api.store.close()
    return {"machine": machine_info(), "rows": rows}


def _bound(api: Api, store_url: str, addresses: list[str], name: str,
           options: dict[str, Any]) -> Callable[[], Row]:
    return lambda: measure(api, store_url, addresses, name, options)


def markdown(results: Row) -> str:
    machine = results["machine"]
    lines = [
        f"Floating IPs on one host, {machine.get('date', '')}: {machine.get('cores', '?')} "
        f"cores, kernel {machine.get('kernel', '?')}. Single runs.", "",
        "| backend | floating IPs | compile | render | full apply | read back | commands after "
        "| reassignment: store, agent pass (commands) |", "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['backend']} | error: {row['error']} |||||||")
            continue
        lines.append(
            f"| {row['backend']} | {row['floating_ips']:,} | {row['compile_s']} s "
            f"| {row['render_s']} s | {row['full_apply_s']} s | {row['read_back_s']} s "
            f"| {row['commands_after']} | {row['reassign_store_s']} s, {row['reassign_pass_s']} s "
            f"({row['reassign_commands']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secfw.bench.floating",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="floating IPs (default 1000)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be positive")
    results = run(args.count)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "floating.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "floating.md").write_text(markdown(results))
    print(f"wrote {args.out}/floating.json and floating.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
