"""``bnkit explain MODEL``: what every BatchNorm layer does in train() and eval(), and why."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from bnkit.cli.commands import add_model_arguments
from bnkit.cli.io import load_model, require_eager
from bnkit.cli.output import Table

NAME = "explain"
HELP = "what every BatchNorm layer does in train() and eval(), and why"


def build_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``explain``.

    Example:
        >>> from bnkit.cli.main import build_parser as main_parser
        >>> main_parser("explain").parse_args(["explain", "m.pt"]).model
        'm.pt'
    """
    parser = subparsers.add_parser(NAME, help=HELP, description=HELP + ". One row per norm layer.")
    add_model_arguments(parser)
    parser.set_defaults(func=run, render=render)
    return parser


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Load the model and explain it; returns one dict per layer.

    Example:
        >>> run(argparse.Namespace(model="torch.nn:BatchNorm1d", weights=None))  # doctest: +SKIP
    """
    from bnkit.inspection.explain import explain

    model = require_eager(load_model(args.model, args.weights), NAME)
    return explain(model).to_dicts()


def render(data: list[dict[str, Any]]) -> list[Table | str]:
    """A table with one row per layer.

    Example:
        >>> render([])
        ['no BatchNorm or other normalisation layer found']
    """
    if not data:
        return ["no BatchNorm or other normalisation layer found"]
    from bnkit.inspection._common import Mode

    rows = []
    for row in data:
        train, evaluation = Mode(**row["train"]), Mode(**row["eval"])
        rows.append([
            row["name"] or "(model)", row["type"], row["channels"], row["now"], train.describe(),
            evaluation.describe(), row["affine"], "\n".join(row["reasons"]),
        ])
    columns = ["layer", "type", "ch", "now", "in train()", "in eval()", "gamma/beta", "why"]
    return [Table(None, columns, rows)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnkit explain`` alone.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    from bnkit.cli.main import main as cli_main

    return cli_main([NAME, *(argv or [])])
