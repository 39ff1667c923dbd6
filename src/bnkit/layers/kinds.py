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
``"bnkit"``                 ``bnkit.BatchNorm``
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

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

#: Every kind :func:`describe_batchnorm` reports (a registered class may also name its own kind).
KINDS = (
    "torch",
    "sync",
    "bnkit",
    "torchvision-frozen",
    "timm-bnact",
    "timm-sync-bnact",
    "timm-frozen",
    "timm-frozen-bnact",
    "lookalike-frozen",
    "registered",
)

#: Kinds whose statistics and gamma/beta are fixed by the class (buffers, inference-mode arithmetic always).
FROZEN_KINDS = frozenset({"torchvision-frozen", "timm-frozen", "timm-frozen-bnact", "lookalike-frozen"})

_TIMM_MODULES = ("timm.layers.norm_act", "timm.models.layers.norm_act")
_TORCHVISION_MODULES = ("torchvision.ops.misc",)


@dataclass(frozen=True, eq=False)
class BatchNormInfo:
    """What bnkit knows about one BatchNorm-like layer (a view: the tensors are the layer's own, not copies).

    Attributes:
        module: the layer itself.
        kind: one of :data:`KINDS` (or the kind a :func:`register_batchnorm` call gave).
        num_features: channels ``C`` (0 for a lazy layer that has not seen an input).
        channel_axis: the channel axis of the input as the layer states it (1 for ``torch.nn``; ``bnkit.BatchNorm``
            accepts any int, negative counting from the end: use :meth:`axis_for` for an input's rank).
        spatial_dims: 1, 2 or 3 for BatchNorm1d/2d/3d-shaped layers, None when the layer takes any rank.
        eps: added to the variance.
        momentum: the running-average momentum in the layer's own convention (None: a cumulative average for
            ``torch``-convention layers, or no momentum at all for frozen layers).
        momentum_convention: ``"torch"`` (weight of the new batch), ``"keras"`` (weight of the old statistics) or
            None (the layer has no momentum: frozen kinds).
        running_mean: the running mean buffer, or None (no running statistics).
        running_var: the running variance buffer, or None.
        num_batches_tracked: the batch counter buffer, or None (frozen kinds have none).
        weight: gamma (a parameter, or a buffer when ``affine_is_buffer``), or None.
        bias: beta, or None.
        affine_is_buffer: gamma/beta are buffers, never trained (FrozenBatchNorm2d).
        activation: the module applied after normalising (timm's ``act``), or None (identity).
        drop: a module applied between normalising and the activation (timm's ``drop``), or None.
        frozen: the layer normalises with its running statistics whatever its training flag, and never updates
            them: a frozen kind, ``bnkit.BatchNorm(freeze_stats=True)`` or a layer frozen by :func:`bnkit.freeze`.
        updates_stats: a training-mode forward would update the running statistics (running statistics are
            tracked and the layer is not frozen).
        lazy: a ``torch.nn`` LazyBatchNorm that has not seen an input yet (no shapes).
        fixed: the class itself fixes the statistics (a frozen kind, or a class registered with ``frozen=True``):
            no switch unfreezes them, and only ``bnkit.recalibrate(..., include_frozen=True)`` rewrites them.

    Example:
        >>> info = describe_batchnorm(nn.BatchNorm2d(8, momentum=0.2))
        >>> info.kind, info.num_features, info.spatial_dims, info.momentum, info.momentum_convention, info.frozen
        ('torch', 8, 2, 0.2, 'torch', False)
    """

    module: nn.Module
    kind: str
    num_features: int
    channel_axis: int
    spatial_dims: int | None
    eps: float
    momentum: float | None
    momentum_convention: str | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    affine_is_buffer: bool
    activation: nn.Module | None
    drop: nn.Module | None
    frozen: bool
    updates_stats: bool
    lazy: bool = False
    fixed: bool = False

    @property
    def has_running_stats(self) -> bool:
        """Both running statistics exist (``track_running_stats=True`` or a frozen kind).

        Example:
            >>> describe_batchnorm(nn.BatchNorm1d(2, track_running_stats=False)).has_running_stats
            False
        """
        return self.running_mean is not None and self.running_var is not None

    @property
    def has_affine(self) -> bool:
        """gamma and beta exist (as parameters or buffers).

        Example:
            >>> describe_batchnorm(nn.BatchNorm1d(2, affine=False)).has_affine
            False
        """
        return self.weight is not None and self.bias is not None

    @property
    def torch_momentum(self) -> float | None:
        """The momentum in PyTorch's convention (weight of the new batch): ``1 - m`` for Keras's ``m``.

        Example:
            >>> describe_batchnorm(nn.BatchNorm1d(2)).torch_momentum
            0.1
        """
        if self.momentum is None or self.momentum_convention != "keras":
            return self.momentum
        return 1.0 - self.momentum

    @property
    def after(self) -> tuple[nn.Module, ...]:
        """The modules applied after normalising, in order (``drop`` then ``activation``; empty for plain BN).

        Example:
            >>> describe_batchnorm(nn.BatchNorm1d(2)).after
            ()
        """
        return tuple(m for m in (self.drop, self.activation) if m is not None)

    def axis_for(self, ndim: int) -> int:
        """The non-negative channel axis for an input of rank ``ndim``.

        Example:
            >>> describe_batchnorm(nn.BatchNorm1d(2)).axis_for(3)
            1
        """
        return self.channel_axis % ndim if self.channel_axis < 0 else self.channel_axis


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Registration:
    kind: str
    describe: Callable[[nn.Module], BatchNormInfo] | None
    num_features: str | int | None
    channel_axis: int
    spatial_dims: int | None
    eps: str | float
    momentum: str | float | None
    momentum_convention: str | None
    running_mean: str
    running_var: str
    weight: str | None
    bias: str | None
    activation: str | None
    drop: str | None
    frozen: bool
    updates_stats: bool | None


