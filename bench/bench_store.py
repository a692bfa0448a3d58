"""Benchmark: one ``secgroup-add-rule`` write on SQLite and on etcd.

The cloud is the benchmark workload (src/secfw/bench/workload.py: 1,000 groups,
5,000 member instances on other hosts, N ports on the benchmarked host), built
once per store and grown to each size. At each size it times, median of
``--repeat`` runs, a rule added to a host group:

* in-process: ``Api.secgroup_add_rule`` (load the whole store, validate, commit);
* the whole command: the ``secfw secgroup-add-rule`` process, start to exit.

etcd is a throw-away member on 127.0.0.1 (secfw.etcdlocal) unless ``--etcd URL``
names one. Usage: ``python bench/bench_store.py [--sizes 100,1000] [--repeat 5]``.
Prints one line per figure; it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from secfw import etcdlocal
from secfw.api import Api
from secfw.bench.workload import PROJECT, BenchCloud, host_group
from secfw.store import open_store

HOST = "bench-host"


def secfw_command() -> str:
    """The ``secfw`` console script beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "secfw"
    return str(beside) if beside.exists() else "secfw"


def median_time(runs: int, func: Callable[[int], object]) -> float:
    """Median wall time of ``func(run)`` over ``runs`` runs (seconds)."""
    times = []
    for run in range(runs):
        start = time.perf_counter()
        func(run)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_store(kind: str, url: str, sizes: list[int], repeat: int) -> None:
    api = Api(open_store(url))
    try:
        cloud = BenchCloud(api, HOST)
        start = time.perf_counter()
        cloud.build_base()
        built = time.perf_counter() - start
        print(f"{kind:<6} base cloud built in one batch        {built:8.2f} s")
        port = 20_000
        for size in sizes:
            start = time.perf_counter()
            cloud.grow_to(size)
            grown = time.perf_counter() - start
            docs = sum(len(d) for d in api.store.load().docs.values())
            print(f"{kind:<6} {size:>6} host ports: grown in {grown:6.2f} s, {docs} documents")
            port += 100

            def in_process(run: int, base: int = port) -> object:
                return api.secgroup_add_rule(PROJECT, host_group(1), "tcp", str(base + run),
                                             str(base + run), "0.0.0.0/0")

            def whole_command(run: int, base: int = port + 50) -> object:
                return subprocess.run(
                    [secfw_command(), "--store", url, "--project", PROJECT, "secgroup-add-rule",
                     host_group(2), "tcp", str(base + run), str(base + run), "0.0.0.0/0"],
                    check=True, stdout=subprocess.DEVNULL)

            api_s = median_time(repeat, in_process)
            cli_s = median_time(repeat, whole_command)
            print(f"{kind:<6} {size:>6} ports  secgroup-add-rule in-process "
                  f"{api_s * 1e3:8.1f} ms   whole secfw process {cli_s * 1e3:8.1f} ms")
    finally:
        api.store.close()


@contextmanager
def etcd_url(given: str | None) -> Iterator[str]:
    """``given``, else a fresh local member for the run (stopped afterwards)."""
    if given:
        yield given
        return
    base = Path(tempfile.mkdtemp(prefix="secfw-bench-etcd-"))
    member = etcdlocal.start(base)
    try:
        yield member.url("bench")
    finally:
        member.stop()
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="host ports, comma-separated")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--etcd", help="etcd store URL (default: a local throw-away member)")
    parser.add_argument("--stores", default="sqlite,etcd")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    kinds = args.stores.split(",")
    if "sqlite" in kinds:
        tmp = tempfile.mkdtemp(prefix="secfw-bench-")
        try:
            bench_store("sqlite", f"sqlite:///{tmp}/bench.db", sizes, args.repeat)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if "etcd" in kinds:
        with etcd_url(args.etcd) as url:
            bench_store("etcd", url, sizes, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
