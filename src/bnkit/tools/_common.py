"""Helpers shared by the model-level tools and the layers above them (inspection, command line).

Argument checks, layer selection, copies and module replacement; the few BatchNorm facts every tool asks
(running buffers, gamma/beta); calling a model on a batch or on example inputs; running it once in eval mode
without changing it; and the one-line wording of an exception.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bnkit.layers.find import LayerSelector, named_batchnorms
from bnkit.layers.keras_guard import refuse_keras

__all__ = [
    "affine_params",
    "bnkit_batchnorm_class",
    "call_on_batch",
    "call_with_example",
    "check_model",
    "copy_unless_inplace",
    "eval_run",
    "first_line",
    "has_running_buffers",
    "input_device_dtype",
    "is_bnkit_batchnorm",
    "replace_modules",
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


def input_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for inputs made up for ``model``: those of its first parameter (float32 on the CPU when
    it has none or the first is not floating point).

    Example:
        >>> input_device_dtype(nn.Linear(2, 2).double())
        (device(type='cpu'), torch.float64)
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    return device, dtype


def first_line(error: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message for a one-line error (the type's name when it has none).

    With ``with_type=True`` the type's name comes first: ``"RuntimeError: shape mismatch"``.

    Example:
        >>> first_line(ValueError("bad value\\nmore detail")), first_line(KeyError())
        ('bad value', 'KeyError')
        >>> first_line(OSError("disk full"), with_type=True)
        'OSError: disk full'
    """
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    if with_type:
        return f"{type(error).__name__}: {line}" if line else type(error).__name__
    return line or type(error).__name__


def call_on_batch(model: nn.Module, batch: Any, tool: str = "bnkit") -> Any:
    """Call ``model`` on one batch of a data iterable: ``model(batch)``, the inputs of ``(inputs, labels, ...)``
    (``model(batch[0])``), or ``model(**batch)`` for a mapping of keyword arguments.

    Raises:
        ValueError: ``batch`` is an empty list/tuple (``tool`` names the caller in the message).

    Example:
        >>> call_on_batch(nn.Identity(), (torch.ones(1), torch.zeros(1)))
        tensor([1.])
    """
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError(f"{tool}: a batch is an empty list/tuple; pass forward=(model, batch) -> ...")
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def call_with_example(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on example inputs: one input, a tuple/list of positional inputs, or a mapping of keywords.

    Example:
        >>> call_with_example(nn.Bilinear(2, 3, 1), (torch.ones(4, 2), torch.ones(4, 3))).shape
        torch.Size([4, 1])
    """
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    return model(example_inputs)


@contextlib.contextmanager
def eval_run(model: nn.Module) -> Iterator[list[Any]]:
    """Run ``model`` in eval mode without gradients; on exit every flag is back and every hook removed.

    Yields a list: append the handles of the hooks you register and they are removed on exit, also on error.
    Training flags are set and restored attribute by attribute, not through ``train()``/``eval()``, so modules
    that override ``train()`` (frozen layers) keep exactly the flag they had. Running statistics cannot move in
    eval mode, so the model comes out as it went in.

    Example:
        >>> model = nn.Sequential(nn.BatchNorm1d(2))
        >>> with eval_run(model) as handles:
        ...     handles.append(model.register_forward_hook(lambda *_: None))
        ...     _ = model(torch.randn(1, 2))  # a batch of 1 is fine in eval mode
        >>> model.training, len(model._forward_hooks)
        (True, 0)
    """
    flags = [(m, m.training) for m in model.modules()]
    handles: list[Any] = []
    try:
        for module, _ in flags:
            module.training = False
        with torch.no_grad():
            yield handles
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
