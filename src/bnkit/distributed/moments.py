"""Cross-rank merges of per-channel :class:`~bnkit.core.moments.Moments`: exact, and differentiable for SyncBN.

Every rank contributes its exact ``(count, mean, m2)`` triple and every rank merges all of them the same way
(in float64, as Chan's formula for many parts: ``mean = sum(n_r mean_r) / N``,
``m2 = sum(m2_r) + sum(n_r (mean_r - mean)^2)``), so all ranks end with bitwise identical statistics.
PyTorch's SyncBatchNorm exchanges ``(mean, invstd)`` instead and rebuilds the variance as
``1 / invstd^2 - eps``, which loses the variance when it is far below ``eps``; the triples do not.

Ranks with an empty batch (count 0) contribute nothing but still take part in every collective.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from bnkit.core.moments import Moments
from bnkit.distributed import comm

__all__ = ["SyncMoments", "exchange", "merge_gathered", "reduce_moments", "sync_moments"]


def merge_gathered(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge stacked per-rank triples (rank on dim 0) exactly in float64; returns ``(count, mean, m2)``.

    ``counts`` is ``[world, 1]`` or ``[world, C]``; ``means`` and ``m2s`` are ``[world, C]``. Parts with count 0
    are ignored even if their mean or m2 is NaN; an all-empty merge gives count 0, mean 0, m2 0.

    Example:
        >>> n, mean, m2 = merge_gathered(torch.tensor([[2.0], [0.0]]), torch.tensor([[1.0], [9.0]]),
        ...                              torch.tensor([[2.0], [float("nan")]]))
        >>> float(n), float(mean), float(m2)
        (2.0, 1.0, 2.0)
    """
    n = counts.double()
    present = n > 0
    means = torch.where(present, means.double(), torch.zeros((), dtype=torch.float64, device=means.device))
    m2s = torch.where(present, m2s.double(), torch.zeros((), dtype=torch.float64, device=m2s.device))
    return _chan_merge(n, means, m2s)


def _chan_merge(n: Any, means: Any, m2s: Any) -> tuple[Any, Any, Any]:
    """Chan's merge of clean float64 parts (rank on dim 0; empty parts all zero), in the inputs' array library.

    Written with operators only, so that it runs on torch tensors and on NumPy arrays alike: NumPy's per-call
    overhead is a fraction of torch's, which is what a merge of a few small vectors costs (see :func:`exchange`).
    """
    total = n.sum(0)
    mean = (n * means).sum(0) / (total + (total == 0))  # an all-empty merge divides 0 by 1
    delta = means - mean
    return total, mean, m2s.sum(0) + (n * delta * delta).sum(0)


def _checked(moments: Moments, where: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean, m2)`` of ``moments``, once mean and m2 are known to have one shape (``where``: the caller)."""
    count, mean, m2 = moments
    if mean.shape != m2.shape:
        raise ValueError(
            f"{where}: mean and m2 must have the same shape; got {tuple(mean.shape)} and {tuple(m2.shape)}"
        )
    return count, mean, m2


def _like_local(
    total: Tensor, mu: Tensor, big_m2: Tensor, count: Tensor, mean: Tensor, m2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The merged (float64) statistics in the shapes and dtypes of this rank's (an integer count in mean's)."""
    dtype = mean.dtype
    return (
        total.to(count.dtype if count.is_floating_point() else dtype).reshape(count.shape),
        mu.to(dtype).reshape(mean.shape),
        big_m2.to(dtype).reshape(m2.shape),
    )


