"""One BatchNorm-like layer at a time: what it is (its kind) and its replacement for each ``convert`` target.

A builder returns the layer itself (already in the target form), a new layer, or raises :class:`Leave` with the
reason the layer stays as it is (``warn=False``: a deliberate choice, e.g. a frozen layer under ``"bnkit"``;
``warn=True``: the target cannot hold it, e.g. timm's ``BatchNormAct2d`` under ``"bnkit"``). Errors that the
user can fix (an unknown rank, a lazy layer, a bnkit setting torch cannot express) raise ``ValueError``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bnkit.layers.kinds import describe_batchnorm
from bnkit.layers.torch_layer import copy_grad_flags
from bnkit.tools.freeze import _set_stats, is_frozen_affine, is_frozen_stats
from bnkit.tools.model_edit import bnkit_batchnorm_class, is_bnkit_batchnorm

TORCH_CLASSES: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Leave(Exception):
    """The layer stays as it is, for ``reason``; ``warn`` when the user asked for something it did not get.

    Example:
        >>> Leave("frozen layer", warn=False).reason
        'frozen layer'
    """

    def __init__(self, reason: str, warn: bool) -> None:
        super().__init__(reason)
        self.reason, self.warn = reason, warn


# ------------------------------------------------------------------------------------------------- kinds


def _timm_class(name: str) -> type:
    from timm.layers import norm_act  # only called when a timm layer is in the model

    return getattr(norm_act, name)


# bnkit.layers.kinds' kinds -> the form convert treats them as (exact classes only: a subclass has its own forward)
_FROZEN = {"torchvision-frozen": "frozen", "timm-frozen": "frozen", "lookalike-frozen": "frozen"}
_CONVERT_KIND = {
    "sync": "torch-sync",
    "timm-bnact": "act",
    "timm-sync-bnact": "sync-act",
    "timm-frozen-bnact": "frozen-act",
    "bnkit-bnact": "bnact",
}


def layer_kind(module: nn.Module) -> str | None:
    """How ``convert`` treats a layer: ``torch`` (BatchNorm1d/2d/3d), ``torch-sync``, ``bnkit``, ``bnact``
    (``bnkit.BatchNormAct``), ``act`` (timm BatchNormAct2d), ``sync-act`` (timm SyncBatchNormAct), ``frozen``
    (FrozenBatchNorm2d of torchvision, timm or
    a look-alike), ``frozen-act`` (timm FrozenBatchNormAct2d), ``subclass`` (a subclass with behaviour of its
    own, or a class taught with ``bnkit.register_batchnorm``), or None (not BatchNorm-like). The recognition is
    :func:`bnkit.layers.kinds.describe_batchnorm`'s.

    Example:
        >>> from torchvision.ops.misc import FrozenBatchNorm2d
        >>> layer_kind(nn.BatchNorm1d(2)), layer_kind(FrozenBatchNorm2d(2)), layer_kind(nn.Linear(2, 2))
        ('torch', 'frozen', None)
    """
    info = describe_batchnorm(module)
    if info is None:
        return None
    cls = type(module)
    if info.kind in _FROZEN or (info.fixed and info.kind != "timm-frozen-bnact"):
        return "frozen"  # the class fixes statistics and gamma/beta: FrozenBatchNorm2d, look-alikes, registered
    exact = {
        "torch": cls in TORCH_CLASSES.values(),
        "sync": cls is nn.SyncBatchNorm,
        "bnkit": cls is bnkit_batchnorm_class(),
        "bnkit-bnact": cls is _bnact_class(),
        "timm-bnact": cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm."),
        "timm-sync-bnact": cls.__name__ == "SyncBatchNormAct" and cls.__module__.startswith("timm."),
        "timm-frozen-bnact": cls.__name__ == "FrozenBatchNormAct2d" and cls.__module__.startswith("timm."),
    }
    if info.lazy:
        return "torch"  # refused by convert with its own message until it has seen an input
    if not exact.get(info.kind, False):
        return "subclass"
    return _CONVERT_KIND.get(info.kind, info.kind)


def _bnact_class() -> type[nn.Module]:
    from bnkit.layers.batchnorm_act import BatchNormAct

    return BatchNormAct


def _factory(module: nn.Module) -> dict[str, Any]:
    ref = next(iter([*module.parameters(recurse=False), *module.buffers(recurse=False)]), None)
    if ref is None:
        return {}
    return {"device": ref.device, "dtype": ref.dtype if ref.is_floating_point() else None}


def _carry_freeze(src: nn.Module, dst: nn.Module) -> None:
    """A frozen layer stays frozen in its new form (hooks for torch layers, switches for bnkit)."""
    stats, affine = is_frozen_stats(src), is_frozen_affine(src)
    if is_bnkit_batchnorm(dst):
        dst.freeze_stats = stats and dst.track_running_stats
        if affine:
            dst.freeze_affine = True
    else:
        if stats and getattr(dst, "running_mean", None) is not None:
            _set_stats(dst, True)
        if affine:
            copy_grad_flags(src, dst)


def _move_act(src: nn.Module, dst: nn.Module) -> nn.Module:
    """timm's norm+act layers: the activation and drop modules go with the layer (same objects)."""
    for attr in ("drop", "act"):
        if isinstance(getattr(src, attr, None), nn.Module):
            setattr(dst, attr, getattr(src, attr))
    return dst


