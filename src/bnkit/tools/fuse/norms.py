"""The BatchNorm-like layers fuse folds, seen the way folding needs them: a per-channel affine map in eval mode
(``scale * x + shift`` on a channel axis), possibly followed by modules it applies after normalising (the drop
and activation of a timm ``BatchNormAct2d``), which the fold keeps.

Which layers are BatchNorms is :func:`bnkit.layers.kinds.describe_batchnorm`'s business (torch, SyncBatchNorm,
bnkit BatchNorm and BatchNormAct, torchvision/timm FrozenBatchNorm2d, timm BatchNormAct2d, SyncBatchNormAct and
FrozenBatchNormAct2d, look-alikes and registered classes; never by importing torchvision or timm). What fuse adds
is whether it knows the ``forward`` that runs: a subclass of one of those classes that overrides ``forward`` may
compute anything else (a fused activation, say), so it is described but not folded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bnkit.core.normalize import scale_shift
from bnkit.layers.kinds import BatchNormInfo, describe_batchnorm

__all__ = ["ChannelAffine", "NormView", "norm_view"]

# The classes whose forward fuse knows, by (module, qualname) of the class that defines it, for the kinds whose
# forward a subclass may override. Look-alikes and registered classes are taken at their word (kinds' contract:
# they compute the BatchNorm map), and the check compares the outputs anyway.
_KNOWN_FORWARDS: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch.nn.modules.batchnorm", "_BatchNorm"),
        ("torch.nn.modules.batchnorm", "SyncBatchNorm"),
        ("bnkit.layers.batchnorm", "BatchNorm"),
        # eval path: the BatchNorm map, then its activation (described as a torch.nn module)
        ("bnkit.layers.batchnorm_act", "BatchNormAct"),
        ("torchvision.ops.misc", "FrozenBatchNorm2d"),
        ("timm.layers.norm_act", "FrozenBatchNorm2d"),
        ("timm.layers.norm_act", "BatchNormAct2d"),
        ("timm.layers.norm_act", "SyncBatchNormAct"),
        ("timm.layers.norm_act", "FrozenBatchNormAct2d"),
        ("timm.models.layers.norm_act", "BatchNormAct2d"),
        ("timm.models.layers.norm_act", "SyncBatchNormAct"),
        ("timm.models.layers.norm_act", "FrozenBatchNormAct2d"),
        # eval path: the BatchNorm, then drop and act when converted from a BatchNormAct2d
        ("timm.layers.split_batchnorm", "SplitBatchNorm2d"),
    }
)
_TRUSTED_KINDS = frozenset({"lookalike-frozen", "registered"})


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
    """A BatchNorm-like layer as fuse sees it: bnkit's description of it, and what fuse adds.

    Attributes:
        info: :func:`bnkit.layers.kinds.describe_batchnorm`'s description.
        understood: Whether fuse knows what its ``forward`` computes (False for a subclass that overrides it).
        post: The modules it applies after normalising, by role, in order (``("drop", ...)``, ``("act", ...)``;
            ``nn.Identity`` left out).

    Example:
        >>> view = norm_view(nn.BatchNorm2d(3))
        >>> view.kind, view.num_features, view.post, view.channel_axis(4)
        ('BatchNorm2d', 3, (), 1)
    """

    info: BatchNormInfo
    understood: bool
    post: tuple[tuple[str, nn.Module], ...]

    @property
    def module(self) -> nn.Module:
        """The layer."""
        return self.info.module

    @property
    def kind(self) -> str:
        """Its class name, for messages."""
        return type(self.info.module).__name__

    @property
    def num_features(self) -> int:
        """Channels it normalises."""
        return self.info.num_features

    @property
    def configured_axis(self) -> int:
        """The channel axis it was built with (negative for bnkit's channels-last layers)."""
        return self.info.channel_axis

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
        if not self.info.has_running_stats:
            return False
        uses_batch = getattr(self.module, "uses_batch_stats", None)
        return not (uses_batch is not None and uses_batch(training=False))

    def affine(self) -> ChannelAffine:
        """Its eval-mode ``(scale, shift)`` in float64 (float32 where float64 is unsupported)."""
        info = self.info
        mean, var = info.running_mean, info.running_var
        dtype = torch.float32 if mean.device.type == "mps" else torch.float64
        weight = None if info.weight is None else info.weight.detach().to(dtype)
        bias = None if info.bias is None else info.bias.detach().to(dtype)
        with torch.no_grad():
            scale, shift = scale_shift(mean.detach().to(dtype), var.detach().to(dtype), weight, bias, info.eps)
        return ChannelAffine(scale, shift)

    def replacement(self) -> nn.Module:
        """What takes its place once its affine map is folded: ``nn.Identity``, its one post module (the
        activation), or an ``nn.Sequential`` of its post modules under their roles (``drop``, ``act``)."""
        if not self.post:
            return nn.Identity()
        if len(self.post) == 1:
            return self.post[0][1]
        return nn.Sequential(OrderedDict(self.post))


def _post(info: BatchNormInfo, owner: type) -> tuple[tuple[str, nn.Module], ...]:
    drop, act = info.drop, info.activation
    if owner.__qualname__ == "SplitBatchNorm2d":  # described as a torch BN; drop/act exist after conversion
        drop, act = getattr(info.module, "drop", None), getattr(info.module, "act", None)
    return tuple(
        (role, module)
        for role, module in (("drop", drop), ("act", act))
        if isinstance(module, nn.Module) and not isinstance(module, nn.Identity)
    )


def norm_view(module: nn.Module) -> NormView | None:
    """``module`` as a :class:`NormView` if it is a BatchNorm-like layer bnkit recognises, else None.

    Example:
        >>> norm_view(nn.GroupNorm(1, 4)) is None, norm_view(nn.SyncBatchNorm(4)).understood
        (True, True)
    """
    info = describe_batchnorm(module)
    if info is None:
        return None
    owner = _forward_owner(module)
    understood = info.kind in _TRUSTED_KINDS or (owner.__module__, owner.__qualname__) in _KNOWN_FORWARDS
    return NormView(info=info, understood=understood, post=_post(info, owner))
