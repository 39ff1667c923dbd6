"""Process-group helpers: who takes part, bounded waits, and the error raised when ranks disagree.

This package is the only part of bnkit that imports ``torch.distributed``. Everything here is a no-op (world
size 1) when ``torch.distributed`` is unavailable or not initialised, so single-process code never pays for it.
"""

from __future__ import annotations

import datetime
import os
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "SyncMismatchError",
    "check_pending",
    "configure",
    "defer_check",
    "get_rank",
    "get_world_size",
    "is_active",
    "sync_options",
]

_ISSUE = "every rank must call every synchronised BatchNorm the same number of times, in the same order"


class SyncMismatchError(RuntimeError):
    """Ranks disagree about which synchronised layer they are in, or a rank never arrived.

    Raised instead of hanging (pytorch#44957). The message names the layer this rank was in.

    Example:
        >>> isinstance(SyncMismatchError("bn1: ranks disagree"), RuntimeError)
        True
    """


# Process-wide settings; the environment gives the defaults so torchrun jobs can set them without code changes.
_OPTIONS: dict[str, Any] = {
    "timeout": float(os.environ["BNKIT_SYNC_TIMEOUT"]) if os.environ.get("BNKIT_SYNC_TIMEOUT") else None,
    "check_shapes": os.environ.get("BNKIT_SYNC_CHECK_SHAPES", "0") not in ("", "0", "false", "False"),
}
_UNSET: Any = object()


def configure(*, timeout: float | None = _UNSET, check_shapes: bool = _UNSET) -> dict[str, Any]:
    """Set how synchronised layers wait and check; returns the previous settings (for restoring).

    Args:
        timeout: Seconds a rank waits in one synchronised collective before raising
            :class:`SyncMismatchError` naming the layer; ``None`` uses the process group's own timeout
            (30 min for gloo by default). Environment default: ``BNKIT_SYNC_TIMEOUT``.
        check_shapes: Before each synchronised forward, gather a 3-number header (layer tag, call number,
            size) so that ranks in layers of different widths fail with a clear error instead of a backend
            abort. Costs one extra tiny collective per layer; meant for debugging.
            Environment default: ``BNKIT_SYNC_CHECK_SHAPES=1``.

    Returns:
        The settings before the call, as a dict accepted back by ``configure(**previous)``.

    Example:
        >>> previous = configure(timeout=60.0)
        >>> _ = configure(**previous)
    """
    previous = dict(_OPTIONS)
    if timeout is not _UNSET:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"bnkit.distributed.configure: timeout must be > 0 seconds or None. Received: {timeout}")
        _OPTIONS["timeout"] = None if timeout is None else float(timeout)
    if check_shapes is not _UNSET:
        _OPTIONS["check_shapes"] = bool(check_shapes)
    return previous


@contextmanager
def sync_options(*, timeout: float | None = _UNSET, check_shapes: bool = _UNSET) -> Iterator[None]:
    """Temporarily :func:`configure` synchronised layers inside a ``with`` block.

    Example:
        >>> with sync_options(timeout=30.0):
        ...     pass
    """
    previous = configure(timeout=timeout, check_shapes=check_shapes)
    try:
        yield
    finally:
        configure(**previous)


def get_world_size(group: Any = None) -> int:
    """World size of ``group``, or 1 when ``torch.distributed`` is unavailable or not initialised.

    Example:
        >>> get_world_size()
        1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def get_rank(group: Any = None) -> int:
    """Rank of this process in ``group``, or 0 when ``torch.distributed`` is not initialised.

    Example:
        >>> get_rank()
        0
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def is_active(group: Any = None) -> bool:
    """True when statistics must be synchronised: ``torch.distributed`` initialised and more than one rank.

    Example:
        >>> is_active()
        False
    """
    return get_world_size(group) > 1


# ---------------------------------------------------------------------------------------------- internals


def _run(start: Any, what: str) -> None:
    """Run a collective (``start(async_op)`` issues it) with a bounded wait; a failure names ``what``."""
    timeout = _OPTIONS["timeout"]
    began = time.monotonic()
    try:
        if timeout is None:
            start(False)  # the process group's own timeout bounds it; no extra wait object
        else:
            start(True).wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as error:
        waited = time.monotonic() - began
        detail = " ".join(str(error).split())[:200]
        if timeout is not None and waited < 0.9 * timeout:
            # the backend gave up early: a peer closed its connection (it crashed, exited or raised)
            raise SyncMismatchError(
                f"{what}: the collective failed after {waited:.1f} s, before the {timeout:g} s timeout, so another "
                f"rank most likely exited or failed ({detail}); look at the other ranks' errors first"
            ) from error
        limit = f"{timeout:g} s" if timeout is not None else "the process group's timeout"
        raise SyncMismatchError(
            f"{what}: no answer from the other ranks within {limit} ({detail}); {_ISSUE} "
            "(pytorch#44957). A rank that skips a layer should call it on an empty batch, or use sync=False there"
        ) from error


