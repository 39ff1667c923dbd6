"""Deterministic training and evaluation loops for the study (plain PyTorch, Adam, cross-entropy).

Example:
    >>> from bnkit.study.data import make_splits
    >>> from bnkit.study.model import DigitsNet
    >>> s = make_splits(0)
    >>> model = train(DigitsNet(), s.source_train, epochs=1, batch_size=32, seed=0)
    >>> 0.0 <= accuracy(model, s.source_test) <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from bnkit.study.data import Dataset

__all__ = ["accuracy", "batches", "predict", "train"]


def batches(
    data: Dataset, batch_size: int, *, seed: int | None = None, drop_last: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` mini-batches of ``data``, shuffled by ``seed`` (in order when ``seed`` is None).

    Example:
        >>> ds = Dataset(torch.zeros(5, 1, 8, 8), torch.arange(5))
        >>> [len(y) for _, y in batches(ds, 2)]
        [2, 2, 1]
    """
    n = len(data)
    if seed is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield data.x[idx], data.y[idx]


def train(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    lr: float = 3e-3,
    optimizer: str = "adam",
    on_step: Callable[[], None] | None = None,
) -> nn.Module:
    """Train the parameters of ``model`` that have ``requires_grad``; returns ``model`` (trained in place).

    The model is put in training mode first (``model.train()``); BatchNorm layers frozen with
    :func:`bnkit.freeze` stay in inference mode because the freeze survives ``train()``. Incomplete last
    batches are dropped so every step normalises over exactly ``batch_size`` samples. Nothing happens when no
    parameter requires a gradient except that BatchNorm layers in training mode see the data (statistics
    adapt), which is what "training BN layers only" still does with a frozen affine.

    Args:
        model: the network.
        data: training data.
        epochs: passes over ``data``.
        batch_size: samples per step.
        seed: shuffling seed of epoch ``e`` is ``seed * 1009 + e``.
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        on_step: called after every step (progress reporting).

    Returns:
        ``model``, trained.

    Raises:
        ValueError: ``batch_size`` larger than the data, or unknown ``optimizer``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> ds = Dataset(torch.rand(8, 1, 8, 8), torch.arange(8) % 10)
        >>> train(net, ds, epochs=1, batch_size=4, seed=0) is net
        True
    """
    if batch_size > len(data):
        raise ValueError(f"batch_size {batch_size} is larger than the {len(data)} training samples")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}: choose 'adam' or 'sgd'")
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer | None = None
    if params:
        opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        for x, y in batches(data, batch_size, seed=seed * 1009 + epoch, drop_last=True):
            if opt is None:
                with torch.no_grad():
                    model(x)
            else:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
            if on_step is not None:
                on_step()
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, *, batch_size: int = 512) -> Tensor:
    """Class predictions of ``model`` in inference mode (the model's mode is restored afterwards).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> predict(net, torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3])
    """
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, data: Dataset) -> float:
    """Fraction of ``data`` that ``model`` (in inference mode) classifies correctly.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> 0.0 <= accuracy(net, Dataset(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]))) <= 1.0
        True
    """
    return float((predict(model, data.x) == data.y).float().mean())
