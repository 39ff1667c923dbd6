"""``bnkit summary MODEL [--input-size C,H,W]``: parameter counts, Keras style and PyTorch style."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from bnkit.cli.commands import add_input_size, add_model_arguments, parse_size
from bnkit.cli.io import load_model
from bnkit.cli.output import Table

NAME = "summary"
HELP = "parameter counts, Keras style and PyTorch style side by side"


def build_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``summary`` (the one command that also reads TorchScript files).

    Example:
        >>> from bnkit.cli.main import build_parser as main_parser
        >>> main_parser("summary").parse_args(["summary", "m.pt", "--input-size", "1,64,64"]).input_size
        '1,64,64'
    """
    parser = subparsers.add_parser(
        NAME, help=HELP,
        description=HELP + ". Keras style counts BatchNorm moving statistics and frozen parameters as "
        "non-trainable, exactly as Keras's model.summary(); PyTorch style gives parameters and buffers.",
    )
    add_model_arguments(parser)
    add_input_size(parser, "input shape without the batch dimension, e.g. 1,64,64: adds output shapes")
    parser.set_defaults(func=run, render=render)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and count; returns the summary as a dict.

    Example:
        >>> run(argparse.Namespace(model="torch.nn:Identity", weights=None, input_size=None))["total"]
        0
    """
    from bnkit.inspection.summary import summary

    loaded = load_model(args.model, args.weights)
    size = parse_size(args.input_size) if args.input_size else None
    return summary(loaded.model, input_size=size).to_dict()


def render(data: dict[str, Any]) -> list[Table | str]:
    """The per-layer table with totals, and both conventions in one line each.

    Example:
        >>> render(run(argparse.Namespace(model="torch.nn:Identity", weights=None, input_size=None)))[-1]
        'Keras style:   total 0  trainable 0  non-trainable 0\\nPyTorch style: parameters 0  trainable 0  buffers 0'
    """
    columns = ["layer", "type", "output shape", "keras total", "trainable", "non-trainable", "parameters",
               "trainable params", "buffers"]
    rows: list[list[Any]] = [
        [r["name"] or "(model)", r["type"], "" if r["output_shape"] is None else str(r["output_shape"]),
         r["total"], r["trainable"], r["non_trainable"], r["parameters"], r["trainable_parameters"], r["buffers"]]
        for r in data["rows"]
    ]
    rows.append(["total", "", "", data["total"], data["trainable"], data["non_trainable"], data["parameters"],
                 data["trainable_parameters"], data["buffers"]])
    footer = (
        f"Keras style:   total {data['total']:,}  trainable {data['trainable']:,}  "
        f"non-trainable {data['non_trainable']:,}\n"
        f"PyTorch style: parameters {data['parameters']:,}  trainable {data['trainable_parameters']:,}  "
        f"buffers {data['buffers']:,}"
    )
    return [Table(None, columns, rows), footer]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnkit summary`` alone.

    Example:
        >>> main(["torch.nn:Identity", "--json"])  # doctest: +SKIP
    """
    from bnkit.cli.main import main as cli_main

    return cli_main([NAME, *(argv or [])])
