"""Run a ``secfw`` command as its own process under the profiler.

``python -m secfw.bench.profiled --out STEM -- ARGS…`` runs ``secfw ARGS…``
(:func:`secfw.cli.main.main`) in this process with cProfile on from the first import
of secfw (imports are part of what a whole-process figure measures), the
collector's and the libnftables calls' times (:mod:`.profiles`), and a sampler
thread that reads the resident size every :data:`SAMPLE_S` and books each
increase to the area of the main thread's innermost frame at that moment.

``--rss-only``: the RSS samples without cProfile. Writes ``STEM.pstats`` and
``STEM.json`` (wall and CPU seconds, the nft calls'
system time, gc seconds, peak RSS, the RSS growth per area and the area where
the peak was reached) — also when the command fails; exits with its status.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from secfw.bench import profiles

SAMPLE_S = 0.02


def rss_kb() -> int:
    """This process's resident size (VmRSS) in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    """Books every RSS increase to the area of ``frame_of()``'s innermost frame."""

    def __init__(self, main_id: int) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.main_id = main_id
        self.stop = threading.Event()
        self.growth_kb: dict[str, int] = {}
        self.peak_kb, self.peak_area = 0, ""

    def run(self) -> None:
        last = rss_kb()
        while not self.stop.wait(SAMPLE_S):
            now = rss_kb()
            area = self._area()
            if now > last:
                self.growth_kb[area] = self.growth_kb.get(area, 0) + now - last
            if now > self.peak_kb:
                self.peak_kb, self.peak_area = now, area
            last = now

    def _area(self) -> str:
        frame: FrameType | None = sys._current_frames().get(self.main_id)
        if frame is None:
            return "other"
        return profiles.area_of((frame.f_code.co_filename, 0, frame.f_code.co_name))

    def summary(self) -> dict[str, object]:
        total = sum(self.growth_kb.values()) or 1
        growth = sorted(((a, kb / total) for a, kb in self.growth_kb.items()),
                        key=lambda item: -item[1])
        return {"peak_rss_mb": round(self.peak_kb / 1024, 1), "peak_area": self.peak_area,
                "rss_growth": [[area, round(share, 4)] for area, share in growth]}


def run(stem: Path, argv: list[str], timings: bool = True) -> int:
    """``secfw argv`` profiled (module doc); its exit status. Without
    ``timings``, RSS samples only (no cProfile: no ``.pstats`` written)."""
    measured = profiles.Measured()
    sampler = RssSampler(threading.get_ident())
    sampler.start()
    profiler = cProfile.Profile() if timings else None
    status: int = 0
    cpu = time.process_time()
    with profiles.gc_timer(measured), profiles.nft_call_timer(measured):
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            from secfw.cli.main import main
            main.main(args=argv, prog_name="secfw", standalone_mode=True)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            if profiler is not None:
                profiler.disable()
            measured.wall_s = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    if profiler is not None:
        profiler.dump_stats(str(stem.with_suffix(".pstats")))
    doc = {"wall_s": measured.wall_s, "cpu_s": time.process_time() - cpu,
           "nft_sys_s": measured.nft_sys_s, "gc_s": measured.gc_s, "status": status,
           **sampler.summary()}
    stem.with_suffix(".json").write_text(json.dumps(doc), encoding="utf-8")
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="stem of the two files")
    parser.add_argument("--rss-only", action="store_true",
                        help="RSS samples only, without cProfile (its overhead)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- secfw's arguments")
    args = parser.parse_args()
    argv = args.args[1:] if args.args[:1] == ["--"] else args.args
    sys.exit(run(args.out, argv, timings=not args.rss_only))


if __name__ == "__main__":
    main()
