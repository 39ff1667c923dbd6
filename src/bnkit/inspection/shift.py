"""``bnkit.shift``: how far new data sits from what each BatchNorm layer learned, and what to do about it.

For every BN layer with running statistics, the model runs on ``data`` in eval mode (the way it will be deployed:
earlier layers normalise with their running statistics) while forward pre-hooks collect the exact per-channel
mean and variance of the layer's input (float64 Chan merges over all batches). Each channel is summarised as a
Gaussian; the layer's distance is the symmetric KL divergence between the running-statistics Gaussian and the
data Gaussian, averaged over channels (the layer's ``eps`` is added to both variances: the layer divides by
``sqrt(var + eps)``, so differences below eps do not change its output). The overall score is the mean of the
layer distances.

Recommendation (thresholds below, module constants):

* ``score < KEEP_FROZEN_BELOW``: **keep-frozen**. The data looks like what the statistics were computed on;
  keep BN in inference mode (Keras's advice for fine-tuning).
* ``KEEP_FROZEN_BELOW <= score < FINE_TUNE_ABOVE``: **recalibrate**. The statistics are off but the features
  are still meaningful; recompute them on the new data (AdaBN: ``bnkit.recalibrate(model, data)``), no labels.
* ``score >= FINE_TUNE_ABOVE``: **fine-tune-bn**. The shift is so large that statistics alone are unlikely to
  suffice; recalibrate, then fine-tune the BN layers (statistics and gamma/beta) on labelled target data.

Why these values: measured with the study's digits setup (scikit-learn's load_digits, a 3-conv BN net trained
15 epochs on the source split, scores on about 600 target images; seeds 0, 1, 2):

==========  =============  ========================  ===============================================
data        score          source model accuracy     after recalibration alone (AdaBN)
==========  =============  ========================  ===============================================
held-out    0.002 - 0.003  99 - 100%                 (not needed)
noise       0.07 - 0.09    51 - 59%                  76%
invert      0.76 - 1.0     14 - 19%                  18 - 21% (a sign flip: statistics cannot fix it)
blur        0.96 - 1.2     32 - 53%                  87 - 92%
contrast    10.9 - 13.4    10 - 22%                  99%
==========  =============  ========================  ===============================================

``KEEP_FROZEN_BELOW = 0.02`` sits 7x above unshifted data and 3x below the mildest shift that recalibration
improved by 20 points. (A smaller zero-padded net of the test suite gives held-out 0.001, noise 0.036, contrast
1.2; stopped early at a high learning rate, its stale running statistics give held-out 0.015. Erring towards
"recalibrate" is cheap: recalibrating on data of the training distribution is precise BN, harmless given
enough samples.)

``FINE_TUNE_ABOVE = 50`` is deliberately above every shift that recalibration fixed here
(contrast scores about 12 and recovers 99%); no measured domain exceeded it, so it is a conservative bound to be
refined by the study (``bnkit study``), which reports the score next to the winning fine-tuning policy.
Limitation: the score measures how far the statistics moved, not whether new statistics can undo the shift. An
inverted image moves them about as far as blur, yet recalibration does not help: check with labelled target
data when the score recommends recalibration and accuracy stays low.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bnkit.core.divergence import gaussian_symmetric_kl
from bnkit.core.moments import Moments, channel_moments, merge_moments, reduction_dims
from bnkit.inspection._common import channel_axis, has_running_stats, limited
from bnkit.layers.kinds import named_batchnorm_like, warn_unrecognised
from bnkit.shared.errors import first_line
from bnkit.shared.table import text_table
from bnkit.tools.model_edit import check_model
from bnkit.tools.model_inputs import call_on_batch, eval_run

__all__ = [
    "FINE_TUNE_ABOVE",
    "KEEP_FROZEN_BELOW",
    "RECOMMENDATIONS",
    "LayerShift",
    "ShiftReport",
    "recommend",
    "shift",
]

#: Below this overall score the data matches the running statistics: keep BN frozen (inference mode).
KEEP_FROZEN_BELOW = 0.02

#: At or above this overall score recalibration alone is unlikely to suffice: fine-tune the BN layers.
FINE_TUNE_ABOVE = 50.0

#: The possible recommendations, from the smallest shift to the largest.
RECOMMENDATIONS = ("keep-frozen", "recalibrate", "fine-tune-bn")


@dataclass
class LayerShift:
    """Distance between one BN layer's running statistics and the statistics of its input on the data.

    Attributes:
        name: Qualified layer name.
        channels: Number of channels.
        samples: Values seen per channel (batch x spatial positions, summed over batches).
        distance: Symmetric KL divergence per channel, averaged over channels.
        max_channel_distance: The largest per-channel divergence.
        mean_shift: Mean over channels of ``|mean_data - running_mean| / sqrt(running_var + eps)``.
        log_var_ratio: Mean over channels of ``|log((var_data + eps) / (running_var + eps))|``.

    Example:
        >>> LayerShift("bn", 4, 100, 0.0, 0.0, 0.0, 0.0).distance
        0.0
    """

    name: str
    channels: int
    samples: int
    distance: float
    max_channel_distance: float
    mean_shift: float
    log_var_ratio: float


@dataclass
class ShiftReport:
    """Per-layer distances, the overall score and the recommendation of :func:`shift`.

    Attributes:
        layers: One :class:`LayerShift` per BN layer that saw data, in module order.
        score: Mean of the layer distances.
        recommendation: ``"keep-frozen"``, ``"recalibrate"`` or ``"fine-tune-bn"``.
        reason: The recommendation in words, with the thresholds.
        batches: Number of batches used.
        skipped: Names of BN layers left out, with why (no running statistics, never called).
        thresholds: ``{"keep_frozen_below": ..., "fine_tune_above": ...}`` used.

    Example:
        >>> ShiftReport([], 0.0, "keep-frozen", "", 0).recommendation
        'keep-frozen'
    """

    layers: list[LayerShift]
    score: float
    recommendation: str
    reason: str
    batches: int
    skipped: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(
        default_factory=lambda: {"keep_frozen_below": KEEP_FROZEN_BELOW, "fine_tune_above": FINE_TUNE_ABOVE}
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready).

        Example:
            >>> ShiftReport([], 0.0, "keep-frozen", "", 0).to_dict()["score"]
            0.0
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShiftReport:
        """The report back from :meth:`to_dict` (e.g. from ``bnkit shift --json``).

        Example:
            >>> report = ShiftReport([LayerShift("bn", 4, 100, 0.5, 1.0, 0.1, 0.2)], 0.5, "recalibrate", "", 1)
            >>> ShiftReport.from_dict(report.to_dict()) == report
            True
        """
        return cls(**{**data, "layers": [LayerShift(**layer) for layer in data["layers"]]})

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict` (non-finite numbers as strings).

        Example:
            >>> '"recommendation": "keep-frozen"' in ShiftReport([], 0.0, "keep-frozen", "", 0).to_json()
            True
        """
        return json.dumps(_finite(self.to_dict()), indent=indent)

    columns = ("layer", "channels", "distance", "max channel", "mean shift (sd)", "|log var ratio|")

    def rows(self) -> list[list[Any]]:
        """Table rows matching :attr:`columns`.

        Example:
            >>> ShiftReport([LayerShift("bn", 4, 100, 0.5, 1.0, 0.1, 0.2)], 0.5, "recalibrate", "", 1).rows()
            [['bn', 4, 0.5, 1.0, 0.1, 0.2]]
        """
        return [
            [row.name, row.channels, row.distance, row.max_channel_distance, row.mean_shift, row.log_var_ratio]
            for row in self.layers
        ]

    def verdict(self) -> str:
        """The score, the recommendation and why, in one line.

        Example:
            >>> ShiftReport([], 0.01, "keep-frozen", "Close.", 1).verdict()
            'score 0.01: keep-frozen. Close.'
        """
        return f"score {self.score:.4g}: {self.recommendation}. {self.reason}"

    def __str__(self) -> str:
        return f"{text_table(self.columns, self.rows())}\n\n{self.verdict()}"


