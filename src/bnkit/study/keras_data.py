"""The study's data for Keras, in NumPy only: the same digits, shifts and splits as :mod:`bnkit.study.data`.

Channels-last images of shape ``[N, 8, 8, 1]`` (Keras's default layout), float32 in ``[0, 1]``, integer labels.
The design is the PyTorch study's (same domains, same per-class split sizes); the random draws come from NumPy's
``default_rng(seed)``, so the split of a given seed is not the same images as the PyTorch study's split of that
seed. Nothing here imports a deep-learning framework.

Example:
    >>> splits = make_splits(seed=0)
    >>> splits.source_train.x.shape[1:], len(splits.target_train) == 10 * 20
    ((8, 8, 1), True)
    >>> float(make_domain(splits.target_test, "invert", seed=0).x.max()) <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnkit.study.catalog import DOMAIN_NAMES  # the stream index of each domain

__all__ = ["SHIFTS", "ArrayDataset", "ArraySplits", "apply_shift", "load_digits_arrays", "make_domain", "make_splits"]


@dataclass(frozen=True)
class ArrayDataset:
    """Images ``x`` of shape ``[N, 8, 8, 1]`` (float32) and integer labels ``y`` of shape ``[N]`` (int64).

    Example:
        >>> len(ArrayDataset(np.zeros((2, 8, 8, 1), "float32"), np.array([0, 1])))
        2
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class ArraySplits:
    """The four disjoint, class-stratified splits.

    Example:
        >>> s = make_splits(seed=1)
        >>> len(s.source_train) > len(s.target_test) > len(s.target_train)
        True
    """

    source_train: ArrayDataset
    source_test: ArrayDataset
    target_train: ArrayDataset
    target_test: ArrayDataset


def _contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 0.3 * x + 0.6


def _blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    g = np.exp(-(np.array([-1.0, 0.0, 1.0]) ** 2) / 2.0)
    kernel = np.outer(g, g)
    kernel /= kernel.sum()
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(3):
        for j in range(3):
            out += kernel[i, j] * padded[:, i : i + h, j : j + w, :]
    return out


def _noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + 0.3 * rng.standard_normal(x.shape), 0.0, 1.0)


def _invert(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - x


#: The shift of every domain of :data:`bnkit.study.catalog.DOMAIN_NAMES` (documented in :mod:`bnkit.study.data`).
SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "contrast": _contrast,
    "blur": _blur,
    "noise": _noise,
    "invert": _invert,
}


def load_digits_arrays() -> ArrayDataset:
    """All 1797 digits, channels-last and scaled to ``[0, 1]`` (needs scikit-learn, bundled data).

    Raises:
        ImportError: scikit-learn is not installed (``pip install "bnkit[study]"``).

    Example:
        >>> load_digits_arrays().x.shape
        (1797, 8, 8, 1)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('bnkit study needs scikit-learn for its bundled digits: pip install "bnkit[study]"') from exc
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    return ArrayDataset(x, digits.target.astype(np.int64))


def make_splits(
    seed: int,
    *,
    target_per_class: int = 20,
    source_per_class: int = 80,
    source_test_per_class: int = 20,
    data: ArrayDataset | None = None,
) -> ArraySplits:
    """Disjoint class-stratified splits of the digits, shuffled by ``seed``.

    Sizes per class as in :func:`bnkit.study.data.make_splits`.

    Raises:
        ValueError: a class has too few images for the requested sizes.

    Example:
        >>> len(make_splits(0, target_per_class=10).target_train)
        100
    """
    data = load_digits_arrays() if data is None else data
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], [], []]
    sizes = (source_per_class, source_test_per_class, target_per_class)
    for cls in np.unique(data.y).tolist():
        idx = np.flatnonzero(data.y == cls)
        if len(idx) <= sum(sizes):
            raise ValueError(
                f"digits class {cls} has {len(idx)} images, fewer than the {sum(sizes) + 1} the split needs: "
                "lower source_per_class, source_test_per_class or target_per_class"
            )
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for i, size in enumerate(sizes):
            parts[i].append(idx[start : start + size])
            start += size
        parts[3].append(idx[start:])
    datasets = []
    for part in parts:
        idx = np.concatenate(part)
        idx = idx[rng.permutation(len(idx))]
        datasets.append(ArrayDataset(data.x[idx], data.y[idx]))
    return ArraySplits(*datasets)


def apply_shift(x: np.ndarray, domain: str, seed: int) -> np.ndarray:
    """Apply the shift of ``domain`` (or ``"source"`` for none) to channels-last images ``x``; float32 out.

    Raises:
        ValueError: unknown domain.

    Example:
        >>> np.unique(apply_shift(np.zeros((1, 8, 8, 1), "float32"), "contrast", seed=0)).tolist()
        [0.6000000238418579]
    """
    if domain == "source":
        return np.array(x, dtype=np.float32, copy=True)
    if domain not in SHIFTS:
        raise ValueError(f"unknown domain {domain!r}: choose from {', '.join(SHIFTS)}")
    # a different stream per domain so adding a domain never changes another one's noise
    rng = np.random.default_rng(seed * 1000 + DOMAIN_NAMES.index(domain))
    return np.ascontiguousarray(SHIFTS[domain](x.astype(np.float64), rng), dtype=np.float32)


def make_domain(data: ArrayDataset, domain: str, seed: int) -> ArrayDataset:
    """``data`` with the shift of ``domain`` applied to its images (labels unchanged).

    Example:
        >>> ds = ArrayDataset(np.ones((1, 8, 8, 1), "float32"), np.array([3]))
        >>> float(make_domain(ds, "invert", seed=0).x.sum())
        0.0
    """
    return ArrayDataset(apply_shift(data.x, domain, seed), data.y)
