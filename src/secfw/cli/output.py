"""Rendering command results: ASCII tables like the operations guide's, or JSON.

Everything a command prints goes through :func:`emit`. Its input is plain data:
a *row* is a mapping of snake_case keys to JSON-ready values (str, int, None,
bool, lists and dicts of those); a command passes either one row or a sequence
of rows, plus the ``(header, key)`` columns a table shows.

Tables are the nova client's plain ASCII boxes (``+----+``), the same bytes on
a terminal and in a pipe: no colour, no terminal-width wrapping, so output is
deterministic and diffable. Cells are padded by display width (wide characters
count two) and control characters are escaped, so a row is always one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import click
from rich.cells import cell_len

#: The output formats every read command accepts (``-f/--format``).
FORMATS = ("table", "json")

Row = Mapping[str, Any]
#: ``(header, key)`` pairs: a table column titled ``header`` shows ``row[key]``.
Columns = Sequence[tuple[str, str]]

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def emit(
    data: Row | Sequence[Row], columns: Columns | None, fmt: str, file: TextIO | None = None
) -> None:
    """Print ``data`` to stdout (or ``file``) in format ``fmt`` (see :func:`render`)."""
    click.echo(render(data, columns, fmt), file=file, nl=False)


def render(data: Row | Sequence[Row], columns: Columns | None, fmt: str) -> str:
    """The text :func:`emit` prints, ending with a newline.

    ``json``: a sequence is a JSON array of the rows (every key, not only the
    columns); a single row is a JSON object.

    ``table``: a sequence is one table with ``columns`` (header only when empty).
    A single row with ``columns`` is a one-row table (what the guide's create
    commands print); with ``columns=None`` it is a ``Property | Value`` table of
    every key, in order (what ``show`` prints).
    """
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if fmt != "table":
        raise ValueError(f"unknown output format {fmt!r}; expected one of {FORMATS}")
    if isinstance(data, Mapping):
        if columns is None:
            return render_table([{"property": k, "value": v} for k, v in data.items()],
                                [("Property", "property"), ("Value", "value")])
        return render_table([data], columns)
    if columns is None:
        raise ValueError("a table of several rows needs columns")
    return render_table(data, columns)


def render_table(rows: Sequence[Row], columns: Columns) -> str:
    """An ASCII table: a header line, then one line per row, boxed like the guide."""
    headers = [cell_text(header) for header, _ in columns]
    body = [[cell_text(row.get(key)) for _, key in columns] for row in rows]
    widths = [max([cell_len(h)] + [cell_len(line[i]) for line in body])
              for i, h in enumerate(headers)]
    border = "+" + "+".join("-" * (width + 2) for width in widths) + "+"
    lines = [border, _table_line(headers, widths), border]
    lines += [_table_line(line, widths) for line in body]
    lines.append(border)
    return "\n".join(lines) + "\n"


def cell_text(value: Any) -> str:
    """How a value reads in a table cell.

    None is empty, a list is comma-separated, a dict reads ``key=value; …``
    (``private=10.0.0.3, 10.0.0.4; public=…``, as nova lists networks).
    Control characters are escaped (``\\x0a``) so that a cell stays on one line.
    """
    if value is None:
        text = ""
    elif isinstance(value, Mapping):
        text = "; ".join(f"{key}={cell_text(item)}" for key, item in value.items())
    elif isinstance(value, list | tuple):
        text = ", ".join(cell_text(item) for item in value)
    else:
        text = str(value)
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def python2_repr(value: Any) -> str:
    """``value`` (JSON-ready data) as the Python 2 clients of the guide printed it.

    nova, glance and cinder of that era put dicts and lists into their tables
    with ``str()``, which in Python 2 is the ``repr`` of unicode strings:
    ``{u'message': u'NoValidHost', u'code': 500}``, ``[{u'name': u'default'}]``.
    Python 3's ``ascii()`` of a string is Python 2's ``repr`` of a unicode string
    but for the ``u`` prefix (same quote choice; non-ASCII and control characters
    escaped as ``\\xNN``/``\\uNNNN``), so the result is always one printable line.
    Key order is the mapping's own.
    """
    if isinstance(value, str):
        return "u" + ascii(value)
    if isinstance(value, Mapping):
        items = (f"{python2_repr(k)}: {python2_repr(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(python2_repr(item) for item in value) + "]"
    return repr(value)  # None, bools and numbers read the same in Python 2


def python2_cell(value: Any) -> str:
    """A ``Property | Value`` cell as novaclient's ``print_dict`` printed it: ``str()``
    of the value in Python 2 (None is ``None``, a string itself, containers their
    :func:`python2_repr`)."""
    if isinstance(value, str):
        return value
    return python2_repr(value)


def _table_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = (cell + " " * (width - cell_len(cell))
              for cell, width in zip(cells, widths, strict=True))
    return "| " + " | ".join(padded) + " |"
