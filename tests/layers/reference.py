"""A float64 reference BatchNorm written from the formulas in semantics.md, independent of bnkit's code."""

from __future__ import annotations

import numpy as np


def reference_forward(
    x: np.ndarray,
    axis: int,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    mean: np.ndarray | None = None,
    var: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Normalise ``x`` (float64) with batch statistics, or with ``mean``/``var`` when given.

    Returns (y, mean, biased var, count) of the statistics actually used.
    """
    x = x.astype(np.float64)
    axis = axis % x.ndim
    moved = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    if mean is None:
        if mask is not None:
            keep = np.moveaxis(np.expand_dims(mask, axis), axis, -1).reshape(-1).astype(bool)
            moved = moved[keep]
        count = float(moved.shape[0])
        mean = moved.mean(axis=0) if count else np.zeros(x.shape[axis])
        var = ((moved - mean) ** 2).mean(axis=0) if count else np.zeros(x.shape[axis])
    else:
        count = float(moved.shape[0])
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.astype(np.float64).reshape(shape)
    if bias is not None:
        y = y + bias.astype(np.float64).reshape(shape)
    return y, mean, var, count
