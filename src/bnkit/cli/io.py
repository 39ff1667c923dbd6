"""Loading PyTorch models and data for the command line, and saving models (atomically, through
:func:`bnkit.cli.files.write_atomic`; ``CliError`` and ``write_atomic`` are re-exported here).

Models (``MODEL`` argument of every sub-command):

* ``package.module:factory`` (also ``package.module:attr.factory``): the factory is imported (the current
  directory is importable) and called without arguments; it must return an ``nn.Module``. With
  ``--weights CKPT`` a state dict is loaded into it, strictly: a plain state dict, or one nested under a common
  key (``state_dict``, ``model_state_dict``, ``model``, ``net``, ``network``, ``module``, ``ema``, ``weights``,
  ``params``), or a ``.safetensors`` file; ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are
  stripped when the model's own keys do not have them. Weights are read with ``torch.load(weights_only=True)``:
  no code in the file runs. A checkpoint that holds other objects needs ``--trust-pickle``.
* a whole module saved with ``torch.save(model, path)``: unpickling it can run code from the file, so it is
  refused unless ``--trust-pickle`` is given (**only for files you trust**); the classes must be importable.
  The refusal comes from torch's restricted unpickler, before any of the file's code runs.
* a TorchScript file (``torch.jit.save``): accepted where the command only reads parameters (``summary``);
  commands that run or rewrite the model need an eager module and say so.

Data (``DATA`` argument of ``shift`` and ``recalibrate``):

* ``.pt``/``.pth``: a tensor, an ``(inputs, labels)`` pair, a list of batches, or a dict with an ``x``,
  ``inputs``, ``input``, ``data`` or ``images`` entry (loaded with ``weights_only=True``: no code runs);
* ``.npy``/``.npz`` (``x``/``inputs``/``input``/``data``/``images`` key, or the only array);
* ``package.module:factory`` returning an iterable of batches (a ``DataLoader``, a list) or a tensor.

Tensors are split into batches of ``--batch-size`` along dimension 0. NumPy float64 and integer arrays become
float32 (PyTorch models are float32 unless told otherwise).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnkit.cli.files import (
    DATA_KEYS,
    CliError,
    check_output_path,
    existing_file,
    import_attr,
    is_factory_spec,
    read_array,
    write_atomic,
)
from bnkit.shared.errors import first_line
from bnkit.tools.checkpoint import (
    STATE_KEYS,
    UntrustedFileError,
    WeightsMismatchError,
    extract_state_dict,
    load_weights,
    read_checkpoint,
)

__all__ = [
    "CliError",
    "DataSource",
    "LoadedModel",
    "call_factory",
    "check_output_path",
    "extract_state_dict",
    "is_factory_spec",
    "load_data",
    "load_model",
    "require_eager",
    "save_model",
    "write_atomic",
]


@dataclass
class LoadedModel:
    """A model and where it came from.

    Attributes:
        model: The module (``torch.jit.ScriptModule`` for TorchScript files).
        kind: ``"factory"``, ``"pickle"`` or ``"torchscript"``.
        source: The ``MODEL`` argument as given.
        path: The model file (None for factories).
        weights: The ``--weights`` file, if any.

    Example:
        >>> LoadedModel(nn.Identity(), "pickle", "m.pt", Path("m.pt"), None).kind
        'pickle'
    """

    model: nn.Module
    kind: str
    source: str
    path: Path | None
    weights: Path | None

    def input_paths(self) -> list[Path]:
        """The files this model was read from (an output must never overwrite them).

        Example:
            >>> LoadedModel(nn.Identity(), "factory", "a:b", None, Path("w.pt")).input_paths()
            [PosixPath('w.pt')]
        """
        return [p for p in (self.path, self.weights) if p is not None]


def call_factory(spec: str, what: str) -> Any:
    """Import ``package.module:attr`` and call it (a module object is returned as it is).

    Errors (missing module or attribute, not callable, the factory raising) become one-line ``CliError``s
    naming ``what`` (``"model"``, ``"data"``).

    Example:
        >>> call_factory("collections:OrderedDict", "data")
        OrderedDict()
    """
    factory = import_attr(spec, what)
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise CliError(f"{what} {spec!r} is not callable (a {type(factory).__name__})")
    try:
        return factory()
    except Exception as exc:  # the user's factory may raise anything; report it on one line
        raise CliError(f"{what} factory {spec!r} failed: {first_line(exc, with_type=True)}") from exc


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def load_model(spec: str, weights: str | None = None, *, trust_pickle: bool = False) -> LoadedModel:
    """Load ``MODEL`` (factory, pickled module or TorchScript file) and apply ``--weights``.

    No file's code runs unless ``trust_pickle`` is True (``--trust-pickle``): pickled modules and checkpoints
    holding custom objects are refused with a one-line error that says so.

    Raises:
        CliError: missing file, unimportable factory, a file that holds no model (e.g. only a state dict),
            weights that do not match the model, a pickle refused because ``trust_pickle`` is False.

    Example:
        >>> load_model("torch.nn:Identity").kind
        'factory'
    """
    if is_factory_spec(spec):
        model = call_factory(spec, "model")
        if not isinstance(model, nn.Module):
            raise CliError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
        loaded = LoadedModel(model, "factory", spec, None, None)
    else:
        path = existing_file(spec, "model")
        if path.suffix.lower() == ".keras":
            raise CliError(
                f"{spec!r} is a Keras model: this command takes PyTorch models (Keras models work with explain, "
                "summary, doctor, recalibrate and fold)"
            )
        if _is_torchscript(path):
            try:
                model = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:  # a damaged archive raises RuntimeError or others
                raise CliError(f"cannot load TorchScript model {spec!r}: {first_line(exc)}") from exc
            loaded = LoadedModel(model, "torchscript", spec, path, None)
        else:
            obj = _read(path, "model", trust_pickle=trust_pickle)
            if isinstance(obj, nn.Module):
                loaded = LoadedModel(obj, "pickle", spec, path, None)
            elif isinstance(obj, dict):
                raise CliError(
                    f"{spec!r} holds a state dict (or checkpoint dict), not a model: give the architecture as "
                    f"package.module:factory and this file as --weights {spec}"
                )
            else:
                raise CliError(f"{spec!r} does not contain a torch.nn.Module (found a {type(obj).__name__})")
    if weights is not None:
        if loaded.kind == "torchscript":
            raise CliError("--weights cannot be applied to a TorchScript model")
        weights_path = existing_file(weights, "weights")
        _apply_weights(loaded.model, weights_path, trust_pickle=trust_pickle)
        loaded.weights = weights_path
    return loaded


def _read(path: Path, what: str, *, trust_pickle: bool) -> Any:
    try:
        return read_checkpoint(path, trust_pickle=trust_pickle)
    except UntrustedFileError as exc:
        detail = _without_path(exc, path).replace("trust_pickle=True (CLI: --trust-pickle)", "--trust-pickle")
        raise CliError(f"refusing to unpickle {what} file {str(path)!r}: {detail}") from exc
    except (ValueError, OSError) as exc:
        raise CliError(f"cannot load {what} file {str(path)!r}: {_without_path(exc, path)}") from exc


def _without_path(exc: BaseException, path: Path) -> str:
    # the checkpoint errors name the file; the CLI names it once, in its own words
    return re.sub(r"^.*?" + re.escape(repr(str(path))) + r":? ", "", first_line(exc), count=1)


def _apply_weights(model: nn.Module, path: Path, *, trust_pickle: bool) -> None:
    state = extract_state_dict(_read(path, "weights", trust_pickle=trust_pickle))
    if state is None:
        raise CliError(
            f"no state dict found in weights file {str(path)!r}: expected a dict of tensors, possibly under one of "
            f"the keys {', '.join(STATE_KEYS)}"
        )
    try:
        load_weights(model, state)
    except WeightsMismatchError as exc:
        raise CliError(f"weights file {str(path)!r} does not match the model: {exc.detail}") from exc


def require_eager(loaded: LoadedModel, command: str) -> nn.Module:
    """The eager model, or a one-line error for TorchScript input (hooks and rewrites need eager modules).

    Example:
        >>> require_eager(LoadedModel(nn.Identity(), "pickle", "m.pt", None, None), "shift")
        Identity()
    """
    if loaded.kind == "torchscript" or isinstance(loaded.model, torch.jit.ScriptModule):
        raise CliError(
            f"bnkit {command} needs an eager model, not TorchScript {loaded.source!r}: give a module saved with "
            "torch.save(model) or package.module:factory [--weights ckpt]"
        )
    return loaded.model


@dataclass
class DataSource:
    """Batches for ``shift``/``recalibrate`` and what they are.

    Attributes:
        batches: An iterable of batches (re-iterable for tensors and lists).
        description: Where they came from and their shape, for messages.
        num_batches: The number of batches when known.

    Example:
        >>> DataSource([torch.zeros(2, 3)], "x", 1).num_batches
        1
    """

    batches: Iterable[Any]
    description: str
    num_batches: int | None


def _to_tensor(value: Any, where: str) -> torch.Tensor:
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise CliError(f"data {where}: object arrays are not supported, save numeric arrays")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise CliError(f"data {where}: expected a tensor or array, found a {type(value).__name__}")
    if not value.is_floating_point() or value.dtype == torch.float64:
        value = value.float()
    return value


def _split(tensor: torch.Tensor, batch_size: int, where: str) -> DataSource:
    if tensor.ndim < 2:
        raise CliError(
            f"data {where} has shape {list(tensor.shape)}: expected [samples, ...] with at least 2 dimensions"
        )
    if tensor.shape[0] == 0:
        raise CliError(f"data {where} is empty")
    batches = list(tensor.split(batch_size))
    return DataSource(batches, f"{where}: {tensor.shape[0]} samples of shape {list(tensor.shape[1:])}", len(batches))


def _from_object(obj: Any, batch_size: int, where: str) -> DataSource:
    import numpy as np

    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return _split(_to_tensor(obj, where), batch_size, where)
    if isinstance(obj, dict):
        for key in DATA_KEYS:
            if key in obj:
                return _from_object(obj[key], batch_size, f"{where}[{key!r}]")
        raise CliError(f"data {where}: a dict without any of the keys {', '.join(DATA_KEYS)}")
    if isinstance(obj, (tuple, list)) and obj:
        first = obj[0]
        labelled = (
            len(obj) == 2
            and isinstance(obj[1], (torch.Tensor, np.ndarray))
            and not isinstance(first, (tuple, list))
            and len(obj[1]) == len(first)
            and obj[1].ndim <= 1
        )
        if labelled:  # (inputs, labels)
            return _from_object(first, batch_size, f"{where} (inputs of an (inputs, labels) pair)")
        batches = [_to_tensor(b[0] if isinstance(b, (tuple, list)) else b, where) for b in obj]
        return DataSource(batches, f"{where}: {len(batches)} batches", len(batches))
    raise CliError(f"data {where}: expected a tensor, an (inputs, labels) pair, a list of batches or a dict")


def load_data(spec: str, *, batch_size: int = 64) -> DataSource:
    """Load ``DATA`` (``.pt``/``.pth``, ``.npy``/``.npz`` or ``package.module:factory``) as batches.

    Raises:
        CliError: missing file, unknown format, no usable array.

    Example:
        >>> import numpy as np, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.npy"
        >>> np.save(path, np.zeros((10, 3)))
        >>> load_data(str(path), batch_size=4).num_batches
        3
    """
    if batch_size < 1:
        raise CliError(f"--batch-size must be a positive integer, got {batch_size}")
    if is_factory_spec(spec):
        obj = call_factory(spec, "data")
        if isinstance(obj, torch.Tensor):
            return _split(_to_tensor(obj, spec), batch_size, spec)
        if not isinstance(obj, Iterable):
            raise CliError(f"data factory {spec!r} returned a {type(obj).__name__}, not an iterable of batches")
        length = len(obj) if hasattr(obj, "__len__") else None
        return DataSource(obj, f"{spec}", length)
    path = existing_file(spec, "data")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        return _from_object(_read(path, "data", trust_pickle=False), batch_size, spec)
    if suffix in (".npy", ".npz"):
        array, where = read_array(path, spec)
        return _split(_to_tensor(array, where), batch_size, where)
    raise CliError(
        f"unknown data format {suffix or '(no suffix)'!r} for {spec!r}: use .pt, .pth, .npy, .npz or "
        "package.module:factory"
    )


SAVE_FORMATS = ("auto", "module", "state_dict", "torchscript")


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    fmt: str,
    inputs: Iterable[Path],
    example_inputs: Any = None,
) -> str:
    """Save ``model`` atomically as a pickled module, a state dict or TorchScript; returns the format used.

    ``"torchscript"`` scripts the model, or traces it on ``example_inputs`` when scripting fails.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "m.pt"
        >>> save_model(nn.Linear(2, 2), out, fmt="state_dict", inputs=[])
        'state_dict'
    """
    if fmt == "state_dict":
        state = model.state_dict()
        write_atomic(path, lambda f: torch.save(state, f), inputs=inputs)
    elif fmt == "torchscript":
        scripted = _script(model, example_inputs)
        write_atomic(path, lambda f: torch.jit.save(scripted, f), inputs=inputs)
    elif fmt == "module":
        write_atomic(path, lambda f: torch.save(model, f), inputs=inputs)
    else:
        raise CliError(f"unknown output format {fmt!r}: choose one of {', '.join(SAVE_FORMATS[1:])}")
    return fmt


def _script(model: nn.Module, example_inputs: Any) -> torch.jit.ScriptModule:
    try:
        return torch.jit.script(model)
    except Exception as script_error:  # scripting fails on much Python; tracing is the fallback
        if example_inputs is None:
            raise CliError(
                f"cannot script the model ({first_line(script_error)}); give --input-size so it can be traced"
            ) from script_error
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        try:
            return torch.jit.trace(model, args)
        except Exception as exc:  # untraceable models
            raise CliError(f"cannot script or trace the model: {first_line(exc)}") from exc