@torch.no_grad()
def reduce_moments(moments: Moments, group: Any = None) -> Moments:
    """Merge this rank's :class:`Moments` with every other rank's (no gradient); every rank gets the same result.

    The exact Chan merge of the ``(count, mean, m2)`` triples of all ranks of ``group``: the statistics of the
    union of the ranks' data. Ranks with count 0 contribute nothing. Without an initialised process group, or
    with world size 1, ``moments`` is returned unchanged and nothing is communicated. ``count`` may be a 0-d
    tensor or per channel; shapes and dtypes must agree across ranks (checked with one tiny header exchange,
    so a mismatch raises instead of aborting the backend).

    Args:
        moments: This rank's statistics (any dtype; merged in float64, returned in ``moments.mean.dtype``).
        group: Process group (default: the world).

    Returns:
        The global statistics, shaped like ``moments``.

    Raises:
        SyncMismatchError: The ranks' shapes or call sequences differ, or a rank never arrived in time.

    Example:
        >>> from bnkit.core.moments import channel_moments
        >>> m = channel_moments(torch.randn(16, 3), (0,))
        >>> reduce_moments(m) is m  # not distributed: nothing to merge
        True
    """
    if not comm.is_active(group):
        return moments
    count, mean, m2 = _checked(moments, "reduce_moments")
    what = "bnkit.distributed.reduce_moments"
    call = comm.next_call(group, what)
    dtype = mean.dtype
    count_flat = count.detach().to(dtype).reshape(-1)
    header = torch.tensor(
        [comm.tag_of(what, call), count_flat.numel(), mean.numel(), torch.finfo(dtype).bits],
        dtype=torch.int64,
        device=mean.device,
    )
    headers = comm.all_gather(header, group, what)
    bad = [r for r in range(headers.shape[0]) if not torch.equal(headers[r], header)]
    if bad:
        if any(int(headers[r, 0]) != int(header[0]) for r in bad):
            raise comm.mismatch(what, call, bad)
        raise comm.SyncMismatchError(
            f"{what}: ranks {bad} sent statistics of another shape or dtype (this rank: count {count_flat.numel()}, "
            f"{mean.numel()} channels, {dtype}); every rank must reduce the same layers in the same order"
        )
    payload = torch.cat([count_flat, mean.detach().reshape(-1), m2.detach().reshape(-1)])
    gathered = comm.all_gather(payload, group, what)
    k, c = count_flat.numel(), mean.numel()
    total, mu, big_m2 = merge_gathered(gathered[:, :k], gathered[:, k : k + c], gathered[:, k + c :])
    return Moments(*_like_local(total, mu, big_m2, count, mean, m2))


def exchange(local: Tensor, group: Any, layer_name: str) -> Tensor:
    """One all_gather of this rank's ``[count, m2 (C), mean (C)]``; returns the global triple, same layout, float64.

    ``local`` must be clean (an empty rank sends zeros, not the NaN moments of an empty batch); it is the send
    buffer, so its sign bits are overwritten. The sign bits of the count and of the first m2 entries (never
    negative) carry a 16-bit tag of (layer, call number), checked on arrival: ranks in different layers of the
    same width raise :class:`SyncMismatchError` on every rank at once, at no extra bytes. Per-channel vectors
    are small, so the cost here is the number of array operations, which is kept low: the tag is one
    ``copysign`` on a prefix and the merge a few reductions.
    """
    channels = (local.numel() - 1) // 2
    call = comm.next_call(group, layer_name)
    tag = comm.tag_of(layer_name, call)
    if comm._OPTIONS["check_shapes"] or call == 0:
        # always on a layer's first call: ranks whose layers differ in width or dtype would otherwise hand the
        # backend payloads of different byte sizes, which aborts the process (gloo); later calls rely on the tag
        _check_headers(group, layer_name, call, tag, channels, local.dtype, local.device)
    slots = min(1 + channels, 16)
    bits = [-1.0 if (tag >> i) & 1 else 1.0 for i in range(slots)]
    # NumPy for CPU float tensors: the tag and the merge handle a few tiny vectors, where torch's per-operation
    # overhead would be most of the cost of a synchronised layer on CPU. Same code, either array library.
    on_host = local.device.type == "cpu" and local.dtype in (torch.float32, torch.float64)
    xp: Any = np if on_host else torch
    sent = local.numpy() if on_host else local
    signs = np.array(bits) if on_host else torch.tensor(bits, dtype=local.dtype, device=local.device)
    xp.copysign(sent[:slots], signs, out=sent[:slots])
    gathered = comm.all_gather(local, group, layer_name)
    g = gathered.numpy() if on_host else gathered
    received = xp.signbit(g[:, :slots])
    mine = received[comm.get_rank(group)]
    if on_host:
        if not bool((received == mine).all()):
            bad = [r for r in range(received.shape[0]) if not bool((received[r] == mine).all())]
            raise comm.mismatch(layer_name, call, bad)
    else:
        # a device verdict: read without stalling the pipeline, raised within a few calls (comm.defer_check)
        comm.defer_check((received == mine).all(dim=1), layer_name, call)
    g = g.astype(np.float64) if on_host else g.double()
    g[:, : 1 + channels] = abs(g[:, : 1 + channels])
    total, mu, m2 = _chan_merge(g[:, :1], g[:, 1 + channels :], g[:, 1 : 1 + channels])
    return torch.from_numpy(np.concatenate([total, m2, mu])) if on_host else torch.cat([total, m2, mu])


