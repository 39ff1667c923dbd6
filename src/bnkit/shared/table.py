"""Plain-text tables for the ``__str__`` of inspection results (the CLI draws rich tables from the same data)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = ["RowList", "format_cell", "text_table"]


class RowList(list):
    """A list of result rows (dataclasses with ``to_dict``) that prints as a table and converts to dicts or JSON.

    Subclasses set :attr:`columns` and :attr:`empty` and implement :meth:`rows`.

    Example:
        >>> from dataclasses import asdict, dataclass
        >>> @dataclass
        ... class Item:
        ...     name: str
        ...     def to_dict(self):
        ...         return asdict(self)
        >>> class Items(RowList):
        ...     columns = ("name",)
        ...     def rows(self):
        ...         return [[item.name] for item in self]
        >>> items = Items([Item("a")])
        >>> items.to_json(indent=None), str(Items())
        ('[{"name": "a"}]', 'nothing found')
    """

    #: Column titles of the table, matching :meth:`rows`.
    columns: ClassVar[tuple[str, ...]] = ()
    #: What ``str()`` of an empty list says.
    empty: ClassVar[str] = "nothing found"

    def rows(self) -> list[list[Any]]:
        """Table rows matching :attr:`columns`.

        Example:
            >>> RowList().rows()
            []
        """
        return [[item] for item in self]

    def to_dicts(self) -> list[dict[str, Any]]:
        """One dict per row (JSON-ready).

        Example:
            >>> RowList().to_dicts()
            []
        """
        return [item.to_dict() for item in self]

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dicts`.

        Example:
            >>> RowList().to_json()
            '[]'
        """
        return json.dumps(self.to_dicts(), indent=indent)

    def __str__(self) -> str:
        if not self:
            return self.empty
        return text_table(self.columns, self.rows())


def text_table(
    columns: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None, wrap: int = 64
) -> str:
    """Left-aligned text columns separated by two spaces, numbers right-aligned, a rule under the header.

    A cell containing newlines spreads over several lines; text lines longer than ``wrap`` characters are
    wrapped at word boundaries.

    Example:
        >>> print(text_table(["a", "n"], [["x", 1], ["yy", 22]]))
        a    n
        --  --
        x    1
        yy  22
    """
    cells = [[_wrap(format_cell(value), wrap) for value in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], *(len(part) for part in text.split("\n")))
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        parts = [value.rjust(widths[i]) if numeric[i] else value.ljust(widths[i]) for i, value in enumerate(values)]
        return "  ".join(parts).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(list(columns)))
    out.append("  ".join("-" * w for w in widths))
    for row in cells:
        # a cell with several lines (one reason per line) makes the row several lines tall
        parts = [text.split("\n") for text in row]
        for k in range(max(len(p) for p in parts)):
            out.append(line([p[k] if k < len(p) else "" for p in parts]))
    return "\n".join(out)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_cell(value: object) -> str:
    """How a table shows a value: ``-`` for None, yes/no, integers with thousands separators, 4 significant digits.

    Example:
        >>> [format_cell(v) for v in (None, True, 1234567, 0.000123456, "x")]
        ['-', 'yes', '1,234,567', '0.0001235', 'x']
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _wrap(text: str, width: int) -> str:
    if width <= 0 or all(len(line) <= width for line in text.split("\n")):
        return text
    return "\n".join("\n".join(textwrap.wrap(line, width, break_on_hyphens=False)) or line for line in text.split("\n"))
