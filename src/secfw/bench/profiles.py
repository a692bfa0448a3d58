"""Profiles of missed targets, taken in the run itself (issue #15).

A missed control-plane target gets one extra repetition of what it measures,
under :mod:`cProfile` — never the measured repetition itself, so the figure is
not distorted by the profiler's overhead. :func:`summarise` turns the
``pstats`` of that repetition into shares of its time by *area*:

* ``libnftables (nft call)`` — own time of the python-nftables binding's
  ``cmd``/``json_cmd``: the ctypes call into libnftables is not a Python or
  builtin function, so cProfile books its whole time to the binding's frame;
  ``kernel (nft call)`` — the system CPU time measured around those calls
  (netlink commit, page faults of libnftables' heap), taken out of it;
* ``imports`` — module bodies and importlib's frames;
* ``secfw <module>`` (``render``, ``compiler.build``, ``agent.hostview`` …),
  a standard-library module, another installed package, or any other file's
  name;
* a builtin (``{method 'join' …}``) is booked to the areas of its callers, in
  proportion to the time it spent under each.

The shares add up to 1, of the target's measured (unprofiled) figure when it is
known (:func:`summarise` scales the Python areas down by the profiler's
overhead). The cyclic collector's time (``gc.callbacks``) is reported beside
them: it is already inside the areas (cProfile books a collection to the frame
that allocated). :func:`explanation` makes the report's cell: those shares (or,
for a data-path target, this run's baselines) and the static next step.
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import os
import pstats
import re
import sysconfig
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from secfw.bench import perfsample
from secfw.bench.common import Row

T = TypeVar("T")

NFT_CALL = "libnftables (nft call)"
KERNEL = "kernel (nft call)"
IMPORTS = "imports"
#: the Neutron comparison's target (its profile comes with neutron.json)
NEUTRON_TARGET = "secfw full sync"
BUILTINS = "builtins"
GENERATED = "generated methods (dataclasses, named tuples)"
TOP = 25
#: areas named in a report cell
CELL_AREAS = 5
_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"])
_SLUG = re.compile(r"[^a-z0-9]+")

#: pstats' key of a function: (file name, line, function name)
FuncKey = tuple[str, int, str]


def slug(text: str) -> str:
    """A file-name-safe short name of a target's text."""
    return _SLUG.sub("-", text.lower()).strip("-")[:60]


