"""Small helpers shared by the benchmark modules: results rows, timing, medians."""

from __future__ import annotations

import compileall
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

#: One JSON-ready result record.
Row = dict[str, Any]
T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()``'s result and its wall time in seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def rounded(value: float | None, digits: int = 4) -> float | None:
    """``value`` rounded for the JSON file (None stays None)."""
    return None if value is None else round(value, digits)


def skipped(reason: str) -> Row:
    """The record of a step that did not run, and why."""
    return {"skipped": reason}


def failed(exc: BaseException) -> Row:
    """The record of a step that raised: its one-line reason."""
    text = str(exc).strip().splitlines()
    return {"error": f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")}


def guarded(fn: Callable[[], Row]) -> Row:
    """``fn()``, or the :func:`failed` record of the exception it raised.

    A benchmark step never ends the run: its error is part of the report.
    """
    try:
        return fn()
    except Exception as exc:
        return failed(exc)


def ok(row: Any) -> bool:
    """True when ``row`` is a result, not a skipped or failed step."""
    return isinstance(row, dict) and "skipped" not in row and "error" not in row


def rows_of(run: Any) -> list[Row]:
    """The ``rows`` of a data-path run, or none when it did not run (skipped,
    failed, or absent from older results)."""
    rows = run.get("rows") if ok(run) else None
    return rows if isinstance(rows, list) else []


def ensure_bytecode() -> None:
    """Compile secfw's modules to bytecode where it is missing or stale, before
    any ``secfw`` process is timed.

    A deployed secfw has its bytecode from install time; a checkout installed
    editable and run with ``PYTHONDONTWRITEBYTECODE=1`` (the CI and bench VMs)
    has none, and each process would then compile every secfw module it
    imports — +60 ms of CPU for ``import secfw.cli.main`` and +135 ms for the
    agent's modules on the 2-core VM (133 -> 192 and 205 -> 341 ms) — which is
    not what a whole-process figure means."""
    import secfw

    compileall.compile_dir(str(Path(secfw.__file__).parent), quiet=1)
