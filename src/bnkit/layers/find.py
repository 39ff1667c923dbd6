"""The one traversal of normalisation layers in a model, and layer selection by name, type or predicate."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Union

from torch import nn

from bnkit.layers.kinds import is_batchnorm_like
from bnkit.shared.selection import matches

__all__ = [
    "LayerSelector",
    "is_batch_independent_norm",
    "is_batchnorm",
    "named_batchnorms",
    "named_norms",
]

#: How tools choose layers: None (all), a glob on the qualified name (``"layer1.*"``), a module type or tuple
#: of types, a predicate ``(name, module) -> bool``, or an iterable of names/globs.
LayerSelector = Union[None, str, type, tuple, Callable[[str, nn.Module], bool], Iterable[str]]  # noqa: UP007


def is_batchnorm(module: nn.Module) -> bool:
    """True for ``torch.nn`` BatchNorm1d/2d/3d, LazyBatchNorm*, SyncBatchNorm, their subclasses and bnkit.BatchNorm.

    Example:
        >>> is_batchnorm(nn.BatchNorm2d(3)), is_batchnorm(nn.GroupNorm(1, 3))
        (True, False)
    """
    from bnkit.layers.batchnorm import BatchNorm

    return isinstance(module, (nn.modules.batchnorm._BatchNorm, BatchNorm))


def is_batch_independent_norm(module: nn.Module) -> bool:
    """True for normalisation layers whose output does not depend on the rest of the batch.

    GroupNorm, LayerNorm, RMSNorm and InstanceNorm without running statistics.

    Example:
        >>> is_batch_independent_norm(nn.LayerNorm(4))
        True
    """
    kinds: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    if hasattr(nn, "RMSNorm"):
        kinds = (*kinds, nn.RMSNorm)
    return isinstance(module, kinds)


_matches = matches


def named_batchnorms(model: nn.Module, layers: LayerSelector = None) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm layer of ``model`` at any depth, as ``(qualified_name, module)``, in module order.

    Only layers with ``torch.nn`` BatchNorm attributes (:func:`is_batchnorm`: ``torch.nn`` BatchNorm and its
    subclasses, timm's BatchNormAct2d included, and ``bnkit.BatchNorm``). Every other kind (FrozenBatchNorm2d,
    look-alikes, registered classes) is listed by :func:`bnkit.named_batchnorm_like`, with its description.

    ``layers`` narrows the selection (see :data:`LayerSelector`). A model that is itself a BatchNorm is
    returned under the name ``""``. Modules registered under several names are listed once.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> [name for name, _ in named_batchnorms(model)]
        ['1']
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if is_batchnorm(module) and _matches(layers, name, module)
    ]


def named_norms(model: nn.Module, layers: LayerSelector = None) -> list[tuple[str, nn.Module]]:
    """Every normalisation layer: each BatchNorm-like kind that :func:`bnkit.layers.kinds.describe_batchnorm`
    recognises (frozen and timm layers included) and the batch-independent norms (GroupNorm, LayerNorm, ...).

    Example:
        >>> model = nn.Sequential(nn.BatchNorm1d(4), nn.LayerNorm(4))
        >>> [type(m).__name__ for _, m in named_norms(model)]
        ['BatchNorm1d', 'LayerNorm']
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if (is_batch_independent_norm(module) or is_batchnorm_like(module)) and _matches(layers, name, module)
    ]
