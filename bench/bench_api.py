"""Benchmark: build a 10,000-instance, 1,000-group cloud through the Python API.

Everything is created in ONE batch (one write transaction), the way an
operator would import a cloud: 1,000 groups with 4 rules each (two CIDR rules,
one ICMP rule, one source-group rule), a flat /16 network, and 10,000
instances on 100 hosts with 3 groups each. Then it times what follows a build:
reloading the store, the CLI's listings, and one more boot and delete in their
own transactions (each of which loads the whole cloud).

Usage: ``python bench/bench_api.py [--instances N] [--groups G] [--store URL]``
(default: a temporary SQLite file, removed afterwards). Prints one line per figure.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from secfw.api import Api
from secfw.store import open_store

PROJECT = "bench"
HOSTS = 100
RULES_PER_GROUP = 4
GROUPS_PER_INSTANCE = 3
T = TypeVar("T")


@contextmanager
def timed(label: str, count: int | None = None) -> Iterator[None]:
    """Print how long the block took (and the per-item cost when ``count`` is given)."""
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    per_item = f"  ({elapsed / count * 1e6:8.1f} µs each)" if count else ""
    print(f"{label:<44} {elapsed:8.3f} s{per_item}")


def measure(label: str, func: Callable[[], T]) -> T:
    """Run ``func`` once under :func:`timed` and return its result."""
    with timed(label):
        return func()


def build(api: Api, instances: int, groups: int, rng: random.Random) -> None:
    """Create the whole cloud in one batch (one transaction, one revision)."""
    names = [f"sg-{i:04d}" for i in range(groups)]
    with api.batch():
        api.quota_update(PROJECT, security_groups=-1, security_group_rules=-1,
                         instances=-1, cores=-1, ram=-1)
        api.net_create(PROJECT, "flat", "10.0.0.0/16")
        api.image_create(PROJECT, "cirros", visibility="public")
        with timed(f"  {groups} groups x {RULES_PER_GROUP} rules", groups):
            for i, name in enumerate(names):
                add_group(api, name, names[max(i - 1, 0)])  # an earlier group (or itself)
        with timed(f"  {instances} instances", instances):
            for i in range(instances):
                chosen = rng.sample(names, GROUPS_PER_INSTANCE)
                api.boot(PROJECT, f"vm-{i:05d}", "m1.tiny", "cirros", f"host-{i % HOSTS:03d}",
                         chosen)


def add_group(api: Api, name: str, source: str) -> None:
    """One group with two CIDR rules, an ICMP rule and a rule from ``source``."""
    api.secgroup_create(PROJECT, name, f"benchmark group {name}")
    api.secgroup_add_rule(PROJECT, name, "tcp", "22", "22", "10.0.0.0/8")
    api.secgroup_add_rule(PROJECT, name, "tcp", "8000", "8999", "0.0.0.0/0")
    api.secgroup_add_rule(PROJECT, name, "icmp", "-1", "-1", "0.0.0.0/0")
    api.secgroup_add_group_rule(PROJECT, name, source, "udp", "53", "53")


def after_build(api: Api) -> None:
    """Time the reads and single writes that run against the built cloud."""
    state = measure("reload the whole cloud (snapshot)", api.snapshot)
    print(f"{'  records':<44} {sum(len(r) for r in state.records.values()):8d}")
    measure("list all instances", lambda: api.list_instances(PROJECT))
    measure("port-list --host host-000", lambda: api.port_list(PROJECT, "host-000"))
    measure("secgroup-list", lambda: api.secgroup_list(PROJECT))
    measure("boot one more instance (own transaction)",
            lambda: api.boot(PROJECT, "extra", "m1.tiny", "cirros", "host-000", ["sg-0000"]))
    measure("delete it (own transaction)", lambda: api.delete(PROJECT, "extra"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=1_000)
    parser.add_argument("--store", help="store URL (default: a temporary SQLite file)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    tmp = None if args.store else tempfile.mkdtemp(prefix="secfw-bench-")
    url = args.store or f"sqlite:///{tmp}/bench.db"
    api = Api(open_store(url))
    try:
        print(f"secfw API benchmark: {args.instances} instances, {args.groups} groups, "
              f"{HOSTS} hosts, store {url}")
        with timed("build in one batch (incl. commit)", args.instances):
            build(api, args.instances, args.groups, random.Random(args.seed))
        print(f"{'  store revision after build':<44} {api.store.revision():8d}")
        after_build(api)
    finally:
        api.store.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
