"""Metadata requests per second, through the real redirect.

``python -m secfw.bench.metadata [--instances 8] [--requests 200] [--out DIR]``
builds a routed lab host with ``--instances`` instances (nftables), starts
``secfw metadata serve`` in its host namespace, lets one agent pass install the
redirect, then has every instance fetch ``/openstack/latest/meta_data.json``
``--requests`` times, all instances at once, each request on a new TCP
connection (as cloud-init asks). Every answer must be the asker's own document.
Writes ``metadata.json`` and ``metadata.md`` to ``--out`` (``bench/results/``).
A single run: it reports, it never asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from secfw.agent import Reconciler
from secfw.api import Api
from secfw.backends import get_backend
from secfw.bench.machine import REPO, machine_info
from secfw.config import Config
from secfw.lab import netns_tools
from secfw.lab.demo import lab_ports
from secfw.lab.hostlab import Lab
from secfw.store import open_store

LISTEN = ("192.0.2.254", 8775)
PATH = "/openstack/latest/meta_data.json"


def _cloud(api: Api, host: str, instances: int) -> dict[str, str]:
    """``instances`` instances on one network of ``host``: tap → instance uuid."""
    api.image_create("admin", "cirros", "qcow2", "public")
    api.net_create("bench", "bench-net", "10.77.0.0/22")
    booted = [api.boot("bench", f"vm{i}", "m1.tiny", "cirros", host, None, ["bench-net"],
                       user_data=b"#cloud-config\n") for i in range(instances)]
    state = api.snapshot()
    return {state.ports_of(i.id)[0].tap: i.id for i in booted}


def _fetch(ns: str, uuid_expected: str, requests: int) -> int:
    """Requests from ``ns``; how many were answered with its own document."""
    good = 0
    for _ in range(requests):
        answer = netns_tools.http_get(ns, "169.254.169.254", 80, PATH, 5.0)
        if answer is not None and answer[0] == 200 and json.loads(answer[1])["uuid"] == (
                uuid_expected):
            good += 1
    return good


def run(instances: int, requests: int, work: Path) -> dict[str, Any]:
    host = f"bench-md-{uuid.uuid4().hex[:6]}"
    url = f"sqlite:///{work}/secfw.db"
    api = Api(open_store(url))
    taps = _cloud(api, host, instances)
    lab = Lab(host, work / "lab")
    server: subprocess.Popen[bytes] | None = None
    try:
        ports = lab_ports(api.snapshot(), host)
        lab.up(ports)
        lab.wire_metadata(LISTEN[0], ports)
        server = subprocess.Popen(
            ["ip", "netns", "exec", lab.host_ns, str(Path(sys.executable).with_name("secfw")),
             "--store",
             url, "metadata", "serve", "--host", host, "--listen", f"{LISTEN[0]}:{LISTEN[1]}",
             "--threads", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):  # bounded: 10 s
            if netns_tools.tcp_connect(lab.host_ns, *LISTEN, 0.05):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the metadata server did not start")
        backend = get_backend("nftables", netns=lab.host_ns, topology="routed")
        Reconciler(open_store(url), host, Config(metadata_listen=LISTEN), backend).reconcile(
            full=True)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=instances) as pool:
            good = sum(pool.map(lambda tap: _fetch(lab.instance_ns(tap), taps[tap], requests),
                                taps))
        elapsed = time.perf_counter() - started
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        lab.down()
        api.store.close()
    total = instances * requests
    return {"instances": instances, "requests": total, "own_answers": good,
            "seconds": round(elapsed, 3), "requests_per_second": round(total / elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secfw.bench.metadata", description=__doc__)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per instance")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="secfw-bench-md-") as work:
        row = run(args.instances, args.requests, Path(work))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metadata.json").write_text(json.dumps(
        {"machine": machine_info(), "metadata": row}, indent=2, sort_keys=True) + "\n")
    (args.out / "metadata.md").write_text(
        "# Metadata requests\n\n| instances | requests | own answers | seconds | requests/s |\n"
        "|---|---|---|---|---|\n"
        f"| {row['instances']} | {row['requests']} | {row['own_answers']} | {row['seconds']} "
        f"| {row['requests_per_second']} |\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
