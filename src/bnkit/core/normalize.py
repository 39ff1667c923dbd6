"""Normalisation and the Batch Renormalization correction as pure tensor functions."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["broadcast_shape", "normalize", "renorm_correction", "scale_shift"]


def broadcast_shape(ndim: int, axis: int, channels: int) -> list[int]:
    """Shape that makes a per-channel vector broadcast along ``axis`` of an ``ndim``-rank tensor.

    Example:
        >>> broadcast_shape(4, -1, 8)
        [1, 1, 1, 8]
    """
    shape = [1] * ndim
    shape[axis % ndim] = channels
    return shape


def scale_shift(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """The per-channel affine map ``y = a * x + b`` equal to normalising with ``(mean, var)``.

    ``a = weight / sqrt(var + eps)`` and ``b = bias - mean * a``; a missing weight counts as 1, a missing bias
    as 0. This is inference-mode BatchNorm, and the quantity folded into a neighbouring conv or linear layer.

    Example:
        >>> a, b = scale_shift(torch.tensor([1.0]), torch.tensor([4.0]), None, None, 0.0)
        >>> a.tolist(), b.tolist()
        ([0.5], [-0.5])
    """
    a = torch.rsqrt(var + eps)
    if weight is not None:
        a = a * weight
    b = -mean * a
    if bias is not None:
        b = b + bias
    return a, b


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
) -> Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` with per-channel vectors broadcast along ``axis``.

    Written as Keras writes it, ``(x - mean) * (rsqrt(var + eps) * weight) + bias``, so a Keras layer is
    reproduced to the rounding. Differentiable in every tensor argument.

    Example:
        >>> normalize(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0]), torch.tensor([1.0]),
        ...           None, None, 0.0, 1).flatten().tolist()
        [-1.0, 1.0]
    """
    shape = broadcast_shape(x.ndim, axis, mean.shape[-1])
    inv = torch.rsqrt(var + eps)
    if weight is not None:
        inv = inv * weight
    y = (x - mean.reshape(shape)) * inv.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def renorm_correction(
    mean: Tensor,
    var: Tensor,
    renorm_mean: Tensor,
    renorm_std: Tensor,
    eps: float,
    rmin: float | Tensor,
    rmax: float | Tensor,
    dmax: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's ``(r, d)`` (Ioffe 2017), both without gradient.

    ``sigma_B = sqrt(var + eps)``, ``sigma_r = max(renorm_std, sqrt(eps))``, ``r = clip(sigma_B / sigma_r,
    rmin, rmax)``, ``d = clip((mean - renorm_mean) / sigma_r, -dmax, dmax)``. The output is then
    ``((x - mean) / sigma_B * r + d) * weight + bias``. Infinite bounds mean no clipping.

    Example:
        >>> r, d = renorm_correction(torch.tensor([1.0]), torch.tensor([4.0]), torch.tensor([0.0]),
        ...                          torch.tensor([1.0]), 0.0, 1 / 3, 3.0, 5.0)
        >>> r.tolist(), d.tolist()
        ([2.0], [1.0])
    """
    with torch.no_grad():
        sigma_b = torch.sqrt(var + eps)
        sigma_r = torch.clamp_min(renorm_std, eps**0.5)
        r = torch.clamp(sigma_b / sigma_r, min=rmin, max=rmax)
        d = torch.clamp((mean - renorm_mean) / sigma_r, min=-dmax, max=dmax)
    return r, d
