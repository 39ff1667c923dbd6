"""``bnkit explain MODEL``: what every BatchNorm layer does in train() and eval() (Keras: under fit(),
evaluate()/predict() and a plain call), and why."""

from __future__ import annotations

import argparse
from typing import Any

from bnkit.cli.commands import add_backend, add_model_arguments, command_main, keras_model_given, load_eager
from bnkit.cli.output import Table

NAME = "explain"
DESCRIPTION = (
    "what every BatchNorm layer does in train() and eval(), and why. One row per norm layer. For a Keras "
    "model (NAME.keras): its mode under fit(), evaluate()/predict() and a plain call (bnkit.keras.explain)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bnkit explain``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> parser.parse_args(["m.pt"]).model
        'm.pt'
    """
    add_model_arguments(parser)
    add_backend(parser)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Load the model and explain it; returns one dict per layer (``bnkit.explain`` or ``bnkit.keras.explain``).

    Example:
        >>> run(argparse.Namespace(model="torch.nn:BatchNorm1d", weights=None))  # doctest: +SKIP
    """
    if keras_model_given(args):
        from bnkit.cli.keras_io import load_keras_model
        from bnkit.keras.explanation import explain as keras_explain

        loaded = load_keras_model(args.model, trust_pickle=args.trust_pickle, backend=args.backend)
        return keras_explain(loaded.model).to_dicts()
    from bnkit.inspection.explain import explain

    _, model = load_eager(args, NAME)
    return explain(model).to_dicts()


def render(data: list[dict[str, Any]]) -> list[Table | str]:
    """A table with one row per layer (the library's table of :func:`bnkit.explain` or
    :func:`bnkit.keras.explain`, told apart by the rows' fields).

    Example:
        >>> render([])
        ['no BatchNorm or other normalisation layer found']
    """
    if data and "fit" in data[0]:
        from bnkit.keras.explanation import KerasExplanation, KerasLayerExplanation

        table: Any = KerasExplanation(KerasLayerExplanation(**row) for row in data)
    else:
        from bnkit.inspection.explain import Explanation, LayerExplanation

        table = Explanation(LayerExplanation.from_dict(row) for row in data)
    if not table:
        return [table.empty]
    return [Table(None, table.columns, table.rows())]


main = command_main(NAME)
