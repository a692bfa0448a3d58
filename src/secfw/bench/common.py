"""Small helpers shared by the benchmark modules: results rows, timing, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
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
