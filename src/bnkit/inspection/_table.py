"""Plain-text tables for the ``__str__`` of inspection results (the CLI draws rich tables from the same data)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence


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
    cells = [[_wrap(_cell(value), wrap) for value in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], *(len(part) for part in text.split("\n")))
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(widths[i]) if numeric[i] else value.ljust(widths[i]) for i, value in enumerate(values)
        ]
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


def _cell(value: object) -> str:
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
    return "\n".join(
        "\n".join(textwrap.wrap(line, width, break_on_hyphens=False)) or line for line in text.split("\n")
    )