def _torch_from_torch(module: nn.Module, cls: type[nn.Module], **extra: Any) -> nn.Module:
    timm_act = getattr(cls, "__module__", "").startswith("timm.")
    bias = {} if timm_act else {"bias": module.bias is not None or not module.affine}
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        **bias,
        **extra,
        **_factory(module),
    )
    if timm_act and module.affine and module.bias is None:
        new.register_parameter("bias", None)
    _move_act(module, new)
    new.load_state_dict(module.state_dict())
    copy_grad_flags(module, new)
    new.train(module.training)
    _carry_freeze(module, new)
    return new


def _unknown_rank(label: str, target: str) -> ValueError:
    return ValueError(
        f"convert: cannot tell whether layer {label!r} needs BatchNorm1d, 2d or 3d (to={target!r}); pass dim=1|2|3 "
        "(or a dict of layer name to dim) or example_inputs=... that reach it"
    )


def _kept_reason(kind: str, to: str) -> Leave:
    if kind in ("frozen", "frozen-act"):
        warn = to == "group"
        return Leave("frozen layer (statistics and gamma/beta fixed), kept as it is; to='trainable' thaws it", warn)
    if kind == "sync-act" and to == "bnact":
        return Leave("timm SyncBatchNormAct: convert to 'torch' first (timm's BatchNormAct2d), then to 'bnact'", True)
    if kind in ("act", "sync-act"):
        hint = "; to='torch-sync' gives timm's SyncBatchNormAct" if to != "bnkit" else ""
        return Leave(
            "timm BatchNorm+activation layer: bnkit.BatchNorm has no activation, so it is kept as it is "
            f"(to='bnact' makes it a bnkit.BatchNormAct){hint}",
            True,
        )
    return Leave(f"its target form is not defined for to={to!r}", True)


def _subclass(module: nn.Module, to: str) -> Leave:
    name = type(module).__name__
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) and not is_bnkit_batchnorm(module):
        return Leave(f"a {name}, a class registered with bnkit.register_batchnorm that convert cannot rebuild", True)
    base = "bnkit.BatchNorm" if is_bnkit_batchnorm(module) else "torch.nn BatchNorm"
    return Leave(
        f"a {name}, a subclass of {base} with behaviour of its own that to={to!r} would drop; "
        "kept as it is (convert it yourself)",
        True,
    )


def _bnact_other(module: nn.Module, kind: str, to: str) -> str:
    """``bnkit.BatchNormAct`` under a target without an activation: the identity one is a ``bnkit.BatchNorm``,
    any other is left as it is (the target would drop the activation)."""
    if kind != "bnact":
        return kind
    if module.activation == "identity":
        return "bnkit"
    raise Leave(
        f"bnkit.BatchNormAct with activation {module.activation!r}: to={to!r} has no form that keeps the "
        "activation, so it is kept as it is",
        True,
    )


