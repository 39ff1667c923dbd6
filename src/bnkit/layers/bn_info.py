"""The record every tool reads about a BatchNorm-like layer (:class:`BatchNormInfo`), the kinds it names, and the
small readers the built-in and registered descriptions share. :mod:`bnkit.layers.kinds` describes layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["FROZEN_KINDS", "KINDS", "BatchNormInfo"]

#: Every kind :func:`bnkit.layers.kinds.describe_batchnorm` reports (a registered class may also name its own).
KINDS = (
    "torch",
    "sync",
    "bnkit",
    "bnkit-bnact",
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
        activation: the module applied after normalising (timm's ``act``; for ``bnkit.BatchNormAct`` a
            ``torch.nn`` module equal to its activation, e.g. ``nn.LeakyReLU(0.1)``), or None (identity).
        drop: a module applied between normalising and the activation (timm's ``drop``), or None.
        frozen: the layer normalises with its running statistics whatever its training flag, and never updates
            them: a frozen kind, ``bnkit.BatchNorm(freeze_stats=True)`` or a layer frozen by :func:`bnkit.freeze`.
        updates_stats: a training-mode forward would update the running statistics (running statistics are
            tracked and the layer is not frozen).
        lazy: a ``torch.nn`` LazyBatchNorm that has not seen an input yet (no shapes).
        fixed: the class itself fixes the statistics (a frozen kind, or a class registered with ``frozen=True``):
            no switch unfreezes them, and only ``bnkit.recalibrate(..., include_frozen=True)`` rewrites them.

    Example:
        >>> from bnkit.layers.kinds import describe_batchnorm
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
            >>> from bnkit.layers.kinds import describe_batchnorm
            >>> describe_batchnorm(nn.BatchNorm1d(2, track_running_stats=False)).has_running_stats
            False
        """
        return self.running_mean is not None and self.running_var is not None

    @property
    def has_affine(self) -> bool:
        """gamma and beta exist (as parameters or buffers).

        Example:
            >>> from bnkit.layers.kinds import describe_batchnorm
            >>> describe_batchnorm(nn.BatchNorm1d(2, affine=False)).has_affine
            False
        """
        return self.weight is not None and self.bias is not None

    @property
    def torch_momentum(self) -> float | None:
        """The momentum in PyTorch's convention (weight of the new batch): ``1 - m`` for Keras's ``m``.

        Example:
            >>> from bnkit.layers.kinds import describe_batchnorm
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
            >>> from bnkit.layers.kinds import describe_batchnorm
            >>> describe_batchnorm(nn.BatchNorm1d(2)).after
            ()
        """
        return tuple(m for m in (self.drop, self.activation) if m is not None)

    def axis_for(self, ndim: int) -> int:
        """The non-negative channel axis for an input of rank ``ndim``.

        Example:
            >>> from bnkit.layers.kinds import describe_batchnorm
            >>> describe_batchnorm(nn.BatchNorm1d(2)).axis_for(3)
            1
        """
        return self.channel_axis % ndim if self.channel_axis < 0 else self.channel_axis


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
