"""``bnkit convert MODEL --to KIND -o OUT``: convert BatchNorm layers (bnkit.convert), or port a model between
Keras and PyTorch (``bnkit convert model.keras --to torch --factory pkg.mod:factory -o out.pt`` and
``bnkit convert model.pt --to keras --factory pkg.mod:keras_factory -o out.keras``, bnkit.transfer_weights)."""

from __future__ import annotations

import argparse
import warnings
from dataclasses import asdict
from typing import Any

from bnkit.cli.commands import (
    add_backend,
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
    "FrozenBatchNorm2d (frozen) or back to trainable BatchNorm2d (trainable), or to GroupNorm; write the model to "
    "OUT. Layers left as they are, and modules with running statistics bnkit does not recognise, are listed. "
    "With --factory, port weights between Keras and PyTorch instead: a .keras MODEL --to torch into the PyTorch "
    "twin the factory builds, or a PyTorch MODEL --to keras into the Keras twin; the port is verified layer by "
    "layer and OUT is written only if it matches."
)

FACTORY_HELP = (
    "port weights between Keras and PyTorch: package.module:factory building the twin model of MODEL (a PyTorch "
    "module for a .keras MODEL with --to torch; a Keras model with --to keras), same layers in the same order"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bnkit convert``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> parser.parse_args(["m.pt", "--to", "torch", "-o", "t.pt"]).to
        'torch'
    """
    add_model_arguments(parser)
    parser.add_argument(
        "--to", required=True, choices=(*TARGETS, "keras"), help="target form (keras: with --factory only)"
    )
    parser.add_argument("--factory", metavar="SPEC", default=None, help=FACTORY_HELP)
    add_backend(parser)
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

    if _porting(args):
        return _port(args)
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
        old, new = change.split(" -> ")
        layers.append({"layer": name, "from": old, "to": new})
    written = write_model(converted, loaded, args, auto="module", extra_inputs=[], example_inputs=example)
    left = {**report.kept, **report.skipped}
    return {
        **written,
        "to": args.to,
        "converted": layers,
        "left": [{"layer": name, "reason": reason} for name, reason in left.items()],
        "unrecognised": list(report.unrecognised),
    }


def _porting(args: argparse.Namespace) -> bool:
    """True for a Keras <-> PyTorch port (``--factory``, or a ``.keras`` MODEL / ``--to keras``, refused without it)."""
    from bnkit.cli.keras_io import is_keras_file

    factory = getattr(args, "factory", None)
    keras_model = is_keras_file(args.model)
    if factory is None:
        if args.to == "keras" or keras_model:
            raise CliError(
                "convert: porting between Keras and PyTorch needs the twin model: "
                "--to torch|keras --factory package.module:factory"
            )
        if getattr(args, "backend", None) is not None:
            raise CliError(f"--backend {args.backend} applies to Keras models (.keras files)")
        return False
    if keras_model and args.to != "torch":
        raise CliError(f"convert --factory: a .keras MODEL is ported --to torch. Received: --to {args.to}")
    if not keras_model and args.to != "keras":
        raise CliError(f"convert --factory: a PyTorch MODEL is ported --to keras. Received: --to {args.to}")
    return True


def _example(keras_model: Any) -> Any:
    import numpy as np

    shape = keras_model.inputs[0].shape[1:]
    if any(d is None for d in shape):
        raise CliError(f"convert: the Keras model's input shape {tuple(shape)} is not fully known; give it an Input")
    return np.random.default_rng(0).normal(size=(8, *shape)).astype("float32")


def _port(args: argparse.Namespace) -> dict[str, Any]:
    """Load both models, transfer and verify, then write OUT only when the port verified."""
    from bnkit.cli.io import call_factory
    from bnkit.cli.keras_io import check_keras_output, load_keras_model, save_keras_model, select_backend
    from bnkit.transfer import transfer_weights

    if args.to == "torch":
        loaded = load_keras_model(args.model, trust_pickle=args.trust_pickle, backend=args.backend)
        check_output(loaded, args)
        keras_model, torch_model = loaded.model, call_factory(args.factory, "model")
        src, dst = keras_model, torch_model
    else:
        select_backend(args.backend)
        loaded, torch_model = load_eager(args, NAME)
        check_keras_output(args.output, loaded.input_paths())
        keras_model = call_factory(args.factory, "model")
        src, dst = torch_model, keras_model
    try:
        with warnings.catch_warnings():  # a divergence is the error below, not a warning too
            warnings.simplefilter("ignore", UserWarning)
            report = transfer_weights(src, dst, _example(keras_model), verify=True)
    except (TypeError, ValueError) as err:
        raise CliError(str(err).splitlines()[0]) from None
    if not report.ok:
        first = report.first_divergence
        raise CliError(f"convert: the ported model does not match, nothing written: {first.line() if first else ''}")
    if args.to == "torch":
        written = write_model(dst, loaded, args, auto="module", extra_inputs=[])
    else:
        path = save_keras_model(dst, args.output, inputs=loaded.input_paths())
        written = {"output": str(path), "format": "keras"}
    return {
        **written,
        "to": args.to,
        "port": report.direction,
        "pairs": len(report.pairs),
        "output_error": report.output_error,
        "changes": report.changes,
        "checks": [asdict(check) for check in report.checks],
    }


def render(data: dict[str, Any]) -> list[Table | str]:
    """The converted layers and the file written.

    Example:
        >>> render({"converted": [], "output": "b.pt", "format": "module", "to": "bnkit", "unrecognised": ["1"]})
        ['not recognised, hold running statistics: 1', 'wrote b.pt (module): 0 layers converted to bnkit']
    """
    blocks: list[Table | str] = []
    if "port" in data:
        rows = [[c["keras"], c["torch"], c["mode"], f"{c['error']:.2g}", c["status"]] for c in data["checks"]]
        blocks.append(Table(None, ["keras", "torch", "mode", "error", "status"], rows))
        notes = [f"{c['keras']} ({c['mode']}): {c['reason']}" for c in data["checks"] if c["reason"]]
        blocks += notes + [f"changed: {change}" for change in data["changes"]]
        errors = ", ".join(f"{mode} {err:.2g}" for mode, err in data["output_error"].items())
        blocks.append(
            f"wrote {data['output']} ({data['format']}): {data['port']}, {data['pairs']} layer pairs verified "
            f"(output relative error {errors})"
        )
        return blocks
    if data["converted"]:
        rows = [[c["layer"], c["from"], c["to"]] for c in data["converted"]]
        blocks.append(Table(None, ["layer", "from", "to"], rows))
    if data.get("left"):
        rows = [[c["layer"], c["reason"]] for c in data["left"]]
        blocks.append(Table("left as they are", ["layer", "reason"], rows))
    if data.get("unrecognised"):
        blocks.append(f"not recognised, hold running statistics: {', '.join(data['unrecognised'])}")
    blocks.append(
        f"wrote {data['output']} ({data['format']}): {len(data['converted'])} layers converted to {data['to']}"
    )
    return blocks


main = command_main(NAME)
