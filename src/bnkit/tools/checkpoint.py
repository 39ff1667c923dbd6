"""Reading checkpoints without running their code, and loading weights all-or-nothing.

Why: ``torch.load(weights_only=False)`` unpickles arbitrary objects, and unpickling can call any function the
file names (``os.system`` included). bnkit never does that on its own:

* ``.safetensors`` files hold tensors only and cannot run code: always safe.
* Other files are read with ``torch.load(weights_only=True)``: torch's restricted unpickler refuses every class
  outside its allow-list *before* calling it, so a payload never runs. State dicts, nested checkpoint dicts of
  tensors and numbers, and tensors load this way.
* Only when the caller passes ``trust_pickle=True`` (the CLI's ``--trust-pickle``) is a file that needs the full
  unpickler (a whole pickled module, a checkpoint holding custom objects) read with ``weights_only=False``.
  Without it the refusal is one line that says why and how, raised before any of the file's code can run.

Loading is all-or-nothing: :func:`load_weights` checks every key, shape and dtype against the model before it
copies a single tensor, so an error leaves the model exactly as it was.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnkit.shared.errors import first_line

__all__ = [
    "STATE_KEYS",
    "UntrustedFileError",
    "WeightsMismatchError",
    "check_weights",
    "extract_state_dict",
    "load_weights",
    "read_checkpoint",
]

# keys under which training scripts commonly nest a state dict inside a checkpoint dict
STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "ema", "weights", "params")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


class UntrustedFileError(Exception):
    """A file that can only be read by running pickled code, refused because ``trust_pickle`` was not given.

    Example:
        >>> str(UntrustedFileError("refused"))
        'refused'
    """


class WeightsMismatchError(ValueError):
    """Weights that do not fit the model (missing or unexpected keys, shapes, dtypes); the model is unchanged.

    ``detail`` is the problem alone (without the model's or file's name), for callers that phrase their own line.

    Example:
        >>> WeightsMismatchError("weights do not match Linear: missing bias", "missing bias").detail
        'missing bias'
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail if detail is not None else message


