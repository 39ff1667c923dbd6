"""Shared machinery of the inspection tools: mode rules per layer kind, running a model without changing it.

Private: the public entry points are explain, summary, doctor and shift. Everything here reads a model and,
where it runs one, restores every module's training flag and removes every hook it added, also on error.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnkit.layers.find import is_batch_independent_norm
from bnkit.layers.find import is_batchnorm as _find_is_batchnorm


def is_batchnorm(module: nn.Module) -> bool:
    """``bnkit.layers.find.is_batchnorm``, falling back to torch's classes while bnkit.BatchNorm is absent."""
    try:
        return _find_is_batchnorm(module)
    except ImportError:
        return isinstance(module, nn.modules.batchnorm._BatchNorm)


def is_bnkit_batchnorm(module: nn.Module) -> bool:
    """True for bnkit.BatchNorm (duck-typed on the mode-rule methods of its contract)."""
    return callable(getattr(module, "uses_batch_stats", None)) and callable(
        getattr(module, "updates_running_stats", None)
    )


def frozen_by_bnkit(module: nn.Module) -> tuple[bool, bool]:
    """``(stats_frozen, affine_frozen)`` as set by ``bnkit.freeze`` (or bnkit.BatchNorm's own switches).

    For torch layers a frozen affine is plain ``requires_grad=False`` and cannot be told apart from a manual
    freeze, so only bnkit layers report ``affine_frozen``; callers word torch layers through requires_grad.
    ``bnkit.tools.freeze`` is imported lazily so inspection keeps working without it.
    """
    if is_bnkit_batchnorm(module):
        return bool(getattr(module, "freeze_stats", False)), bool(getattr(module, "freeze_affine", False))
    try:
        from bnkit.tools.freeze import is_frozen_stats
    except ImportError:
        return False, False
    return bool(is_frozen_stats(module)), False


@dataclass(frozen=True)
class Mode:
    """What a normalisation layer does in one model mode.

    Attributes:
        normalize: ``"batch"`` (statistics of the current batch), ``"running"`` (stored running statistics) or
            ``"per-sample"`` (GroupNorm/LayerNorm/InstanceNorm: statistics of each sample alone).
        updates_running_stats: Whether a forward pass in this mode changes the running statistics.
        synchronized: Whether batch statistics are merged across processes (SyncBN, bnkit ``sync=True``).

    Example:
        >>> Mode("batch", True, False).normalize
        'batch'
    """

    normalize: str
    updates_running_stats: bool
    synchronized: bool = False

    def describe(self) -> str:
        """Short words for a table cell, e.g. ``"batch stats, updates running"``.

        Example:
            >>> Mode("running", False).describe()
            'running stats'
        """
        words = {"batch": "batch stats", "running": "running stats", "per-sample": "per-sample stats"}
        text = words.get(self.normalize, self.normalize)
        if self.synchronized and self.normalize == "batch":
            text = "synced " + text
        if self.updates_running_stats:
            text += ", updates running"
        return text


def has_running_stats(module: nn.Module) -> bool:
    """True when the layer keeps running statistics (``track_running_stats`` and the buffers exist)."""
    tracked = bool(getattr(module, "track_running_stats", False))
    return tracked and getattr(module, "running_mean", None) is not None


def mode_in(module: nn.Module, training: bool) -> Mode:
    """What ``module`` does after ``model.train()`` (``training=True``) or ``model.eval()``.

    bnkit.BatchNorm answers through its own mode rule; torch BN layers follow PyTorch's rule (batch statistics
    when training or without running statistics; updates when training with running statistics), unless
    ``bnkit.freeze`` froze their statistics, which then survive ``model.train()``.
    """
    synced = _is_synchronized(module)
    if is_batch_independent_norm(module):
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and has_running_stats(module):
            if training:
                return Mode("per-sample", True)
            return Mode("running", False)
        return Mode("per-sample", False)
    if is_bnkit_batchnorm(module):
        return Mode(
            "batch" if module.uses_batch_stats(training) else "running",
            bool(module.updates_running_stats(training)),
            synced,
        )
    stats_frozen, _ = frozen_by_bnkit(module)
    tracked = has_running_stats(module)
    use_batch = (training and not stats_frozen) or not tracked
    return Mode("batch" if use_batch else "running", use_batch and tracked and training, synced and use_batch)