def recommend(score: float) -> tuple[str, str]:
    """The recommendation for an overall score, and why in words.

    Example:
        >>> recommend(0.01)[0], recommend(5.0)[0], recommend(1e4)[0]
        ('keep-frozen', 'recalibrate', 'fine-tune-bn')
    """
    if not math.isfinite(score) or score >= FINE_TUNE_ABOVE:
        return "fine-tune-bn", (
            f"Score >= {FINE_TUNE_ABOVE:g}: a shift this large is unlikely to be fixed by new statistics alone; "
            "recalibrate (bnkit.recalibrate) and then fine-tune the BN layers on labelled target data."
        )
    if score >= KEEP_FROZEN_BELOW:
        return "recalibrate", (
            f"Score between {KEEP_FROZEN_BELOW:g} and {FINE_TUNE_ABOVE:g}: the running statistics no longer "
            "match this data; recompute them on it (AdaBN): bnkit.recalibrate(model, data), then check accuracy "
            "on labelled target data; if it stays low, fine-tune all layers with BN in training mode."
        )
    return "keep-frozen", (
        f"Score < {KEEP_FROZEN_BELOW:g}: the data matches the running statistics; keep BN frozen (inference "
        "mode) when fine-tuning."
    )


def shift(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> ShiftReport:
    """Score the domain shift between ``data`` and the running statistics of every BN layer of ``model``.

    Every BatchNorm kind with running statistics counts, FrozenBatchNorm2d included (a detector's frozen
    backbone: is it worth ``bnkit.recalibrate(model, data, include_frozen=True)``?).

    The model runs on ``data`` in eval mode without gradients (running statistics cannot change); every module's
    training flag is restored and every hook removed afterwards, also on error. See the module docstring for the
    distance, the score and the thresholds of the recommendation.

    Args:
        model: A model with BatchNorm layers that keep running statistics.
        data: Any iterable of batches: tensors, ``(inputs, labels, ...)`` tuples (inputs used) or dicts of
            keyword arguments; e.g. a ``DataLoader``.
        num_batches: Use at most this many batches (all when None).
        forward: Optional ``forward(model, batch)`` for models not called as above; a detector's batch of
            images is one list: ``forward=lambda model, images: model(images)`` (docs/tools.md, "Example inputs").

    Returns:
        A :class:`ShiftReport` with per-layer distances, ``score``, ``recommendation`` and ``reason``.

    Raises:
        ValueError: No BN layer with running statistics, no batch in ``data``, or the model fails on a batch.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.BatchNorm1d(3)).eval()
        >>> model[0].running_var.fill_(4.0)
        tensor([4., 4., 4.])
        >>> shift(model, [2 * torch.randn(256, 3)]).recommendation
        'keep-frozen'
        >>> shift(model, [2 * torch.randn(256, 3) + 10]).recommendation
        'recalibrate'
    """
    check_model(model, "shift")
    run = forward if forward is not None else functools.partial(call_on_batch, tool="shift")
    layers = [(name, info.module) for name, info in named_batchnorm_like(model)]
    tracked = [(name, module) for name, module in layers if has_running_stats(module)]
    skipped = [f"{name} (track_running_stats=False)" for name, module in layers if not has_running_stats(module)]
    unrecognised = warn_unrecognised(model, "shift")
    skipped += [f"{name} (running statistics, but bnkit does not recognise the class)" for name in unrecognised]
    if not tracked:
        also = f"; not recognised: {', '.join(unrecognised)} (bnkit.register_batchnorm)" if unrecognised else ""
        raise ValueError(
            "shift needs BatchNorm layers with running statistics; this model has none "
            f"(no BatchNorm, or all track_running_stats=False){also}"
        )
    acc: dict[int, Moments] = {}

    def hook(module: nn.Module, args: Any) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            return
        axis = channel_axis(module, x.ndim)
        x = x.detach()
        if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        part = channel_moments(x, reduction_dims(x.ndim, axis))
        part = Moments(part.count.double(), part.mean.double(), part.m2.double())
        previous = acc.get(id(module))
        acc[id(module)] = part if previous is None else merge_moments(previous, part)

    batches = 0
    with eval_run(model) as handles:
        for _, module in tracked:
            handles.append(module.register_forward_pre_hook(hook))
        for batch in limited(data, num_batches):
            try:
                run(model, batch)
            except (RuntimeError, ValueError, IndexError) as exc:
                shape = _shape_of(batch)
                raise ValueError(f"the model failed on batch {batches} (shape {shape}): {first_line(exc)}") from exc
            batches += 1
    if batches == 0:
        raise ValueError("shift: data yielded no batches")

    results = []
    for name, module in tracked:
        moments = acc.get(id(module))
        if moments is None:
            skipped.append(f"{name} (not called on this data)")
            continue
        results.append(_layer_shift(name, module, moments))
    if not results:
        raise ValueError("shift: no BatchNorm layer was called while running the model on the data")
    score = float(sum(r.distance for r in results) / len(results))
    recommendation, reason = recommend(score)
    return ShiftReport(results, score, recommendation, reason, batches, skipped)


def _layer_shift(name: str, module: nn.Module, moments: Moments) -> LayerShift:
    eps = float(getattr(module, "eps", 1e-5))
    count = moments.count.clamp_min(1.0)
    mean = moments.mean
    var = moments.m2 / count
    run_mean = module.running_mean.detach().double().cpu()
    run_var = module.running_var.detach().double().cpu()
    mean, var = mean.cpu(), var.cpu()
    per_channel = gaussian_symmetric_kl(run_mean, run_var, mean, var, eps=eps)
    scale = torch.sqrt(run_var.clamp_min(0.0) + eps)
    return LayerShift(
        name=name,
        channels=int(mean.numel()),
        samples=int(float(moments.count.max())),
        distance=float(per_channel.mean()),
        max_channel_distance=float(per_channel.max()),
        mean_shift=float(((mean - run_mean).abs() / scale).mean()),
        log_var_ratio=float(torch.log((var + eps) / (run_var.clamp_min(0.0) + eps)).abs().mean()),
    )


def _shape_of(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return str(list(batch.shape))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return str(list(batch[0].shape))
    return type(batch).__name__


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
