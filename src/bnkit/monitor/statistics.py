"""What the torch :class:`~bnkit.monitor.monitor.Monitor` takes from a BatchNorm call, and its summary.

:func:`channel_moments` measures a layer's input (one fused pass of float32 sums on CPU, finished in float64, with
an exact two-pass fallback when ``|mean| >> std`` would make the one-pass variance inaccurate; ``torch.var_mean``
elsewhere); :class:`Pending` keeps it with a snapshot of the layer's state; :func:`summarize` reads every layer of
a step back with one device sync and hands the vectors to the framework-free summary of
:mod:`bnkit.shared.monitor_stats` (shared with ``bnkit.keras.Monitor``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from bnkit.shared import monitor_stats

__all__ = ["ROWS", "STATE_KEYS", "Layer", "Pending", "channel_moments", "summarize"]

# float32 sums of squares carry a relative error of a few 1e-8 per element; 2e-6 is a generous bound.
_F32_SUM_REL_ERR = 2e-6
# One-pass variances are accepted while their error bound stays below this fraction of max(var, eps).
_VAR_REL_TOL = 1e-3
# Below this many contiguous values per (sample, channel), reducing over the outer dimension is faster.
_INNER_MIN = 32


class Layer:
    """What the monitor keeps about one selected BatchNorm layer.

    Example:
        >>> Layer("bn", nn.BatchNorm1d(2)).eps
        1e-05
    """

    __slots__ = ("eps", "is_bnkit", "module", "name", "records", "seen_step")

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.eps = float(module.eps)
        self.is_bnkit = callable(getattr(module, "uses_batch_stats", None)) and callable(
            getattr(module, "channel_axis", None)
        )
        self.seen_step: int | None = None
        self.records = 0


#: Rows of a layer's packed statistics (see :class:`Pending`).
ROWS = ("stat0", "stat1", "running_mean", "running_var", "weight", "bias")
STATE_KEYS = ROWS[2:]


class Pending:
    """Statistics of one layer taken during a forward call, not yet summarised.

    ``packed`` is a float64 ``[6, C]`` tensor with the rows of :data:`ROWS`: the first two are the batch's
    float32 sums and sums of squares when ``raw`` (the CPU fast path, finished at flush time for all layers
    at once), else its mean and biased variance; then the snapshot of the layer's tensors, NaN where the
    layer has no such tensor (``state_keys`` names those it has).

    Example:
        >>> p = Pending(Layer("bn", nn.BatchNorm1d(2)))
        >>> p.state, p.state_keys = torch.stack([torch.zeros(2), torch.ones(2)]), ("running_mean", "running_var")
        >>> p.pack(torch.zeros(2, 2, dtype=torch.float64)); p.snapshot("running_var").tolist()
        [1.0, 1.0]
    """

    __slots__ = ("count", "layer", "nbt", "packed", "raw", "skipped", "state", "state_keys", "uses_batch")

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.state: Tensor | None = None
        self.state_keys: tuple[str, ...] = ()
        self.nbt: int | Tensor | None = None
        self.skipped: Tensor | None = None  # bnkit's skipped_batches after the call (non-finite batches)
        self.packed: Tensor | None = None
        self.raw = False
        self.count = 0
        self.uses_batch = True

    def pack(self, stats: Tensor) -> None:
        """Store the batch statistics together with the snapshot, as one float64 tensor.

        Example:
            >>> p = Pending(Layer("bn", nn.BatchNorm1d(1))); p.pack(torch.ones(2, 1, dtype=torch.float64))
            >>> p.packed.shape
            torch.Size([6, 1])
        """
        if self.state_keys == STATE_KEYS:
            packed = torch.cat((stats, self.state.to(stats.dtype)))
        else:
            packed = torch.full((len(ROWS), stats.shape[1]), math.nan, dtype=torch.float64, device=stats.device)
            packed[:2] = stats
            for i, key in enumerate(self.state_keys):
                packed[ROWS.index(key)] = self.state[i]
        self.packed = packed.to(torch.float64)
        self.state = None

    def snapshot(self, key: str) -> Tensor | None:
        """Row ``key`` of the packed snapshot, or None when the layer has no such tensor.

        Example:
            >>> p = Pending(Layer("bn", nn.BatchNorm1d(1))); p.pack(torch.ones(2, 1, dtype=torch.float64))
            >>> p.snapshot("weight") is None
            True
        """
        return self.packed[ROWS.index(key)] if key in self.state_keys else None


def channel_moments(x: Tensor, axis: int, mask: Tensor | None, eps: float) -> tuple[Tensor, bool, int]:
    """Per-channel statistics of ``x`` over every axis but ``axis``: ``(stats [2, C], raw, values per channel)``.

    ``raw``: ``stats`` holds float32 sums and sums of squares, to be finished in float64 (:func:`summarize`);
    otherwise float64 mean and biased variance. ``torch.var_mean`` is exact but runs several times slower than
    the BatchNorm layer itself on CPU, so on CPU one pass of float32 sums is used, unless a channel's
    ``|mean| >> std`` would make ``E[x^2] - E[x]^2`` inaccurate (relative error above 1e-3 of
    ``max(var, eps)``): then the layer's statistics are computed exactly in two passes.

    Example:
        >>> stats, raw, count = channel_moments(torch.ones(4, 2, 8, 8) * 3, axis=1, mask=None, eps=1e-5)
        >>> raw, count, stats.tolist()  # |mean| >> std: exact two-pass mean and variance
        (False, 256, [[3.0, 3.0], [0.0, 0.0]])
    """
    channels = x.shape[axis]
    dims = tuple(d for d in range(x.ndim) if d != axis)
    if mask is not None:
        from bnkit.core.moments import channel_moments

        full_mask = mask.unsqueeze(axis).expand_as(x) if mask.ndim == x.ndim - 1 else mask
        m = channel_moments(x.double(), dims, full_mask)
        count = m.count.clamp_min(1.0)
        return torch.stack((m.mean, m.m2 / count)), False, int(m.count.min())
    count = x.numel() // channels
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        x = x.float()
    if x.device.type != "cpu":
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return torch.stack((mean, var)).double(), False, count
    flat = channel_view(x, axis)
    if flat.ndim == 3 and flat.shape[2] >= _INNER_MIN:  # (outer, C, inner): reduce the contiguous inner run
        s1 = flat.sum(dim=2).sum(dim=0)
        s2 = torch.linalg.vecdot(flat, flat, dim=2).sum(dim=0)
    else:  # short inner runs: reduce over rows of (outer, C * inner), vectorised across the columns
        rows = flat.reshape(flat.shape[0], -1)
        s1 = rows.sum(dim=0)
        s2 = torch.linalg.vecdot(rows, rows, dim=0)
        if flat.ndim == 3:
            s1 = s1.view(channels, -1).sum(dim=1)
            s2 = s2.view(channels, -1).sum(dim=1)
    # One-pass error bound ~ _F32_SUM_REL_ERR * E[x^2]; it exceeds _VAR_REL_TOL * max(var, eps) when
    # mean^2 > (1 - r) E[x^2] (and E[x^2] > eps / r, left out: exactly zero channels never trigger),
    # r = _F32_SUM_REL_ERR / _VAR_REL_TOL. One fused expression, one sync (free on CPU).
    r = _F32_SUM_REL_ERR / _VAR_REL_TOL
    if not bool(torch.addcmul(s2, s1, s1, value=-1.0 / ((1.0 - r) * count)).min() < 0):
        return torch.stack((s1, s2)), True, count
    shape = [1] * x.ndim
    shape[axis] = channels
    shift = (s1 / count).view(shape)
    centred = x - shift
    d1 = centred.sum(dim=dims).double() / count
    d2 = (centred * centred).sum(dim=dims).double() / count
    return torch.stack((shift.flatten().double() + d1, (d2 - d1 * d1).clamp_min(0.0))), False, count


def channel_view(x: Tensor, axis: int) -> Tensor:
    """A copy-free view of ``x`` as ``(outer, C, inner)`` or ``(rows, C)``; copies only odd layouts.

    Example:
        >>> channel_view(torch.zeros(2, 3, 4), 1).shape
        torch.Size([2, 3, 4])
    """
    channels = x.shape[axis]
    if x.ndim >= 3 and axis == 1:
        last = torch.channels_last if x.ndim == 4 else torch.channels_last_3d if x.ndim == 5 else None
        if last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=last):
            return x.movedim(1, -1).reshape(-1, channels)
    if not x.is_contiguous():
        x = x.contiguous()
    outer = math.prod(x.shape[:axis])
    inner = math.prod(x.shape[axis + 1 :])
    if inner == 1:
        return x.view(outer, channels)
    return x.view(outer, channels, inner)


def summarize(pending: list[Pending]) -> tuple[list[list[float]], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Rows of ``QUANTITIES`` plus num_batches_tracked, each layer's batch mean/variance, and its packed vectors.

    Every layer's vectors (and the device copies of ``num_batches_tracked``) are read back with one device sync;
    raw float32 sums are finished in float64 here, then :func:`bnkit.shared.monitor_stats.summarize` summarises
    all layers at once.

    Example:
        >>> p = Pending(Layer("bn", nn.BatchNorm1d(1)))
        >>> p.pack(torch.tensor([[2.0], [1.0]], dtype=torch.float64))
        >>> table, means, variances, _ = summarize([p]); table[0][:2]
        [2.0, 1.0]
    """
    device = pending[0].packed.device
    lengths = [p.packed.shape[1] for p in pending]
    device_nbt = [i for i, p in enumerate(pending) if isinstance(p.nbt, Tensor)]
    parts = [torch.cat([p.packed.to(device) for p in pending], dim=1).flatten()]
    parts += [pending[i].nbt.to(device, torch.float64).reshape(1) for i in device_nbt]
    flat = torch.cat(parts).cpu().numpy() if len(parts) > 1 else parts[0].cpu().numpy()
    total = sum(lengths)
    s0, s1, rm, rv, w, b = flat[: len(ROWS) * total].reshape(len(ROWS), total)
    nbt = [float(p.nbt) if isinstance(p.nbt, int) else math.nan for p in pending]
    for k, i in enumerate(device_nbt):
        nbt[i] = float(flat[len(ROWS) * total + k])
    # Raw layers hold float32 sums: finish them in float64, all layers at once.
    count = np.repeat(np.array([float(p.count) for p in pending]), lengths)
    raw = np.repeat(np.array([p.raw for p in pending]), lengths)
    with np.errstate(all="ignore"):
        mean = np.where(raw, s0 / count, s0)
        var = np.where(raw, np.maximum(s1 / count - mean * mean, 0.0), s1)
    packed = np.stack((mean, var, rm, rv, w, b))
    table = monitor_stats.summarize(packed, lengths, [p.layer.eps for p in pending])
    rows = [[*row, n] for row, n in zip(table.tolist(), nbt, strict=True)]
    splits = np.cumsum(lengths)[:-1]
    vectors = np.split(packed, splits, axis=1)
    return rows, np.split(mean, splits), np.split(var, splits), vectors
