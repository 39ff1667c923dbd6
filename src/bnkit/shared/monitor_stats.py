"""Per-layer summaries of the BatchNorm monitors, in float64 NumPy: drift, variance extremes, dead channels,
norms, and TensorBoard histograms of per-channel vectors.

Both monitors hand over the per-channel vectors of every layer of a step at once, packed side by side, so a
step costs about twenty NumPy operations whatever the number of layers (segment reductions with ``reduceat``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ROWS", "histograms", "pack", "summarize", "symmetric_kl"]

#: Rows of the packed per-channel array :func:`summarize` takes (NaN where a layer has no such vector).
ROWS: tuple[str, ...] = ("batch_mean", "batch_var", "running_mean", "running_var", "weight", "bias")


def symmetric_kl(mean_p: np.ndarray, var_p: np.ndarray, mean_q: np.ndarray, var_q: np.ndarray) -> np.ndarray:
    """Per-channel symmetric KL divergence ``KL(p||q) + KL(q||p)`` between 1-D Gaussians, in float64.

    Closed form ``0.5 * ((vp - vq)^2 + (vp + vq) * (mp - mq)^2) / (vp * vq)``; add the layer's eps to both
    variances first (the monitors do), as ``bnkit.core.divergence.gaussian_symmetric_kl`` does.

    Example:
        >>> float(symmetric_kl(np.zeros(1), np.ones(1), np.ones(1), np.ones(1))[0])
        1.0
    """
    mp, mq = np.asarray(mean_p, np.float64), np.asarray(mean_q, np.float64)
    vp, vq = np.asarray(var_p, np.float64), np.asarray(var_q, np.float64)
    diff = mp - mq
    with np.errstate(all="ignore"):
        return 0.5 * ((vp - vq) ** 2 + (vp + vq) * diff * diff) / (vp * vq)


def pack(vectors: dict[str, Any], channels: int) -> np.ndarray:
    """A float64 ``[len(ROWS), channels]`` array of one layer's vectors by row name; NaN rows for missing ones.

    Example:
        >>> pack({"batch_mean": [1.0, 2.0]}, 2)[:2].tolist()
        [[1.0, 2.0], [nan, nan]]
    """
    out = np.full((len(ROWS), channels), math.nan)
    for i, key in enumerate(ROWS):
        value = vectors.get(key)
        if value is not None:
            out[i] = np.asarray(value, np.float64).reshape(-1)
    return out


def summarize(packed: np.ndarray, lengths: Sequence[int], eps: Sequence[float]) -> np.ndarray:
    """The summary of every layer of a step: a float64 ``[layers, 13]`` table in the order of ``QUANTITIES``.

    Args:
        packed: ``[len(ROWS), sum(lengths)]`` float64: each layer's vectors (:data:`ROWS`) side by side.
        lengths: channels of each layer.
        eps: each layer's eps (added to both variances for the drift; dead channels have batch variance below it).

    Returns:
        Per layer: channel averages of batch mean and variance, smallest and largest batch variance, the same
        four of the running statistics, drift (mean and largest channel's symmetric KL), L2 norms of weight and
        bias, and the fraction of dead channels (batch variance below eps; a NaN variance does not count). NaN
        where an input row is NaN (a missing vector), except the dead fraction: the caller knows what is missing.

    Example:
        >>> table = summarize(pack({"batch_mean": [0.0], "batch_var": [1.0], "running_mean": [1.0],
        ...                         "running_var": [1.0]}, 1), [1], [0.0])
        >>> float(table[0, 8])  # drift: a one-standard-deviation shift of the mean
        1.0
    """
    lengths_ = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths_)[:-1]))
    eps_ = np.repeat(np.asarray(eps, np.float64), lengths_)
    mean, var, rm, rv, w, b = np.asarray(packed, np.float64)
    kl = symmetric_kl(mean, var + eps_, rm, rv + eps_)
    dead = (var < eps_).astype(np.float64)
    sums = np.add.reduceat(np.stack((mean, var, rm, rv, kl, dead, w * w, b * b)), starts, axis=1)
    means = sums / lengths_
    mins = np.minimum.reduceat(np.stack((var, rv)), starts, axis=1)
    maxs = np.maximum.reduceat(np.stack((var, rv, kl)), starts, axis=1)
    norms = np.sqrt(sums[6:])
    return np.stack(
        (
            means[0], means[1], mins[0], maxs[0],  # batch mean, var, var min, var max
            means[2], means[3], mins[1], maxs[1],  # running mean, var, var min, var max
            means[4], maxs[2],  # drift, drift max
            norms[0], norms[1], means[5],  # weight norm, bias norm, dead fraction
        ),
        axis=1,
    )  # fmt: skip


def histograms(vectors: list[tuple[str, np.ndarray]], bins: int = 30) -> list[tuple[str, dict[str, Any]]]:
    """Histograms of many small vectors at once: ``(tag, fields)`` with equal-width bins, TensorBoard's layout.

    ``fields`` are those of a TensorBoard ``HistogramProto`` (``min, max, num, sum, sum_squares,
    bucket_limits, bucket_counts``). A constant vector gets a unit-wide range around its value, as NumPy's
    histogram does. Vectors with a non-finite value are left out (TensorBoard refuses them; the scalars report
    them).

    Example:
        >>> [(tag, h["num"], sum(h["bucket_counts"])) for tag, h in histograms([("v", np.arange(5.0))], bins=4)]
        [('v', 5, 5.0)]
    """
    if not vectors:
        return []
    flat = np.concatenate([np.asarray(v, np.float64).reshape(-1) for _, v in vectors])
    lengths = np.array([np.size(v) for _, v in vectors], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    vmin, vmax = np.minimum.reduceat(flat, starts), np.maximum.reduceat(flat, starts)
    total, squares = np.add.reduceat(flat, starts), np.add.reduceat(flat * flat, starts)
    constant = vmax == vmin
    low = np.where(constant, vmin - 0.5, vmin)
    high = np.where(constant, vmax + 0.5, vmax)
    width = (high - low) / bins
    owner = np.repeat(np.arange(len(vectors)), lengths)
    with np.errstate(all="ignore"):
        index = np.nan_to_num(np.floor((flat - low[owner]) / width[owner]), nan=0.0, posinf=0.0, neginf=0.0)
    index = np.clip(index, 0, bins - 1).astype(np.int64)
    counts = np.bincount(owner * bins + index, minlength=len(vectors) * bins).reshape(len(vectors), bins)
    out = []
    for k, (tag, _) in enumerate(vectors):
        lo, hi, total_, squares_ = float(vmin[k]), float(vmax[k]), float(total[k]), float(squares[k])
        if not all(math.isfinite(v) for v in (lo, hi, total_, squares_)):
            continue
        start, step = float(low[k]), float(width[k])
        # TensorBoard stores right bucket edges; the leading empty bucket carries the left edge.
        fields = {
            "min": lo,
            "max": hi,
            "num": int(lengths[k]),
            "sum": total_,
            "sum_squares": squares_,
            "bucket_limits": [start + step * j for j in range(bins + 1)],
            "bucket_counts": [0.0, *counts[k].astype(np.float64).tolist()],
        }
        out.append((tag, fields))
    return out