def area_of(key: FuncKey) -> str:
    """The area of one profiled function (module doc); ``builtins`` for a C
    function (file name ``~``), whose time goes to its callers."""
    filename, _line, name = key
    if filename == "~":
        return BUILTINS
    if filename.startswith("<frozen importlib") or name == "<module>":
        return IMPORTS
    if filename == "<string>":  # exec'd source: dataclasses' and named tuples' methods
        return GENERATED
    path = filename.replace("\\", "/")
    if "/secfw/" in path:
        module = path.rsplit("/secfw/", 1)[1].removesuffix(".py").replace("/", ".")
        module = module.removeprefix("backends.nftables.").removesuffix(".__init__")
        return f"secfw {module}"
    base = path.rsplit("/", 1)[-1]
    if base == "nftables.py":
        return NFT_CALL
    if "site-packages/" in path or "dist-packages/" in path:
        return path.split("-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    real = os.path.realpath(path)
    if real.startswith(_STDLIB):
        return real.removeprefix(_STDLIB).strip("/").split("/", 1)[0].removesuffix(".py")
    return base.removesuffix(".py")


def area_times(stats: pstats.Stats) -> dict[str, float]:
    """Seconds of own time per area (builtins booked to their callers)."""
    raw: dict[FuncKey, Any] = stats.stats  # type: ignore[attr-defined]
    times: dict[str, float] = {}
    for key, (_cc, _nc, own, _cum, callers) in raw.items():
        area = area_of(key)
        if area != BUILTINS:
            times[area] = times.get(area, 0.0) + own
            continue
        for area_share, seconds in _callers_shares(callers, own):
            times[area_share] = times.get(area_share, 0.0) + seconds
    return times


def _callers_shares(callers: dict[FuncKey, Any], own: float) -> list[tuple[str, float]]:
    """A builtin's ``own`` time split over its callers' areas by the time it
    spent under each (a caller that is itself a builtin keeps ``builtins``)."""
    edges = [(area_of(caller), edge[2]) for caller, edge in callers.items()]
    total = sum(seconds for _, seconds in edges)
    if total <= 0:
        return [(BUILTINS, own)]
    return [(area, own * seconds / total) for area, seconds in edges]


@dataclass
class Measured:
    """What one profiled repetition measured beside its pstats."""

    wall_s: float = 0.0
    #: system CPU seconds spent inside libnftables calls (the kernel's share)
    nft_sys_s: float = 0.0
    gc_s: float = 0.0
    extra: Row = field(default_factory=dict)


#: areas whose time the profiler does not inflate (C code, the kernel)
UNINFLATED = (NFT_CALL, KERNEL)


def summarise(stats: pstats.Stats, measured: Measured, measured_s: float | None = None
              ) -> Row:
    """Shares by area, largest first (module doc), of ``measured_s`` — the
    figure's own (unprofiled) time — when given, else of the profiled time.

    cProfile charges every Python call (~1 µs each) and nothing inside C code:
    a profiled repetition runs its Python areas slower, its libnftables call
    and kernel time not. So the nft call's and the kernel's seconds are kept as
    the profiled repetition measured them and the other areas are scaled
    together to fill the rest of ``measured_s`` (kept as they are when the C
    part alone exceeds it). Contract: the shares add up to 1; the kernel's
    share is carved out of the libnftables call's (never more than it)."""
    times = area_times(stats)
    if NFT_CALL in times:
        kernel = min(measured.nft_sys_s, times[NFT_CALL])
        times[NFT_CALL] -= kernel
        times[KERNEL] = kernel
    profiled = sum(times.values())
    fixed = sum(times.get(area, 0.0) for area in UNINFLATED)
    if measured_s and fixed < measured_s < profiled:
        scale = (measured_s - fixed) / (profiled - fixed)
        times = {a: s if a in UNINFLATED else s * scale for a, s in times.items()}
    total = sum(times.values())
    areas = sorted(((a, s / total) for a, s in times.items() if s > 0 and total > 0),
                   key=lambda item: -item[1])
    return {"profiled_s": round(profiled, 4), "wall_s": round(measured.wall_s, 4),
            "measured_s": None if measured_s is None else round(measured_s, 4),
            "gc_s": round(measured.gc_s, 4),
            "areas": [[area, round(share, 4)] for area, share in areas
                      if round(share, 4) > 0]} | measured.extra


def shares_text(summary: Row, limit: int = CELL_AREAS) -> str:
    """``41 % libnftables (nft call), 22 % secfw render, …`` (the largest areas)."""
    areas = summary.get("areas") or []
    parts = [f"{share * 100:.0f} % {area}" for area, share in areas[:limit]]
    if len(areas) > limit:
        parts.append("…")
    gc_s, profiled = summary.get("gc_s") or 0, summary.get("profiled_s") or 0
    if gc_s and profiled:
        parts.append(f"(gc {gc_s / profiled * 100:.0f} % within them)")
    return ", ".join(parts)


def pstats_text(stats: pstats.Stats, top: int = TOP) -> str:
    """pstats' tables of the ``top`` functions by own time and by cumulative time."""
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def _rss_lines(summary: Row) -> list[str]:
    """The RSS samples' lines (a process profile), or none."""
    if "rss_growth" not in summary:
        return []
    return [f"peak RSS {summary['peak_rss_mb']} MB, reached in {summary['peak_area']}; "
            "RSS growth by area (sampled every 20 ms):",
            *(f"{share:7.1%}  {area}" for area, share in summary["rss_growth"]), ""]


def write(directory: Path, name: str, title: str, stats: pstats.Stats, summary: Row) -> str:
    """Write ``directory/<name>.txt`` (areas, then :func:`pstats_text`); its
    file name relative to the results directory."""
    directory.mkdir(parents=True, exist_ok=True)
    basis = (f"shares of the measured {summary['measured_s']:.3f} s (Python areas scaled "
             "down by the profiler's overhead)" if summary.get("measured_s") else
             "shares of the profiled time")
    lines = [f"# {title}", "",
             f"profiled {summary['profiled_s']:.3f} s (the repetition's wall time "
             f"{summary['wall_s']:.3f} s); {basis}; gc {summary['gc_s']:.3f} s within "
             "the areas", "",
             *(f"{share:7.1%}  {area}" for area, share in summary["areas"]), "",
             *_rss_lines(summary)]
    path = directory / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n" + pstats_text(stats), encoding="utf-8")
    return f"{directory.name}/{path.name}"


def record(taken: Taken, target: str, ports: int, out: Path,
           measured_s: float | None = None) -> Row:
    """Summarise ``taken`` (as shares of ``measured_s``: :func:`summarise`),
    write its file under ``out/profiles``; the report's row."""
    summary = summarise(taken.stats, taken.measured, measured_s)
    name = slug(target)
    file = write(out / "profiles", name, f"{target} — profiled at {ports:,} ports",
                 taken.stats, summary)
    return {"target": target, "ports": ports, "file": file} | summary


# ---------------------------------------------------------------------- taking one


@contextmanager
def gc_timer(measured: Measured) -> Iterator[None]:
    """Adds the cyclic collector's time while inside to ``measured.gc_s``."""
    started: list[float] = []

    def callback(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            measured.gc_s += time.perf_counter() - started.pop()

    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)


@contextmanager
def nft_call_timer(measured: Measured) -> Iterator[None]:
    """Adds the system CPU time spent inside libnftables calls to
    ``measured.nft_sys_s`` (the binding's ``cmd`` and ``json_cmd`` wrapped for
    the duration; process-wide CPU times: the profiled work runs on one thread)."""
    try:
        import nftables
    except ImportError:  # no binding: no nft call to time
        yield
        return
    cls = nftables.Nftables
    originals = {name: getattr(cls, name) for name in ("cmd", "json_cmd")}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            before = os.times().system
            try:
                return fn(*args, **kwargs)
            finally:
                measured.nft_sys_s += os.times().system - before
        timed_call.__name__ = fn.__name__
        return timed_call

    for name, fn in originals.items():
        setattr(cls, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(cls, name, fn)


@dataclass
class Taken:
    """One profile: its pstats and what was measured beside them."""

    stats: pstats.Stats
    measured: Measured


class Session:
    """A profiler enabled only inside :meth:`call` (several calls add up)."""

    def __init__(self) -> None:
        self.measured = Measured()
        self.profiler = cProfile.Profile()

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` under cProfile, with the collector's and the nft calls' times."""
        with gc_timer(self.measured), nft_call_timer(self.measured):
            started = time.perf_counter()
            self.profiler.enable()
            try:
                return fn()
            finally:
                self.profiler.disable()
                self.measured.wall_s += time.perf_counter() - started

    def taken(self) -> Taken:
        return Taken(pstats.Stats(self.profiler), self.measured)


def profile_call(fn: Callable[[], T]) -> tuple[T, Taken]:
    """``fn()`` under the profiler, and its profile."""
    session = Session()
    result = session.call(fn)
    return result, session.taken()


def load_process(stem: Path) -> Taken:
    """The profile :mod:`secfw.bench.profiled` wrote to ``stem``.pstats/.json."""
    doc = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    measured = Measured(wall_s=float(doc["wall_s"]), nft_sys_s=float(doc["nft_sys_s"]),
                        gc_s=float(doc["gc_s"]),
                        extra={k: doc[k] for k in ("peak_rss_mb", "peak_area", "rss_growth")
                               if k in doc})
    pstats_file = stem.with_suffix(".pstats")
    stats = pstats.Stats(str(pstats_file)) if pstats_file.exists() else pstats.Stats()
    return Taken(stats, measured)


# ---------------------------------------------------------------------- the report


def profile_for(results: Row, target: str) -> Row | None:
    """The profile row of ``target`` (keyed by the start of its text), or None."""
    found = dict(results.get("profiles") or {})
    neutron = results.get("neutron")
    if isinstance(neutron, dict) and isinstance(neutron.get("profile"), dict):
        found.setdefault(NEUTRON_TARGET, neutron["profile"])  # its own section's profile
    return next((row for start, row in found.items() if target.startswith(start)), None)


def measured_text(row: Row, where_from: str = "") -> str:
    """What a profile row found, for the report's cell (its file named relative
    to the results directory, or prefixed with ``where_from``)."""
    if "skipped" in row or "error" in row:
        return f"no profile ({row.get('skipped') or row.get('error')})"
    where = f" (profiled at {row['ports']:,} ports: {where_from}{row['file']})"
    if "rss_growth" in row and "RSS" in row["target"]:
        growth = ", ".join(f"{share * 100:.0f} % {area}" for area, share in
                           row["rss_growth"][:CELL_AREAS])
        time_shares = f"; time {shares_text(row, 3)}" if row.get("areas") else ""
        return (f"RSS growth {growth}; peak {row['peak_rss_mb']:,.0f} MB reached in "
                f"{row['peak_area']}{time_shares}{where}")
    return shares_text(row) + where


#: data-path targets → (results key of the data path, the kinds whose ratios are split)
DATAPATH = {"data path routed, UDP": ("datapath", ("udp",)),
            "data path routed, TCP": ("datapath", ("tcp",)),
            "data path bridged": ("datapath_bridged", ("udp", "tcp")),
            "new TCP connections": ("datapath", ("conn",))}
TARGET_N = 10_000
PERF_NOTE = ("Data-path targets: the points lost against no filter at 10,000 ports, split by "
             "this run's conntrack-only baseline, and perf's kernel symbols over one more UDP "
             "run of the largest N (`perf record -a`, the samples of iperf3 and of softirqs; "
             "per packet: `python -m secfw.bench.hookcost`).")


def datapath_text(results: Row, target: str) -> str | None:
    """For a data-path target: the points lost against no filter at 10,000 ports,
    split into conntrack alone (this run's conntrack-only baseline) and secfw's
    rules; None when that data path did not run."""
    if target.startswith("first-packet"):
        return _first_packet(results)
    spec = next((v for k, v in DATAPATH.items() if target.startswith(k)), None)
    if spec is None:
        return None
    key, kinds = spec
    parts = [_split(results, key, kind) for kind in kinds]
    if target.startswith("new TCP") and isinstance(results.get("datapath_bridged"), dict):
        parts.append(_split(results, "datapath_bridged", "conn"))
    found = [part for part in parts if part]
    keys = [key, "datapath_bridged"] if target.startswith("new TCP") else [key]
    found += [text for text in (_perf(results, k) for k in keys) if text]
    return "; ".join(found) if found else None


def _first_packet(results: Row) -> str | None:
    """``routed connect() p50 / p99: no filter 47 / 200 µs, …; 100 → 50,000 ports:
    p50 +1 µs, p99 +29 µs``: the large new-connections run's rows side by side
    (the baselines say what conntrack alone adds to the tail); None without it."""
    large = (results.get("connections") or {}).get("topologies", {}).get("routed")
    rows = [r for r in (large or {}).get("rows", [])
            if isinstance(r.get("conn_p50_us"), int | float)
            and isinstance(r.get("conn_p99_us"), int | float)]
    ours = [r for r in rows if r.get("ports")]
    if len(ours) < 2:
        return None
    cells = [f"{r['filter'] if not r.get('ports') else format(r['ports'], ',') + ' ports'} "
             f"{r['conn_p50_us']:.0f} / {r['conn_p99_us']:.0f} µs" for r in rows]
    low, high = ours[0], ours[-1]
    return (f"routed connect() p50 / p99: {', '.join(cells)}; {low['ports']:,} → "
            f"{high['ports']:,} ports: p50 {high['conn_p50_us'] - low['conn_p50_us']:+.0f} µs, "
            f"p99 {high['conn_p99_us'] - low['conn_p99_us']:+.0f} µs")


def _perf(results: Row, key: str) -> str | None:
    """``bridged perf (UDP 64 B at 10,000): nf_tables 12 %, …``, or None."""
    datapath: Row = results.get(key) or {}
    perf = datapath.get("perf")
    if not isinstance(perf, dict) or "shares" not in perf:
        return None
    return (f"{datapath.get('topology', key)} perf ({perf['run']} at {perf['ports']:,}): "
            f"{perfsample.shares_text(perf)} of the data path's busy samples")


def _split(results: Row, key: str, kind: str) -> str | None:
    """``bridged UDP -37 points vs unfiltered: conntrack alone -24, secfw's rules -12``."""
    datapath = results.get(key) or {}
    rows = datapath.get("rows") if isinstance(datapath, dict) else None
    if not isinstance(rows, list):
        return None
    ratio = "conn_ratio" if kind == "conn" else f"{kind}_ratio"
    baseline = next((r for r in rows if r.get("filter") == "conntrack only"), None)
    secfw = next((r for r in rows if r.get("ports") == TARGET_N), None)
    if not baseline or not secfw or not all(
            isinstance(r.get(ratio), int | float) for r in (baseline, secfw)):
        return None
    lost, ct = 1 - secfw[ratio], 1 - baseline[ratio]
    label = {"conn": "new conn/s"}.get(kind, kind.upper())
    return (f"{datapath.get('topology', key)} {label} {-lost * 100:+.0f} points vs unfiltered: "
            f"conntrack alone {-ct * 100:+.0f}, secfw's rules {(ct - lost) * 100:+.0f}")


def explanation(results: Row, target: Row, next_step: str, where_from: str = "") -> str:
    """The report's cell for a missed target: what this run measured (its
    profile, or the data path's baselines), then ``next_step``; "" when met.
    ``where_from``: the results directory as the reader sees it."""
    if target["met"] is not False:
        return ""
    row = profile_for(results, target["target"])
    measured = (measured_text(row, where_from) if row else
                datapath_text(results, target["target"]))
    if measured is None:
        return f"no profile in this run; last profile: {next_step}"
    return f"measured: {measured}; next: {next_step}"


def total_seconds(results: Row) -> float:
    """The run's time spent taking profiles (outside every figure)."""
    rows = list((results.get("profiles") or {}).values())
    neutron = results.get("neutron")
    if isinstance(neutron, dict) and isinstance(neutron.get("profile"), dict):
        rows.append(neutron["profile"])
    return sum(float(row.get("profile_s") or 0) for row in rows)
