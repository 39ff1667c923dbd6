"""Teaching bnkit a BatchNorm-like layer class of your own: :func:`register_batchnorm`, :func:`unregister_batchnorm`,
and the description of a registered layer that :func:`bnkit.layers.kinds.describe_batchnorm` gives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from bnkit.layers.bn_info import BatchNormInfo, _frozen_by_bnkit, _is_buffer, _not_identity, _tensor

__all__ = ["describe_registered", "register_batchnorm", "registration_of", "unregister_batchnorm"]


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
        >>> from bnkit.layers.kinds import describe_batchnorm
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


def registration_of(module: nn.Module) -> _Registration | None:
    """The registration that applies to ``module`` (its class or the nearest registered base class), or None.

    Example:
        >>> registration_of(nn.BatchNorm2d(2)) is None
        True
    """
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


def describe_registered(module: nn.Module, reg: _Registration) -> BatchNormInfo:
    """Describe an instance of a registered class, as its registration says.

    Raises:
        ValueError: the instance lacks an attribute its registration names.
        TypeError: a ``describe`` function returned something other than a BatchNormInfo for this module.

    Example:
        >>> registration_of(nn.Linear(1, 1)) is None
        True
    """
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
