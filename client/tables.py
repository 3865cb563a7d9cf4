"""Tables that fit the terminal without cutting a number.

Numbers print with 3 significant digits (an exponent past 1e4 or below 1e-3, as Python's
``g`` format does), integers whole. Each column is at least as wide as its longest word (a
number is one word), so rich wraps cells between words and never inside one; when even those
widths do not fit, the columns of lowest priority are dropped, and the table says which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console, JustifyMethod
from rich.table import Table

BOX = box.SIMPLE_HEAD  # one space between columns, a rule under the header: narrow
PADDING = 1  # rich's default (0, 1) padding: one space each side of a cell


def number(value: Any) -> str:
    """3 significant digits with an exponent where needed (7.99e-16, 1.41e+15, 0.0123);
    integers whole; None is empty; the API's "NaN"/"Infinity" strings as nan/inf."""
    if value is None:
        return ""
    if isinstance(value, str):
        return {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}.get(value, value)
    if isinstance(value, int):  # bool too
        return str(value)
    value = float(value)
    if value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}" if math.isfinite(value) else str(value)


@dataclass(frozen=True)
class Column:
    """A table column: its header, whether it holds numbers (right-aligned) and its priority
    (the lowest is dropped first when the terminal is too narrow; 0 is never dropped)."""

    header: str
    numeric: bool = False
    priority: int = 0


def _longest_word(text: str) -> int:
    return max((len(word) for line in text.splitlines() for word in line.split()), default=0)


def _longest_line(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def column_widths(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int
) -> dict[int, int]:
    """{column index: width} of the columns that fit in ``width`` characters: every column at
    least its longest word, the rest of the room shared out up to each column's longest line;
    columns of lowest priority are left out until the minimum widths fit."""
    cells = [[c.header, *(row[i] for row in rows)] for i, c in enumerate(columns)]
    minimum = [max(_longest_word(text) for text in column) for column in cells]
    natural = [max(_longest_line(text) for text in column) for column in cells]
    kept = list(range(len(columns)))

    def room() -> int:
        return width - sum(minimum[i] for i in kept) - len(kept) * (2 * PADDING + 1)

    while room() < 0 and any(columns[i].priority for i in kept):
        drop = min((i for i in kept if columns[i].priority), key=lambda i: columns[i].priority)
        kept.remove(drop)
    widths = {i: minimum[i] for i in kept}
    spare = room()
    for i in sorted(kept, key=lambda i: natural[i] - minimum[i]):  # smallest needs first
        grow = min(natural[i] - widths[i], max(spare, 0) // max(1, len(kept)))
        widths[i] += grow
        spare -= grow
    for i in kept:  # what is left goes to the columns still short of their longest line
        grow = min(natural[i] - widths[i], max(spare, 0))
        widths[i] += grow
        spare -= grow
    return widths


def fitted_table(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    title: str | None = None,
) -> Table:
    """A rich Table of ``rows`` (cells already formatted) that fits ``console``'s width."""
    widths = column_widths(columns, rows, console.width)
    dropped = [c.header for i, c in enumerate(columns) if i not in widths]
    caption = f"left out to fit {console.width} columns: {', '.join(dropped)}" if dropped else None
    table = Table(title=title, caption=caption, box=BOX, show_edge=False)
    for i, width in widths.items():
        column = columns[i]
        justify: JustifyMethod = "right" if column.numeric else "left"
        table.add_column(column.header, width=width, justify=justify, overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in widths))
    return table
