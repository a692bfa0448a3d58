"""``python -m secfw.bench``: run the benchmark suite and write its reports.

Always exits 0 once the reports are written: benchmarks report, they do not
fail (a target missed or a step skipped is in the report). Exit 2 is a usage
error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from secfw.bench import targets
from secfw.bench.machine import REPO
from secfw.bench.runner import DATAPATH_MAX, Options, run

DEFAULT_SIZES = (100, 1_000, 10_000, 50_000)
QUICK_SIZES = (50, 200)
DEFAULT_OUT = REPO / "bench" / "results"
#: 30 minutes: the control plane (~6 min at 100-50k ports), the routed data path
#: (~9 min: 8 configurations x 5 repetitions of UDP, TCP and new connections, with
#: iptables' 10 s loads at 10k), the bridged one (3 repetitions, ~6 min) and new
#: connections at 50k (~4 min), on the 2-core VM; steps that would overrun are skipped.
DEFAULT_BUDGET_S = 1800.0


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(part.replace("_", "")) for part in text.split(",") if part}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes must be positive integers")
    return sizes


def parse_args(argv: list[str] | None) -> Options:
    """Command-line options → :class:`Options` (``--quick`` shrinks everything)."""
    parser = argparse.ArgumentParser(prog="python -m secfw.bench", description=__doc__)
    parser.add_argument("--sizes", type=_sizes, help="ports per size, e.g. 100,1000 "
                        f"(default {','.join(map(str, DEFAULT_SIZES))})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in seconds: sizes 50,200, 1 s iperf, 1 repetition")
    parser.add_argument("--skip-datapath", action="store_true", help="no iperf3 measurements")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds; steps that would overrun it are skipped (default 1800)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--datapath-max", type=int, default=DATAPATH_MAX,
                        help="largest size of the full data path; a larger last size gets "
                             f"new connections only (default {DATAPATH_MAX})")
    parser.add_argument("--profile", choices=("missed", "all", "none"), default="missed",
                        help="profile the targets the run misses (default), every target "
                             "(at a size the run has), or none; bench/results/profiles/")
    args = parser.parse_args(argv)
    quick = args.quick
    return Options(
        sizes=args.sizes or (QUICK_SIZES if quick else DEFAULT_SIZES),
        out=args.out,
        quick=quick,
        datapath=not args.skip_datapath,
        budget_s=args.budget or (240.0 if quick else DEFAULT_BUDGET_S),
        seed=args.seed,
        reps=1 if quick else 5,
        iperf_seconds=1.0 if quick else 3.0,
        compile_repeat=1 if quick else 3,
        membership_reps=2 if quick else 5,
        bridged_reps=1 if quick else 3,
        conn_reps=1 if quick else 3,
        datapath_max=args.datapath_max,
        profile=args.profile,
    )


_MAIN_PID = os.getpid()


def _stop(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM ends the run like Ctrl-C: the cleanup in ``finally`` blocks runs.

    Only in this process: pyroute2 forks helpers (to open sockets in a namespace)
    and stops them with SIGTERM; a helper must just exit, never unwind a copy of
    the benchmark's stack (that would run its cleanup twice).
    """
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    print(f"secfw bench: sizes {', '.join(f'{n:,}' for n in options.sizes)}, "
          f"budget {options.budget_s:.0f} s, out {options.out}", flush=True)
    results = run(options)
    for target in results["targets"]:
        print(f"  {targets.verdict(target['met']):>12}  {target['target']}: {target['figure']}")
    print(f"wrote {options.out}/latest.json, latest.md, latest.png "
          f"in {results['elapsed_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
