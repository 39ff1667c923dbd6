"""``bnkit explain MODEL``: what every BatchNorm layer does in train() and eval(), and why."""

from __future__ import annotations

import argparse
from typing import Any

from bnkit.cli.commands import add_command, add_model_arguments, command_main, load_eager
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
    parser = add_command(subparsers, NAME, HELP, HELP + ". One row per norm layer.", run=run, render=render)
    add_model_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Load the model and explain it; returns one dict per layer.

    Example:
        >>> run(argparse.Namespace(model="torch.nn:BatchNorm1d", weights=None))  # doctest: +SKIP
    """
    from bnkit.inspection.explain import explain

    _, model = load_eager(args, NAME)
    return explain(model).to_dicts()


def render(data: list[dict[str, Any]]) -> list[Table | str]:
    """A table with one row per layer (the library's table of :func:`bnkit.explain`).

    Example:
        >>> render([])
        ['no BatchNorm or other normalisation layer found']
    """
    from bnkit.inspection.explain import Explanation, LayerExplanation

    table = Explanation(LayerExplanation.from_dict(row) for row in data)
    if not table:
        return [table.empty]
    return [Table(None, table.columns, table.rows())]


main = command_main(NAME)
