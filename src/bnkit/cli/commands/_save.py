"""Output options shared by the commands that write a model (fuse, recalibrate, convert)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnkit.cli.files import check_output_path

if TYPE_CHECKING:  # torch only for PyTorch models: recalibrate also writes Keras models
    from torch import nn

    from bnkit.cli.io import LoadedModel

FORMAT_HELP = (
    "module: whole pickled module (torch.save(model)); state_dict: tensors only (load with --weights into the "
    "same architecture); torchscript: torch.jit.script, else traced on --input-size; auto: {auto}"
)


def add_output_arguments(parser: argparse.ArgumentParser, auto: str, extra_formats: Sequence[str] = ()) -> None:
    """``-o/--output`` (required) and ``--format`` (``extra_formats`` adds choices, e.g. ``"keras"``).

    Example:
        >>> p = argparse.ArgumentParser(); add_output_arguments(p, "module")
        >>> p.parse_args(["-o", "x.pt"]).format
        'auto'
    """
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="file to write (atomically; never one of the input files)"
    )
    keras_help = "; keras: a .keras file (a Keras model's only format)" if "keras" in extra_formats else ""
    parser.add_argument(
        "--format",
        choices=["auto", "module", "state_dict", "torchscript", *extra_formats],
        default="auto",
        help=FORMAT_HELP.format(auto=auto) + keras_help,
    )


def write_model(
    model: nn.Module,
    loaded: LoadedModel,
    args: argparse.Namespace,
    *,
    auto: str,
    extra_inputs: list[Path],
    example_inputs: Any = None,
) -> dict[str, str]:
    """Save ``model`` per ``--output``/``--format``; returns ``{"output": path, "format": fmt}``.

    Example:
        >>> import tempfile, torch
        >>> from bnkit.cli.io import LoadedModel
        >>> out = Path(tempfile.mkdtemp()) / "m.pt"
        >>> ns = argparse.Namespace(output=str(out), format="auto")
        >>> write_model(torch.nn.Linear(1, 1), LoadedModel(torch.nn.Linear(1, 1), "factory", "a:b", None, None),
        ...             ns, auto="state_dict", extra_inputs=[])["format"]
        'state_dict'
    """
    from bnkit.cli.io import save_model

    fmt = auto if args.format == "auto" else args.format
    save_model(
        model, args.output, fmt=fmt, inputs=[*loaded.input_paths(), *extra_inputs], example_inputs=example_inputs
    )
    return {"output": str(args.output), "format": fmt}


def check_output(loaded: LoadedModel, args: argparse.Namespace, extra_inputs: Sequence[Path] = ()) -> None:
    """Refuse a bad ``--output`` before any work is done (the input files, a missing directory).

    Example:
        >>> import torch
        >>> from bnkit.cli.io import LoadedModel
        >>> ns = argparse.Namespace(output="out.pt")
        >>> check_output(LoadedModel(torch.nn.Identity(), "pickle", "m.pt", Path("m.pt"), None), ns)
    """
    check_output_path(args.output, [*loaded.input_paths(), *extra_inputs])