def read_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Any:
    """Read a ``.safetensors`` or ``torch.save`` file without running code unless ``trust_pickle=True``.

    Raises:
        FileNotFoundError: no such file.
        UntrustedFileError: the file needs the full unpickler (it may run code) and ``trust_pickle`` is False.
        ValueError: the file is not a checkpoint torch can read (one line naming the file).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.pt"
        >>> torch.save({"w": torch.ones(2)}, path)
        >>> read_checkpoint(path)["w"].tolist()
        [1.0, 1.0]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found (or not a file)")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise ValueError(f"cannot read safetensors file {str(path)!r}: {first_line(exc)}") from exc
    if _is_export_archive(path):
        raise ValueError(
            f"cannot read {str(path)!r}: it is a torch.export program (.pt2), which bnkit does not read: "
            "torch.export.load unpickles parts of it with weights_only=False, so it can run code; give the "
            "architecture as code and the weights as a .safetensors or .pt state dict"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's restricted unpickler names the global it refused; anything else means "not a torch.save file"
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused is None:
            raise ValueError(f"cannot read checkpoint {str(path)!r}: not a file written by torch.save") from exc
        if not trust_pickle:
            raise UntrustedFileError(
                f"{str(path)!r} needs the full unpickler, which can run code from the file (it refers to "
                f"{refused.group(1)}); load it only if you trust it: pass trust_pickle=True (CLI: --trust-pickle), "
                "or save a state dict (.pt of tensors or .safetensors) and rebuild the model from code"
            ) from exc
    except Exception as exc:  # not a torch file, truncated, zip damaged...
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {first_line(exc)}") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # missing classes, corrupt pickles
        hint = ""
        if isinstance(exc, (AttributeError, ModuleNotFoundError)):
            hint = " (a pickled module needs its classes importable: run from the project directory)"
        raise ValueError(f"cannot unpickle {str(path)!r}: {first_line(exc)}{hint}") from exc


def _is_export_archive(path: Path) -> bool:
    # a torch.export archive (torch.export.save) has "<name>/archive_format" and no "<name>/data.pkl"
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/archive_format") for n in names) and not any(n.endswith("/data.pkl") for n in names)


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state dict inside a checkpoint object: a module, a flat dict of tensors, or nested under a common key.

    Example:
        >>> sorted(extract_state_dict({"epoch": 3, "state_dict": {"w": torch.ones(1)}}))
        ['w']
    """
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping) or not obj:
        return None
    if all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj if isinstance(obj, dict) else dict(obj)
    for key in STATE_KEYS:
        if key in obj:
            found = extract_state_dict(obj[key])
            if found is not None:
                return found
    return None


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_weights(model: nn.Module, state: Mapping[str, Any], *, strict: bool = True) -> dict[str, torch.Tensor]:
    """Validate ``state`` against ``model`` and return it ready to load (wrapper prefixes stripped).

    Checks every entry before anything is written: keys (all of them when ``strict``), that values are tensors,
    shapes, and dtypes (floating values may change precision; integer and bool buffers must stay integer/bool).

    Raises:
        WeightsMismatchError: one line naming the first problem key (and how many more there are).

    Example:
        >>> sorted(check_weights(nn.Linear(2, 1), {"module.weight": torch.ones(1, 2), "module.bias": torch.ones(1)}))
        ['bias', 'weight']
    """
    own = model.state_dict()
    state = _strip_wrapper_prefixes(dict(state), set(own))
    problems: list[str] = []
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        labelled = (("missing", missing), ("unexpected", unexpected))
        keys = [f"{label} {_few(names)}" for label, names in labelled if names]
        if keys:
            problems.append("; ".join(keys))
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key!r} is a {type(value).__name__}, not a tensor")
        elif value.shape != target.shape:
            problems.append(
                f"size mismatch for {key!r}: shape {list(value.shape)} in the weights, "
                f"{list(target.shape)} in the model"
            )
        elif (value.dtype.is_floating_point, value.is_complex()) != (
            target.dtype.is_floating_point,
            target.is_complex(),
        ):
            problems.append(f"{key!r} has dtype {value.dtype}, the model has {target.dtype}")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        detail = f"{problems[0]}{more}"
        raise WeightsMismatchError(f"weights do not match {type(model).__name__}: {detail}", detail)
    return state


def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = True,
    trust_pickle: bool = False,
) -> nn.Module:
    """Load a checkpoint file (or a state dict) into ``model`` in place, all-or-nothing; returns ``model``.

    The file is read with :func:`read_checkpoint` (no code runs unless ``trust_pickle=True``); the state dict is
    found in it with :func:`extract_state_dict` and validated with :func:`check_weights` before any tensor is
    copied, so on error the model is exactly as it was.

    Raises:
        UntrustedFileError: see :func:`read_checkpoint`.
        WeightsMismatchError: no state dict in the file, or it does not fit the model (the message names the file).

    Example:
        >>> net = nn.Linear(2, 1)
        >>> load_weights(net, {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}).weight.sum().item()
        0.0
    """
    where = "" if isinstance(source, Mapping) else f" in {str(source)!r}"
    obj = source if isinstance(source, Mapping) else read_checkpoint(source, trust_pickle=trust_pickle)
    state = extract_state_dict(obj)
    if state is None and isinstance(obj, Mapping) and obj and not any(key in obj for key in STATE_KEYS):
        state = dict(obj)  # a state dict with a bad entry: let check_weights name the entry
    if state is None:
        detail = "no state dict found: expected a dict of tensors, possibly under one of the keys " + ", ".join(
            STATE_KEYS
        )
        raise WeightsMismatchError(detail.replace("found:", f"found{where}:"), detail)
    try:
        state = check_weights(model, state, strict=strict)
    except WeightsMismatchError as exc:
        raise WeightsMismatchError(f"{exc}{where}", exc.detail) from None
    model.load_state_dict(state, strict=strict)
    return model


def _value_kind(tensor: torch.Tensor) -> str:
    # a checkpoint may change a float tensor's precision (load_state_dict casts), never float <-> int/bool/complex
    if tensor.is_complex():
        return "complex"
    return "floating" if tensor.dtype.is_floating_point else "integer or bool"
