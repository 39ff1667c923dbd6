"""Printing command results: rich tables in a terminal, plain text otherwise, JSON with ``--json``.

Handlers return plain data; a command's ``render(data)`` turns it into :class:`Table` objects and lines of text.
rich is optional (``pip install "bnkit[cli]"``): without it, or when the output is not a terminal, the same
tables are printed as aligned plain text, so scripts and pipes get stable output.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, is_dataclass
from typing import IO, Any

from bnkit.shared.table import format_cell, text_table

__all__ = ["Result", "Table", "emit", "error_line", "jsonable", "note_line", "print_blocks", "progress", "use_rich"]


@dataclass
class Table:
    """A titled table with optional notes printed under it.

    Example:
        >>> Table("t", ["a"], [[1]]).columns
        ['a']
    """

    title: str | None
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    """A handler's data together with the exit status the command should end with (default 0).

    Example:
        >>> Result({"ok": True}, exit_code=1).exit_code
        1
    """

    data: Any
    exit_code: int = 0


def jsonable(value: Any) -> Any:
    """Plain JSON data from results: dataclasses, objects with ``to_dict``/``to_dicts``, tuples, NaN as string.

    Example:
        >>> jsonable({"a": (1, float("nan"))})
        {'a': [1, 'nan']}
    """
    if hasattr(value, "to_dicts"):
        return jsonable(value.to_dicts())
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    if is_dataclass(value) and not isinstance(value, type):
        from dataclasses import asdict

        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def use_rich(stream: IO[str]) -> bool:
    """rich tables only for a terminal with rich installed (and ``NO_COLOR``/``BNKIT_PLAIN`` not set).

    Example:
        >>> import io
        >>> use_rich(io.StringIO())
        False
    """
    if os.environ.get("BNKIT_PLAIN"):
        return False
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _plain_table(table: Table) -> str:
    text = text_table(list(table.columns), [list(r) for r in table.rows], title=table.title)
    if table.notes:
        text += "\n" + "\n".join(table.notes)
    return text


def print_blocks(blocks: Iterable[Table | str], stream: IO[str] | None = None, *, rich: bool | None = None) -> None:
    """Print tables and text blocks, with rich when ``rich`` (default: :func:`use_rich` of the stream).

    Example:
        >>> print_blocks([Table(None, ["a", "b"], [[1, "x"]]), "done"])
        a  b
        -  -
        1  x
        <BLANKLINE>
        done
    """
    stream = stream if stream is not None else sys.stdout
    fancy = use_rich(stream) if rich is None else rich
    blocks = list(blocks)
    if fancy:
        from rich.console import Console
        from rich.table import Table as RichTable

        console = Console(file=stream, force_terminal=rich if rich is not None else None)
        for block in blocks:
            if isinstance(block, Table):
                rt = RichTable(title=block.title, show_lines=False)
                for column in block.columns:
                    rt.add_column(str(column), overflow="fold")
                for row in block.rows:
                    rt.add_row(*(format_cell(v) for v in row))
                console.print(rt)
                for note in block.notes:
                    console.print(note, markup=False, highlight=False)
            else:
                console.print(block, markup=False, highlight=False)
        return
    stream.write("\n\n".join(_plain_table(b) if isinstance(b, Table) else str(b) for b in blocks))
    if blocks:
        stream.write("\n")


def emit(data: Any, render: Any = None, *, as_json: bool = False, stream: IO[str] | None = None) -> None:
    """Print a handler's data: JSON, the command's rendering, or a generic rendering.

    Example:
        >>> emit({"a": 1}, as_json=True)
        {
          "a": 1
        }
    """
    stream = stream if stream is not None else sys.stdout
    if as_json:
        stream.write(json.dumps(jsonable(data), indent=2) + "\n")
        return
    if data is None:
        return
    if render is not None:
        print_blocks(render(data), stream)
        return
    if isinstance(data, str):
        stream.write(data + "\n")
        return
    plain = jsonable(data)
    if isinstance(plain, dict) and all(not isinstance(v, (dict, list)) for v in plain.values()):
        print_blocks([Table(None, ["key", "value"], [[k, v] for k, v in plain.items()])], stream)
        return
    stream.write(json.dumps(plain, indent=2) + "\n")


def error_line(prog: str, message: str, stream: IO[str] | None = None) -> None:
    """Print ``prog: error: message`` as exactly one line on stderr.

    Example:
        >>> import io; s = io.StringIO(); error_line("bnkit", "bad\\nthing", s); s.getvalue()
        'bnkit: error: bad thing\\n'
    """
    _one_line(prog, "error", message, stream)


def note_line(prog: str, message: str, stream: IO[str] | None = None) -> None:
    """Print ``prog: note: message`` as exactly one line on stderr (what the command did on the user's behalf;
    stdout keeps the result, so ``--json`` output stays parseable).

    Example:
        >>> import io; s = io.StringIO(); note_line("bnkit doctor", "put the model\\nin eval mode", s); s.getvalue()
        'bnkit doctor: note: put the model in eval mode\\n'
    """
    _one_line(prog, "note", message, stream)


def _one_line(prog: str, kind: str, message: str, stream: IO[str] | None) -> None:
    stream = stream if stream is not None else sys.stderr
    flat = " ".join(message.split())
    stream.write(f"{prog}: {kind}: {flat}\n")


def progress(items: Iterable[Any], total: int | None, description: str) -> Iterator[Any]:
    """Iterate ``items`` with a progress bar on stderr when it is a terminal and rich is installed.

    Example:
        >>> list(progress([1, 2], 2, "x"))
        [1, 2]
    """
    if not use_rich(sys.stderr):
        yield from items
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
