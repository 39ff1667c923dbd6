"""Epoch-end agreement of BatchNorm running statistics across ``torch.distributed`` ranks (timm's ``--dist-bn``).

With plain (unsynchronised) BatchNorm under DDP every rank updates its running statistics from its own
batches, so the ranks drift apart and a checkpoint saved by rank 0 reflects rank 0's data only.
:func:`sync_running_stats` makes them agree: ``"reduce"`` averages them over the ranks, ``"broadcast"`` copies
rank 0's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bnkit.distributed import average_, broadcast_, is_active
from bnkit.layers.find import LayerSelector
from bnkit.tools._common import check_model, select_batchnorms

__all__ = ["MODES", "sync_running_stats"]

MODES = ("reduce", "broadcast")
_FLOAT_BUFFERS = ("running_mean", "running_var", "running_std", "renorm_mean", "renorm_std")


def sync_running_stats(
    model: nn.Module, mode: str = "reduce", group: Any = None, *, layers: LayerSelector = None
) -> list[str]:
    """Make the running statistics of every BatchNorm layer identical on all ranks, in place.

    ``mode="reduce"``: ``running_mean`` and ``running_var`` (and a renorm layer's ``running_std``,
    ``renorm_mean``, ``renorm_std``) become their average over the ranks of ``group``; ``num_batches_tracked``
    is left as it is (DDP ranks take the same number of steps). Averaging the per-rank running variances is
    right for i.i.d. shards: each is an estimate of the same population variance (the spread of the per-rank
    running means is estimation noise, not variance of the data). For renorm layers ``running_var`` is then
    re-derived as ``relu(running_std**2 - eps)`` to keep bnkit's invariant.
    ``mode="broadcast"``: every statistics buffer, ``num_batches_tracked`` included, is copied from rank 0
    of ``group``.

    Call it on every rank at the same point (typically before evaluation or checkpointing at epoch end); it
    costs one tiny check plus one collective per buffer dtype. Parameters, the training flags and layers
    without running statistics are left alone. Outside ``torch.distributed`` or with one rank it changes
    nothing. Works on a DDP-wrapped model or its ``.module``.

    Args:
        model: Any module containing BatchNorm layers (``torch.nn`` or ``bnkit``).
        mode: ``"reduce"`` (average) or ``"broadcast"`` (rank 0 wins).
        group: Process group (default: the world).
        layers: Which BatchNorm layers (None: all; glob, type, predicate or list of names).

    Returns:
        The qualified names of the layers whose statistics were made to agree.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: ``mode`` is not ``"reduce"`` or ``"broadcast"``, or ``layers`` matches nothing.
        bnkit.distributed.SyncMismatchError: The ranks hold different layers or buffer shapes.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> sync_running_stats(model, mode="reduce")  # not distributed: nothing changes
        ['1']
    """
    check_model(model, "sync_running_stats")
    if mode not in MODES:
        raise ValueError(f"sync_running_stats: mode must be 'reduce' or 'broadcast'. Received: mode={mode!r}")
    selected = [
        (name, module)
        for name, module in select_batchnorms(model, layers, "sync_running_stats")
        if getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None
    ]
    if not is_active(group):
        return [name for name, _ in selected]
    names: list[str] = []
    tensors: list[Tensor] = []
    for layer_name, module in selected:
        kinds = _FLOAT_BUFFERS + (("num_batches_tracked",) if mode == "broadcast" else ())
        for kind in kinds:
            buffer = getattr(module, kind, None)
            if isinstance(buffer, Tensor):
                names.append(f"{layer_name}.{kind}")
                tensors.append(buffer)
    what = f"sync_running_stats(mode={mode!r})"
    if mode == "reduce":
        average_(tensors, group, what=what, names=names)
        with torch.no_grad():
            for _, module in selected:
                if getattr(module, "renorm", None) is not None:
                    std = module.running_std
                    module.running_var.copy_(torch.relu(std * std - module.eps))
    else:
        broadcast_(tensors, group, src=0, what=what, names=names)
    return [name for name, _ in selected]
