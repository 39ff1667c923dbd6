"""The study's model: a small convolutional network with a normalisation layer after every convolution.

Three 3x3 convolutions (16, 32, 64 channels, no bias since a norm follows), each followed by a normalisation
layer and ReLU, a 2x2 max-pool after the second, global average pooling and a linear head (``model.head``).
About 24k parameters; a forward pass over the whole digits set takes milliseconds on a CPU.

The convolutions pad by replicating the border pixel rather than with zeros, so an affine change of the input
``x' = a*x + b`` changes every first-layer feature map by exactly ``a*f + b*sum(w)``: a BatchNorm after it can
undo the shift completely (for ``a > 0``) once its statistics are recomputed. With zero padding the border
pixels would see ``0`` instead of ``b`` and the fix would only be approximate.

Example:
    >>> model = DigitsNet(norm="batch")
    >>> model(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NORMS", "DigitsNet", "make_norm"]

#: Normalisation kinds the factory builds, with the text the report uses for them.
NORMS: dict[str, str] = {
    "batch": "BatchNorm (torch.nn.BatchNorm2d)",
    "bnkit": "bnkit.BatchNorm",
    "group": "GroupNorm (8 groups)",
    "renorm": "Batch Renormalization (bnkit.BatchNorm, renorm)",
    "ghost": "Ghost BatchNorm (bnkit.BatchNorm, virtual_batch_size)",
}


def make_norm(
    kind: str,
    num_features: int,
    *,
    virtual_batch_size: int | None = None,
    renorm_warmup: int = 0,
    renorm_ramp: int = 0,
) -> nn.Module:
    """One normalisation layer of ``kind`` (a key of :data:`NORMS`) for ``num_features`` channels.

    Args:
        kind: ``"batch"`` (torch.nn.BatchNorm2d), ``"bnkit"`` (bnkit.BatchNorm), ``"group"`` (GroupNorm with
            ``min(8, num_features)`` groups), ``"renorm"`` (bnkit.BatchNorm with Batch Renormalization) or
            ``"ghost"`` (bnkit.BatchNorm normalising groups of ``virtual_batch_size`` samples).
        num_features: channels.
        virtual_batch_size: ghost-batch size, required for ``"ghost"``.
        renorm_warmup: training steps of plain BN before renorm corrections start (``"renorm"`` only).
        renorm_ramp: steps over which rmax and dmax then ramp up to their final values.

    Returns:
        The layer.

    Raises:
        ValueError: unknown ``kind`` or ``"ghost"`` without ``virtual_batch_size``.

    Example:
        >>> type(make_norm("group", 16)).__name__
        'GroupNorm'
    """
    if kind == "batch":
        return nn.BatchNorm2d(num_features)
    if kind == "group":
        return nn.GroupNorm(min(8, num_features), num_features)
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}: choose from {', '.join(NORMS)}")
    import bnkit

    if kind == "bnkit":
        return bnkit.BatchNorm(num_features)
    if kind == "ghost":
        if virtual_batch_size is None:
            raise ValueError("make_norm('ghost', ...) needs virtual_batch_size: the samples per ghost batch")
        return bnkit.BatchNorm(num_features, virtual_batch_size=virtual_batch_size)
    # Ioffe 2017's final clipping (rmax 3, dmax 5) after a warm-up and ramp the caller scales to its run
    # length; renorm momentum 0.1 like the running statistics, since the paper's 0.01 needs far more steps
    renorm = bnkit.Renorm(
        rmax=3.0,
        dmax=5.0,
        momentum=0.1,
        warmup_steps=renorm_warmup,
        rmax_ramp_steps=renorm_ramp,
        dmax_ramp_steps=renorm_ramp,
    )
    return bnkit.BatchNorm(num_features, renorm=renorm)


class DigitsNet(nn.Module):
    """Conv-norm-ReLU x3, global average pooling and a linear ``head``, for 1x8x8 digit images.

    Args:
        norm: normalisation kind after every convolution (see :func:`make_norm`).
        width: channels of the first convolution (doubled twice).
        num_classes: outputs of the head.
        **norm_kwargs: passed to :func:`make_norm` (``virtual_batch_size``, ``renorm_warmup``, ...).

    Example:
        >>> net = DigitsNet()
        >>> [type(m).__name__ for m in net.features][:3]
        ['Conv2d', 'BatchNorm2d', 'ReLU']
    """

    def __init__(self, norm: str = "batch", width: int = 16, num_classes: int = 10, **norm_kwargs: int) -> None:
        super().__init__()
        w = width

        def conv(cin: int, cout: int) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="replicate", bias=False)

        self.features = nn.Sequential(
            conv(1, w),
            make_norm(norm, w, **norm_kwargs),
            nn.ReLU(),
            conv(w, 2 * w),
            make_norm(norm, 2 * w, **norm_kwargs),
            nn.ReLU(),
            nn.MaxPool2d(2),
            conv(2 * w, 4 * w),
            make_norm(norm, 4 * w, **norm_kwargs),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
