"""Update rules for running (moving) statistics, in both conventions.

PyTorch's ``momentum`` is the weight of the NEW batch: ``r <- (1 - m) * r + m * x`` (default 0.1).
Keras's ``momentum`` is the weight of the OLD value: ``r <- r * m + x * (1 - m)`` (default 0.99).
Both are written as their libraries write them, so the update itself rounds exactly as theirs does.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["ema_update", "keras_ema_update", "momentum_factor", "torch_to_keras_momentum", "unbias"]


def ema_update(running: Tensor, batch: Tensor, momentum: float) -> Tensor:
    """PyTorch convention: returns ``(1 - momentum) * running + momentum * batch``.

    Example:
        >>> import torch
        >>> ema_update(torch.tensor([0.0]), torch.tensor([1.0]), 0.1).tolist()
        [0.10000000149011612]
    """
    return running * (1.0 - momentum) + batch * momentum


def keras_ema_update(running: Tensor, batch: Tensor, keras_momentum: float) -> Tensor:
    """Keras convention, written as Keras writes it: ``running * momentum + batch * (1 - momentum)``.

    Example:
        >>> import torch
        >>> keras_ema_update(torch.tensor([0.0]), torch.tensor([1.0]), 0.99).tolist()
        [0.009999999776482582]
    """
    return running * keras_momentum + batch * (1.0 - keras_momentum)


def momentum_factor(momentum: float | None, num_batches_tracked: int) -> float:
    """The weight of the new batch: ``momentum``, or ``1 / num_batches_tracked`` when it is None.

    ``momentum=None`` is PyTorch's cumulative moving average; ``num_batches_tracked`` counts the current batch.

    Example:
        >>> momentum_factor(None, 4), momentum_factor(0.1, 4)
        (0.25, 0.1)
    """
    if momentum is None:
        return 1.0 / float(num_batches_tracked)
    return float(momentum)


def torch_to_keras_momentum(momentum: float) -> float:
    """Convert between conventions (the map is its own inverse): ``1 - momentum``.

    Example:
        >>> round(torch_to_keras_momentum(0.1), 12)
        0.9
    """
    return 1.0 - float(momentum)


def unbias(biased_var: Tensor, count: Tensor | float) -> Tensor:
    """Bessel's correction ``var * n / (n - 1)`` as PyTorch applies it to the running variance.

    Example:
        >>> import torch
        >>> unbias(torch.tensor([1.0]), 2.0).tolist()
        [2.0]
    """
    return biased_var * (count / (count - 1))
