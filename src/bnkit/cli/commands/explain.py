"""``bnkit explain MODEL``: what every BatchNorm layer does in train() and eval(), and why."""

from __future__ import annotations

import argparse
from typing import Any

from bnkit.cli.commands import add_model_arguments, command_main, load_eager
from bnkit.cli.output import Table

NAME = "explain"
DESCRIPTION = "what every BatchNorm layer does in train() and eval(), and why. One row per norm layer."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bnkit explain``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> parser.parse_args(["m.pt"]).model
        'm.pt'
    """
    add_model_arguments(parser)


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
