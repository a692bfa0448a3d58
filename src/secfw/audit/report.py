"""``secfw audit report``: one page for an auditor — who reaches whom, what is
exposed, what the rules get wrong — as self-contained HTML or as Markdown.

* the **reachability matrix**, one per service class (:data:`SERVICES`): row =
  source instance, column = destination instance, a cell says whether the first
  packet of such a connection from the row's address to the column's is allowed
  — read from the destination's exact ingress space (:func:`secfw.audit.reach.reach`,
  the senders' egress included), so both ends' filters count;
* the **exposure** table (:func:`secfw.audit.exposure.exposure`);
* the **lint** findings (:func:`secfw.audit.lint.lint`).

The HTML page has its style inline and no script, image, font or link: it
renders the same with no network. Every name in it is user data and is escaped
(``html.escape``; ``|`` and backslashes in Markdown). Pure: the CLI writes files.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from secfw.audit.exposure import exposure
from secfw.audit.lint import lint
from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import reach
from secfw.audit.space import ICMP_OF, Box, contains
from secfw.model import SecurityGroup

#: Service classes of the matrix: (label, protocol, port or ICMP selector).
SERVICES: tuple[tuple[str, int, int], ...] = (
    ("ssh tcp/22", 6, 22), ("http tcp/80", 6, 80), ("https tcp/443", 6, 443),
    ("mysql tcp/3306", 6, 3306), ("postgresql tcp/5432", 6, 5432),
    ("rdp tcp/3389", 6, 3389), ("dns udp/53", 17, 53),
    ("ping icmp echo", ICMP_OF["ipv4"], 8 * 256),
)
#: Instances shown in the matrices at most (the page stays readable).
MATRIX_LIMIT = 60


@dataclass(frozen=True)
class Report:
    """What the page shows, as plain data."""

    title: str
    names: list[str]  # matrix rows/columns: instance (port address)
    matrices: dict[str, list[list[bool | None]]]  # service -> [row][col]; None: no address
    exposure: list[dict[str, Any]]
    lint: list[dict[str, Any]]
    truncated: int  # instances left out of the matrices


def build_report(cp: CloudPolicy, views: Sequence[PortView],
                 groups: Sequence[SecurityGroup], title: str) -> Report:
    """The report of ``views`` (their instances' ports) and ``groups``."""
    shown = list(views)[:MATRIX_LIMIT]
    names = [f"{v.instance.name} ({v.port.ip or v.port.ip6})" for v in shown]
    answers = [reach(cp, v, "ingress", "ipv4") for v in shown]
    matrices: dict[str, list[list[bool | None]]] = {}
    for label, protocol, selector in SERVICES:
        point = Box(protocol, protocol, selector, selector)
        rows: list[list[bool | None]] = []
        for source in shown:
            row: list[bool | None] = []
            for target, answer in zip(shown, answers, strict=True):
                if source.port.ip is None or answer is None or source is target:
                    row.append(None)
                else:
                    row.append(contains(answer.regions, source.port.ip, point))
            rows.append(row)
        matrices[label] = rows
    return Report(title, names, matrices, exposure(cp, views), lint(cp, groups),
                  max(0, len(views) - len(shown)))


# ---------------------------------------------------------------------- HTML

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: left; }
th { background: #eee; }
td.allow { background: #f7c9c9; text-align: center; }
td.deny { background: #d8efd8; text-align: center; }
td.self { background: #f4f4f4; text-align: center; color: #999; }
"""


def render_html(report: Report) -> str:
    """One self-contained HTML document (module docstring)."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(report.title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{e(report.title)}</h1>", "<h2>Reachability</h2>",
             "<p>A cell: may the row's instance open this kind of connection to the "
             "column's (both filters applied)? <b>allow</b> / deny.</p>"]
    if report.truncated:
        parts.append(f"<p>{report.truncated} instance(s) beyond the first "
                     f"{MATRIX_LIMIT} are left out of the matrices.</p>")
    for label, rows in report.matrices.items():
        parts.append(f'<h3>{e(label)}</h3><table class="matrix" data-service="{e(label)}">')
        parts.append("<tr><th>from \\ to</th>" + "".join(
            f"<th>{e(n)}</th>" for n in report.names) + "</tr>")
        for name, row in zip(report.names, rows, strict=True):
            cells = "".join(_cell(name, report.names[i], v) for i, v in enumerate(row))
            parts.append(f"<tr><th>{e(name)}</th>{cells}</tr>")
        parts.append("</table>")
    parts.append("<h2>Exposure</h2>")
    parts.append(_table(["Instance", "Kind", "Protocol", "Ports/ICMP", "Sources",
                         "Admin ports", "Detail"],
                        [_exposure_cells(r) for r in report.exposure], "exposure"))
    parts.append("<h2>Lint</h2>")
    parts.append(_table(["Kind", "Group", "Rule", "Detail"],
                        [[f["kind"], f["group"], f.get("rule") or "", f["detail"]]
                         for f in report.lint], "lint"))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _cell(source: str, target: str, value: bool | None) -> str:
    e = html.escape
    where = f'data-from="{e(source)}" data-to="{e(target)}"'
    if value is None:
        return f'<td class="self" {where}>-</td>'
    kind = "allow" if value else "deny"
    return f'<td class="{kind}" {where}>{kind}</td>'


def _table(header: list[str], rows: list[list[Any]], name: str) -> str:
    e = html.escape
    if not rows:
        return f'<p class="{name}">None.</p>'
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="{name}"><tr>{head}</tr>{body}</table>'


def _exposure_cells(row: dict[str, Any]) -> list[Any]:
    last = row.get("icmp_type_last")
    types = f"{row.get('icmp_type')}" if last in (None, row.get("icmp_type")) else \
        f"{row.get('icmp_type')}-{last}"
    service = row.get("ports") or (f"type {types}" if row.get("icmp_type") is not None else "")
    return [row["instance"], row["kind"], row["protocol"], service or "",
            ", ".join(row["sources"]), ", ".join(str(p) for p in row["admin_ports"][:8]),
            row["detail"]]


# ---------------------------------------------------------------------- Markdown


def render_markdown(report: Report) -> str:
    """The same report as GitHub-flavoured Markdown tables."""
    lines = [f"# {_md(report.title)}", "", "## Reachability", "",
             "A cell: may the row's instance open this kind of connection to the column's "
             "(both filters applied)? **allow** / deny.", ""]
    if report.truncated:
        lines += [f"{report.truncated} instance(s) beyond the first {MATRIX_LIMIT} are "
                  "left out of the matrices.", ""]
    for label, rows in report.matrices.items():
        lines += [f"### {_md(label)}", ""]
        matrix = [[name, *("-" if v is None else "**allow**" if v else "deny" for v in row)]
                  for name, row in zip(report.names, rows, strict=True)]
        lines += _md_table(["from \\ to", *report.names], matrix)
    lines += ["## Exposure", ""]
    lines += _md_table(["Instance", "Kind", "Protocol", "Ports/ICMP", "Sources",
                        "Admin ports", "Detail"],
                       [_exposure_cells(r) for r in report.exposure])
    lines += ["## Lint", ""]
    lines += _md_table(["Kind", "Group", "Rule", "Detail"],
                       [[f["kind"], f["group"], f.get("rule") or "", f["detail"]]
                        for f in report.lint])
    return "\n".join(lines)


def _md(text: Any) -> str:
    """A cell's text: backslashes, pipes and HTML's ``<``/``&`` escaped, one line."""
    escaped = str(text).replace("\\", "\\\\").replace("|", "\\|")
    return html.escape(escaped, quote=False).replace("\n", " ")


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    if not rows:
        return ["None.", ""]
    out = ["| " + " | ".join(_md(h) for h in header) + " |",
           "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return [*out, ""]