def all_gather(tensor: Tensor, group: Any, what: str) -> Tensor:
    """``[world, *tensor.shape]``: every rank's ``tensor``, with a bounded wait that names ``what``."""
    world = dist.get_world_size(group)
    flat = tensor.contiguous().reshape(-1)
    if dist.get_backend(group) == "gloo":
        # Gloo's single-tensor all-gather is newer than the list form; the list form works on every version.
        parts = [torch.empty_like(flat) for _ in range(world)]
        _run(lambda async_op: dist.all_gather(parts, flat, group=group, async_op=async_op), what)
        return torch.stack(parts).reshape(world, *tensor.shape)
    out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _run(lambda async_op: gather_single(out, flat, group=group, async_op=async_op), what)
    return out.reshape(world, *tensor.shape)


def all_reduce_sum(tensor: Tensor, group: Any, what: str) -> Tensor:
    """In-place sum of ``tensor`` over the ranks of ``group`` with a bounded wait that names ``what``."""
    _run(lambda async_op: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=async_op), what)
    return tensor


def broadcast(tensor: Tensor, src_rank: int, group: Any, what: str) -> Tensor:
    """In-place broadcast from the group rank ``src_rank`` with a bounded wait that names ``what``."""
    src = src_rank if group is None else dist.get_global_rank(group, src_rank)
    _run(lambda async_op: dist.broadcast(tensor, src=src, group=group, async_op=async_op), what)
    return tensor


def tag_of(layer_name: str, call: int) -> int:
    """A stable 16-bit fingerprint of (layer, call number), identical on every rank (unlike ``hash``)."""
    return zlib.crc32(f"{layer_name}#{call}".encode()) & 0xFFFF


_CALLS: dict[tuple[int, str], int] = {}


def next_call(group: Any, layer_name: str) -> int:
    """Number this call of ``layer_name`` on ``group`` (0, 1, 2, ...) so ranks can compare call counts."""
    key = (0 if group is None else id(group), layer_name)
    call = _CALLS.get(key, 0)
    _CALLS[key] = call + 1
    return call


def reset_call_counts() -> None:
    """Forget the per-layer call numbers and queued tag checks (after a failed step, before all ranks restart
    in step)."""
    _CALLS.clear()
    _PENDING.clear()


# Tag checks of device tensors waiting for their values to reach the host: (ok per rank, ready event, layer,
# call). Reading a device tensor at once would stall the GPU pipeline once per layer per step; instead the
# verdict is copied to the host without blocking and read when the device has produced it.
_PENDING: list[tuple[Tensor, Any, str, int]] = []
_MAX_PENDING = 64


def defer_check(ok_per_rank: Tensor, layer_name: str, call: int) -> None:
    """Queue a device-side verdict ``ok_per_rank`` (bool per rank) of call ``call`` of ``layer_name``.

    The values travel to the host without blocking (pinned memory and an event on CUDA) and are read by
    :func:`check_pending` once ready, so a mismatch surfaces within a few synchronised calls with no stall.

    Example:
        >>> defer_check(torch.tensor([True, True]), "bn1", 0)  # CPU values are ready: checked at once
    """
    event = None
    if ok_per_rank.device.type == "cuda":
        host = torch.empty(ok_per_rank.shape, dtype=ok_per_rank.dtype, pin_memory=True)
        host.copy_(ok_per_rank, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host = ok_per_rank.detach().to("cpu")
    _PENDING.append((host, event, layer_name, call))
    check_pending(block=len(_PENDING) > _MAX_PENDING)


def check_pending(*, block: bool = False) -> None:
    """Read the queued tag verdicts the device has produced (all of them with ``block=True``); raise
    :class:`SyncMismatchError` naming the first layer and call in which ranks disagreed.

    Example:
        >>> check_pending(block=True)  # nothing queued: nothing to read
    """
    while _PENDING:
        host, event, layer_name, call = _PENDING[0]
        if event is not None and not event.query():
            if not block:
                return
            event.synchronize()
        _PENDING.pop(0)
        flags = host.tolist()  # on the host already: no device read
        if not all(flags):
            _PENDING.clear()
            raise mismatch(layer_name, call, [rank for rank, ok in enumerate(flags) if not ok])


def mismatch(what: str, call: int, ranks: list[int]) -> SyncMismatchError:
    """The error for ranks found in a different layer or call than this one."""
    return SyncMismatchError(
        f"{what}: this rank (rank {get_rank()}) is in call {call} of this layer but rank(s) {ranks} are in a "
        f"different synchronised layer or call; {_ISSUE} (pytorch#44957). A rank that would skip a layer should "
        "call it on an empty batch instead, or use sync=False for that layer"
    )
