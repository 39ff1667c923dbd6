"""Applying planned folds: new weights for the absorbing layer (computed in float64, rounded once), and the
BatchNorm replaced by what it applied after normalising (``nn.Identity`` for a plain BatchNorm)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from bnkit.core.fold import fold_after_conv, fold_after_linear, fold_before_conv, fold_before_linear
from bnkit.tools.fuse.norms import norm_view
from bnkit.tools.fuse.plan import Fold

__all__ = ["apply_fold", "transplant"]


def _set_submodule(model: nn.Module, name: str, value: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, value)


def apply_fold(model: nn.Module, op: Fold) -> None:
    """Fold BatchNorm ``op.bn`` of ``model`` into ``op.layer`` in place.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
        >>> apply_fold(model, Fold("1", "0", "after"))
        >>> model[1]
        Identity()
    """
    bn = model.get_submodule(op.bn)
    view = norm_view(bn)
    if view is None:  # the plan only names recognised BatchNorms
        raise ValueError(f"fuse: {op.bn} ({type(bn).__name__}) is not a BatchNorm bnkit recognises")
    layer = model.get_submodule(op.layer)
    affine = view.affine()
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    scale, shift = affine.scale.to(weight.device), affine.shift.to(weight.device)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            fold = fold_after_linear if op.position == "after" else fold_before_linear
            new_weight, new_bias = fold(weight, bias, scale, shift)
        else:
            fold = fold_after_conv if op.position == "after" else fold_before_conv
            transposed = isinstance(layer, _ConvTransposeNd)
            new_weight, new_bias = fold(weight, bias, scale, shift, transposed=transposed, groups=layer.groups)
    grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(new_weight, requires_grad=grad)
    layer.bias = nn.Parameter(new_bias, requires_grad=grad if layer.bias is None else layer.bias.requires_grad)
    _set_submodule(model, op.bn, view.replacement())


def transplant(model: nn.Module, fused: nn.Module, plan: Iterable[Fold]) -> None:
    """Give ``model`` the fused parameters computed on its copy ``fused``, and replace its folded BatchNorms by
    what they applied after normalising (their own activation modules).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> transplant(model, nn.Sequential(nn.Linear(2, 2), nn.Identity()), [Fold("1", "0", "after")])
        >>> model[1]
        Identity()
    """
    for op in plan:
        source = fused.get_submodule(op.layer)
        target = model.get_submodule(op.layer)
        if type(target) is type(source):
            target.weight = source.weight
            target.bias = source.bias
        else:  # a lazy layer materialised on the copy only
            _set_submodule(model, op.layer, source)
        view = norm_view(model.get_submodule(op.bn))
        _set_submodule(model, op.bn, view.replacement() if view is not None else fused.get_submodule(op.bn))