def current_mode(module: nn.Module) -> Mode:
    """What the layer does right now, given its own ``training`` flag."""
    return mode_in(module, bool(module.training))


def _is_synchronized(module: nn.Module) -> bool:
    if isinstance(module, nn.SyncBatchNorm):
        return True
    return bool(getattr(module, "sync", False)) and is_bnkit_batchnorm(module)


def channel_axis(module: nn.Module, ndim: int) -> int:
    """Non-negative channel axis of the layer for an input of rank ``ndim`` (1 for torch BN layers)."""
    axis_fn = getattr(module, "channel_axis", None)
    if callable(axis_fn):
        return int(axis_fn(ndim))
    return 1 if ndim > 1 else 0


def num_channels(module: nn.Module) -> int | None:
    """The number of channels a norm layer normalises, or None when it is not known (lazy layers)."""
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(math.prod(shape))
    return None


def layer_type(module: nn.Module) -> str:
    """The class name, qualified with ``bnkit.`` for bnkit layers so they stand out from torch's."""
    cls = type(module)
    if cls.__module__.startswith("bnkit."):
        return f"bnkit.{cls.__name__}"
    return cls.__name__


def momentum_of(module: nn.Module) -> tuple[float | None, str]:
    """``(momentum in PyTorch's convention, wording)``; Keras-convention layers are converted to compare."""
    keras = getattr(module, "keras_momentum", None)
    if keras is not None:
        return 1.0 - float(keras), f"Keras momentum {float(keras):g} (= {1.0 - float(keras):g} PyTorch)"
    momentum = getattr(module, "momentum", None)
    if momentum is None:
        return None, "momentum=None: cumulative average"
    return float(momentum), f"momentum {float(momentum):g}"


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag on exit and forbid gradient recording inside.

    Flags are restored attribute by attribute rather than through ``train()``, so modules that override
    ``train()`` (frozen layers) keep exactly the flag they had.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def hooks_removed_on_exit() -> Iterator[list[Any]]:
    """Collects hook handles (append them to the yielded list) and removes them all on exit."""
    handles: list[Any] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def set_eval(model: nn.Module) -> None:
    """Put every module in eval mode by attribute (no ``train()`` override involved)."""
    for module in model.modules():
        module.training = False


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one batch: a tensor, ``(inputs, labels, ...)`` (inputs used), a dict (kwargs).

    Example:
        >>> call_model(nn.Identity(), (torch.ones(1), torch.zeros(1)))
        tensor([1.])
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise TypeError(
        f"cannot feed a batch of type {type(batch).__name__} to the model: give tensors, (inputs, labels) "
        "pairs or dicts of keyword arguments, or pass forward=callable(model, batch)"
    )


def call_with_example(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on example inputs: a tensor, a tuple/list of positional tensors, or a dict of kwargs."""
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of tensors or a dict, got {type(example_inputs).__name__}"
    )


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor found in a (possibly nested) tuple/list/dict, or None."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def limited(data: Iterable[Any], num_batches: int | None) -> Iterator[Any]:
    """The first ``num_batches`` items of ``data`` (all when None)."""
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches}")
    for index, item in enumerate(data):
        if num_batches is not None and index >= num_batches:
            return
        yield item


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm and batch-independent norm layers in module order, each once (as ``find.named_norms``)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if is_batchnorm(module) or is_batch_independent_norm(module)
    ]


ForwardFn = Callable[[nn.Module, Any], Any]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm layers only, in module order, each once (as ``layers.find.named_batchnorms``)."""
    return [(name, module) for name, module in model.named_modules() if is_batchnorm(module)]
