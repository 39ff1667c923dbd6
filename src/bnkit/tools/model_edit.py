"""Editing models safely: argument checks, BatchNorm selection, copies, module replacement, layer names, and
the few BatchNorm facts every tool asks (running buffers, gamma/beta)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from bnkit.layers.find import LayerSelector, named_batchnorms
from bnkit.layers.keras_guard import refuse_keras
from bnkit.layers.kinds import BatchNormInfo, named_batchnorm_like, unrecognised_running_stats

__all__ = [
    "affine_params",
    "bnkit_batchnorm_class",
    "check_model",
    "copy_unless_inplace",
    "has_running_buffers",
    "is_bnkit_batchnorm",
    "replace_modules",
    "select_batchnorm_like",
    "select_batchnorms",
    "set_layer_names",
]


def bnkit_batchnorm_class() -> type[nn.Module]:
    """The ``bnkit.BatchNorm`` class, imported late so the tools import before the layer module does.

    Example:
        >>> bnkit_batchnorm_class().__name__
        'BatchNorm'
    """
    from bnkit.layers.batchnorm import BatchNorm

    return BatchNorm


def is_bnkit_batchnorm(module: Any) -> bool:
    """True when ``module`` is a ``bnkit.BatchNorm`` (or a subclass).

    Example:
        >>> is_bnkit_batchnorm(nn.BatchNorm2d(3))
        False
    """
    return isinstance(module, bnkit_batchnorm_class())


def check_model(model: Any, tool: str) -> None:
    """Raise a one-line TypeError unless ``model`` is an ``nn.Module``.

    Example:
        >>> check_model(nn.Linear(2, 2), "freeze")
    """
    refuse_keras(model, tool)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{tool}: expected a torch.nn.Module, got {type(model).__name__}")


def select_batchnorms(model: nn.Module, layers: LayerSelector, tool: str) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers of ``model`` chosen by ``layers``; an explicit selector that matches none raises.

    ``layers=None`` on a model without BatchNorm returns an empty list: there is nothing to do, which is not
    an error. A selector that the user wrote and that matches nothing is almost always a typo, so it raises.

    Example:
        >>> [n for n, _ in select_batchnorms(nn.Sequential(nn.BatchNorm1d(2)), None, "freeze")]
        ['0']
    """
    if isinstance(layers, (bytes, int, float)) or layers is True or layers is False:
        raise TypeError(
            f"{tool}: layers must be None, a name glob, a module type, a predicate or a list of names; got {layers!r}"
        )
    selected = named_batchnorms(model, layers)
    if layers is not None and not selected:
        available = [name or "<model>" for name, _ in named_batchnorms(model)]
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise ValueError(f"{tool}: layers={layers!r} matched no BatchNorm layer; the model has: {shown or 'none'}")
    return selected


def select_batchnorm_like(
    model: nn.Module, layers: LayerSelector, tool: str, *, stacklevel: int = 4
) -> list[tuple[str, BatchNormInfo]]:
    """Every BatchNorm-like layer (all kinds) of ``model`` chosen by ``layers``, with its description.

    Never silent: an explicit selector that matches nothing raises (naming the layers there are), and a model in
    which bnkit recognises no BatchNorm at all gives a warning naming the modules that hold running statistics
    bnkit does not recognise (then an empty list: there is nothing to do).

    Example:
        >>> [(n, i.kind) for n, i in select_batchnorm_like(nn.Sequential(nn.BatchNorm1d(2)), None, "freeze")]
        [('0', 'torch')]
    """
    if isinstance(layers, (bytes, int, float)) or layers is True or layers is False:
        raise TypeError(
            f"{tool}: layers must be None, a name glob, a module type, a predicate or a list of names; got {layers!r}"
        )
    selected = named_batchnorm_like(model, layers)
    if selected:
        return selected
    everything = named_batchnorm_like(model) if layers is not None else []
    unknown = [name or "<model>" for name, _ in unrecognised_running_stats(model)]
    also = f"; not recognised (bnkit.register_batchnorm): {', '.join(unknown[:8])}" if unknown else ""
    if layers is not None:
        available = [name or "<model>" for name, _ in everything]
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise ValueError(
            f"{tool}: layers={layers!r} matched no BatchNorm layer; the model has: {shown or 'none'}{also}"
        )
    warnings.warn(
        f"{tool}: the model has no BatchNorm layer bnkit recognises; nothing to do{also}", stacklevel=stacklevel
    )
    return []


def copy_unless_inplace(model: nn.Module, inplace: bool) -> nn.Module:
    """``model`` itself when ``inplace`` is true, else a deep copy (parameters, buffers, hooks, flags).

    Example:
        >>> m = nn.Linear(2, 2)
        >>> copy_unless_inplace(m, True) is m, copy_unless_inplace(m, False) is m
        (True, False)
    """
    if inplace:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise TypeError(
            f"cannot deep-copy the model ({type(exc).__name__}: {exc}); pass inplace=True to modify it in place"
        ) from exc


def replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Swap modules by identity everywhere they are registered (shared modules stay shared).

    ``replacements`` maps ``id(old_module)`` to its replacement. Returns the model, or the replacement of the
    model itself when the model is one of the replaced modules.

    Example:
        >>> seq = nn.Sequential(nn.BatchNorm1d(2))
        >>> new = nn.Identity()
        >>> replace_modules(seq, {id(seq[0]): new})[0] is new
        True
    """
    if id(model) in replacements:
        return replacements[id(model)]
    seen: set[int] = set()
    for parent in model.modules():
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]
    return model


def set_layer_names(model: nn.Module) -> None:
    """Give every unnamed ``bnkit.BatchNorm`` of ``model`` its qualified name, for error messages.

    Example:
        >>> set_layer_names(nn.Sequential(nn.BatchNorm1d(2)))
    """
    cls = bnkit_batchnorm_class()
    for name, module in model.named_modules():
        if isinstance(module, cls) and getattr(module, "name", None) in (None, ""):
            module.name = name or type(module).__name__


def has_running_buffers(module: nn.Module) -> bool:
    """True when the layer holds ``running_mean`` and ``running_var`` buffers (whatever ``track_running_stats``).

    Example:
        >>> untracked = nn.BatchNorm1d(2, track_running_stats=False)
        >>> has_running_buffers(nn.BatchNorm1d(2)), has_running_buffers(untracked)
        (True, False)
    """
    return getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None


def affine_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """gamma and beta of a norm layer by attribute name (``weight``, ``bias``), those that exist, in that order.

    Example:
        >>> list(affine_params(nn.BatchNorm1d(2))), affine_params(nn.BatchNorm1d(2, affine=False))
        (['weight', 'bias'], {})
    """
    params = {key: getattr(module, key, None) for key in ("weight", "bias")}
    return {key: value for key, value in params.items() if isinstance(value, torch.Tensor)}
