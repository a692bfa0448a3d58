"""Benchmark: single CLI writes on SQLite and on etcd, at 1k-50k host ports.

The cloud is the benchmark workload (src/secfw/bench/workload.py: 1,000 groups,
5,000 member instances on other hosts, N ports on the benchmarked host, all in
one project and most on one /14 network). It is built once on SQLite and grown
size by size, in batches of :data:`GROW_BATCH` boots (each boot goes through
``Api.boot``: its addresses, MAC and tap allocated by key). The etcd store of
each size is then filled from the SQLite one in bulk — documents put through
``Store.write`` transactions of :data:`COPY_DOCS` (the store's commit keeps the
indexes), which is what growing the cloud by boots one etcd transaction each
would cost hours to reach.

At each size it times, median of ``--repeat`` runs, each write command of
:data:`COMMANDS` on a fresh group and instance:

* in-process: the ``Api`` method (open the transaction, read by key, commit);
* the whole command: the ``secfw …`` process, start to exit — wall time, and its
  CPU time (user + system, from ``wait4(2)``: on a loaded machine the wall time
  also counts the wait for a core).

etcd is a throw-away member on 127.0.0.1 (secfw.lab.etcdlocal) unless ``--etcd URL``
names one. Usage: ``python bench/bench_store.py [--sizes 1000,10000,50000]
[--repeat 5]``. Prints one line per figure; it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from secfw.api import Api
from secfw.bench.common import ensure_bytecode
from secfw.bench.workload import FLAVOR, IMAGE, MAIN_NET, PROJECT, BenchCloud, host_group
from secfw.errors import StoreError
from secfw.lab import etcdlocal
from secfw.store import Store, open_store

HOST = "bench-host"
#: Boots per transaction while growing the SQLite cloud.
GROW_BATCH = 1_000
#: Documents per transaction when copying the cloud into etcd, and attempts per batch.
COPY_DOCS = 200
COPY_ATTEMPTS = 3
#: The write commands timed, in the order each run makes them.
COMMANDS = ("secgroup-create", "secgroup-add-rule", "boot", "add-secgroup",
            "remove-secgroup", "delete", "secgroup-delete")
#: The paged read commands timed after the writes (secfw.paging): a page of 50.
READS = ("list --limit 50", "port-list --limit 50")


def secfw_command() -> str:
    """The ``secfw`` console script beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "secfw"
    return str(beside) if beside.exists() else "secfw"


def cli_args(command: str, run: str) -> list[str]:
    """The ``secfw`` arguments of ``command`` in run ``run``."""
    group, server, port = f"bench-g-{run}", f"bench-vm-{run}", "30000"
    return {
        "secgroup-create": ["secgroup-create", group, "bench"],
        "secgroup-add-rule": ["secgroup-add-rule", group, "tcp", port, port, "0.0.0.0/0"],
        "boot": ["boot", server, "--flavor", FLAVOR, "--image", IMAGE, "--security-groups",
                 host_group(1), "--nic", f"net-id={MAIN_NET[0]}", "--host", HOST],
        "add-secgroup": ["add-secgroup", server, group],
        "remove-secgroup": ["remove-secgroup", server, group],
        "delete": ["delete", server],
        "secgroup-delete": ["secgroup-delete", group],
    }[command]


def api_call(api: Api, command: str, run: str) -> Callable[[], object]:
    """The ``Api`` call that ``secfw`` makes for ``cli_args(command, run)``."""
    group, server, port = f"bench-g-{run}", f"bench-vm-{run}", "30000"
    return {
        "secgroup-create": lambda: api.secgroup_create(PROJECT, group, "bench"),
        "secgroup-add-rule": lambda: api.secgroup_add_rule(PROJECT, group, "tcp", port, port,
                                                           "0.0.0.0/0"),
        "boot": lambda: api.boot(PROJECT, server, FLAVOR, IMAGE, HOST, [host_group(1)],
                                 [MAIN_NET[0]]),
        "add-secgroup": lambda: api.add_secgroup(PROJECT, server, group),
        "remove-secgroup": lambda: api.remove_secgroup(PROJECT, server, group),
        "delete": lambda: api.delete(PROJECT, server),
        "secgroup-delete": lambda: api.secgroup_delete(PROJECT, group),
    }[command]


def read_args(command: str) -> list[str]:
    """The ``secfw`` arguments of a paged read of :data:`READS`."""
    return {"list --limit 50": ["list", "--limit", "50"],
            "port-list --limit 50": ["port-list", "--host", HOST, "--limit", "50"]}[command]


def read_call(api: Api, command: str) -> Callable[[], object]:
    """The ``Api`` call that ``secfw`` makes for ``read_args(command)``."""
    return {"list --limit 50": lambda: api.server_page(PROJECT, None, False, 50, None),
            "port-list --limit 50": lambda: api.port_page(PROJECT, HOST, 50, None)}[command]


