"""Everything in bnkit that talks to ``torch.distributed``: synchronised batch statistics and cross-rank merges.

The only bnkit package that imports ``torch.distributed``. With no initialised process group, or a world of
one rank, every function here is the identity and communicates nothing.

Example:
    >>> import torch
    >>> from bnkit.core.moments import channel_moments
    >>> m = channel_moments(torch.randn(8, 3), (0,))
    >>> reduce_moments(m) is m, is_active()
    (True, False)
"""

from __future__ import annotations

from bnkit.distributed.buffers import average_, broadcast_
from bnkit.distributed.comm import (
    SyncMismatchError,
    configure,
    get_rank,
    get_world_size,
    is_active,
    sync_options,
)
from bnkit.distributed.functional import sync_batch_norm
from bnkit.distributed.moments import SyncMoments, merge_gathered, reduce_moments, sync_moments

__all__ = [
    "SyncMismatchError",
    "SyncMoments",
    "average_",
    "broadcast_",
    "configure",
    "get_rank",
    "get_world_size",
    "is_active",
    "merge_gathered",
    "reduce_moments",
    "sync_batch_norm",
    "sync_moments",
    "sync_options",
]
