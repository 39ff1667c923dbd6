"""Coalesced in-place agreement of tensors across ranks (average or broadcast), one collective per dtype.

Used at epoch end to make the running statistics of unsynchronised BatchNorm layers agree (timm's
``--dist-bn``). Tensors are flattened into one buffer per (dtype, device), so a ResNet's 100+ buffers cost a
handful of collectives, and copied back only after every collective succeeded (nothing is left half-changed).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bnkit.distributed import comm

__all__ = ["average_", "broadcast_", "nonfinite_ranks"]


def _check_layout(tensors: Sequence[Tensor], group: Any, what: str, names: Sequence[str] | None) -> None:
    # Ranks with different models would hand the backend buffers of different sizes, which aborts the
    # process (gloo) instead of raising; one tiny header exchange turns that into a clear error.
    fingerprint = zlib.crc32("|".join(names or []).encode()) & 0x7FFFFFFF
    header = torch.tensor(
        [len(tensors), sum(t.numel() for t in tensors), fingerprint],
        dtype=torch.int64,
        device=tensors[0].device if tensors else "cpu",
    )
    headers = comm.all_gather(header, group, what)
    bad = [r for r in range(headers.shape[0]) if not torch.equal(headers[r], header)]
    if bad:
        raise comm.SyncMismatchError(
            f"{what}: rank(s) {bad} hold different layers or buffer shapes than rank {comm.get_rank(group)} "
            f"({len(tensors)} tensors, {int(header[1])} values); every rank must pass the same model"
        )


def _buckets(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[Tensor]]:
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    return buckets


def _by_bucket_(tensors: Sequence[Tensor], collective: Callable[[list[Tensor]], Tensor]) -> None:
    """Run ``collective`` (bucket -> its new values, flattened) on each (dtype, device) bucket, then copy back.

    Every collective runs before any tensor is written, so a failing one leaves all of them unchanged.
    """
    results = [(bucket, collective(bucket)) for bucket in _buckets(tensors).values()]
    for bucket, flat in results:
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
            offset += t.numel()


@torch.no_grad()
def average_(
    tensors: Sequence[Tensor], group: Any = None, *, what: str = "average_", names: Sequence[str] | None = None
) -> None:
    """Replace each floating-point tensor by its mean over the ranks of ``group``, in place.

    Sums in float64 where the dtype is narrower, so the average of float32/float16 buffers rounds once.
    Non-floating tensors are an error (average them yourself). A no-op outside ``torch.distributed`` or with
    one rank.

    Args:
        tensors: Tensors of the same shapes on every rank, in the same order.
        group: Process group (default: the world).
        what: Name used in error messages.
        names: Optional names of the tensors; ranks must agree on them (checked).

    Example:
        >>> t = torch.ones(3)
        >>> average_([t])  # not distributed: unchanged
        >>> t.tolist()
        [1.0, 1.0, 1.0]
    """
    if not comm.is_active(group):
        return
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"{what}: can only average floating-point tensors, got {t.dtype}")
    _check_layout(tensors, group, what, names)
    world = comm.get_world_size(group)

    def mean(bucket: list[Tensor]) -> Tensor:
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in bucket])
        return comm.all_reduce_sum(flat, group, what) / world

    _by_bucket_(tensors, mean)


@torch.no_grad()
def broadcast_(
    tensors: Sequence[Tensor],
    group: Any = None,
    *,
    src: int = 0,
    what: str = "broadcast_",
    names: Sequence[str] | None = None,
) -> None:
    """Overwrite each tensor with its value on rank ``src`` of ``group`` (any dtype), in place.

    A no-op outside ``torch.distributed`` or with one rank.

    Args:
        tensors: Tensors of the same shapes and dtypes on every rank, in the same order.
        group: Process group (default: the world).
        src: Rank within ``group`` whose values win.
        what: Name used in error messages.
        names: Optional names of the tensors; ranks must agree on them (checked).

    Example:
        >>> t = torch.zeros(2)
        >>> broadcast_([t])  # not distributed: unchanged
        >>> t.tolist()
        [0.0, 0.0]
    """
    if not comm.is_active(group):
        return
    world = comm.get_world_size(group)
    if not 0 <= src < world:
        raise ValueError(f"{what}: src must be a rank in 0..{world - 1}. Received: src={src}")
    _check_layout(tensors, group, what, names)

    def value_on_src(bucket: list[Tensor]) -> Tensor:
        return comm.broadcast(torch.cat([t.reshape(-1) for t in bucket]), src, group, what)

    _by_bucket_(tensors, value_on_src)


@torch.no_grad()
def nonfinite_ranks(
    groups: Sequence[Sequence[Tensor]], group: Any = None, *, what: str = "nonfinite_ranks", names: Sequence[str]
) -> list[list[int]]:
    """For each group of tensors (e.g. one layer's buffers), the ranks on which any of them is NaN or infinite.

    Every rank gets the same answer (one tiny all_gather of per-group flags after the layout check), so all ranks
    can raise, or skip the same groups, together. Outside ``torch.distributed`` only this rank is looked at.

    Example:
        >>> nonfinite_ranks([[torch.ones(2)], [torch.tensor([float("nan")])]], names=["a", "b"])
        [[], [0]]
    """
    flags = torch.tensor(
        [int(any(not bool(torch.isfinite(t).all()) for t in tensors)) for tensors in groups], dtype=torch.int64
    )
    if not comm.is_active(group):
        return [[0] if int(flag) else [] for flag in flags]
    flat = [t for tensors in groups for t in tensors]
    _check_layout(flat, group, what, names)
    gathered = comm.all_gather(flags.to(flat[0].device if flat else "cpu"), group, what).cpu()
    return [[rank for rank in range(gathered.shape[0]) if int(gathered[rank, i])] for i in range(len(groups))]
