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
from bnkit.cli.io import CliError
from bnkit.cli.output import Table
from bnkit.tools.convert import TARGETS

NAME = "convert"
DESCRIPTION = (
    "Convert every BatchNorm layer: to bnkit.BatchNorm (exact), to plain torch BatchNorm (also "
    "from SyncBatchNorm), to synchronised bnkit.BatchNorm (sync) or torch.nn.SyncBatchNorm (torch-sync), to "
    "FrozenBatchNorm2d (frozen) or back to trainable BatchNorm2d (trainable), to GroupNorm, or BatchNorm + "
    "activation pairs to bnkit.BatchNormAct (bnact); write the model to "
    "OUT. Layers left as they are, and modules with running statistics bnkit does not recognise, are listed."
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
    add_input_size(
        parser,
        "input shape without the batch dimension, for one eval-mode forward that records each layer's rank; "
        "rarely needed: --to torch reads the rank from the model itself",
    )
    parser.add_argument(
        "--dim",
        type=int,
        choices=(1, 2, 3),
        default=None,
        help="--to torch/frozen/trainable: BatchNorm1d/2d/3d where neither the model nor --input-size fixes the rank",
    )
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
        ...     groups=None, input_size=None, dim=None, strict=True))  # doctest: +SKIP
    """
    from bnkit.tools.convert import convert_with_report

    loaded, model = load_eager(args, NAME)
    check_output(loaded, args)
    example = example_batch(model, args.input_size, 2)
    dim = getattr(args, "dim", None) if args.to in ("torch", "frozen", "trainable") else None
    try:
        converted, report = convert_with_report(
            model, args.to, example_inputs=example, groups=args.groups, strict=args.strict, dim=dim
        )
    except ValueError as err:
        message = str(err)
        if "needs BatchNorm1d, 2d or 3d" in message:
            message = message.split(" (to=")[0] + "; pass --dim 1|2|3 or --input-size"
        raise CliError(message) from None
    layers = []
    for name, change in report.converted.items():
        old, new = change.rsplit(" -> ", 1)
        layers.append({"layer": name, "from": old, "to": new})
    written = write_model(converted, loaded, args, auto="module", extra_inputs=[], example_inputs=example)
    left = {**report.kept, **report.skipped}
    return {
        **written,
        "to": args.to,
        "converted": layers,
        "left": [{"layer": name, "reason": reason} for name, reason in left.items()],
        "unrecognised": list(report.unrecognised),
        "notes": list(report.notes),
    }


def render(data: dict[str, Any]) -> list[Table | str]:
    """The converted layers and the file written.

    Example:
        >>> render({"converted": [], "output": "b.pt", "format": "module", "to": "bnkit", "unrecognised": ["1"]})
        ['not recognised, hold running statistics: 1', 'wrote b.pt (module): 0 layers converted to bnkit']
    """
    blocks: list[Table | str] = []
    if data["converted"]:
        rows = [[c["layer"], c["from"], c["to"]] for c in data["converted"]]
        blocks.append(Table(None, ["layer", "from", "to"], rows))
    if data.get("left"):
        rows = [[c["layer"], c["reason"]] for c in data["left"]]
        blocks.append(Table("left as they are", ["layer", "reason"], rows))
    if data.get("unrecognised"):
        blocks.append(f"not recognised, hold running statistics: {', '.join(data['unrecognised'])}")
    blocks.extend(f"note: {note}" for note in data.get("notes", ()))
    blocks.append(
        f"wrote {data['output']} ({data['format']}): {len(data['converted'])} layers converted to {data['to']}"
    )
    return blocks


main = command_main(NAME)
