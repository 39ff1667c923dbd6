"""One description of "a BatchNorm-like layer" that every tool uses: :class:`BatchNormInfo`.

The ecosystem ships many BatchNorm layers that are not ``torch.nn`` BatchNorm: torchvision's and timm's
``FrozenBatchNorm2d`` (statistics and gamma/beta are buffers), timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``
(BatchNorm followed by dropout and an activation in the same module), timm's ``FrozenBatchNormAct2d``, and
look-alikes such as detectron2's ``FrozenBatchNorm2d``. :func:`describe_batchnorm` reads any of them into one
frozen record: channels and channel axis, eps, momentum and its convention, running statistics, gamma/beta (and
whether they are buffers), what is applied after normalising, and whether the layer is frozen and can update its
statistics. Tools ask this record instead of assuming ``torch.nn`` attributes.

torchvision and timm are never imported here: their classes are recognised through ``sys.modules`` (an instance
of a class exists only once its module is imported), look-alikes by their buffers. :func:`register_batchnorm`
teaches bnkit a layer of your own.

Kinds (:data:`KINDS`):

==========================  ==========================================================================
kind                        layers
==========================  ==========================================================================
``"torch"``                 ``torch.nn`` BatchNorm1d/2d/3d, LazyBatchNorm1d/2d/3d and other subclasses
``"sync"``                  ``torch.nn.SyncBatchNorm``
``"bnkit"``                 ``bnkit.BatchNorm`` (and subclasses other than the one below)
``"bnkit-bnact"``           ``bnkit.BatchNormAct`` (and subclasses): ``activation`` is a ``torch.nn`` module
                            equal to its activation (``nn.ReLU()``, ``nn.LeakyReLU(slope)``, ``nn.ELU(alpha)``)
``"torchvision-frozen"``    ``torchvision.ops.FrozenBatchNorm2d`` (timm re-exports this class)
``"timm-bnact"``            ``timm.layers.BatchNormAct2d``
``"timm-sync-bnact"``       ``timm.layers.SyncBatchNormAct``
``"timm-frozen"``           a ``FrozenBatchNorm2d`` defined by timm itself (older timm releases)
``"timm-frozen-bnact"``     ``timm.layers.FrozenBatchNormAct2d``
``"lookalike-frozen"``      any other module whose ``weight``, ``bias``, ``running_mean`` and ``running_var``
                            are all buffers of one shape ``[C]`` and that has a float ``eps`` (detectron2)
``"registered"``            classes taught with :func:`register_batchnorm` (or the kind given there)
==========================  ==========================================================================
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from bnkit.layers.bn_info import (
    FROZEN_KINDS,
    KINDS,
    BatchNormInfo,
    _frozen_by_bnkit,
    _not_identity,
    _tensor,
)
from bnkit.layers.registry import describe_registered, register_batchnorm, registration_of, unregister_batchnorm
from bnkit.shared.selection import Selector, matches

__all__ = [
    "FROZEN_KINDS",
    "KINDS",
    "BatchNormInfo",
    "describe_batchnorm",
    "is_batchnorm_like",
    "named_batchnorm_like",
    "register_batchnorm",
    "unrecognised_running_stats",
    "unregister_batchnorm",
    "warn_unrecognised",
]

_TIMM_MODULES = ("timm.layers.norm_act", "timm.models.layers.norm_act")
_TORCHVISION_MODULES = ("torchvision.ops.misc",)


def _classes(modules: tuple[str, ...], name: str) -> tuple[type, ...]:
    """The classes called ``name`` in those of ``modules`` already imported (never imports anything)."""
    found = []
    for module_name in modules:
        module = sys.modules.get(module_name)
        cls = getattr(module, name, None) if module is not None else None
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _spatial_dims(module: nn.Module) -> int | None:
    target = getattr(type(module), "cls_to_become", None) or type(module)  # LazyBatchNormNd becomes BatchNormNd
    for dims, cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(target, type) and issubclass(target, cls):
            return dims
    return None


def _is_lazy(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), nn.parameter.UninitializedBuffer) or isinstance(
        getattr(module, "weight", None), nn.parameter.UninitializedParameter
    )


def _describe_torch(module: nn.Module, kind: str, spatial_dims: int | None) -> BatchNormInfo:
    lazy = _is_lazy(module)
    mean, var = _tensor(module, "running_mean"), _tensor(module, "running_var")
    weight, bias = _tensor(module, "weight"), _tensor(module, "bias")
    frozen = _frozen_by_bnkit(module)
    return BatchNormInfo(
        module=module,
        kind=kind,
        num_features=int(getattr(module, "num_features", 0) or 0),
        channel_axis=1,
        spatial_dims=spatial_dims,
        eps=float(module.eps),
        momentum=None if module.momentum is None else float(module.momentum),
        momentum_convention="torch",
        running_mean=mean,
        running_var=var,
        num_batches_tracked=_tensor(module, "num_batches_tracked"),
        weight=weight,
        bias=bias,
        affine_is_buffer=False,
        activation=_not_identity(getattr(module, "act", None)) if kind.startswith("timm") else None,
        drop=_not_identity(getattr(module, "drop", None)) if kind.startswith("timm") else None,
        frozen=frozen,
        updates_stats=bool(module.track_running_stats) and mean is not None and not frozen,
        lazy=lazy,
    )


def _bnact_activation(module: nn.Module) -> nn.Module | None:
    """A ``torch.nn`` module computing ``bnkit.BatchNormAct``'s activation (None for the identity)."""
    activation = getattr(module, "activation", "identity")
    if activation == "relu":
        return nn.ReLU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(module.negative_slope)
    if activation == "elu":
        return nn.ELU(module.alpha)
    return None


