"""``bnkit convert MODEL --to KIND -o OUT``: convert BatchNorm layers (bnkit.convert)."""

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
from bnkit.cli.output import Table
from bnkit.tools.convert import TARGETS

NAME = "convert"
DESCRIPTION = (
    "Convert every BatchNorm layer: to bnkit.BatchNorm (exact), to plain torch BatchNorm (also "
    "from SyncBatchNorm), to synchronised bnkit.BatchNorm (sync) or torch.nn.SyncBatchNorm (torch-sync), or to "
    "GroupNorm; write the model to OUT."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bnkit convert``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> parser.parse_args(["m.pt", "--to", "torch", "-o", "t.pt"]).to
        'torch'
    """
    add_model_arguments(parser)
    parser.add_argument("--to", required=True, choices=TARGETS, help="target form")
    add_output_arguments(parser, auto="module")
    parser.add_argument(
        "--groups",
        type=positive_int,
        default=None,
        help="--to group: number of groups (default: the largest divisor of the channels <= 32)",
    )
    add_input_size(parser, "input shape without the batch dimension: tells --to torch/group each layer's rank")
    parser.add_argument(
        "--no-strict",
        dest="strict",
        action="store_false",
        help="--to torch: drop bnkit settings torch cannot express instead of refusing",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Convert and write; returns which layers changed type and the output path.

    Example:
        >>> run(argparse.Namespace(model="m.pt", weights=None, to="bnkit", output="b.pt", format="auto",
        ...     groups=None, input_size=None, strict=True))  # doctest: +SKIP
    """
    from bnkit.tools.convert import convert

    loaded, model = load_eager(args, NAME)
    check_output(loaded, args)
    example = example_batch(model, args.input_size, 2)
    before = {name: type(m).__name__ for name, m in model.named_modules()}
    converted = convert(model, args.to, example_inputs=example, groups=args.groups, strict=args.strict)
    layers = [
        {"layer": name, "from": before[name], "to": type(m).__name__}
        for name, m in converted.named_modules()
        if name in before and before[name] != type(m).__name__
    ]
    written = write_model(converted, loaded, args, auto="module", extra_inputs=[], example_inputs=example)
    return {**written, "to": args.to, "converted": layers}


def render(data: dict[str, Any]) -> list[Table | str]:
    """The converted layers and the file written.

    Example:
        >>> render({"converted": [], "output": "b.pt", "format": "module", "to": "bnkit"})
        ['wrote b.pt (module): 0 layers converted to bnkit']
    """
    blocks: list[Table | str] = []
    if data["converted"]:
        rows = [[c["layer"], c["from"], c["to"]] for c in data["converted"]]
        blocks.append(Table(None, ["layer", "from", "to"], rows))
    blocks.append(
        f"wrote {data['output']} ({data['format']}): {len(data['converted'])} layers converted to {data['to']}"
    )
    return blocks


main = command_main(NAME)
