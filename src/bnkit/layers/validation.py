"""The rules for ``bnkit.BatchNorm``'s settings and state dicts, shared by the constructor and assignment.

Why one place: a setting checked only in ``__init__`` can be broken later (``bn.momentum = 1.5`` would be
accepted and ``bn.momentum = float("nan")`` would surface as an error that blames the input). The layer calls
:func:`check_setting` from both its constructor and ``__setattr__``, so the messages are the same either way.
:func:`check_layer_state` validates a whole state dict before a single tensor is copied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["NONFINITE_POLICIES", "VALIDATED_SETTINGS", "check_layer_state", "check_setting"]

NONFINITE_POLICIES = ("skip", "raise", "warn")
VALIDATED_SETTINGS = frozenset({"eps", "momentum", "keras_momentum", "virtual_batch_size", "on_nonfinite"})
_MOMENTUM_CONVENTIONS = {"momentum": "NEW batch (PyTorch convention)", "keras_momentum": "OLD value (Keras convention)"}
# entries a layer fills in itself when a checkpoint lacks them (old checkpoints, a plain BN loaded into renorm)
_DERIVED = frozenset({"num_batches_tracked", "running_std", "renorm_mean", "renorm_std"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_setting(label: str, name: str, value: Any) -> Any:
    """The value to store for setting ``name`` of layer ``label``, or a one-line ``ValueError``.

    Example:
        >>> check_setting("bn1", "momentum", 0.1)
        0.1
        >>> try:
        ...     check_setting("bn1", "momentum", 1.5)
        ... except ValueError as error:
        ...     print(str(error)[:44])
        bn1: momentum is the weight of the NEW batch
    """
    if name == "eps":
        # > 0, not >= 0: torch's batch-norm kernels refuse eps=0 in training (and 1/sqrt(0) is inf for a constant
        # channel), which would only surface at the first forward, after the step counter moved
        if not _is_real(value) or value <= 0:
            raise ValueError(f"{label}: eps must be > 0 and finite. Received: eps={value!r}")
        return float(value)
    if name in _MOMENTUM_CONVENTIONS:
        if value is None:
            return None
        if not _is_real(value) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{label}: {name} is the weight of the {_MOMENTUM_CONVENTIONS[name]} and must be in [0, 1] or None. "
                f"Received: {name}={value!r}"
            )
        return float(value)
    if name == "virtual_batch_size":
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{label}: virtual_batch_size must be a positive int. Received: {value!r}")
        return value
    if name == "on_nonfinite":
        if value not in NONFINITE_POLICIES:
            choices = ", ".join(repr(p) for p in NONFINITE_POLICIES)
            raise ValueError(f"{label}: on_nonfinite must be one of {choices}. Received: {value!r}")
        return value
    raise KeyError(name)


def check_layer_state(
    label: str, own: Mapping[str, torch.Tensor], state: Mapping[str, Any], *, strict: bool, prefix: str = ""
) -> None:
    """Validate a layer's state dict entries against its own (``own``) before anything is copied.

    Every entry must be a tensor of the layer's shape, floating where the layer's is floating; with ``strict``
    nothing may be missing (except what the layer derives itself: ``num_batches_tracked`` of old checkpoints,
    renorm statistics) or unexpected.

    Raises:
        ValueError: one line naming the layer and the entry; nothing was loaded.

    Example:
        >>> own = {"weight": torch.ones(2), "bias": torch.zeros(2)}
        >>> try:
        ...     check_layer_state("bn", own, {"weight": torch.ones(3), "bias": torch.zeros(2)}, strict=True)
        ... except ValueError as error:
        ...     print(str(error)[:60])
        bn: state dict entry 'weight' has shape (3,) but the layer's
    """
    given = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if strict:
        missing = sorted(set(own) - set(given) - _DERIVED)
        unexpected = sorted(set(given) - set(own))
        if missing or unexpected:
            parts = [
                f"{what} {', '.join(map(repr, keys))}"
                for what, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            ]
            raise ValueError(f"{label}: state dict has {'; '.join(parts)}; nothing was loaded")
    for key, value in given.items():
        mine = own.get(key)
        if mine is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{label}: state dict entry {key!r} is a {type(value).__name__}, not a tensor; nothing was loaded"
            )
        if value.shape != mine.shape:
            raise ValueError(
                f"{label}: state dict entry {key!r} has shape {tuple(value.shape)} but the layer's has shape "
                f"{tuple(mine.shape)}; nothing was loaded (load a checkpoint made for this architecture)"
            )
        if value.dtype.is_floating_point != mine.dtype.is_floating_point:
            raise ValueError(
                f"{label}: state dict entry {key!r} has dtype {value.dtype} but the layer's is {mine.dtype}; "
                "nothing was loaded"
            )
