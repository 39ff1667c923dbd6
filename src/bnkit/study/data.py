"""The study's data: scikit-learn's bundled digits, documented domain shifts and deterministic splits.

The source domain is ``sklearn.datasets.load_digits`` as shipped (1797 greyscale 8x8 images, no download),
scaled to ``[0, 1]``. Each target domain applies one documented shift to a disjoint set of digit images:

========== ============================================================================================
domain     what changes
========== ============================================================================================
contrast   ``x' = 0.3 * x + 0.6``: a washed-out, bright scan. An affine change of the input, which a
           BatchNorm after the first convolution can undo exactly once its statistics are recomputed.
blur       a 3x3 Gaussian blur (sigma 1 pixel, edges replicated): changes the spatial structure, not
           only the statistics.
noise      additive Gaussian noise of standard deviation 0.3, clipped to ``[0, 1]``. Different noise for
           every image, fixed by the seed.
invert     ``x' = 1 - x``. The negative control: also affine, but with a negative slope, which flips the
           sign of every first-layer feature. Recomputing statistics cannot undo a sign flip.
========== ============================================================================================

Splits are stratified per class and disjoint: per class about 80 source-training images, 20 source-test
images, ``target_per_class`` (20 by default: "tens of images per class") labelled target-training images and
the remaining ~60 as the held-out target test set. The same target images are used for every domain, so the
domains differ only by their shift.

Example:
    >>> splits = make_splits(seed=0)
    >>> splits.source_train.x.shape[1:], len(splits.target_train.x) == 10 * 20
    (torch.Size([1, 8, 8]), True)
    >>> make_domain(splits.target_test, "invert", seed=0).x.max() <= 1.0
    tensor(True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bnkit.study.catalog import NEGATIVE_CONTROLS

__all__ = [
    "DOMAINS",
    "NEGATIVE_CONTROLS",
    "Dataset",
    "Splits",
    "apply_shift",
    "load_digits_tensors",
    "make_domain",
    "make_splits",
]


@dataclass(frozen=True)
class Dataset:
    """Images ``x`` of shape ``[N, 1, 8, 8]`` (float32 in ``[0, 1]``) and integer labels ``y`` of shape ``[N]``.

    Example:
        >>> ds = Dataset(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]))
        >>> len(ds)
        2
    """

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    """The four disjoint, class-stratified splits of the digits.

    Example:
        >>> s = make_splits(seed=1)
        >>> len(s.source_train) > len(s.target_test) > len(s.target_train)
        True
    """

    source_train: Dataset
    source_test: Dataset
    target_train: Dataset
    target_test: Dataset


def _contrast(x: Tensor, gen: torch.Generator) -> Tensor:
    return 0.3 * x + 0.6


def _blur(x: Tensor, gen: torch.Generator) -> Tensor:
    coords = torch.tensor([-1.0, 0.0, 1.0])
    g = torch.exp(-(coords**2) / 2.0)
    kernel = torch.outer(g, g)
    kernel = (kernel / kernel.sum()).view(1, 1, 3, 3)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.conv2d(padded, kernel)


def _noise(x: Tensor, gen: torch.Generator) -> Tensor:
    return (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)


def _invert(x: Tensor, gen: torch.Generator) -> Tensor:
    return 1.0 - x


#: Target domains in the order they are reported; each maps a batch of images (and a generator for random
#: shifts) to the shifted images.
DOMAINS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "contrast": _contrast,
    "blur": _blur,
    "noise": _noise,
    "invert": _invert,
}


def load_digits_tensors() -> Dataset:
    """All 1797 digits as a :class:`Dataset` scaled to ``[0, 1]`` (needs scikit-learn, bundled data).

    Raises:
        ImportError: scikit-learn is not installed (``pip install "bnkit[study]"``).

    Example:
        >>> load_digits_tensors().x.shape
        torch.Size([1797, 1, 8, 8])
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('bnkit study needs scikit-learn for its bundled digits: pip install "bnkit[study]"') from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return Dataset(x, y)


def make_splits(
    seed: int,
    *,
    target_per_class: int = 20,
    source_per_class: int = 80,
    source_test_per_class: int = 20,
    data: Dataset | None = None,
) -> Splits:
    """Disjoint class-stratified splits of the digits, shuffled by ``seed``.

    Per class: ``source_per_class`` source-training images, ``source_test_per_class`` source-test images,
    ``target_per_class`` target-training images and every remaining image as target test.

    Args:
        seed: shuffling seed; the same seed always gives the same splits.
        target_per_class: labelled target-training images per class.
        source_per_class: source-training images per class.
        source_test_per_class: source-test images per class.
        data: the images to split; defaults to :func:`load_digits_tensors`.

    Returns:
        The four splits.

    Raises:
        ValueError: a class has too few images for the requested sizes.

    Example:
        >>> len(make_splits(0, target_per_class=10).target_train)
        100
    """
    data = load_digits_tensors() if data is None else data
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[], [], [], []]
    sizes = (source_per_class, source_test_per_class, target_per_class)
    for cls in torch.unique(data.y).tolist():
        idx = torch.nonzero(data.y == cls).flatten()
        if len(idx) <= sum(sizes):
            raise ValueError(
                f"digits class {cls} has {len(idx)} images, fewer than the {sum(sizes) + 1} the split needs: "
                "lower source_per_class, source_test_per_class or target_per_class"
            )
        idx = idx[torch.randperm(len(idx), generator=gen)]
        start = 0
        for i, size in enumerate(sizes):
            parts[i].append(idx[start : start + size])
            start += size
        parts[3].append(idx[start:])
    datasets = []
    for part in parts:
        idx = torch.cat(part)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        datasets.append(Dataset(data.x[idx], data.y[idx]))
    return Splits(*datasets)


def apply_shift(x: Tensor, domain: str, seed: int) -> Tensor:
    """Apply the shift of ``domain`` (a key of :data:`DOMAINS`, or ``"source"`` for none) to images ``x``.

    Raises:
        ValueError: unknown domain.

    Example:
        >>> apply_shift(torch.zeros(1, 1, 8, 8), "contrast", seed=0).unique()
        tensor([0.6000])
    """
    if domain == "source":
        return x.clone()
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}: choose from {', '.join(DOMAINS)}")
    # a different stream per domain so adding a domain never changes another one's noise
    gen = torch.Generator().manual_seed(seed * 1000 + list(DOMAINS).index(domain))
    return DOMAINS[domain](x, gen).contiguous()


def make_domain(data: Dataset, domain: str, seed: int) -> Dataset:
    """``data`` with the shift of ``domain`` applied to its images (labels unchanged).

    Example:
        >>> ds = Dataset(torch.ones(1, 1, 8, 8), torch.tensor([3]))
        >>> float(make_domain(ds, "invert", seed=0).x.sum())
        0.0
    """
    return Dataset(apply_shift(data.x, domain, seed), data.y)
