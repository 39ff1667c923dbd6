"""Epoch-end agreement of BatchNorm running statistics across ``torch.distributed`` ranks (timm's ``--dist-bn``).

With plain (unsynchronised) BatchNorm under DDP every rank updates its running statistics from its own
batches, so the ranks drift apart and a checkpoint saved by rank 0 reflects rank 0's data only.
:func:`sync_running_stats` makes them agree: ``"reduce"`` averages them over the ranks, ``"broadcast"`` copies
rank 0's.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from bnkit.distributed import average_, broadcast_, is_active
from bnkit.distributed.buffers import nonfinite_ranks
from bnkit.layers.find import LayerSelector
from bnkit.tools.model_edit import check_model, select_batchnorms

__all__ = ["MODES", "NONFINITE_POLICIES", "sync_running_stats"]

MODES = ("reduce", "broadcast")
NONFINITE_POLICIES = ("raise", "skip")
_FLOAT_BUFFERS = ("running_mean", "running_var", "running_std", "renorm_mean", "renorm_std")


def sync_running_stats(
    model: nn.Module,
    mode: str = "reduce",
    group: Any = None,
    *,
    layers: LayerSelector = None,
    on_nonfinite: str = "raise",
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

    Non-finite statistics (NaN or infinity in a layer's buffers on any rank for ``"reduce"``, on rank 0 for
    ``"broadcast"``) would spread to every rank. They are found first, with one tiny collective, and then
    ``on_nonfinite="raise"`` (default) raises the same error on every rank with nothing changed anywhere, and
    ``on_nonfinite="skip"`` leaves those layers as they are on every rank, synchronises the others and warns.

    Call it on every rank at the same point (typically before evaluation or checkpointing at epoch end); it
    costs one tiny check plus one collective per buffer dtype. Parameters, the training flags and layers
    without running statistics are left alone. Outside ``torch.distributed`` or with one rank it changes
    nothing. Works on a DDP-wrapped model or its ``.module``.

    Args:
        model: Any module containing BatchNorm layers (``torch.nn`` or ``bnkit``).
        mode: ``"reduce"`` (average) or ``"broadcast"`` (rank 0 wins).
        group: Process group (default: the world).
        layers: Which BatchNorm layers (None: all; glob, type, predicate or list of names).
        on_nonfinite: ``"raise"`` or ``"skip"`` (see above).

    Returns:
        The qualified names of the layers whose statistics were made to agree.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: ``mode`` or ``on_nonfinite`` is not one of its choices, ``layers`` matches nothing, or a layer
            holds non-finite statistics and ``on_nonfinite="raise"`` (raised on every rank; nothing changed).
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
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"sync_running_stats: on_nonfinite must be 'raise' or 'skip'. Received: on_nonfinite={on_nonfinite!r}"
        )
    selected = [
        (name, module)
        for name, module in select_batchnorms(model, layers, "sync_running_stats")
        if getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None
    ]
    if not is_active(group):
        return [name for name, _ in selected]
    kinds = _FLOAT_BUFFERS + (("num_batches_tracked",) if mode == "broadcast" else ())
    buffers = [
        {f"{layer_name}.{kind}": b for kind in kinds if isinstance(b := getattr(module, kind, None), Tensor)}
        for layer_name, module in selected
    ]
    what = f"sync_running_stats(mode={mode!r})"
    keep = _finite_layers(selected, buffers, mode, group, on_nonfinite, what)
    selected = [layer for layer, ok in zip(selected, keep, strict=True) if ok]
    chosen = [entry for entry, ok in zip(buffers, keep, strict=True) if ok]
    names = [name for entry in chosen for name in entry]
    tensors = [tensor for entry in chosen for tensor in entry.values()]
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


def _finite_layers(
    selected: list[tuple[str, nn.Module]],
    buffers: list[dict[str, Tensor]],
    mode: str,
    group: Any,
    on_nonfinite: str,
    what: str,
) -> list[bool]:
    """Which layers may be synchronised; the same answer on every rank (raises on every rank when asked to)."""
    statistics = [[t for t in entry.values() if t.is_floating_point()] for entry in buffers]
    names = [name for entry in buffers for name in entry if entry[name].is_floating_point()]
    ranks = nonfinite_ranks(statistics, group, what=what, names=names)
    if mode == "broadcast":  # only rank 0's values travel; NaN elsewhere is overwritten, which repairs it
        ranks = [[r for r in found if r == 0] for found in ranks]
    bad = [(layer_name, found) for (layer_name, _), found in zip(selected, ranks, strict=True) if found]
    if not bad:
        return [True] * len(selected)
    listed = ", ".join(f"{name!r} on rank(s) {found}" for name, found in bad[:3])
    more = f" and {len(bad) - 3} more layers" if len(bad) > 3 else ""
    if on_nonfinite == "raise":
        raise ValueError(
            f"{what}: non-finite running statistics in {listed}{more}; nothing was changed on any rank. "
            "Recalibrate those layers (bnkit.recalibrate) or pass on_nonfinite='skip' to leave them as they are"
        )
    warnings.warn(
        f"{what}: left {listed}{more} as they are (non-finite running statistics); the other layers were synchronised",
        RuntimeWarning,
        stacklevel=3,
    )
    return [not found for found in ranks]
