"""Per-channel statistics: numerically stable moments, masked moments, ghost-batch moments, Chan merges.

A :class:`Moments` triple ``(count, mean, m2)`` is the exact summary of a set of values: ``m2`` is the sum of
squared deviations from ``mean``. Triples of disjoint parts merge exactly (Chan et al. 1979), which is what
ghost batches, distributed statistics and precise recalibration all need. Variances are never formed as
``E[x^2] - E[x]^2``, which cancels catastrophically when ``|mean| >> std``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Moments",
    "batch_stats",
    "channel_moments",
    "ghost_moments",
    "merge_all",
    "merge_moments",
    "reduction_dims",
    "variance",
]


class Moments(NamedTuple):
    """Count, mean and sum of squared deviations (``m2``) per channel.

    ``count`` is a tensor broadcastable to ``mean`` (a 0-d tensor when every channel saw the same number of
    values). Example:

        >>> m = channel_moments(torch.tensor([[1.0], [3.0]]), (0,))
        >>> float(m.mean), float(variance(m))
        (2.0, 1.0)
    """

    count: Tensor
    mean: Tensor
    m2: Tensor


def reduction_dims(ndim: int, axis: int) -> tuple[int, ...]:
    """All dimensions of an ``ndim``-rank tensor except the channel ``axis`` (negative allowed).

    Example:
        >>> reduction_dims(4, -1)
        (0, 1, 2)
    """
    axis = axis % ndim
    return tuple(d for d in range(ndim) if d != axis)


def channel_moments(x: Tensor, dims: Sequence[int], mask: Tensor | None = None) -> Moments:
    """Stable moments of ``x`` over ``dims`` (the remaining dimension is the channel).

    Without a mask it uses ``torch.var_mean`` (Welford/two-pass inside the kernel); an empty input gives
    count 0, mean 0 and m2 0. With a boolean ``mask``
    (``x``'s shape, or broadcastable to it) only positions where the mask is True count; a channel with no
    unmasked value gets count 0, mean 0 and m2 0 (no NaN). Differentiable with respect to ``x``.

    Example:
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 20.0], [100.0, 30.0]])
        >>> m = channel_moments(x, (0,), mask=torch.tensor([True, True, False]).unsqueeze(1).expand(3, 2))
        >>> m.mean.tolist(), m.count.tolist()
        ([2.0, 15.0], [2.0, 2.0])
    """
    dims = tuple(dims)
    if mask is None:
        count = 1
        for d in dims:
            count *= x.shape[d]
        count_t = torch.tensor(float(count), dtype=x.dtype, device=x.device)
        if count == 0:
            # An empty batch contributes nothing; sum() keeps the result attached to x's graph.
            zeros = x.sum(dim=dims)
            return Moments(count_t, zeros, zeros.clone())
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return Moments(count_t, mean, var * count)
    weights = mask.to(x.dtype).expand_as(x)
    count = weights.sum(dim=dims)
    safe = count.clamp_min(1.0)
    mean = (x * weights).sum(dim=dims) / safe
    centred = (x - _expand(mean, x.ndim, dims)) * weights
    m2 = (centred * centred).sum(dim=dims)
    return Moments(count, mean, m2)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` with channels on dim 1, without gradient; fast and stable.

    ATen's ``batch_norm_update_stats`` is several times faster than ``var_mean`` over ``(0, 2, 3)`` on CPU but
    loses digits when ``|mean| >> std``; shifting every channel by one of its own samples first (a value within
    a few standard deviations of the mean) removes that, at the cost of one elementwise pass. ``x`` must hold at
    least one value per channel.

    Example:
        >>> mean, var = batch_stats(torch.tensor([[1e4 + 1.0], [1e4 + 3.0]]))
        >>> mean.tolist(), var.tolist()
        ([10002.0], [1.0])
    """
    with torch.no_grad():
        channels = x.shape[1]
        shift = x[0].reshape(channels, -1)[:, 0]
        view = (1, channels) + (1,) * (x.ndim - 2)
        mean, var = torch.batch_norm_update_stats(x - shift.reshape(view), None, None, 0.0)
        return mean + shift, var


def ghost_moments(x: Tensor, axis: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of contiguous groups of ``group_size`` samples along dimension 0 (ghost batch norm).

    Returns ``(count_per_group, mean, var_biased)`` with ``mean``/``var`` shaped ``[groups, C]``. Groups are
    contiguous chunks: samples ``0..k-1`` form group 0, ``k..2k-1`` group 1, and so on. The caller checks that
    ``x.shape[0]`` is a multiple of ``group_size``.

    Example:
        >>> _, mean, var = ghost_moments(torch.tensor([[0.0], [2.0], [10.0], [14.0]]), 1, 2)
        >>> mean.flatten().tolist(), var.flatten().tolist()
        ([1.0, 12.0], [1.0, 4.0])
    """
    axis = axis % x.ndim
    groups = x.shape[0] // group_size
    xg = x.reshape(groups, group_size, *x.shape[1:])
    # In the grouped view the channel axis moves one to the right and the group index (dim 0) is kept.
    channel = axis + 1
    dims = tuple(d for d in range(1, xg.ndim) if d != channel)
    var, mean = torch.var_mean(xg, dim=dims, correction=0)
    count = x.numel() // x.shape[axis] // groups
    return torch.tensor(float(count), dtype=x.dtype, device=x.device), mean, var


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Exact merge of the moments of two disjoint parts (Chan et al.). Empty parts (count 0) are neutral.

    Example:
        >>> left = channel_moments(torch.tensor([[1.0], [2.0]]), (0,))
        >>> right = channel_moments(torch.tensor([[3.0], [4.0], [5.0]]), (0,))
        >>> float(variance(merge_moments(left, right)))
        2.0
    """
    n = a.count + b.count
    safe = torch.where(n > 0, n, torch.ones_like(n))
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / safe)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / safe)
    return Moments(n, mean, m2)


def merge_all(parts: Iterable[Moments]) -> Moments:
    """Merge any number of :class:`Moments` left to right.

    Example:
        >>> parts = [channel_moments(torch.tensor([[float(v)]]), (0,)) for v in range(4)]
        >>> float(merge_all(parts).mean)
        1.5
    """
    total: Moments | None = None
    for part in parts:
        total = part if total is None else merge_moments(total, part)
    if total is None:
        raise ValueError("merge_all needs at least one Moments; received none")
    return total


def variance(m: Moments, unbiased: bool = False) -> Tensor:
    """Variance from a :class:`Moments` triple: ``m2/n`` (biased) or ``m2/(n-1)`` (unbiased).

    Channels with too few values (n == 0, or n <= 1 when unbiased) get variance 0 rather than NaN; callers
    that must refuse such batches check the count first.

    Example:
        >>> m = channel_moments(torch.tensor([[1.0], [3.0]]), (0,))
        >>> float(variance(m, unbiased=True))
        2.0
    """
    denom = m.count - 1 if unbiased else m.count
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, m.m2 / safe, torch.zeros_like(m.m2))


def _expand(stat: Tensor, ndim: int, dims: Sequence[int]) -> Tensor:
    """Re-insert the reduced dimensions of a per-channel statistic so it broadcasts against the input."""
    for d in sorted(d % ndim for d in dims):
        stat = stat.unsqueeze(d)
    return stat
