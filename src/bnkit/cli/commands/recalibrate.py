"""``bnkit recalibrate MODEL DATA -o OUT``: recompute running statistics from data (precise BN, AdaBN), for
PyTorch models and Keras models (``NAME.keras``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bnkit.cli.commands import (
    add_backend,
    add_data_arguments,
    add_model_arguments,
    command_main,
    keras_model_given,
    load_eager,
)
from bnkit.cli.commands._save import add_output_arguments, check_output, write_model
from bnkit.cli.files import CliError, is_factory_spec
from bnkit.cli.output import Table

NAME = "recalibrate"
DESCRIPTION = (
    "Recompute the running statistics of every BatchNorm layer from DATA (bnkit.recalibrate; for a Keras model "
    "NAME.keras, bnkit.keras.recalibrate) and write the model to OUT. On target-domain data this is AdaBN. The "
    "input file is never changed."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bnkit recalibrate``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> parser.parse_args(["m.pt", "x.npy", "-o", "r.pt"]).method
        'precise'
    """
    add_model_arguments(parser)
    add_output_arguments(
        parser,
        auto="state_dict for a factory model (load it with --weights), keras for a .keras model, module otherwise",
        extra_formats=("keras",),
    )
    parser.add_argument(
        "--method",
        choices=["precise", "ema"],
        default="precise",
        help="precise: exact population statistics (default); ema: momentum updates (PyTorch models)",
    )
    parser.add_argument(
        "--sequential", action="store_true", help="recompute layer by layer (one pass over DATA per layer)"
    )
    add_backend(parser)
    add_data_arguments(parser)  # DATA is the second positional, after MODEL


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Recalibrate and write; returns the recalibration report with the output path.

    Example:
        >>> run(argparse.Namespace(model="m.pt", weights=None, data="x.npy", output="r.pt", format="auto",
        ...     method="precise", sequential=False, batch_size=64, num_batches=None))  # doctest: +SKIP
    """
    if keras_model_given(args):
        return _run_keras(args)
    if args.format == "keras":
        raise CliError(f"--format keras is for Keras models (.keras files); {args.model!r} is a PyTorch model")
    from dataclasses import asdict

    from bnkit.cli.io import load_data
    from bnkit.tools.recalibrate import recalibrate

    loaded, model = load_eager(args, NAME)
    data_inputs = [] if is_factory_spec(args.data) else [Path(args.data)]
    check_output(loaded, args, data_inputs)
    source = load_data(args.data, batch_size=args.batch_size)
    report = recalibrate(
        model,
        source.batches,
        method=args.method,
        num_batches=args.num_batches,
        progress=sys.stderr.isatty(),
        sequential=args.sequential,
    )
    auto = "state_dict" if loaded.kind == "factory" else "module"
    written = write_model(model, loaded, args, auto=auto, extra_inputs=data_inputs)
    return {**written, **asdict(report)}


def _run_keras(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import asdict

    from bnkit.cli.keras_io import check_keras_output, load_keras_data, load_keras_model, save_keras_model
    from bnkit.keras.recalibration import recalibrate as keras_recalibrate

    if args.format not in ("auto", "keras"):
        raise CliError(f"--format {args.format} is for PyTorch models: a Keras model is written as a .keras file")
    if args.method != "precise":
        raise CliError(f"--method {args.method}: Keras models are recalibrated with precise statistics only")
    data_inputs = [] if is_factory_spec(args.data) else [Path(args.data)]
    check_keras_output(args.output, [Path(args.model), *data_inputs])
    loaded = load_keras_model(args.model, trust_pickle=args.trust_pickle, backend=args.backend)
    source = load_keras_data(args.data, batch_size=args.batch_size)
    report = keras_recalibrate(
        loaded.model,
        source.data,
        sequential=args.sequential,
        num_batches=args.num_batches,
        batch_size=args.batch_size,
    )
    save_keras_model(loaded.model, args.output, inputs=[*loaded.input_paths(), *data_inputs])
    return {"output": str(args.output), "format": "keras", "backend": loaded.backend, **asdict(report)}


def render(data: dict[str, Any]) -> list[Table | str]:
    """Per-layer counts (PyTorch) or the layers recalibrated (Keras), and the file written.

    Example:
        >>> render({"counts": {"bn": 6}, "skipped": {}, "method": "precise", "batches": 2, "passes": 1,
        ...         "output": "r.pt", "format": "module"})[-1]
        'wrote r.pt (module): 1 layers recalibrated (precise) from 2 batches in 1 pass(es)'
    """
    if "counts" not in data:
        return _render_keras(data)
    count_label = "values per channel" if data["method"] == "precise" else "updates"
    blocks: list[Table | str] = [Table(None, ["layer", count_label], [[k, v] for k, v in data["counts"].items()])]
    if data["skipped"]:
        blocks.append(Table("skipped", ["layer", "why"], [[k, v] for k, v in data["skipped"].items()]))
    blocks.append(
        f"wrote {data['output']} ({data['format']}): {len(data['counts'])} layers recalibrated ({data['method']}) "
        f"from {data['batches']} batches in {data['passes']} pass(es)"
    )
    return blocks


def _render_keras(data: dict[str, Any]) -> list[Table | str]:
    rows = [[name, data["samples"]] for name in data["layers"]]
    blocks: list[Table | str] = [Table(None, ["layer", "samples"], rows)]
    if data["skipped"]:
        blocks.append(Table("skipped", ["layer", "why"], [[k, v] for k, v in data["skipped"].items()]))
    blocks.append(
        f"wrote {data['output']} ({data['format']}, {data['backend']} backend): {len(data['layers'])} layers "
        f"recalibrated (precise) from {data['samples']} samples in {data['batches']} batches in {data['passes']} "
        "pass(es)"
    )
    return blocks


main = command_main(NAME)