def timed(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def run_process(args: list[str]) -> tuple[float, float]:
    """``(wall, CPU)`` seconds of one process, run to its end; CPU is its user +
    system time from ``wait4(2)`` (its own, not its parent's). A failure raises."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    error = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, args, stderr=error)
    return wall, usage.ru_utime + usage.ru_stime


def bench_commands(kind: str, url: str, size: int, repeat: int, label: str) -> None:
    """Every command of :data:`COMMANDS`, ``repeat`` runs in-process and as a
    process; prints the medians."""
    api = Api(open_store(url))
    in_process: dict[str, list[float]] = {c: [] for c in COMMANDS}
    whole: dict[str, list[tuple[float, float]]] = {c: [] for c in COMMANDS}
    try:
        for run in range(repeat):
            for command in COMMANDS:
                in_process[command].append(timed(api_call(api, command, f"{label}a{run}")))
            for command in COMMANDS:
                whole[command].append(run_process([
                    secfw_command(), "--store", url, "--project", PROJECT,
                    *cli_args(command, f"{label}p{run}")]))
    finally:
        api.store.close()
    in_process.update(bench_reads(api.store.url, repeat, whole))
    for command in (*COMMANDS, *READS):
        walls, cpus = zip(*whole[command], strict=True)
        print(f"{kind:<6} {size:>6} ports  {command:<20} in-process "
              f"{statistics.median(in_process[command]) * 1e3:7.1f} ms   whole secfw process "
              f"{statistics.median(walls) * 1e3:7.1f} ms (CPU "
              f"{statistics.median(cpus) * 1e3:5.1f} ms)", flush=True)


def bench_reads(url: str, repeat: int,
                whole: dict[str, list[tuple[float, float]]]) -> dict[str, list[float]]:
    """Each paged read of :data:`READS`, ``repeat`` times in-process (returned)
    and as a ``secfw`` process (added to ``whole``)."""
    api = Api(open_store(url))
    in_process: dict[str, list[float]] = {c: [] for c in READS}
    try:
        for command in READS:
            args = [secfw_command(), "--store", url, "--project", PROJECT, *read_args(command)]
            for _ in range(repeat):
                in_process[command].append(timed(read_call(api, command)))
                whole.setdefault(command, []).append(run_process(args))
    finally:
        api.store.close()
    return in_process


def copy_store(source: Store, target: Store) -> float:
    """Every document of ``source`` into the empty ``target``, through its write
    transactions (the bulk path, see the module docstring); seconds taken."""
    start = time.perf_counter()
    items = [(kind, doc_id, doc) for kind, by_id in sorted(source.load().docs.items())
             for doc_id, doc in by_id.items()]
    for first in range(0, len(items), COPY_DOCS):
        batch = items[first:first + COPY_DOCS]
        for attempt in range(1, COPY_ATTEMPTS + 1):
            try:  # putting the same documents again is harmless
                _put_all(target, batch)
                break
            except StoreError as exc:  # a busy member (503) on the loaded machine
                if attempt == COPY_ATTEMPTS:
                    raise
                print(f"copy: batch at {first} failed ({exc}), again", flush=True)
    return time.perf_counter() - start


def _put_all(target: Store, batch: list[tuple[str, str, dict[str, object]]]) -> None:
    with target.write() as txn:
        for kind, doc_id, doc in batch:
            txn.put(kind, doc_id, doc)


def run(sizes: list[int], repeat: int, stores: list[str], etcd: str | None) -> None:
    ensure_bytecode()  # the whole-process figures are those of an installed secfw
    tmp = tempfile.mkdtemp(prefix="secfw-bench-")
    url = f"sqlite:///{tmp}/bench.db"
    api = Api(open_store(url))
    try:
        cloud = BenchCloud(api, HOST)
        print(f"sqlite base cloud built in one batch        {timed(cloud.build_base):8.2f} s")
        for size in sizes:
            start = time.perf_counter()
            for step in range(cloud.ports + GROW_BATCH, size + GROW_BATCH, GROW_BATCH):
                cloud.grow_to(min(step, size))
            docs = sum(len(d) for d in api.store.load().docs.values())
            print(f"sqlite {size:>6} host ports: grown in {time.perf_counter() - start:7.2f} s "
                  f"({GROW_BATCH} boots a transaction), {docs} documents", flush=True)
            if "sqlite" in stores:
                bench_commands("sqlite", url, size, repeat, f"s{size}")
            if "etcd" in stores:
                with etcd_url(etcd, f"bench{size}") as target_url:
                    target = open_store(target_url)
                    try:
                        print(f"etcd   {size:>6} host ports: copied in "
                              f"{copy_store(api.store, target):7.2f} s", flush=True)
                    finally:
                        target.close()
                    bench_commands("etcd", target_url, size, repeat, f"e{size}")
    finally:
        api.store.close()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def etcd_url(given: str | None, prefix: str) -> Iterator[str]:
    """``given`` (its prefix + ``prefix``), else a fresh local member for the run."""
    if given:
        yield f"{given.rstrip('/')}-{prefix}"
        return
    base = Path(tempfile.mkdtemp(prefix="secfw-bench-etcd-"))
    member = etcdlocal.start(base)
    try:
        yield member.url(prefix)
    finally:
        member.stop()
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="host ports, comma-separated")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--etcd", help="etcd store URL (default: a local throw-away member)")
    parser.add_argument("--stores", default="sqlite,etcd")
    args = parser.parse_args(argv)
    run([int(size) for size in args.sizes.split(",")], args.repeat,
        args.stores.split(","), args.etcd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
