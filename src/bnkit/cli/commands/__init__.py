"""The sub-commands of ``bnkit``, one module each, and the argument helpers they share.

Contract of a command module ``bnkit/cli/commands/<name>.py`` (registered in :data:`bnkit.cli.main.COMMANDS`):

* ``build_parser(subparsers) -> argparse.ArgumentParser``: calls ``subparsers.add_parser("<name>", ...)``, adds
  the arguments and ``set_defaults(func=handler)``, optionally ``render=render``; returns the parser.
  (Alternatively ``add_arguments(parser)`` filling a parser that main creates.) ``--json`` and ``--debug`` are
  added by main when the command does not define them.
* ``handler(args) -> data``: does the work and returns plain data (dicts, lists, dataclasses, objects with
  ``to_dict``); it may return :class:`bnkit.cli.output.Result` to choose the exit status. It raises
  :class:`bnkit.cli.io.CliError` (or ValueError/TypeError) for anything the user should fix: main prints one
  line and exits 2.
* ``render(data) -> list[Table | str]`` (optional): the human-readable form; ``--json`` prints ``data``.
* ``main(argv=None) -> int``: runs just this command (``bnkit.cli.main.main([name, *argv])``).

Which model forms each command accepts (``package.module:factory [--weights]``, a pickled module, TorchScript):
every command takes factories and pickled modules; TorchScript files only ``summary``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from bnkit.cli.io import CliError

__all__ = ["add_model_arguments", "example_from_size", "parse_size"]

MODEL_HELP = (
    "the model: package.module:factory (called without arguments; use --weights for a checkpoint), a module "
    "saved with torch.save(model, path) (unpickled: trusted files only), or a TorchScript file (summary only)"
)
DATA_HELP = (
    "the data: a .pt/.pth tensor or (inputs, labels) pair, a .npy/.npz array, or package.module:factory "
    "returning an iterable of batches"
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``MODEL`` and ``--weights``.

    Example:
        >>> p = argparse.ArgumentParser(); add_model_arguments(p)
        >>> p.parse_args(["a:b", "--weights", "w.pt"]).weights
        'w.pt'
    """
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--weights", metavar="CKPT", default=None,
                        help="state dict (or checkpoint with one under state_dict/model/...) to load into MODEL")


def parse_size(text: str) -> tuple[int, ...]:
    """``"1,64,64"`` or ``"1x64x64"`` -> ``(1, 64, 64)``.

    Raises:
        CliError: not a list of positive integers.

    Example:
        >>> parse_size("1x64x64")
        (1, 64, 64)
    """
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        size = tuple(int(p) for p in parts if p)
    except ValueError:
        size = ()
    if not size or any(d < 1 for d in size):
        raise CliError(f"--input-size {text!r}: expected positive integers like 3,224,224 (no batch dimension)")
    return size


def add_input_size(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--input-size C,H,W`` (without the batch dimension).

    Example:
        >>> p = argparse.ArgumentParser(); add_input_size(p, "x")
        >>> p.parse_args(["--input-size", "3,8,8"]).input_size
        '3,8,8'
    """
    parser.add_argument("--input-size", metavar="SIZE", default=None, help=help_text)


def example_from_size(model: torch.nn.Module, size: Sequence[int], batch: int, seed: int = 0) -> torch.Tensor:
    """A random normal batch ``[batch, *size]`` on the model's device and dtype (seeded: reproducible).

    Example:
        >>> example_from_size(torch.nn.Linear(3, 2), (3,), 4).shape
        torch.Size([4, 3])
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *size), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def first_batch(batches: Any) -> Any:
    """The first batch of a data source, or a one-line error when there is none.

    Example:
        >>> first_batch([torch.zeros(1)])
        tensor([0.])
    """
    for batch in batches:
        return batch
    raise CliError("the data yielded no batches")