def _from_timm(module: nn.Module) -> bool:
    source = getattr(module, "source_class", None) or ""
    return source.startswith("timm.") and source.endswith(".BatchNormAct2d")


def _bnact_to_torch(module: nn.Module, strict: bool) -> nn.Module:
    """timm's ``BatchNormAct2d`` for a ``bnkit.BatchNormAct`` converted from one (timm importable), else Leave."""
    if not _from_timm(module):
        raise Leave(
            f"bnkit.BatchNormAct with activation {module.activation!r}: torch.nn BatchNorm has no activation and "
            "the layer was not converted from timm's BatchNormAct2d, so it is kept as it is (its state dict "
            "loads into nn.BatchNorm2d followed by the activation)",
            True,
        )
    try:
        timm_class = _timm_class("BatchNormAct2d")
    except ImportError:
        raise Leave("converted from timm's BatchNormAct2d, but timm is not importable: kept as it is", True) from None
    plain = bnkit_batchnorm_class().to_torch(module, 2, strict=strict)  # the settings checks of bnkit -> torch
    new = _torch_from_torch(plain, timm_class)
    new.act = describe_batchnorm(module).activation or nn.Identity()
    if module.freeze_stats and module.track_running_stats:
        _set_stats(new, True)
    return new


# ----------------------------------------------------------------------------------------------- targets


def to_bnkit(name: str, module: nn.Module, kind: str, sync: bool, process_group: Any, dim: int | None) -> nn.Module:
    """The ``"bnkit"``/``"sync"`` form of one layer.

    Example:
        >>> type(to_bnkit("bn", nn.BatchNorm2d(2), "torch", False, None, None)).__name__
        'BatchNorm'
    """
    if kind in ("bnkit", "bnact"):
        return _bnkit_synced(module, process_group) if sync else module
    if kind not in ("torch", "torch-sync"):
        target = "sync" if sync else "bnkit"
        raise _subclass(module, target) if kind == "subclass" else _kept_reason(kind, target)
    new = bnkit_batchnorm_class().from_torch(module)
    if new.torch_dim is None and dim is not None:
        new.torch_dim = dim
    if sync:
        new.sync = True
        if process_group is not None or kind != "torch-sync":
            new.process_group = process_group
    new.name = name or None
    _carry_freeze(module, new)
    return new


def _bnkit_synced(module: nn.Module, process_group: Any) -> nn.Module:
    """A copy of a bnkit layer with ``sync=True`` (a copy, so an error later leaves an in-place model as it was)."""
    if module.sync and process_group is None:
        return module
    new = copy.deepcopy(module)
    new.sync = True
    if process_group is not None or not module.sync:
        new.process_group = process_group
    return new


def to_torch(name: str, module: nn.Module, kind: str, dim: int | None, strict: bool) -> nn.Module:
    """The ``"torch"`` form of one layer (``dim``: 1, 2, 3 or None when unknown).

    Example:
        >>> type(to_torch("bn", nn.SyncBatchNorm(2), "torch-sync", 3, True)).__name__
        'BatchNorm3d'
    """
    label = name or "<model>"
    if kind == "torch":
        return module
    if kind == "bnact" and (module.activation != "identity" or _from_timm(module)):
        try:
            return _bnact_to_torch(module, strict)
        except ValueError as err:
            raise ValueError(f"convert: layer {label!r}: {err}") from None
    kind = _bnact_other(module, kind, "torch")
    if kind in ("act", "frozen", "frozen-act"):
        if kind == "act":
            raise Leave("timm BatchNormAct2d is already a torch.nn.BatchNorm2d (activation kept)", False)
        raise _kept_reason(kind, "torch")
    if kind == "subclass":
        raise _subclass(module, "torch")
    if kind == "sync-act":
        return _torch_from_torch(module, _timm_class("BatchNormAct2d"))
    if dim is None:
        raise _unknown_rank(label, "torch")
    if kind == "bnkit":
        try:
            new = module.to_torch(dim, strict=strict)
        except ValueError as err:
            raise ValueError(f"convert: layer {label!r}: {err}") from None
        if module.freeze_stats and module.track_running_stats:
            _set_stats(new, True)
        return new
    return _torch_from_torch(module, TORCH_CLASSES[dim])


