"""Distances between per-channel Gaussian summaries of BatchNorm statistics (used by shift and monitoring)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["gaussian_symmetric_kl"]


def gaussian_symmetric_kl(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-channel symmetric KL divergence ``KL(p||q) + KL(q||p)`` between 1-D Gaussians.

    Closed form: ``0.5 * ((vp - vq)^2 + (vp + vq) * (mp - mq)^2) / (vp * vq)``. ``eps`` (the layer's own eps
    is a good choice) is added to both variances so dead channels give finite values. Computed in float64.

    Example:
        >>> import torch
        >>> float(gaussian_symmetric_kl(torch.tensor([0.0]), torch.tensor([1.0]),
        ...                             torch.tensor([1.0]), torch.tensor([1.0]), eps=0.0))
        1.0
    """
    mp, mq = mean_p.double(), mean_q.double()
    vp, vq = var_p.double() + eps, var_q.double() + eps
    diff = mp - mq
    return 0.5 * ((vp - vq) ** 2 + (vp + vq) * diff * diff) / (vp * vq)
