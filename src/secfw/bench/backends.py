"""Both backends, both topologies: compile, render and full apply, side by side.

``python -m secfw.bench.backends [--sizes 1000,10000] [--out DIR]`` builds the
benchmark cloud (:mod:`.workload`) and, at each size, compiles the host once and
then, for the nftables backend and the iptables backend in both variants
(iptables-nft, iptables-legacy), for the routed and the bridged topology: renders
the IR, applies it whole into a fresh namespace (the backend's own ``apply`` of a
plan made from nothing), reads it back and plans again (which must be empty:
converged). Writes ``backends.json`` and ``backends.md`` to ``--out``
(``bench/results/``). Figures are single runs: they report, they never assert.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secfw.api import Api
from secfw.backends import TOPOLOGIES, get_backend
from secfw.bench.common import Row, guarded, rounded, timed
from secfw.bench.machine import REPO, machine_info
from secfw.bench.namespaces import scratch_netns
from secfw.bench.workload import BenchCloud
from secfw.cloud import CloudState
from secfw.compiler.build import compile_host
from secfw.compiler.ir import HostFilter
from secfw.store import open_store

DEFAULT_SIZES = (1_000, 10_000)
#: (label, backend name, constructor options)
BACKENDS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("nftables", "nftables", {}),
    ("iptables-nft", "iptables", {"variant": "nft"}),
    ("iptables-legacy", "iptables", {"variant": "legacy"}),
)


def measure(hf: HostFilter, name: str, options: dict[str, Any], topology: str) -> Row:
    """Render, full apply, read back and re-plan one backend in a fresh namespace."""
    with scratch_netns() as ns:
        backend: Any = get_backend(name, netns=ns, topology=topology, **options)
        _, render_s = timed(lambda: backend.render(hf))
        plan = backend.plan(None, hf)
        _, apply_s = timed(lambda: backend.apply(plan))
        current, read_s = timed(backend.read)
        again = backend.plan(current, hf)
        backend.cleanup()
    return {"render_s": rounded(render_s), "full_apply_s": rounded(apply_s),
            "read_back_s": rounded(read_s), "commands_after": again.size}


def run(sizes: tuple[int, ...], seed: int = 1) -> Row:
    """Every backend × topology at every size (see the module doc)."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="secfw-bench-") as work:
        api = Api(open_store(f"sqlite:///{work}/bench.db"))
        try:
            cloud = BenchCloud(api, f"bench-{uuid.uuid4().hex[:6]}", seed=seed)
            cloud.build_base()
            for size in sizes:
                cloud.grow_to(size)
                rows += _size_rows(size, CloudState.from_snapshot(api.store.load()), cloud.host)
        finally:
            api.store.close()
    return {"machine": machine_info(), "rows": rows}


def _size_rows(size: int, state: CloudState, host: str) -> list[Row]:
    """One compile, then every backend × topology measured on its IR."""
    hf, compile_s = timed(lambda: compile_host(state, host))
    rows = []
    for topology in TOPOLOGIES:
        for label, name, options in BACKENDS:
            row = {"ports": size, "backend": label, "topology": topology,
                   "compile_s": rounded(compile_s),
                   **guarded(_bound(measure, hf, name, options, topology))}
            print(f"  {size:>6} {label:<16} {topology:<8} {row}", flush=True)
            rows.append(row)
    return rows


def _bound(fn: Callable[..., Row], *args: Any) -> Callable[[], Row]:
    return lambda: fn(*args)


def markdown(results: Row) -> str:
    """The results as a Markdown table."""
    machine = results["machine"]
    lines = [
        f"Backends × topologies, {machine.get('date', '')}: {machine.get('cores', '?')} cores, "
        f"kernel {machine.get('kernel', '?')}. Single runs.", "",
        "| ports | backend | topology | compile | render | full apply | read back "
        "| commands after |", "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['ports']:,} | {row['backend']} | {row['topology']} "
                         f"| error: {row['error']} |||||")
            continue
        lines.append(
            f"| {row['ports']:,} | {row['backend']} | {row['topology']} | {row['compile_s']} s "
            f"| {row['render_s']} s | {row['full_apply_s']} s | {row['read_back_s']} s "
            f"| {row['commands_after']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secfw.bench.backends",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="ports per size, comma-separated (default 1000,10000)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(sorted({int(part) for part in args.sizes.split(",") if part}))
    except ValueError:
        parser.error(f"--sizes: not a list of integers: {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        parser.error("--sizes: sizes must be positive integers")
    results = run(sizes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backends.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "backends.md").write_text(markdown(results))
    print(f"wrote {args.out}/backends.json and backends.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
