"""The sub-commands of ``bnkit``, one module each, and the argument helpers they share.

Contract of a command module ``bnkit/cli/commands/<name>.py`` (registered in :data:`bnkit.cli.main.COMMANDS`,
whose one-line help ``bnkit --help`` shows), either

* declarative: ``add_arguments(parser)`` adds the arguments to a parser that main creates with the module's
  ``DESCRIPTION`` (default: the one-line help), and main sets ``func=run`` and ``render=render``; or
* ``build_parser(subparsers) -> argparse.ArgumentParser``: calls ``subparsers.add_parser("<name>", ...)``, adds
  the arguments and ``set_defaults(func=handler)``, optionally ``render=render``; returns the parser.

``--json`` and ``--debug`` are added by main when the command does not define them. Then:

* ``run(args) -> data`` (the handler): does the work and returns plain data (dicts, lists, dataclasses, objects
  with ``to_dict``); it may return :class:`bnkit.cli.output.Result` to choose the exit status. It raises
  :class:`bnkit.cli.io.CliError` (or ValueError/TypeError) for anything the user should fix: main prints one
  line and exits 2.
* ``render(data) -> list[Table | str]`` (optional): the human-readable form; ``--json`` prints ``data``.
* ``main(argv=None) -> int``: runs just this command (``bnkit.cli.main.main([name, *argv])``); build it with
  :func:`command_main`.

The helpers below hold what several commands share: the ``MODEL`` and ``DATA`` arguments, ``--input-size`` and
the example batch made from it, and loading an eager model.

Which model forms each command accepts (``package.module:factory [--weights]``, a pickled module, TorchScript,
a Keras ``.keras`` file): every command takes factories and pickled modules; TorchScript files only ``summary``;
``.keras`` files ``explain``, ``summary``, ``doctor``, ``recalibrate`` and ``fold`` (with ``--backend``).

This module imports neither torch nor Keras: the PyTorch loaders (:mod:`bnkit.cli.io`) are imported by the
functions that need them, so a Keras command never imports torch.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bnkit.cli.files import CliError

if TYPE_CHECKING:  # torch is imported by the PyTorch commands only: the Keras path never imports it
    import torch

    from bnkit.cli.io import LoadedModel

__all__ = [
    "add_backend",
    "add_data_arguments",
    "add_input_size",
    "add_model_arguments",
    "command_main",
    "example_batch",
    "example_from_size",
    "first_batch",
    "join_size_arguments",
    "keras_model_given",
    "load_eager",
    "parse_size",
    "positive_int",
]

MODEL_HELP = (
    "the model: package.module:factory (called without arguments; use --weights for a checkpoint), a module "
    "saved with torch.save(model, path) (unpickled: trusted files only), a TorchScript file (summary only), or "
    "a Keras 3 model file NAME.keras (explain, summary, doctor, recalibrate, fold, convert --factory; see --backend)"
)
BACKEND_HELP = (
    "Keras backend for a .keras model (sets KERAS_BACKEND before Keras is imported; default: Keras's own "
    "choice, KERAS_BACKEND or ~/.keras/keras.json)"
)
DATA_HELP = (
    "the data: a .pt/.pth tensor or (inputs, labels) pair, a .npy/.npz array, or package.module:factory "
    "returning an iterable of batches"
)


def command_main(name: str) -> Callable[[Sequence[str] | None], int]:
    """The ``main(argv=None) -> int`` of a command module: runs ``bnkit NAME *argv`` and returns the exit status.

    Example:
        >>> command_main("summary")(["torch.nn:Identity", "--json"])  # doctest: +ELLIPSIS
        {
        ...
        0
    """

    def main(argv: Sequence[str] | None = None) -> int:
        from bnkit.cli.main import main as cli_main

        return cli_main([name, *(argv or [])])

    main.__doc__ = f"Run ``bnkit {name}`` alone (``argv`` without the command name); returns the exit status."
    return main


def positive_int(text: str) -> int:
    """argparse type for counts such as ``--batch-size``: a positive integer.

    Example:
        >>> positive_int("8")
        8
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``MODEL`` and ``--weights``.

    Example:
        >>> p = argparse.ArgumentParser(); add_model_arguments(p)
        >>> p.parse_args(["a:b", "--weights", "w.pt"]).weights
        'w.pt'
    """
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument(
        "--weights",
        metavar="CKPT",
        default=None,
        help="state dict (.pt or .safetensors, or a checkpoint with one under state_dict/model/...) to load into MODEL",
    )
    add_trust_pickle(parser)


def add_trust_pickle(parser: argparse.ArgumentParser) -> None:
    """``--trust-pickle``: allow unpickling files that can run code (whole pickled modules, custom objects).

    Example:
        >>> p = argparse.ArgumentParser(); add_trust_pickle(p)
        >>> p.parse_args([]).trust_pickle
        False
    """
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading files that can run code when unpickled (a module saved with torch.save(model), "
        "checkpoints with custom objects) or loaded (a .keras file with a Lambda layer: Keras's safe_mode=False); "
        "only for files you trust. Without it such files are refused",
    )


_SIZE_TOKEN = re.compile(r"^(?=.*[0-9])[-0-9x,]+$")  # "-1" too: parse_size then says what is wrong
_SIZE_SEPARATORS = re.compile(r"[\s,x]+")


def parse_size(text: str | Sequence[str]) -> tuple[int, ...]:
    """``"1,64,64"``, ``"1x64x64"``, ``"1 64 64"`` or ``["1", "64", "64"]`` -> ``(1, 64, 64)``.

    Raises:
        CliError: not a list of positive integers.

    Example:
        >>> parse_size("1x64x64"), parse_size("3 224 224"), parse_size(["3", "8", "8"])
        ((1, 64, 64), (3, 224, 224), (3, 8, 8))
    """
    joined = text if isinstance(text, str) else " ".join(text)
    parts = [p for p in _SIZE_SEPARATORS.split(joined.strip()) if p]
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if not size or any(d < 1 for d in size):
        raise CliError(
            f"--input-size {joined!r}: expected positive integers like 3,224,224 or 3 224 224 (no batch dimension)"
        )
    return size


def join_size_arguments(argv: Sequence[str]) -> list[str]:
    """Let ``--input-size`` take its numbers as separate words: ``--input-size 3 224 224`` becomes
    ``--input-size 3,224,224`` (the number words right after the option are joined; ``MODEL`` and the rest stay).

    Example:
        >>> join_size_arguments(["summary", "--input-size", "3", "224", "224", "m.pt"])
        ['summary', '--input-size', '3,224,224', 'm.pt']
        >>> join_size_arguments(["summary", "m.pt", "--input-size", "3,8,8"])
        ['summary', 'm.pt', '--input-size', '3,8,8']
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        out.append(arg)
        i += 1
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg != "--input-size":
            continue
        numbers: list[str] = []
        while i < len(argv) and _SIZE_TOKEN.match(argv[i]):
            numbers.append(argv[i])
            i += 1
        if numbers:
            out.append(",".join(n.strip(",") for n in numbers))
    return out


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``DATA``, ``--batch-size`` (for tensor data, default 64) and ``--num-batches``.

    Example:
        >>> p = argparse.ArgumentParser(); add_data_arguments(p)
        >>> args = p.parse_args(["x.npy", "--num-batches", "3"])
        >>> args.data, args.batch_size, args.num_batches
        ('x.npy', 64, 3)
    """
    parser.add_argument("data", metavar="DATA", help=DATA_HELP)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="samples per batch for tensor data (64)")
    parser.add_argument("--num-batches", type=positive_int, default=None, help="use at most this many batches")


def add_backend(parser: argparse.ArgumentParser) -> None:
    """``--backend tensorflow|jax|torch`` for ``.keras`` models.

    Example:
        >>> p = argparse.ArgumentParser(); add_backend(p)
        >>> p.parse_args(["--backend", "jax"]).backend
        'jax'
    """
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default=None, help=BACKEND_HELP)


def keras_model_given(args: argparse.Namespace) -> bool:
    """True when ``MODEL`` is a ``.keras`` file; for a PyTorch model, refuses ``--backend`` (it is Keras's).

    Raises:
        CliError: ``--backend`` given with a PyTorch model, or ``--weights`` with a ``.keras`` one.

    Example:
        >>> keras_model_given(argparse.Namespace(model="m.keras", weights=None, backend="jax"))
        True
    """
    from bnkit.cli.keras_io import is_keras_file

    if is_keras_file(args.model):
        if getattr(args, "weights", None) is not None:
            raise CliError(f"--weights does not apply to the Keras model {args.model!r}: its weights are in the file")
        return True
    backend = getattr(args, "backend", None)
    if backend is not None:
        raise CliError(f"--backend {backend} applies to Keras models (.keras files); {args.model!r} is a PyTorch model")
    return False


def load_eager(args: argparse.Namespace, command: str) -> tuple[LoadedModel, torch.nn.Module]:
    """``MODEL``/``--weights`` loaded, and the eager module (a one-line error for TorchScript).

    Example:
        >>> load_eager(argparse.Namespace(model="torch.nn:Identity", weights=None), "explain")[1]
        Identity()
    """
    from bnkit.cli.io import load_model, require_eager

    loaded = load_model(args.model, args.weights, trust_pickle=getattr(args, "trust_pickle", False))
    return loaded, require_eager(loaded, command)


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
        >>> import torch
        >>> example_from_size(torch.nn.Linear(3, 2), (3,), 4).shape
        torch.Size([4, 3])
    """
    import torch

    from bnkit.tools.model_inputs import input_device_dtype

    device, dtype = input_device_dtype(model)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *size), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def example_batch(model: torch.nn.Module, input_size: str | None, batch: int) -> torch.Tensor | None:
    """:func:`example_from_size` for ``--input-size`` text, or None when it was not given.

    Example:
        >>> import torch
        >>> example_batch(torch.nn.Linear(3, 2), "3", 4).shape, example_batch(torch.nn.Linear(3, 2), None, 4)
        (torch.Size([4, 3]), None)
    """
    return example_from_size(model, parse_size(input_size), batch) if input_size else None


def first_batch(batches: Any) -> Any:
    """The first batch of a data source, or a one-line error when there is none.

    Example:
        >>> first_batch([[1.0], [2.0]])
        [1.0]
    """
    for batch in batches:
        return batch
    raise CliError("the data yielded no batches")
