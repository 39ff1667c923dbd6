"""Exact copies between ``torch.nn`` BatchNorm modules and :class:`bnkit.BatchNorm`, both ways.

:meth:`bnkit.BatchNorm.from_torch` and :meth:`bnkit.BatchNorm.to_torch` delegate here. What is copied: the
configuration (``eps``, ``momentum``, ``affine``, ``track_running_stats``, SyncBatchNorm's process group), the
state dict, the train/eval mode and ``requires_grad`` of gamma and beta. Settings torch cannot express are refused
by ``to_torch`` unless ``strict=False``, which drops them (inference output unchanged).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from bnkit.layers.batchnorm import BatchNorm

__all__ = ["batchnorm_from_torch", "batchnorm_to_torch", "copy_grad_flags"]


def batchnorm_from_torch(cls: type[BatchNorm], module: nn.Module) -> BatchNorm:
    """An exact ``cls`` copy of a ``torch.nn`` BatchNorm1d/2d/3d or SyncBatchNorm (see :meth:`BatchNorm.from_torch`).

    Example:
        >>> from bnkit import BatchNorm
        >>> batchnorm_from_torch(BatchNorm, nn.BatchNorm1d(3)).torch_dim
        1
    """
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"BatchNorm.from_torch expects a torch.nn BatchNorm module. Received: {type(module).__name__}")
    ref = module.weight if module.weight is not None else module.running_mean
    layer = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        sync=isinstance(module, nn.SyncBatchNorm),
        process_group=getattr(module, "process_group", None),
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )
    if module.track_running_stats and module.running_mean is None:
        raise ValueError("BatchNorm.from_torch: the module tracks running stats but its buffers are None")
    if module.affine and module.bias is None:  # torch >= 2.13 BatchNorm(bias=False)
        layer.register_parameter("bias", None)
    layer.load_state_dict(module.state_dict())
    copy_grad_flags(module, layer)
    layer.train(module.training)
    for dim, torch_class in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(module, torch_class):
            layer.torch_dim = dim
    return layer


def batchnorm_to_torch(
    layer: BatchNorm, dim: int | None = None, *, strict: bool = True
) -> nn.modules.batchnorm._BatchNorm:
    """A ``torch.nn.BatchNorm{dim}d`` copy of ``layer`` (see :meth:`BatchNorm.to_torch`).

    Example:
        >>> from bnkit import BatchNorm
        >>> type(batchnorm_to_torch(BatchNorm(4), dim=3)).__name__
        'BatchNorm3d'
    """
    if dim is None:
        dim = {2: 1, 3: 1, 4: 2, 5: 3}.get(layer._seen_dim) or getattr(layer, "torch_dim", None) or 2
    classes = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
    if dim not in classes:
        raise ValueError(f"{layer.label()}: to_torch(dim=...) must be 1, 2 or 3. Received: {dim}")
    problems = []
    if layer.axis != 1:
        problems.append(f"channel axis {layer.axis} (torch needs 1; permute the input)")
    if not layer.unbiased_running_var:
        problems.append("biased running variance")
    if layer.keras_momentum is not None:
        problems.append("Keras momentum update formula")
    if layer.virtual_batch_size is not None:
        problems.append("ghost batches")
    if layer.renorm is not None:
        problems.append("renorm")
    if layer.weight is None and layer.bias is not None:
        problems.append("beta without gamma (gamma would be added as a frozen 1)")
    if problems and strict:
        raise ValueError(
            f"{layer.label()}: torch.nn.BatchNorm cannot express {', '.join(problems)}; "
            "pass strict=False to convert anyway (inference output is unchanged)"
        )
    ref = layer.weight if layer.weight is not None else layer.running_mean
    extra = {} if layer.bias is not None or layer.weight is None else {"bias": False}
    module = classes[dim](
        layer.num_features,
        eps=layer.eps,
        momentum=layer.momentum,
        affine=layer.weight is not None or layer.bias is not None,
        **extra,
        track_running_stats=layer.track_running_stats,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )
    state = {k: v for k, v in layer.state_dict().items() if k not in ("running_std", "renorm_mean", "renorm_std")}
    if layer.weight is None and layer.bias is not None:
        module.weight.requires_grad_(False)  # the frozen 1 that stands in for Keras's scale=False
        state["weight"] = module.weight.detach().clone()
    module.load_state_dict(state)
    copy_grad_flags(layer, module)
    module.train(layer.training)
    return module


def copy_grad_flags(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst``'s gamma and beta the ``requires_grad`` of ``src``'s (where both are parameters).

    Example:
        >>> src, dst = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
        >>> _ = src.weight.requires_grad_(False); copy_grad_flags(src, dst); dst.weight.requires_grad
        False
    """
    for attr in ("weight", "bias"):
        mine, theirs = getattr(src, attr, None), getattr(dst, attr, None)
        if isinstance(mine, nn.Parameter) and isinstance(theirs, nn.Parameter):
            theirs.requires_grad_(mine.requires_grad)