def to_torch_sync(module: nn.Module, kind: str, process_group: Any) -> nn.Module:
    """The ``"torch-sync"`` form of one layer.

    Example:
        >>> to_torch_sync(nn.BatchNorm3d(2), "torch", None).bnkit_torch_dim
        3
    """
    if kind in ("bnkit", "bnact"):
        return _bnkit_synced(module, process_group)
    if kind in ("torch-sync", "sync-act"):
        return module
    if kind == "torch":
        new = _torch_from_torch(module, nn.SyncBatchNorm, process_group=process_group)
        # so "torch" gives the same class back without running the model
        new.bnkit_torch_dim = next(d for d, cls in TORCH_CLASSES.items() if isinstance(module, cls))
        return new
    if kind == "act":
        return _torch_from_torch(module, _timm_class("SyncBatchNormAct"), process_group=process_group)
    raise _subclass(module, "torch-sync") if kind == "subclass" else _kept_reason(kind, "torch-sync")


def to_group(
    name: str, module: nn.Module, kind: str, groups: int | Callable[[int], int] | None, ndim: int | None
) -> nn.Module:
    """The ``"group"`` form of one layer (``ndim``: its input rank, when known).

    Example:
        >>> to_group("bn", nn.BatchNorm2d(4), "torch", 2, None)
        GroupNorm(2, 4, eps=1e-05, affine=True, bias=True)
    """
    from bnkit.tools.convert import default_groups

    kind = _bnact_other(module, kind, "group")
    if kind not in ("torch", "torch-sync", "bnkit", "act", "sync-act"):
        raise _subclass(module, "group") if kind == "subclass" else _kept_reason(kind, "group")
    label = name or "<model>"
    channels = module.num_features
    if kind == "bnkit" and module.axis != 1 and (ndim is None or module.axis % ndim != 1):
        raise ValueError(
            f"convert: layer {label!r} normalises channel axis {module.axis}, but GroupNorm needs channels on "
            "axis 1; permute the input or pass example_inputs=... if the axis is 1 for its input rank"
        )
    count = default_groups(channels) if groups is None else groups(channels) if callable(groups) else groups
    if not isinstance(count, int) or isinstance(count, bool) or count < 1 or channels % count:
        raise ValueError(
            f"convert: layer {label!r} has {channels} channels, which {count!r} groups do not divide; pass "
            "groups=<a divisor> or a callable channels -> groups"
        )
    affine = module.weight is not None or module.bias is not None
    if kind in ("act", "sync-act"):
        new = _move_act(module, _timm_class("GroupNormAct")(channels, count, eps=module.eps, affine=affine))
        new.to(**_factory(module))
        if affine and module.bias is None:
            new.register_parameter("bias", None)
    else:
        bias = module.bias is not None or not affine
        new = nn.GroupNorm(count, channels, eps=module.eps, affine=affine, bias=bias, **_factory(module))
    if affine:
        with torch.no_grad():
            if module.weight is not None:
                new.weight.copy_(module.weight)
            else:
                # GroupNorm cannot have beta without gamma: gamma stays at its identity value, frozen.
                new.weight.requires_grad_(False)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        copy_grad_flags(module, new)
    new.train(module.training)
    return new


def _frozen_values(module: nn.Module) -> dict[str, torch.Tensor]:
    mean, var = module.running_mean, module.running_var
    gamma = module.weight if module.weight is not None else torch.ones_like(mean)
    beta = module.bias if module.bias is not None else torch.zeros_like(mean)
    return {"weight": gamma.detach(), "bias": beta.detach(), "running_mean": mean, "running_var": var}


