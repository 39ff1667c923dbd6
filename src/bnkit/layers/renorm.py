"""Batch Renormalization settings (Ioffe 2017): clipping bounds, their warm-up/ramp schedule, and momentum."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Renorm"]


@dataclass(frozen=True)
class Renorm:
    """How :class:`bnkit.BatchNorm` applies Batch Renormalization in training.

    In training the output is ``((x - mu_B) / sigma_B * r + d) * gamma + beta`` with ``r = clip(sigma_B /
    sigma_r, rmin, rmax)`` and ``d = clip((mu_B - mu_r) / sigma_r, -dmax, dmax)`` (no gradient through r, d),
    where ``mu_r``/``sigma_r`` are the ``renorm_mean``/``renorm_std`` buffers, moving averages with ``momentum``.
    Inference uses the running statistics as plain BatchNorm does.

    Schedule (the paper's: plain BN for 5k steps, rmax ramps to 3 by 40k steps, dmax to 5 by 25k): for the
    first ``warmup_steps`` training steps r = 1 and d = 0; then ``rmax`` grows linearly from 1 and ``dmax`` from
    0 to their final values over ``rmax_ramp_steps``/``dmax_ramp_steps`` (0 = at once); ``rmin`` follows as
    ``1 / rmax`` unless given. The step is the layer's ``num_batches_tracked`` before the current update.

    Args:
        rmax: Final upper clip of r (``math.inf`` for none).
        dmax: Final clip of |d| (``math.inf`` for none).
        rmin: Lower clip of r; ``None`` means ``1 / rmax`` at every step.
        momentum: PyTorch convention (weight of the NEW batch) for ``renorm_mean``/``renorm_std``.
        keras_momentum: Keras convention (weight of the OLD value); when set it replaces ``momentum`` and the
            update is written as Keras writes it. ``BatchNorm.from_keras(renorm=True)`` sets it.
        warmup_steps: Steps of plain BatchNorm before renorm starts.
        rmax_ramp_steps: Steps after warm-up over which rmax grows from 1 to ``rmax``.
        dmax_ramp_steps: Steps after warm-up over which dmax grows from 0 to ``dmax``.

    Example:
        >>> Renorm.paper().bounds(0)
        (1.0, 1.0, 0.0)
        >>> Renorm(rmax=3.0, dmax=5.0).bounds(10)
        (0.3333333333333333, 3.0, 5.0)
    """

    rmax: float = 3.0
    dmax: float = 5.0
    rmin: float | None = None
    momentum: float = 0.01
    keras_momentum: float | None = None
    warmup_steps: int = 0
    rmax_ramp_steps: int = 0
    dmax_ramp_steps: int = 0

    def __post_init__(self) -> None:
        if not self.rmax >= 1.0:
            raise ValueError(f"Renorm: rmax must be >= 1. Received: rmax={self.rmax}")
        if not self.dmax >= 0.0:
            raise ValueError(f"Renorm: dmax must be >= 0. Received: dmax={self.dmax}")
        if self.rmin is not None and not 0.0 <= self.rmin <= self.rmax:
            raise ValueError(f"Renorm: need 0 <= rmin <= rmax. Received: rmin={self.rmin}, rmax={self.rmax}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"Renorm: momentum must be in [0, 1]. Received: momentum={self.momentum}")
        for field in ("warmup_steps", "rmax_ramp_steps", "dmax_ramp_steps"):
            if getattr(self, field) < 0:
                raise ValueError(f"Renorm: {field} must be >= 0. Received: {field}={getattr(self, field)}")

    @classmethod
    def paper(cls) -> Renorm:
        """The schedule of Ioffe (2017): 5k warm-up steps, rmax 3 by step 40k, dmax 5 by step 25k.

        Example:
            >>> Renorm.paper().bounds(40_000)
            (0.3333333333333333, 3.0, 5.0)
        """
        return cls(rmax=3.0, dmax=5.0, warmup_steps=5000, rmax_ramp_steps=35_000, dmax_ramp_steps=20_000)

    @classmethod
    def from_keras(cls, renorm_clipping: dict | None = None, renorm_momentum: float = 0.99) -> Renorm:
        """Keras 3's ``renorm_clipping`` (keys rmax, rmin, dmax; a missing key means no clipping).

        Example:
            >>> Renorm.from_keras({"rmax": 2.0}).bounds(0)
            (0.0, 2.0, inf)
        """
        clipping = dict(renorm_clipping or {})
        unknown = set(clipping) - {"rmax", "rmin", "dmax"}
        if unknown:
            raise ValueError(
                f"Renorm.from_keras: unknown renorm_clipping keys {sorted(unknown)}; "
                f"supported: rmax, rmin, dmax. Received: {clipping}"
            )

        def bound(key: str, default: float) -> float:
            value = clipping.get(key)
            return default if value is None else float(value)

        return cls(
            rmax=bound("rmax", math.inf),
            rmin=bound("rmin", 0.0),
            dmax=bound("dmax", math.inf),
            momentum=1.0 - float(renorm_momentum),
            keras_momentum=float(renorm_momentum),
        )

    def bounds_at(self, step: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`bounds` for a step held in a tensor (``num_batches_tracked``), computed on its device.

        The same arithmetic as :meth:`bounds` in float64, so the layer never reads the step on the host (no
        device sync, no graph break under ``torch.compile``).

        Example:
            >>> r = Renorm(rmax=3.0, dmax=4.0, rmax_ramp_steps=2, dmax_ramp_steps=4)
            >>> [round(float(v), 6) for v in r.bounds_at(torch.tensor(0))] == list(r.bounds(0))
            True
        """
        step64 = step.to(torch.float64)
        done = step64 - self.warmup_steps + 1
        one = torch.ones_like(step64)
        r_frac = one if self.rmax_ramp_steps == 0 else torch.clamp(done / self.rmax_ramp_steps, max=1.0)
        d_frac = one if self.dmax_ramp_steps == 0 else torch.clamp(done / self.dmax_ramp_steps, max=1.0)
        r_full, d_full = r_frac >= 1.0, d_frac >= 1.0
        rmax = torch.where(r_full, self.rmax, 1.0 + (self.rmax - 1.0) * r_frac)
        dmax = torch.where(d_full, self.dmax, self.dmax * d_frac)
        rmin = 1.0 / rmax if self.rmin is None else torch.where(r_full, self.rmin, 1.0 - (1.0 - self.rmin) * r_frac)
        warm = step64 < self.warmup_steps
        rmin, rmax, dmax = torch.where(warm, 1.0, rmin), torch.where(warm, 1.0, rmax), torch.where(warm, 0.0, dmax)
        return rmin.to(dtype), rmax.to(dtype), dmax.to(dtype)

    def bounds(self, step: int) -> tuple[float, float, float]:
        """``(rmin, rmax, dmax)`` in force at training step ``step`` (0-based).

        Example:
            >>> Renorm(rmax=3.0, dmax=4.0, rmax_ramp_steps=2, dmax_ramp_steps=4).bounds(0)
            (0.5, 2.0, 1.0)
        """
        if step < self.warmup_steps:
            return 1.0, 1.0, 0.0
        done = step - self.warmup_steps + 1
        r_frac = 1.0 if self.rmax_ramp_steps == 0 else min(1.0, done / self.rmax_ramp_steps)
        d_frac = 1.0 if self.dmax_ramp_steps == 0 else min(1.0, done / self.dmax_ramp_steps)
        rmax = self.rmax if r_frac == 1.0 else 1.0 + (self.rmax - 1.0) * r_frac
        dmax = self.dmax if d_frac == 1.0 else self.dmax * d_frac
        if self.rmin is None:
            rmin = 1.0 / rmax
        else:
            rmin = self.rmin if r_frac == 1.0 else 1.0 - (1.0 - self.rmin) * r_frac
        return rmin, rmax, dmax
