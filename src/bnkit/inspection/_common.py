"""Shared machinery of the inspection tools: the mode rule per layer kind and the facts the reports word.

Private: the public entry points are explain, summary, doctor and shift. Layer traversal comes from
:mod:`bnkit.layers.find`; calling and running a model without changing it from :mod:`bnkit.tools._common`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnkit.layers.find import is_batch_independent_norm
from bnkit.layers.kinds import BatchNormInfo, describe_batchnorm
from bnkit.tools.freeze import is_frozen_stats
from bnkit.tools.model_edit import has_running_buffers, is_bnkit_batchnorm


def fixed_by_class(module: nn.Module) -> BatchNormInfo | None:
    """The description of a layer whose class fixes its statistics (FrozenBatchNorm2d and friends, a registered
    ``frozen=True`` class), else None.

    Example:
        >>> fixed_by_class(nn.BatchNorm2d(2)) is None
        True
    """
    info = describe_batchnorm(module)
    return info if info is not None and info.fixed else None


def frozen_by_bnkit(module: nn.Module) -> tuple[bool, bool]:
    """``(stats_frozen, affine_frozen)`` as set by ``bnkit.freeze`` (or bnkit.BatchNorm's own switches).

    For torch layers a frozen affine is plain ``requires_grad=False`` and cannot be told apart from a manual
    freeze, so only bnkit layers report ``affine_frozen``; callers word torch layers through requires_grad.

    Example:
        >>> frozen_by_bnkit(nn.BatchNorm1d(2))
        (False, False)
    """
    if is_bnkit_batchnorm(module):
        return bool(module.freeze_stats), bool(module.freeze_affine)
    if fixed_by_class(module) is not None:
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
    """True when the layer keeps running statistics (``track_running_stats`` and the buffers exist).

    Example:
        >>> has_running_stats(nn.BatchNorm1d(2)), has_running_stats(nn.BatchNorm1d(2, track_running_stats=False))
        (True, False)
    """
    info = describe_batchnorm(module)
    if info is not None and not hasattr(module, "track_running_stats"):
        return info.has_running_stats  # frozen and registered kinds: the buffers are the statistics
    tracked = bool(getattr(module, "track_running_stats", False))
    return tracked and getattr(module, "running_mean", None) is not None


def never_updated(module: nn.Module) -> bool:
    """True when the running statistics are still at their initial values: mean 0, variance 1, 0 batches seen.

    Example:
        >>> never_updated(nn.BatchNorm1d(2)), never_updated(nn.BatchNorm1d(2, track_running_stats=False))
        (True, False)
    """
    info = describe_batchnorm(module)
    count = getattr(module, "num_batches_tracked", None)
    if info is not None and info.num_batches_tracked is None and info.frozen and info.has_running_stats:
        # frozen kinds keep no counter: statistics at exactly 0/1 were never loaded
        return bool(torch.all(info.running_mean == 0)) and bool(torch.all(info.running_var == 1))
    if not isinstance(count, torch.Tensor) or int(count) != 0:
        return False
    return bool(torch.all(module.running_mean == 0)) and bool(torch.all(module.running_var == 1))


def is_synchronized(module: nn.Module) -> bool:
    """True for layers whose batch statistics are merged across processes (SyncBatchNorm, bnkit ``sync=True``).

    Example:
        >>> is_synchronized(nn.SyncBatchNorm(2)), is_synchronized(nn.BatchNorm2d(2))
        (True, False)
    """
    if isinstance(module, nn.SyncBatchNorm):
        return True
    return is_bnkit_batchnorm(module) and bool(module.sync)


def mode_in(module: nn.Module, training: bool) -> Mode:
    """What ``module`` does after ``model.train()`` (``training=True``) or ``model.eval()``.

    bnkit.BatchNorm answers through its own mode rule; torch BN layers follow PyTorch's rule (batch statistics
    when training or without running buffers; updates when training with ``track_running_stats``), unless
    ``bnkit.freeze`` froze their statistics, which then survive ``model.train()``.

    Example:
        >>> mode_in(nn.BatchNorm1d(2), True), mode_in(nn.LayerNorm(2), False).normalize
        (Mode(normalize='batch', updates_running_stats=True, synchronized=False), 'per-sample')
    """
    synced = is_synchronized(module)
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
    if fixed_by_class(module) is not None:
        return Mode("running", False)
    # PyTorch's rule: training uses the batch and updates only while tracking; eval uses the running buffers
    # whenever they exist, even with track_running_stats switched off after construction.
    stats_frozen, _ = frozen_by_bnkit(module)
    in_training = training and not stats_frozen
    use_batch = in_training or not has_running_buffers(module)
    updates = in_training and has_running_stats(module)
    return Mode("batch" if use_batch else "running", updates, synced and use_batch)


def channel_axis(module: nn.Module, ndim: int) -> int:
    """Non-negative channel axis of the layer for an input of rank ``ndim`` (1 for torch BN layers).

    Example:
        >>> channel_axis(nn.BatchNorm2d(3), 4), channel_axis(nn.BatchNorm1d(3), 1)
        (1, 0)
    """
    axis_fn = getattr(module, "channel_axis", None)
    if callable(axis_fn):
        return int(axis_fn(ndim))
    return 1 if ndim > 1 else 0


def num_channels(module: nn.Module) -> int | None:
    """The number of channels a norm layer normalises, or None when it is not known (lazy layers).

    Example:
        >>> num_channels(nn.BatchNorm2d(3)), num_channels(nn.LayerNorm([4, 5])), num_channels(nn.LazyBatchNorm2d())
        (3, 20, None)
    """
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    info = describe_batchnorm(module)
    if info is not None and info.num_features > 0:
        return info.num_features
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(math.prod(shape))
    return None


def layer_type(module: nn.Module) -> str:
    """The class name, qualified with ``bnkit.`` for bnkit layers so they stand out from torch's.

    Example:
        >>> layer_type(nn.BatchNorm2d(3))
        'BatchNorm2d'
    """
    cls = type(module)
    if cls.__module__.startswith("bnkit."):
        return f"bnkit.{cls.__name__}"
    original = getattr(module, "original_name", None)  # a TorchScript module keeps its class name here
    if isinstance(module, torch.jit.ScriptModule) and isinstance(original, str):
        return original
    return cls.__name__


def limited(data: Iterable[Any], num_batches: int | None) -> Iterator[Any]:
    """The first ``num_batches`` items of ``data`` (all when None).

    Example:
        >>> list(limited("abc", 2))
        ['a', 'b']
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches}")
    for index, item in enumerate(data):
        if num_batches is not None and index >= num_batches:
            return
        yield item
