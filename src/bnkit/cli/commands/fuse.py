"""``bnkit fuse MODEL -o OUT``: fold every foldable inference BatchNorm into its neighbour (bnkit.fuse)."""

from __future__ import annotations

import argparse
from typing import Any

from bnkit.cli.commands import (
    add_input_size,
    add_model_arguments,
    command_main,
    example_batch,
    load_eager,
    positive_int,
)
from bnkit.cli.commands._save import add_output_arguments, check_output, write_model
from bnkit.cli.io import CliError
from bnkit.cli.output import Table

NAME = "fuse"
DESCRIPTION = (
    "Fold BatchNorm layers into the conv/linear layers next to them (eval mode), check that the "
    "fused model gives the same outputs, and write it to OUT. The input file is never changed."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bnkit fuse``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> parser.parse_args(["m.pt", "-o", "f.pt"]).check
        True
    """
    add_model_arguments(parser)
    add_output_arguments(parser, auto="module")
    add_input_size(
        parser, "input shape without the batch dimension for the check (default: generated from the first layer)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=2, help="batch of the check input (2)")
    parser.add_argument(
        "--no-check", dest="check", action="store_false", help="do not compare fused and original outputs"
    )
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance of the check")
    parser.add_argument("--rtol", type=float, default=None, help="relative tolerance of the check")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fuse, check and write; returns the fuse report with the output path.

    Example:
        >>> run(argparse.Namespace(model="m.pt", weights=None, output="f.pt", format="auto", input_size=None,
        ...                        batch_size=2, check=True, atol=None, rtol=None))  # doctest: +SKIP
    """
    from bnkit.shared.errors import first_line
    from bnkit.tools.fuse import fuse_with_report

    loaded, model = load_eager(args, NAME)
    check_output(loaded, args)
    example = example_batch(model, args.input_size, args.batch_size)
    try:
        fused, report = fuse_with_report(model, example, check=args.check, atol=args.atol, rtol=args.rtol)
    except ValueError as exc:
        if "example_inputs" in str(exc) and example is None:
            reason = first_line(exc).split("; pass example_inputs")[0]
            raise CliError(f"{reason}: give --input-size C,H,W for the check (or --no-check)") from exc
        raise
    written = write_model(fused, loaded, args, auto="module", extra_inputs=[], example_inputs=example)
    return {**written, **report.to_dict()}


def render(data: dict[str, Any]) -> list[Table | str]:
    """Folded and skipped layers, the check, the file written.

    Example:
        >>> render({"folded": [], "skipped": [], "notes": [], "checked": False, "max_abs_diff": None,
        ...         "tolerance": None, "output": "f.pt", "format": "module"})[-1]
        'wrote f.pt (module); 0 BatchNorm layers folded, 0 skipped; not checked'
    """
    blocks: list[Table | str] = [_records_table(title, data[title]) for title in ("folded", "skipped") if data[title]]
    blocks.extend(data.get("notes") or [])
    check = (
        f"checked: max |diff| {data['max_abs_diff']:.3g} <= {data['tolerance']:.3g}"
        if data["checked"] and data["max_abs_diff"] is not None and data["tolerance"] is not None
        else "not checked"
    )
    blocks.append(
        f"wrote {data['output']} ({data['format']}); {len(data['folded'])} BatchNorm layers folded, "
        f"{len(data['skipped'])} skipped; {check}"
    )
    return blocks


def _records_table(title: str, records: list[dict[str, Any]]) -> Table:
    keys = list(records[0])
    return Table(title, keys, [[record[k] for k in keys] for record in records])


main = command_main(NAME)
