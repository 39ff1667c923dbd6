"""Fused synchronised batch normalisation for training: exact global statistics, PyTorch's communication.

The common case of a synchronised layer (no mask, no renorm) as one autograd function, so that it costs what
PyTorch's SyncBatchNorm costs: local statistics from ATen's fused kernel, one ``all_gather`` of
``[count, m2, mean]`` (``world * (2C + 1)`` numbers) merged exactly in float64, normalisation by ATen's
inference kernel with the global statistics, and in backward one ``all_reduce`` of
``[sum(dy), sum(dy * (x - mean))]`` (``2C`` numbers), the reductions coming from ATen's fused backward kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bnkit.core.moments import Moments, batch_stats
from bnkit.distributed import comm
from bnkit.distributed.moments import exchange

__all__ = ["sync_batch_norm"]


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        group: Any,
        layer_name: str,
    ) -> tuple[Tensor, Tensor]:
        channels = x.shape[1]
        n = x.numel() // channels if channels else 0
        if n > 0:
            mean, var = batch_stats(x)
            local = torch.cat([var.new_full((1,), float(n)), var.mul_(n), mean])
        else:
            local = x.new_zeros(1 + 2 * channels)
        merged = exchange(local, group, layer_name)
        mu = merged[1 + channels :].to(x.dtype)
        var = (merged[1 : 1 + channels] / merged[:1].clamp_min(1.0)).to(x.dtype)
        y = F.batch_norm(x, mu, var, weight, bias, False, 0.0, eps) if n > 0 else x.clone()
        ctx.save_for_backward(x, weight, mu, var)
        ctx.eps = eps
        ctx.total = merged[0].to(x.dtype)  # a 0-dim device tensor: dividing by it rounds like a Python float
        ctx.group = group
        ctx.layer_name = layer_name
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(merged)
        return y, merged

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *unused: Any) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, mu, var = ctx.saved_tensors
        channels = x.shape[1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if x.numel() > 0:
            # Inference-mode backward, fused: dy * invstd * weight, invstd * sum(dy * (x - mean)) and sum(dy).
            grad_eval, grad_w, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy, x, weight, mu, var, None, None, False, ctx.eps, [need_x, True, True]
            )
        else:
            grad_eval = None
            grad_w = sum_dy = x.new_zeros(channels)
        grad_x = None
        if need_x:
            # The loss of every rank depends on the global mean and variance: sum the two reductions (the
            # concatenation is a copy, so grad_w and sum_dy stay this rank's own).
            combined = torch.cat([sum_dy, grad_w])
            comm.all_reduce_sum(combined, ctx.group, f"{ctx.layer_name} (backward)")
            invstd = torch.rsqrt(var + ctx.eps)
            scale = invstd if weight is None else invstd * weight
            shift, slope = combined.view(2, channels).mul_(scale / ctx.total)
            if grad_eval is not None:
                view = (1, channels) + (1,) * (x.ndim - 2)
                slope.mul_(invstd)
                grad_x = grad_eval.addcmul_(x - mu.reshape(view), slope.reshape(view), value=-1.0)
                grad_x = grad_x.sub_(shift.reshape(view))
            else:
                grad_x = torch.zeros_like(x)
        grad_w = grad_w if weight is not None and need_w else None
        grad_b = sum_dy if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b, None, None, None


def sync_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    axis: int = 1,
    group: Any = None,
    layer_name: str = "BatchNorm",
) -> tuple[Tensor, Moments]:
    """Training-mode batch normalisation of ``x`` with the statistics of all ranks' batches together.

    ``y = weight * (x - mean) / sqrt(var + eps) + bias`` where ``mean`` and the biased ``var`` are those of the
    union of the batches of every rank of ``group``, merged exactly from ``(count, mean, m2)`` triples; the
    gradient is that of the sum of all ranks' losses, as in PyTorch's SyncBatchNorm. One ``all_gather``
    forward and one ``all_reduce`` backward (only when ``x`` needs a gradient), with the same payloads as
    PyTorch. ``x`` may be empty on some ranks. Running statistics are left to the caller: the returned
    global :class:`Moments` (detached, in float64 as merged) are what they should be updated with. Every rank
    must call it for the same layers in the same order (see :func:`bnkit.distributed.sync_moments`).

    Without an initialised process group, or with world size 1, it normalises with the local batch
    statistics and communicates nothing.

    Args:
        x: Input with channels on ``axis`` (float32 or float64; cast half precision first).
        weight: Per-channel scale or None.
        bias: Per-channel shift or None.
        eps: Added to the variance.
        axis: The channel axis.
        group: Process group (default: the world).
        layer_name: Used in error messages and the cross-rank call check.

    Returns:
        ``(y, global_moments)`` with ``y`` shaped like ``x`` and the moments in float64.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y, stats = sync_batch_norm(x, None, None, 1e-5)
        >>> y.shape, float(stats.count)
        (torch.Size([8, 3, 4, 4]), 128.0)
    """
    axis = axis % x.ndim
    xc = x if axis == 1 else x.movedim(axis, 1)
    channels = xc.shape[1]
    if comm.is_active(group):
        y, merged = _SyncBatchNorm.apply(xc, weight, bias, eps, group, layer_name)
        stats = Moments(merged[0], merged[1 + channels :], merged[1 : 1 + channels])
    else:
        n = xc.numel() // channels if channels else 0
        mean, var = batch_stats(xc.detach()) if n else (xc.new_zeros(channels), xc.new_zeros(channels))
        stats = Moments(torch.tensor(float(n), dtype=torch.float64, device=xc.device), mean.double(), var.double() * n)
        y = F.batch_norm(xc, None, None, weight, bias, True, 0.0, eps) if n else xc.clone()
    y = y if axis == 1 else y.movedim(1, axis)
    return y, stats
