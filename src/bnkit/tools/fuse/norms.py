"""The BatchNorm-like layers fuse folds, seen the way folding needs them: a per-channel affine map in eval mode
(``scale * x + shift`` on a channel axis), possibly followed by modules it applies after normalising (the drop
and activation of a timm ``BatchNormAct2d``), which the fold keeps.

Recognised by class, never by importing torchvision or timm: ``torch.nn`` BatchNorm (any subclass that keeps
its ``forward``), ``SyncBatchNorm``, ``bnkit.BatchNorm``, torchvision's ``FrozenBatchNorm2d`` (which timm
re-exports), timm's ``BatchNormAct2d``, ``SyncBatchNormAct``, ``FrozenBatchNormAct2d`` and ``SplitBatchNorm2d``
(eval path).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.core.normalize import scale_shift
from bnkit.layers.find import is_batchnorm

__all__ = ["ChannelAffine", "NormView", "holds_running_stats", "norm_view"]

# (module, qualname) of the class that defines forward -> names of the modules applied after normalising.
_KNOWN_FORWARDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("torch.nn.modules.batchnorm", "_BatchNorm"): (),
    ("torch.nn.modules.batchnorm", "SyncBatchNorm"): (),
    ("bnkit.layers.batchnorm", "BatchNorm"): (),
    ("torchvision.ops.misc", "FrozenBatchNorm2d"): (),
    ("timm.layers.norm_act", "FrozenBatchNorm2d"): (),
    ("timm.layers.norm_act", "BatchNormAct2d"): ("drop", "act"),
    ("timm.layers.norm_act", "SyncBatchNormAct"): ("drop", "act"),
    ("timm.layers.norm_act", "FrozenBatchNormAct2d"): ("drop", "act"),
    ("timm.layers.split_batchnorm", "SplitBatchNorm2d"): ("drop", "act"),
}
_FROZEN = {"FrozenBatchNorm2d", "FrozenBatchNormAct2d"}


@dataclass(frozen=True)
class ChannelAffine:
    """The eval-mode map of a BatchNorm, ``y = scale * x + shift`` per channel (float64 where supported).

    Example:
        >>> ChannelAffine(torch.ones(2), torch.zeros(2)).scale.shape
        torch.Size([2])
    """

    scale: Tensor
    shift: Tensor


def _forward_owner(module: nn.Module) -> type:
    """The class in ``module``'s MRO that defines the ``forward`` it runs."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return cls
    return nn.Module


@dataclass(frozen=True)
class NormView:
    """A BatchNorm-like layer as fuse sees it.

    Attributes:
        module: The layer.
        kind: Its class name, for messages.
        understood: Whether bnkit knows what its ``forward`` computes (False for a subclass that overrides it).
        post: Names of its submodules applied after normalising, in order (``("drop", "act")`` for timm's
            BatchNormAct), those that are ``nn.Identity`` left out.
        frozen: Whether its statistics and affine terms are buffers that never change (``FrozenBatchNorm2d``).

    Example:
        >>> view = norm_view(nn.BatchNorm2d(3))
        >>> view.kind, view.num_features, view.post, view.channel_axis(4)
        ('BatchNorm2d', 3, (), 1)
    """

    module: nn.Module
    kind: str
    understood: bool
    post: tuple[str, ...]
    frozen: bool

    @property
    def num_features(self) -> int:
        """Channels it normalises (from its running mean, so frozen layers without ``num_features`` work)."""
        mean = getattr(self.module, "running_mean", None)
        if isinstance(mean, Tensor) and not isinstance(mean, nn.parameter.UninitializedTensorMixin):
            return int(mean.numel())
        return int(getattr(self.module, "num_features", 0))

    @property
    def configured_axis(self) -> int:
        """The channel axis it was built with (negative for bnkit's channels-last layers)."""
        return 1 if isinstance(self.module, _BatchNorm) else int(getattr(self.module, "axis", 1))

    def channel_axis(self, ndim: int | None) -> int | None:
        """The non-negative channel axis for an input of rank ``ndim``; None when unknown or out of range."""
        axis = self.configured_axis
        if ndim is None:
            return axis if axis >= 0 else None
        if not -ndim <= axis < ndim:
            return None
        return axis % ndim

    def uses_running_stats(self) -> bool:
        """Whether its eval-mode output is the affine map of its running statistics."""
        module = self.module
        if getattr(module, "running_mean", None) is None or getattr(module, "running_var", None) is None:
            return False
        uses_batch = getattr(module, "uses_batch_stats", None)
        return not (uses_batch is not None and uses_batch(training=False))

    def affine(self) -> ChannelAffine:
        """Its eval-mode ``(scale, shift)`` in float64 (float32 where float64 is unsupported)."""
        module = self.module
        mean = module.running_mean
        dtype = torch.float32 if mean.device.type == "mps" else torch.float64
        weight = None if module.weight is None else module.weight.detach().to(dtype)
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        with torch.no_grad():
            scale, shift = scale_shift(mean.to(dtype), module.running_var.to(dtype), weight, bias, float(module.eps))
        return ChannelAffine(scale, shift)

    def replacement(self) -> nn.Module:
        """What takes its place once its affine map is folded: ``nn.Identity``, its one post module, or an
        ``nn.Sequential`` of its post modules under their own names (``drop``, ``act``)."""
        modules = [(name, getattr(self.module, name)) for name in self.post]
        if not modules:
            return nn.Identity()
        if len(modules) == 1:
            return modules[0][1]
        return nn.Sequential(OrderedDict(modules))


def norm_view(module: nn.Module) -> NormView | None:
    """``module`` as a :class:`NormView` if it is a BatchNorm-like layer bnkit recognises, else None.

    Example:
        >>> norm_view(nn.GroupNorm(1, 4)) is None, norm_view(nn.SyncBatchNorm(4)).understood
        (True, True)
    """
    owner = _forward_owner(module)
    post_names = _KNOWN_FORWARDS.get((owner.__module__, owner.__qualname__))
    if post_names is None and not is_batchnorm(module):
        return None
    post = tuple(
        name
        for name in post_names or ()
        if isinstance(getattr(module, name, None), nn.Module) and not isinstance(getattr(module, name), nn.Identity)
    )
    return NormView(
        module=module,
        kind=type(module).__name__,
        understood=post_names is not None,
        post=post,
        frozen=owner.__qualname__ in _FROZEN,
    )


def holds_running_stats(module: nn.Module) -> bool:
    """Whether ``module`` itself has a ``running_mean`` or ``running_var`` tensor (any BatchNorm look-alike).

    Example:
        >>> holds_running_stats(nn.BatchNorm1d(2)), holds_running_stats(nn.Linear(2, 2))
        (True, False)
    """
    return any(isinstance(getattr(module, name, None), Tensor) for name in ("running_mean", "running_var"))