class SyncMoments(torch.autograd.Function):
    """Autograd function: global ``(count, mean, m2)`` from this rank's, one collective each way.

    Forward: one ``all_gather`` of ``[count, m2, mean]`` (``world * (2C + 1)`` numbers, the same as PyTorch's
    SyncBatchNorm), exact merge. The sign bits of the count and of the m2 entries (all non-negative) carry a
    16-bit fingerprint of (layer name, call number), so ranks that are in different layers of the same width
    fail at once with :class:`SyncMismatchError` instead of mixing statistics, at no extra bytes.
    Backward: one ``all_reduce`` of the ``2C`` gradients with respect to the global mean and m2 (every rank's
    loss depends on them), then the local chain rule: ``d mean / d mean_r = n_r / N``,
    ``d m2 / d mean_r = 2 n_r (mean_r - mean)``, ``d m2 / d m2_r = 1``.

    Use :func:`sync_moments`, which skips all of this when there is nothing to synchronise.

    Example:
        >>> SyncMoments.apply  # doctest: +ELLIPSIS
        <...>
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, count: Tensor, mean: Tensor, m2: Tensor, group: Any, layer_name: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        channels = mean.numel()
        dtype = mean.dtype
        local = torch.cat([count.detach().reshape(1).to(dtype), m2.detach().reshape(-1), mean.detach().reshape(-1)])
        # An empty batch has NaN moments; it must contribute nothing, and NaN * 0 is still NaN.
        local = torch.where(local[:1] > 0, local, 0.0)
        # a copy even for float64 input: exchange writes the tag into the send buffer's sign bits
        local64 = local.to(torch.float64, copy=True)
        merged = exchange(local, group, layer_name)
        total, big_m2, mu = merged[:1], merged[1 : 1 + channels], merged[1 + channels :]
        n_local = local64[0]
        ctx.group = group
        ctx.layer_name = layer_name
        ctx.shape = mean.shape
        ctx.channels = channels
        # d mean / d mean_r = n_r / N and d m2 / d mean_r = 2 n_r (mean_r - mean); both 0 on an empty rank.
        share = n_local / total.clamp_min(1.0)
        slope = 2.0 * n_local * (local64[1 + channels :] - mu)
        ctx.save_for_backward(share, slope, (n_local > 0).to(dtype))
        out_count, out_mean, out_m2 = _like_local(total, mu, big_m2, count, mean, m2)
        ctx.mark_non_differentiable(out_count)
        return out_count, out_mean, out_m2

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_count: Tensor | None, grad_mean: Tensor, grad_m2: Tensor
    ) -> tuple[None, Tensor, Tensor, None, None]:
        share, slope, present = ctx.saved_tensors
        channels = ctx.channels
        # Every rank's loss depends on the global statistics: sum their gradients (2C numbers, one collective).
        combined = torch.cat([grad_mean.reshape(-1), grad_m2.reshape(-1)])
        comm.all_reduce_sum(combined, ctx.group, f"{ctx.layer_name} (backward)")
        g_mean, g_m2 = combined[:channels], combined[channels:]
        d_mean = (g_mean.double() * share + g_m2.double() * slope).to(grad_mean.dtype)
        d_m2 = g_m2 * present
        return None, d_mean.reshape(ctx.shape), d_m2.reshape(ctx.shape), None, None


_WIRE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_headers(
    group: Any, layer_name: str, call: int, tag: int, channels: int, dtype: torch.dtype, device: torch.device
) -> None:
    code = _WIRE_DTYPES.index(dtype) if dtype in _WIRE_DTYPES else len(_WIRE_DTYPES)
    header = torch.tensor([tag, call, channels, code], dtype=torch.int64, device=device)
    headers = comm.all_gather(header, group, f"{layer_name} (shape check)")
    bad = [r for r in range(headers.shape[0]) if not torch.equal(headers[r], header)]
    if not bad:
        return
    me = f"this rank (rank {comm.get_rank(group)})"
    if all(torch.equal(headers[r, :2], header[:2]) for r in bad):  # same layer and call: width or dtype differs
        widths = sorted({int(headers[r, 2]) for r in bad} - {channels})
        if widths:
            raise comm.SyncMismatchError(
                f"{layer_name}: {me} normalises {channels} channels but rank(s) {bad} normalise {widths}; "
                "every rank must run the same model"
            )
        names = sorted(
            {str(_WIRE_DTYPES[int(headers[r, 3])]) if int(headers[r, 3]) < len(_WIRE_DTYPES) else "?" for r in bad}
        )
        raise comm.SyncMismatchError(
            f"{layer_name}: {me} computes in {dtype} but rank(s) {bad} in {', '.join(names)}; give every rank the "
            "same dtype (model.to(dtype) or the same autocast settings)"
        )
    raise comm.mismatch(layer_name, call, bad)


def sync_moments(
    local: Moments, *, group: Any = None, layer_name: str = "BatchNorm", uniform_count: bool = False
) -> Moments:
    """Global batch statistics of all ranks, differentiable with respect to this rank's mean and m2.

    Given this rank's ``(count, mean, m2)`` (computed with autograd; the batch may be empty), returns the
    statistics of the union of all ranks' batches. The caller computes the biased variance as
    ``m2 / count``. One ``all_gather`` in forward and, if gradients are needed, one ``all_reduce`` in backward
    (see :class:`SyncMoments`); every rank must call it for the same layers in the same order, and a rank
    that does not is detected (same-width layers: at once for CPU tensors, within a few calls on accelerators, where
    the verdict travels to the host without stalling the pipeline) or times out (see :func:`configure`) with a
    :class:`SyncMismatchError` naming ``layer_name``.

    Without an initialised process group, or with world size 1, returns ``local`` itself and communicates
    nothing. Callers decide the mode: call it only in training (PyTorch's SyncBatchNorm never synchronises
    in eval, even with ``track_running_stats=False``).

    Args:
        local: This rank's statistics; ``count`` is a 0-d tensor or the same value for every channel.
        group: Process group (default: the world).
        layer_name: Used in error messages and in the cross-rank call check; give each layer its own.
        uniform_count: The caller guarantees that every channel has the same count (a BatchNorm mask covers
            whole positions), which skips the per-channel check, a host read.

    Returns:
        Global :class:`Moments` with the shapes of ``local``.

    Raises:
        ValueError: ``count`` differs between channels (not a BatchNorm batch).
        SyncMismatchError: Ranks are in different layers or calls, or a rank never arrived in time.

    Example:
        >>> from bnkit.core.moments import channel_moments
        >>> local = channel_moments(torch.randn(8, 4, requires_grad=True), (0,))
        >>> sync_moments(local, layer_name="bn1") is local  # not distributed
        True
    """
    if not comm.is_active(group):
        return local
    count, mean, m2 = _checked(local, layer_name)
    first = count.detach().reshape(-1)[:1]
    if count.numel() > 1 and not uniform_count and not bool((count.detach() == first).all()):
        raise ValueError(
            f"{layer_name}: synchronised statistics need the same count for every channel; got per-channel "
            "counts that differ (a mask must cover whole positions, not single channels)"
        )
    total, mu, big_m2 = SyncMoments.apply(first.reshape(()), mean, m2, group, layer_name)
    if count.ndim:
        total = total.expand(count.shape)
    return Moments(total, mu, big_m2)
