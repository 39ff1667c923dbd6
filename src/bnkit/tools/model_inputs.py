"""Calling a model: on a batch of a data iterable, on example inputs, once in eval mode without changing it;
and the device/dtype of inputs made up for it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["call_on_batch", "call_with_example", "eval_run", "input_device_dtype"]


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


#: Example inputs, the one calling convention of every tool that runs a model once (doctor, fuse, convert,
#: Monitor): a tensor or a list (one positional argument: a torchvision detector takes a list of images), a tuple
#: (positional arguments), a mapping (keyword arguments), or a callable ``forward(model)``. A type alias of
#: ``Any`` (importable, not in ``__all__``: the docstring test would otherwise read ``typing.Any``'s docstring).
#: See docs/tools.md, "Example inputs".
ExampleInputs = Any


def call_with_example(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """Call ``model`` on example inputs, the same way in every tool.

    * a tensor, a list or any other object: one positional argument (``model(x)``; a torchvision detector's
      ``[image, ...]`` stays one list);
    * a tuple: positional arguments (``model(*example_inputs)``);
    * a mapping: keyword arguments (``model(**example_inputs)``);
    * a callable that is not an ``nn.Module``: ``example_inputs(model)``, for anything else.

    Example:
        >>> call_with_example(nn.Bilinear(2, 3, 1), (torch.ones(4, 2), torch.ones(4, 3))).shape
        torch.Size([4, 1])
        >>> call_with_example(nn.Identity(), lambda m: m(torch.zeros(1)))
        tensor([0.])
    """
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if callable(example_inputs) and not isinstance(example_inputs, (nn.Module, torch.Tensor)):
        return example_inputs(model)
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
