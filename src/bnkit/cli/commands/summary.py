"""``bnkit summary MODEL [--input-size C,H,W]``: parameter counts, Keras style and PyTorch style."""

from __future__ import annotations

import argparse
from typing import Any

from bnkit.cli.commands import (
    add_backend,
    add_input_size,
    add_model_arguments,
    command_main,
    keras_model_given,
    parse_size,
)
from bnkit.cli.files import CliError
from bnkit.cli.output import Table

NAME = "summary"
DESCRIPTION = (
    "parameter counts, Keras style and PyTorch style side by side. Keras style"
    " counts BatchNorm moving statistics and frozen parameters as "
    "non-trainable, exactly as Keras's model.summary(); PyTorch style gives parameters and buffers. "
    "Takes Keras models too (NAME.keras: bnkit.keras.summary)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bnkit summary``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> parser.parse_args(["m.pt", "--input-size", "1,64,64"]).input_size
        '1,64,64'
    """
    add_model_arguments(parser)
    add_input_size(
        parser,
        "input shape without the batch dimension, e.g. 1,64,64 or 1 64 64: adds output shapes (PyTorch models; "
        "a .keras model has its own)",
    )
    add_backend(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and count; returns the summary as a dict.

    Example:
        >>> run(argparse.Namespace(model="torch.nn:Identity", weights=None, input_size=None))["total"]
        0
    """
    if keras_model_given(args):
        from bnkit.cli.keras_io import load_keras_model
        from bnkit.keras.accounting import summary as keras_summary

        if args.input_size:
            raise CliError(
                "--input-size is for PyTorch models: a .keras model is built, and its output shapes are read from it"
            )
        loaded = load_keras_model(args.model, trust_pickle=args.trust_pickle, backend=args.backend)
        return keras_summary(loaded.model).to_dict()
    from bnkit.cli.io import load_model
    from bnkit.inspection.summary import summary

    loaded_torch = load_model(args.model, args.weights, trust_pickle=getattr(args, "trust_pickle", False))
    size = parse_size(args.input_size) if args.input_size else None
    return summary(loaded_torch.model, input_size=size).to_dict()


def render(data: dict[str, Any]) -> list[Table | str]:
    """The library's per-layer table with totals, and both conventions in one line each.

    Example:
        >>> render(run(argparse.Namespace(model="torch.nn:Identity", weights=None, input_size=None)))[-1]
        'Keras style:   total 0  trainable 0  non-trainable 0\\nPyTorch style: parameters 0  trainable 0  buffers 0'
    """
    from bnkit.shared.summary import Summary

    counts = Summary.from_dict(data)
    return [Table(None, counts.columns, counts.table_rows()), counts.footer()]


main = command_main(NAME)
