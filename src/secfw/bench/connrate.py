"""New connections: TCP connections per second and first-packet latency.

What users feel of a filter on *new* flows is the first packet's walk through
the ruleset (established packets take the conntrack shortcut). This module is
both the measuring tool and its driver:

* ``python -m secfw.bench.connrate serve PORT`` — accepts connections and closes
  each one at once (the server's FIN comes first, so no TIME_WAIT piles up on
  the client, whose ephemeral ports would otherwise run out within seconds);
* ``python -m secfw.bench.connrate client IP PORT SECONDS WORKERS`` — WORKERS
  processes, each connecting in a loop for SECONDS: ``connect()`` is timed (it
  returns when the SYN-ACK has arrived, so it is the SYN → SYN-ACK round trip
  as the client sees it, including the filter's work on the SYN), then the
  client waits for the server's FIN and closes with an RST (``SO_LINGER`` 0).
  It prints one JSON object: connections, seconds, p50/p99 connect time (µs).

The driver, :class:`ConnProbe`, runs both with ``ip netns exec`` in two lab
instances, like :class:`secfw.bench.datapath.Iperf`. Python's own cost per
connection is in every configuration alike, baseline included, so the ratios
compare filters; the absolute rates are this tool's, not the kernel's limit.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

#: The server's port; ``bench-dp`` (secfw.bench.workload) admits TCP to it.
CONN_PORT = 5301
#: ``struct linger`` with l_onoff=1, l_linger=0: close() sends an RST and frees
#: the socket at once (socket(7), SO_LINGER).
RESET_ON_CLOSE = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class ConnFigures:
    """One client run: connections per second and connect() time percentiles (µs)."""

    rate: float
    p50_us: float
    p99_us: float


# ------------------------------------------------------------------ the tool


def serve(port: int) -> None:
    """Accept on every address, ``port``, and close each connection at once; forever."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(4096)
    while True:
        conn, _ = listener.accept()
        conn.close()


def _client_worker(ip: str, port: int, seconds: float) -> list[float]:
    """Connect to ``ip:port`` in a loop for ``seconds``; every connect() time (s).
    A refused or timed-out connection ends the run with an error (the baseline
    admits every connection, so any failure is a broken measurement)."""
    timings: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(3.0)
        started = time.perf_counter()
        sock.connect((ip, port))
        timings.append(time.perf_counter() - started)
        sock.recv(1)  # the server's FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        sock.close()
    return timings


def client(ip: str, port: int, seconds: float, workers: int) -> dict[str, float]:
    """Run ``workers`` connecting processes; connections/s and p50/p99 connect() µs."""
    with multiprocessing.Pool(workers) as pool:
        runs = pool.starmap(_client_worker, [(ip, port, seconds)] * workers)
    timings = sorted(t for run in runs for t in run)
    if not timings:
        raise RuntimeError("no connection completed")
    return {
        "connections": len(timings),
        "seconds": seconds,
        "rate": len(timings) / seconds,
        "p50_us": _percentile(timings, 0.50) * 1e6,
        "p99_us": _percentile(timings, 0.99) * 1e6,
    }


def _percentile(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ascending ``ordered`` (non-empty)."""
    rank = max(1, round(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# ---------------------------------------------------------------- the driver


class ConnProbe:
    """The tool's server in ``server_ns`` and its clients in ``client_ns``."""

    def __init__(self, server_ns: str, client_ns: str, server_ip: str,
                 workers: int = 2) -> None:
        self.server_ns, self.client_ns, self.server_ip = server_ns, client_ns, server_ip
        self.workers = workers

    @contextmanager
    def serving(self) -> Iterator[ConnProbe]:
        """Run the server for the duration of the block."""
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.server_ns, sys.executable, "-m",
             "secfw.bench.connrate", "serve", str(CONN_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)  # let it bind before the first client connects
            yield self
        finally:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    def measure(self, seconds: float) -> ConnFigures:
        """One client run of ``seconds``. RuntimeError when the tool fails."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.client_ns, sys.executable, "-m",
             "secfw.bench.connrate", "client", self.server_ip, str(CONN_PORT),
             f"{seconds:g}", str(self.workers)],
            capture_output=True, text=True, timeout=seconds + 60, check=False)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
            raise RuntimeError(f"connection-rate client: {lines[-1]}")
        found = json.loads(done.stdout)
        return ConnFigures(float(found["rate"]), float(found["p50_us"]),
                           float(found["p99_us"]))


def main(argv: list[str]) -> int:
    """``serve PORT`` or ``client IP PORT SECONDS WORKERS`` (see the module doc)."""
    if argv[:1] == ["serve"] and len(argv) == 2:
        serve(int(argv[1]))
        return 0
    if argv[:1] == ["client"] and len(argv) == 5:
        figures = client(argv[1], int(argv[2]), float(argv[3]), int(argv[4]))
        print(json.dumps(figures))
        return 0
    print("usage: connrate serve PORT | client IP PORT SECONDS WORKERS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
