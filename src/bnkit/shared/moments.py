"""Per-channel moments in float64 NumPy and their exact merge (Chan et al.): framework-free.

A batch's moments are the triple ``(count, mean, m2)`` per channel, computed in two passes (mean first, then the
sum of squared deviations), so large means cost no precision. Merging triples is exact: the population mean is
the count-weighted mean and the population (biased) variance is ``m2 / count``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NumpyMoments", "batch_moments", "merge"]


@dataclass
class NumpyMoments:
    """Count, mean and sum of squared deviations per channel (float64).

    Example:
        >>> m = batch_moments(np.array([[1.0], [3.0]]), axis=-1)
        >>> m.count.tolist(), m.mean.tolist(), m.variance().tolist()
        ([2.0], [2.0], [1.0])
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    def variance(self) -> np.ndarray:
        """The biased (population) variance ``m2 / count`` (0 where nothing was counted).

        Example:
            >>> NumpyMoments(np.array([4.0]), np.array([0.0]), np.array([8.0])).variance().tolist()
            [2.0]
        """
        return np.divide(self.m2, self.count, out=np.zeros_like(self.m2), where=self.count > 0)


def batch_moments(x: np.ndarray, axis: int | tuple[int, ...] = -1, mask: np.ndarray | None = None) -> NumpyMoments:
    """Two-pass float64 moments of ``x`` per channel along ``axis``; ``mask`` (one dimension less) weights rows.

    Example:
        >>> x = np.array([[1.0, 10.0], [3.0, 10.0], [100.0, 0.0]])
        >>> batch_moments(x, -1, mask=np.array([1, 1, 0])).mean.tolist()
        [2.0, 10.0]
    """
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    ndim = x.ndim
    channel_axes = tuple(a % ndim for a in axes)
    reduce = tuple(d for d in range(ndim) if d not in channel_axes)
    values = np.asarray(x, dtype=np.float64)
    if mask is None:
        weights = np.ones_like(values)
    else:
        weights = np.broadcast_to(np.expand_dims(np.asarray(mask, dtype=np.float64), -1), values.shape)
    count = weights.sum(axis=reduce)
    total = (values * weights).sum(axis=reduce)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    shape = [1 if d in reduce else s for d, s in enumerate(values.shape)]
    deviation = (values - mean.reshape(shape)) * weights
    m2 = (deviation * (values - mean.reshape(shape))).sum(axis=reduce)
    return NumpyMoments(count, mean, m2)


def merge(a: NumpyMoments, b: NumpyMoments) -> NumpyMoments:
    """The moments of the union of two sets (Chan et al.'s exact pairwise merge).

    Example:
        >>> x = np.arange(6.0).reshape(6, 1)
        >>> m = merge(batch_moments(x[:2]), batch_moments(x[2:]))
        >>> m.mean.tolist(), m.variance().tolist() == [x.var()]
        ([2.5], True)
    """
    count = a.count + b.count
    delta = b.mean - a.mean
    safe = np.where(count > 0, count, 1.0)
    mean = a.mean + delta * (b.count / safe)
    m2 = a.m2 + b.m2 + delta**2 * (a.count * b.count / safe)
    return NumpyMoments(count, mean, m2)
