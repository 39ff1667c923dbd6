"""What every ``bnkit.doctor`` rule receives: the model, its BatchNorm layers, the intent, and what one forward
pass on the example inputs showed (:func:`trace_example`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnkit.inspection._common import channel_axis
from bnkit.layers.kinds import named_batchnorm_like
from bnkit.shared.diagnosis import Finding
from bnkit.shared.errors import first_line
from bnkit.tools.model_inputs import call_with_example, eval_run

__all__ = ["Context", "Rule", "Trace", "batchnorms_of", "context_of", "trace_example"]


@dataclass
class Trace:
    """What one forward pass on the example inputs showed, per BN layer name (see :func:`trace_example`).

    Example:
        >>> Trace().calls
        {}
    """

    calls: dict[str, int] = field(default_factory=dict)
    batch: dict[str, int] = field(default_factory=dict)
    values_per_channel: dict[str, int] = field(default_factory=dict)
    ndim: dict[str, int] = field(default_factory=dict)
    producers: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    """What every rule receives.

    Attributes:
        model: The model examined.
        batchnorms: ``(name, module)`` of every BatchNorm layer, in module order.
        intent: ``None``, ``"inference"``, ``"training"`` or ``"fine-tune"``.
        trace: Observations from one forward pass on ``example_inputs`` (None without them).

    Example:
        >>> Context(nn.Identity(), [], None, None).will_train()
        True
    """

    model: nn.Module
    batchnorms: list[tuple[str, nn.Module]]
    intent: str | None
    trace: Trace | None

    def for_inference(self) -> bool:
        """The model is meant to predict: ``intent="inference"``, or no intent and the model is in eval mode.

        Example:
            >>> Context(nn.Identity().eval(), [], None, None).for_inference()
            True
        """
        if self.intent is not None:
            return self.intent == "inference"
        return not self.model.training

    def will_train(self) -> bool:
        """The model is meant to train: a training intent, or no intent and the model is in train mode.

        Example:
            >>> Context(nn.Identity(), [], "inference", None).will_train()
            False
        """
        if self.intent is not None:
            return self.intent in ("training", "fine-tune")
        return self.model.training


Rule = Callable[[Context], list[Finding]]


def trace_example(model: nn.Module, example_inputs: Any, batchnorms: list[tuple[str, nn.Module]]) -> Trace:
    """Run ``model`` once on ``example_inputs`` (eval mode, no gradients, flags restored) and record, per BN layer,
    its calls, smallest batch, values per channel, input rank and the conv/linear layer that produced its input.

    Raises:
        ValueError: the model fails on ``example_inputs``.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> t = trace_example(model, torch.zeros(5, 3), batchnorms_of(model))
        >>> t.calls, t.batch, t.producers
        ({'1': 1}, {'1': 5}, {'1': '0'})
    """
    trace = Trace()
    names = {id(module): name for name, module in batchnorms}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}

    def producer_hook(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                outputs[id(output)] = (name, output)  # keep the tensor alive so its id stays unique

        return hook

    def bn_hook(module: nn.Module, args: Any) -> None:
        name = names[id(module)]
        trace.calls[name] = trace.calls.get(name, 0) + 1
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            return
        trace.batch[name] = min(trace.batch.get(name, x.shape[0]), int(x.shape[0]))
        axis = channel_axis(module, x.ndim)
        per_channel = math.prod(s for d, s in enumerate(x.shape) if d != axis)
        trace.values_per_channel[name] = per_channel
        trace.ndim[name] = x.ndim
        entry = outputs.get(id(x))
        if entry is not None and entry[1] is x:
            trace.producers[name] = entry[0]

    with eval_run(model) as handles:
        for name, module in model.named_modules():
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                handles.append(module.register_forward_hook(producer_hook(name)))
        for _, module in batchnorms:
            handles.append(module.register_forward_pre_hook(bn_hook))
        try:
            call_with_example(model, example_inputs)
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise ValueError(f"the model failed on example_inputs: {first_line(exc)}") from exc
    return trace


def context_of(model: nn.Module, intent: str | None = None, example_inputs: Any = None) -> Context:
    """What the rules see for ``model``: its BatchNorm layers, the intent and, with ``example_inputs``, one traced
    forward pass (:func:`trace_example`).

    Raises:
        ValueError: the model fails on ``example_inputs``.

    Example:
        >>> model = nn.Sequential(nn.BatchNorm1d(2))
        >>> [name for name, _ in context_of(model).batchnorms], context_of(model, None, torch.zeros(3, 2)).trace.batch
        (['0'], {'0': 3})
    """
    batchnorms = batchnorms_of(model)
    trace = trace_example(model, example_inputs, batchnorms) if example_inputs is not None else None
    return Context(model, batchnorms, intent, trace)


def batchnorms_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every BatchNorm kind bnkit recognises in ``model``, in module order.

    Example:
        >>> [name for name, _ in batchnorms_of(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))]
        ['1']
    """
    return [(name, info.module) for name, info in named_batchnorm_like(model)]