def _describe_bnkit(module: nn.Module) -> BatchNormInfo:
    from bnkit.layers.batchnorm_act import BatchNormAct

    keras = module.keras_momentum is not None
    frozen = bool(module.freeze_stats)
    bnact = isinstance(module, BatchNormAct)
    return BatchNormInfo(
        module=module,
        kind="bnkit-bnact" if bnact else "bnkit",
        num_features=int(module.num_features),
        channel_axis=int(module.axis),
        spatial_dims=None,
        eps=float(module.eps),
        momentum=float(module.keras_momentum) if keras else module.momentum,
        momentum_convention="keras" if keras else "torch",
        running_mean=module.running_mean,
        running_var=module.running_var,
        num_batches_tracked=module.num_batches_tracked,
        weight=module.weight,
        bias=module.bias,
        affine_is_buffer=False,
        activation=_bnact_activation(module) if bnact else None,
        drop=None,
        frozen=frozen,
        updates_stats=bool(module.track_running_stats) and not frozen,
    )


def _describe_frozen(module: nn.Module, kind: str) -> BatchNormInfo:
    mean = module.running_mean
    name = type(module).__name__.lower()
    spatial = next((d for d in (1, 2, 3) if f"{d}d" in name), None) if kind == "lookalike-frozen" else 2
    return BatchNormInfo(
        module=module,
        kind=kind,
        num_features=int(mean.shape[0]),
        channel_axis=1,
        spatial_dims=spatial,
        eps=float(module.eps),
        momentum=None,
        momentum_convention=None,
        running_mean=mean,
        running_var=module.running_var,
        num_batches_tracked=_tensor(module, "num_batches_tracked"),
        weight=module.weight,
        bias=module.bias,
        affine_is_buffer=True,
        activation=_not_identity(getattr(module, "act", None)) if kind == "timm-frozen-bnact" else None,
        drop=_not_identity(getattr(module, "drop", None)) if kind == "timm-frozen-bnact" else None,
        frozen=True,
        updates_stats=False,
        fixed=True,
    )


def _looks_frozen(module: nn.Module) -> bool:
    """The FrozenBatchNorm2d shape: weight, bias, running_mean, running_var all buffers of one shape [C]; eps."""
    buffers = dict(module.named_buffers(recurse=False))
    tensors = [buffers.get(key) for key in ("weight", "bias", "running_mean", "running_var")]
    if not all(isinstance(t, Tensor) and t.ndim == 1 and t.is_floating_point() for t in tensors):
        return False
    if len({tuple(t.shape) for t in tensors}) != 1:  # type: ignore[union-attr]
        return False
    eps = getattr(module, "eps", None)
    return isinstance(eps, (float, int)) and not isinstance(eps, bool)