def to_frozen(name: str, module: nn.Module, kind: str, dim: int | None) -> nn.Module:
    """The ``"frozen"`` form of one layer.

    Example:
        >>> to_frozen("bn", nn.BatchNorm2d(4, eps=1e-3), "torch", None)
        FrozenBatchNorm2d(4, eps=0.001)
    """
    if kind in ("frozen", "frozen-act"):
        return module
    kind = _bnact_other(module, kind, "frozen")
    if kind == "subclass":
        raise _subclass(module, "frozen")
    label = name or "<model>"
    if getattr(module, "running_mean", None) is None:
        raise Leave("no running statistics (track_running_stats=False): nothing to freeze", True)
    if kind == "bnkit" and (module.axis != 1 or module.renorm is not None):
        raise Leave(
            "FrozenBatchNorm2d cannot express "
            + ("renorm" if module.renorm is not None else f"a channel axis other than 1 ({module.axis})")
            + "; bnkit.freeze(model) freezes it in place",
            True,
        )
    if kind in ("torch", "act"):
        dim = 2 if isinstance(module, nn.BatchNorm2d) else 1 if isinstance(module, nn.BatchNorm1d) else 3
    if dim is None:
        raise _unknown_rank(label, "frozen")
    if dim != 2:
        raise Leave(
            f"FrozenBatchNorm2d takes 4-D inputs and this layer is a BatchNorm{dim}d; bnkit.freeze(model) freezes "
            "it in place",
            True,
        )
    if kind in ("act", "sync-act"):
        new = _move_act(module, _timm_class("FrozenBatchNormAct2d")(module.num_features, eps=module.eps))
    else:
        from torchvision.ops.misc import FrozenBatchNorm2d

        new = FrozenBatchNorm2d(module.num_features, eps=module.eps)
    new.to(**_factory(module))
    with torch.no_grad():
        for key, value in _frozen_values(module).items():
            getattr(new, key).copy_(value)
    new.train(module.training)
    return new


def to_trainable(name: str, module: nn.Module, kind: str, dim: int | None) -> nn.Module:
    """The ``"trainable"`` form of one layer: a frozen layer becomes ``BatchNorm{dim}d`` (timm's
    ``BatchNormAct2d`` for ``FrozenBatchNormAct2d``), read through its :class:`bnkit.layers.kinds.BatchNormInfo`.

    Example:
        >>> from torchvision.ops.misc import FrozenBatchNorm2d
        >>> to_trainable("bn", FrozenBatchNorm2d(4), "frozen", None)
        BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    """
    if kind not in ("frozen", "frozen-act"):
        return module
    info = describe_batchnorm(module)
    assert info is not None and info.running_mean is not None and info.running_var is not None
    if kind == "frozen" and (info.activation is not None or info.drop is not None):
        raise Leave("applies an activation after normalising, which BatchNorm2d would drop", True)
    if info.channel_axis != 1:
        raise Leave(f"normalises channel axis {info.channel_axis}; torch.nn BatchNorm needs axis 1", True)
    mean = info.running_mean.detach()
    values = {
        "weight": info.weight.detach() if info.weight is not None else torch.ones_like(mean),
        "bias": info.bias.detach() if info.bias is not None else torch.zeros_like(mean),
        "running_mean": mean,
        "running_var": info.running_var.detach(),
    }
    factory = {"device": mean.device, "dtype": mean.dtype}
    if kind == "frozen-act":
        new = _move_act(module, _timm_class("BatchNormAct2d")(mean.numel(), eps=info.eps, momentum=0.1))
        new.to(**factory)
    else:
        dim = info.spatial_dims or dim
        if dim is None:
            raise _unknown_rank(name or "<model>", "trainable")
        new = TORCH_CLASSES[dim](mean.numel(), eps=info.eps, momentum=0.1, **factory)
    with torch.no_grad():
        for key, value in values.items():
            getattr(new, key).copy_(value)
    new.train(module.training)
    return new
