"""``bnkit fold MODEL.keras -o OUT.keras``: fold a Keras model's BatchNormalization layers into the layers next
to them (``bnkit.keras.fold_with_report``) and write the folded model; the Keras counterpart of ``bnkit fuse``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnkit.cli.commands import (
    add_backend,
    add_input_size,
    add_model_arguments,
    command_main,
    keras_model_given,
    parse_size,
    positive_int,
)
from bnkit.cli.files import CliError
from bnkit.cli.output import Table, jsonable

NAME = "fold"
DESCRIPTION = (
    "Fold the BatchNormalization layers of a Keras model (NAME.keras) into the Conv/Dense layers next to them "
    "(bnkit.keras.fold_with_report), check the folded model against the original, and write it to OUT "
    "(.keras, loads with plain Keras). The input file is never changed. For PyTorch models use bnkit fuse."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bnkit fold``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> args = parser.parse_args(["m.keras", "-o", "f.keras", "--backend", "jax"])
        >>> args.output, args.backend
        ('f.keras', 'jax')
    """
    add_model_arguments(parser)
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="the .keras file to write (atomically; never MODEL)"
    )
    add_input_size(
        parser,
        "input shape without the batch dimension for the check, channels last (e.g. 32,32,3 or 32 32 3); "
        "default: bnkit.keras.fold's own check",
    )
    parser.add_argument("--batch-size", type=positive_int, default=2, help="batch of the check input (2)")
    add_backend(parser)


@dataclass
class FoldOutput:
    """The fold report with the file written: ``str(report)`` for people, ``to_dict()`` for ``--json``.

    Example:
        >>> FoldOutput("folded bn into conv", "f.keras", "jax").to_dict()
        {'report': 'folded bn into conv', 'output': 'f.keras', 'format': 'keras', 'backend': 'jax'}
    """

    report: Any
    output: str
    backend: str

    def to_dict(self) -> dict[str, Any]:
        """The report's own ``to_dict()`` with ``output``, ``format`` and ``backend`` added.

        Example:
            >>> FoldOutput("r", "f.keras", "jax").to_dict()["format"]
            'keras'
        """
        report = self.report.to_dict() if hasattr(self.report, "to_dict") else {"report": jsonable(self.report)}
        return {**report, "output": self.output, "format": "keras", "backend": self.backend}


def _fold_with_report() -> Any:
    import bnkit.keras

    try:
        return bnkit.keras.fold_with_report
    except AttributeError as exc:
        raise CliError("this bnkit has no bnkit.keras.fold_with_report: update bnkit to fold Keras models") from exc


def run(args: argparse.Namespace) -> FoldOutput:
    """Fold, check and write; returns the report with the output path.

    Example:
        >>> run(argparse.Namespace(model="m.keras", weights=None, output="f.keras", input_size=None, batch_size=2,
        ...                        backend=None, trust_pickle=False))  # doctest: +SKIP
    """
    if not keras_model_given(args):
        raise CliError(
            f"bnkit fold works on Keras models (NAME.keras); for the PyTorch model {args.model!r} use "
            "bnkit fuse MODEL -o OUT"
        )
    from bnkit.cli.keras_io import check_keras_output, load_keras_model, save_keras_model

    check_keras_output(args.output, [Path(args.model)])
    loaded = load_keras_model(args.model, trust_pickle=args.trust_pickle, backend=args.backend)
    fold_with_report = _fold_with_report()
    if args.input_size is not None:
        import numpy as np

        size = parse_size(args.input_size)
        example = np.random.default_rng(0).standard_normal((args.batch_size, *size)).astype("float32")
        folded, report = fold_with_report(loaded.model, check=example)
    else:
        folded, report = fold_with_report(loaded.model)
    save_keras_model(folded, args.output, inputs=loaded.input_paths())
    return FoldOutput(report, str(args.output), loaded.backend)


def render(data: FoldOutput | dict[str, Any]) -> list[Table | str]:
    """The report as ``bnkit.keras.fold_with_report`` prints it, and the file written.

    Example:
        >>> render(FoldOutput("folded bn into conv", "f.keras", "jax"))
        ['folded bn into conv', 'wrote f.keras (keras, jax backend)']
    """
    if isinstance(data, FoldOutput):
        return [str(data.report), f"wrote {data.output} (keras, {data.backend} backend)"]
    lines = [f"{key}: {value}" for key, value in data.items() if key not in ("output", "format", "backend")]
    return [*lines, f"wrote {data['output']} (keras, {data['backend']} backend)"]


main = command_main(NAME)