_REGISTRY: dict[type, _Registration] = {}


def register_batchnorm(
    cls: type,
    *,
    kind: str = "registered",
    describe: Callable[[nn.Module], BatchNormInfo] | None = None,
    num_features: str | int | None = "num_features",
    channel_axis: int = 1,
    spatial_dims: int | None = None,
    eps: str | float = "eps",
    momentum: str | float | None = None,
    momentum_convention: str | None = None,
    running_mean: str = "running_mean",
    running_var: str = "running_var",
    weight: str | None = "weight",
    bias: str | None = "bias",
    activation: str | None = None,
    drop: str | None = None,
    frozen: bool = False,
    updates_stats: bool | None = None,
) -> None:
    """Teach bnkit a BatchNorm-like layer class of your own, so every tool sees it (subclasses included).

    Each option names the attribute of an instance that holds the value (a string) or gives the value itself
    (a number). The layer must compute ``weight * (x - running_mean) / sqrt(running_var + eps) + bias`` over
    ``channel_axis`` when it uses its running statistics; tools rely on that. For anything more exotic pass
    ``describe``, a function ``module -> BatchNormInfo``, instead of the attribute options. Registering a class
    again replaces its registration; registered classes take precedence over bnkit's built-in recognition.

    Args:
        cls: the layer class (an ``nn.Module`` subclass).
        kind: the kind reported in :attr:`BatchNormInfo.kind`.
        describe: a function that describes an instance completely; the other options must then be left out.
        num_features: attribute or value; when the attribute is missing, the running mean's length.
        channel_axis: the channel axis of the input (negative counts from the end).
        spatial_dims: 1, 2 or 3 for BatchNorm1d/2d/3d-shaped layers, None for any rank.
        eps: attribute name or value.
        momentum: attribute name, value or None (no momentum, e.g. a frozen layer).
        momentum_convention: ``"torch"``, ``"keras"`` or None; required with ``momentum``.
        running_mean: attribute name of the running mean.
        running_var: attribute name of the running variance.
        weight: attribute name of gamma, or None when the layer has none.
        bias: attribute name of beta, or None.
        activation: attribute name of a module applied after normalising, or None.
        drop: attribute name of a module applied between normalising and ``activation``, or None.
        frozen: the class always normalises with its running statistics and never updates them.
        updates_stats: whether a training-mode forward updates the running statistics (default: ``not frozen``).

    Raises:
        TypeError: ``cls`` is not an ``nn.Module`` subclass, or an option has the wrong type.
        ValueError: ``describe`` combined with attribute options, a bad kind, convention or spatial_dims.

    Example:
        >>> import torch
        >>> class FixedNorm(nn.Module):  # a layer bnkit does not know: frozen statistics in "mu" and "var"
        ...     def __init__(self, c):
        ...         super().__init__()
        ...         self.register_buffer("mu", torch.zeros(c))
        ...         self.register_buffer("var", torch.ones(c))
        ...         self.eps = 1e-3
        ...     def forward(self, x):
        ...         return (x - self.mu[:, None]) / (self.var[:, None] + self.eps).sqrt()
        >>> register_batchnorm(FixedNorm, running_mean="mu", running_var="var", weight=None, bias=None, frozen=True)
        >>> info = describe_batchnorm(FixedNorm(4))
        >>> info.kind, info.num_features, info.eps, info.frozen, info.updates_stats
        ('registered', 4, 0.001, True, False)
        >>> unregister_batchnorm(FixedNorm)
        True
    """
    where = "bnkit.register_batchnorm"
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{where}: cls must be an nn.Module subclass; got {cls!r}")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{where}: kind must be a non-empty string; got {kind!r}")
    label = f"{where}({cls.__name__})"
    if describe is not None:
        if not callable(describe):
            raise TypeError(f"{label}: describe must be a callable module -> BatchNormInfo; got {describe!r}")
        defaults = {
            "num_features": (num_features, "num_features"),
            "channel_axis": (channel_axis, 1),
            "spatial_dims": (spatial_dims, None),
            "eps": (eps, "eps"),
            "momentum": (momentum, None),
            "momentum_convention": (momentum_convention, None),
            "running_mean": (running_mean, "running_mean"),
            "running_var": (running_var, "running_var"),
            "weight": (weight, "weight"),
            "bias": (bias, "bias"),
            "activation": (activation, None),
            "drop": (drop, None),
            "frozen": (frozen, False),
            "updates_stats": (updates_stats, None),
        }
        changed = [key for key, (value, default) in defaults.items() if value != default]
        if changed:
            raise ValueError(f"{label}: describe= describes the layer completely; leave out {', '.join(changed)}")
    for option, value in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(value, str):
            raise TypeError(f"{label}: {option} must be an attribute name (str); got {value!r}")
    for option, value in (("weight", weight), ("bias", bias), ("activation", activation), ("drop", drop)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{label}: {option} must be an attribute name (str) or None; got {value!r}")
    for option, value in (("eps", eps), ("momentum", momentum), ("num_features", num_features)):
        if isinstance(value, bool) or not (value is None or isinstance(value, (str, int, float))):
            raise TypeError(f"{label}: {option} must be an attribute name or a number; got {value!r}")
    if eps is None:
        raise TypeError(f"{label}: eps must be an attribute name or a number; got None")
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
        raise TypeError(f"{label}: channel_axis must be an int; got {channel_axis!r}")
    if spatial_dims not in (None, 1, 2, 3):
        raise ValueError(f"{label}: spatial_dims must be 1, 2, 3 or None; got {spatial_dims!r}")
    if momentum_convention not in (None, "torch", "keras"):
        raise ValueError(f"{label}: momentum_convention must be 'torch', 'keras' or None; got {momentum_convention!r}")
    if momentum is not None and momentum_convention is None:
        raise ValueError(f"{label}: momentum given without momentum_convention ('torch' or 'keras')")
    for option, value in (("frozen", frozen),):
        if not isinstance(value, bool):
            raise TypeError(f"{label}: {option} must be True or False; got {value!r}")
    if updates_stats is not None and not isinstance(updates_stats, bool):
        raise TypeError(f"{label}: updates_stats must be True, False or None; got {updates_stats!r}")
    if frozen and updates_stats:
        raise ValueError(f"{label}: a frozen layer cannot update its statistics (frozen=True, updates_stats=True)")
    _REGISTRY[cls] = _Registration(
        kind,
        describe,
        num_features,
        channel_axis,
        spatial_dims,
        eps,
        momentum,
        momentum_convention,
        running_mean,
        running_var,
        weight,
        bias,
        activation,
        drop,
        frozen,
        updates_stats,
    )


def unregister_batchnorm(cls: type) -> bool:
    """Forget a class taught with :func:`register_batchnorm`; True when it was registered.

    Example:
        >>> unregister_batchnorm(nn.Linear)
        False
    """
    return _REGISTRY.pop(cls, None) is not None


def _registration(module: nn.Module) -> _Registration | None:
    for cls in type(module).__mro__:
        registration = _REGISTRY.get(cls)
        if registration is not None:
            return registration
    return None


def _read(module: nn.Module, reg_name: str, option: str, value: Any, *, required: bool = True) -> Any:
    if not isinstance(value, str):
        return value
    if hasattr(module, value):
        return getattr(module, value)
    if not required:
        return None
    raise ValueError(
        f"{type(module).__name__}: registered with {option}={value!r} but the layer has no attribute {value!r}; "
        f"call bnkit.register_batchnorm({type(module).__name__}, {option}=...) with the right name"
    )


def _describe_registered(module: nn.Module, reg: _Registration) -> BatchNormInfo:
    if reg.describe is not None:
        info = reg.describe(module)
        if not isinstance(info, BatchNormInfo) or info.module is not module:
            raise TypeError(
                f"{type(module).__name__}: the describe function given to bnkit.register_batchnorm must return a "
                f"BatchNormInfo for the module it is given; got {type(info).__name__}"
            )
        return info
    name = type(module).__name__
    mean = _read(module, name, "running_mean", reg.running_mean)
    var = _read(module, name, "running_var", reg.running_var)
    weight = _read(module, name, "weight", reg.weight) if reg.weight else None
    bias = _read(module, name, "bias", reg.bias) if reg.bias else None
    features = _read(module, name, "num_features", reg.num_features, required=False)
    if features is None:
        ref = mean if isinstance(mean, Tensor) else weight
        features = int(ref.shape[0]) if isinstance(ref, Tensor) and ref.ndim == 1 else 0
    eps = float(_read(module, name, "eps", reg.eps))
    momentum = _read(module, name, "momentum", reg.momentum)
    activation = _read(module, name, "activation", reg.activation) if reg.activation else None
    drop = _read(module, name, "drop", reg.drop) if reg.drop else None
    has_stats = isinstance(mean, Tensor) and isinstance(var, Tensor)
    frozen = reg.frozen or _frozen_by_bnkit(module)
    updates = (not frozen and has_stats) if reg.updates_stats is None else (reg.updates_stats and not frozen)
    return BatchNormInfo(
        module=module,
        kind=reg.kind,
        num_features=int(features),
        channel_axis=reg.channel_axis,
        spatial_dims=reg.spatial_dims,
        eps=eps,
        momentum=None if momentum is None else float(momentum),
        momentum_convention=reg.momentum_convention,
        running_mean=mean if isinstance(mean, Tensor) else None,
        running_var=var if isinstance(var, Tensor) else None,
        num_batches_tracked=_tensor(module, "num_batches_tracked"),
        weight=weight if isinstance(weight, Tensor) else None,
        bias=bias if isinstance(bias, Tensor) else None,
        affine_is_buffer=_is_buffer(weight) or _is_buffer(bias),
        activation=_not_identity(activation),
        drop=_not_identity(drop),
        frozen=frozen,
        updates_stats=updates,
        fixed=reg.frozen,
    )


# ---------------------------------------------------------------------------------------------- built-in kinds


def _tensor(module: nn.Module, attr: str) -> Tensor | None:
    value = getattr(module, attr, None)
    return value if isinstance(value, Tensor) else None


def _is_buffer(tensor: Any) -> bool:
    return isinstance(tensor, Tensor) and not isinstance(tensor, nn.Parameter)


def _not_identity(module: Any) -> nn.Module | None:
    if not isinstance(module, nn.Module) or isinstance(module, nn.Identity):
        return None
    return module


def _frozen_by_bnkit(module: nn.Module) -> bool:
    """A torch BatchNorm frozen by :func:`bnkit.freeze` (its pre-hook says so; bnkit.tools defines it)."""
    return any(
        getattr(hook, "bnkit_freezes_stats", False) and getattr(hook, "enabled", True)
        for hook in module._forward_pre_hooks.values()
    )


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


def _describe_bnkit(module: nn.Module) -> BatchNormInfo:
    keras = module.keras_momentum is not None
    frozen = bool(module.freeze_stats)
    return BatchNormInfo(
        module=module,
        kind="bnkit",
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
        activation=None,
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
    registration = _registration(module)
    if registration is not None:
        return _describe_registered(module, registration)
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
