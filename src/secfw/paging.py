"""Pages of a listing: ``--limit N`` and ``--marker ID``, nova's and neutron's convention.

A listing's rows come from an ordered index of the store
(:data:`secfw.store.indexes.ORDER_INDEXES`), whose items sort exactly as the
unpaged listing sorts its rows, so the pages of a listing, one after the
other, are the unpaged listing. A page reads the index from the marker's entry
on, ``limit + 1`` entries at a time (the one more says whether a next page
exists), and the records of those entries only: its cost is the page, not the
kind. A listing that filters (a host's ports, the networks a project may use)
reads on, chunk by chunk, until the page is full.

The marker is the id of the last row of the previous page; a marker that is
not a row of this listing (unknown, deleted since, or filtered out) is
refused: the page after it cannot be told.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from secfw.cloud import CloudState, order_item
from secfw.errors import ValidationError
from secfw.store.indexes import INDEX_KINDS

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page: its rows, and the marker of the next page (None: the last page)."""

    rows: list[T]
    next_marker: str | None


def check_limit(limit: int) -> int:
    """``limit`` when it is a positive number of rows, else ValidationError."""
    if limit < 1:
        raise ValidationError(f"--limit {limit}: expected a positive number of rows")
    return limit


def read_page(state: CloudState, index: str, bucket: str, limit: int, marker: str | None,
              keep: Callable[[Any], bool] = lambda _: True,
              prepare: Callable[[list[Any]], None] = lambda _: None) -> Page[Any]:
    """The records of the page of ``bucket`` of ``index`` after ``marker``
    that ``keep`` accepts (``prepare`` sees each chunk first: what ``keep``
    will read, read together). ``state`` is a lazy state (Api.keyed_read)."""
    check_limit(limit)
    after = None
    if marker is not None:
        record = state.records[INDEX_KINDS[index]].get(marker)
        item = order_item(index, bucket, record) if record is not None else None
        if record is None or item is None or not _kept(record, keep, prepare):
            raise ValidationError(f"--marker {marker}: not a row of this listing")
        after = (item, marker)
    rows: list[Any] = []
    for chunk in state.ordered(index, bucket, after, limit + 1):
        prepare(chunk)
        rows.extend(record for record in chunk if keep(record))
        if len(rows) > limit:
            break
    if len(rows) > limit:
        return Page(rows[:limit], rows[limit - 1].id)
    return Page(rows, None)


def slice_page(rows: list[T], limit: int, marker: str | None,
               key: Callable[[T], str]) -> Page[T]:
    """The page after ``marker`` of rows already read and sorted (a listing
    bounded by a quota, such as one group's rules)."""
    check_limit(limit)
    start = 0
    if marker is not None:
        ids = [key(row) for row in rows]
        if marker not in ids:
            raise ValidationError(f"--marker {marker}: not a row of this listing")
        start = ids.index(marker) + 1
    page = rows[start:start + limit]
    more = start + limit < len(rows)
    return Page(page, key(page[-1]) if more and page else None)


def _kept(record: Any, keep: Callable[[Any], bool],
          prepare: Callable[[list[Any]], None]) -> bool:
    prepare([record])
    return keep(record)