def describe_batchnorm(module: Any) -> BatchNormInfo | None:
    """Describe a BatchNorm-like layer, or None when ``module`` is not one bnkit recognises.

    Recognition order: classes taught with :func:`register_batchnorm`, ``bnkit.BatchNorm``, timm's and
    torchvision's classes (only when their modules are already imported: this never imports them),
    ``torch.nn`` BatchNorm and its subclasses, then look-alikes of ``FrozenBatchNorm2d`` by their buffers.

    Args:
        module: any object (non-modules and TorchScript modules give None).

    Returns:
        A :class:`BatchNormInfo`, or None.

    Raises:
        ValueError: a registered class whose instance lacks an attribute its registration names.

    Example:
        >>> describe_batchnorm(nn.SyncBatchNorm(4)).kind, describe_batchnorm(nn.Conv2d(1, 1, 1)) is None
        ('sync', True)
    """
    if not isinstance(module, nn.Module) or isinstance(module, torch.jit.ScriptModule):
        return None  # a TorchScript module is compiled code: no tool can edit it
    registration = registration_of(module)
    if registration is not None:
        return describe_registered(module, registration)
    from bnkit.layers.batchnorm import BatchNorm

    if isinstance(module, BatchNorm):
        return _describe_bnkit(module)
    frozen_bnact = _classes(_TIMM_MODULES, "FrozenBatchNormAct2d")
    if frozen_bnact and isinstance(module, frozen_bnact):
        return _describe_frozen(module, "timm-frozen-bnact")
    vision_frozen = _classes(_TORCHVISION_MODULES, "FrozenBatchNorm2d")
    if vision_frozen and isinstance(module, vision_frozen):
        return _describe_frozen(module, "torchvision-frozen")
    timm_frozen = tuple(c for c in _classes(_TIMM_MODULES, "FrozenBatchNorm2d") if c not in vision_frozen)
    if timm_frozen and isinstance(module, timm_frozen):
        return _describe_frozen(module, "timm-frozen")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        sync_act = _classes(_TIMM_MODULES, "SyncBatchNormAct")
        if sync_act and isinstance(module, sync_act):
            return _describe_torch(module, "timm-sync-bnact", None)
        bn_act = _classes(_TIMM_MODULES, "BatchNormAct2d")
        if bn_act and isinstance(module, bn_act):
            return _describe_torch(module, "timm-bnact", 2)
        if isinstance(module, nn.SyncBatchNorm):
            return _describe_torch(module, "sync", None)
        return _describe_torch(module, "torch", _spatial_dims(module))
    if _looks_frozen(module):
        return _describe_frozen(module, "lookalike-frozen")
    return None


def is_batchnorm_like(module: Any) -> bool:
    """True when :func:`describe_batchnorm` recognises ``module`` (every kind, frozen ones included).

    Example:
        >>> is_batchnorm_like(nn.BatchNorm1d(2)), is_batchnorm_like(nn.LayerNorm(2))
        (True, False)
    """
    return describe_batchnorm(module) is not None


def named_batchnorm_like(model: nn.Module, layers: Selector = None) -> list[tuple[str, BatchNormInfo]]:
    """Every BatchNorm-like layer of ``model`` at any depth, as ``(qualified_name, info)``, in module order.

    Unlike :func:`bnkit.named_batchnorms` (``torch.nn`` BatchNorm and ``bnkit.BatchNorm`` only), this lists
    every kind of :data:`KINDS`: frozen layers, timm's BatchNormAct, look-alikes and registered classes.
    ``layers`` narrows the selection (a glob, a type, a predicate ``(name, module) -> bool`` or a list of
    names). A model that is itself such a layer is listed under ``""``; shared modules are listed once.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> [(name, info.kind) for name, info in named_batchnorm_like(model)]
        [('1', 'torch')]
    """
    found = []
    for name, module in model.named_modules():
        if not matches(layers, name, module):
            continue
        info = describe_batchnorm(module)
        if info is not None:
            found.append((name, info))
    return found


def _is_batch_independent(module: nn.Module) -> bool:
    kinds: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    return isinstance(module, kinds)


def unrecognised_running_stats(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding ``running_mean`` and ``running_var`` tensors that bnkit does not recognise.

    Tools warn about these and name them in their reports: such a layer is probably a BatchNorm that bnkit
    cannot handle until it is taught with :func:`register_batchnorm`. InstanceNorm with running statistics is
    a known batch-independent layer and is not listed.

    Example:
        >>> import torch
        >>> class Odd(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_buffer("running_mean", torch.zeros(2))
        ...         self.register_buffer("running_var", torch.ones(2))
        >>> [name for name, _ in unrecognised_running_stats(nn.Sequential(nn.BatchNorm1d(2), Odd()))]
        ['1']
    """
    found = []
    for name, module in model.named_modules():
        if not (
            isinstance(getattr(module, "running_mean", None), Tensor)
            and isinstance(getattr(module, "running_var", None), Tensor)
        ):
            continue
        if _is_batch_independent(module) or describe_batchnorm(module) is not None:
            continue
        found.append((name, module))
    return found


def warn_unrecognised(model: nn.Module, tool: str, *, stacklevel: int = 3) -> tuple[str, ...]:
    """Warn (one line) about the modules :func:`unrecognised_running_stats` finds; return their names.

    Example:
        >>> warn_unrecognised(nn.Sequential(nn.BatchNorm1d(2)), "explain")
        ()
    """
    names = tuple(name or "<model>" for name, _ in unrecognised_running_stats(model))
    if names:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        warnings.warn(
            f"{tool}: modules with running statistics that bnkit does not recognise were left out: {shown}; "
            "teach bnkit their class with bnkit.register_batchnorm(cls, ...)",
            UserWarning,
            stacklevel=stacklevel,
        )
    return names
