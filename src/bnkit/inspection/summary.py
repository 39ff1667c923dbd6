"""``bnkit.summary``: parameter counts in the Keras and the PyTorch convention side by side.

Why two conventions: Keras counts a BatchNorm's moving mean and variance as (non-trainable) weights, so
``model.count_params()`` of a Keras network is larger than ``sum(p.numel() for p in model.parameters())`` of the
same PyTorch network, and users porting models ask why. The Keras-style columns here give exactly what Keras
prints for the same network; the PyTorch-style columns give what ``parameters()``/``buffers()`` hold.

Keras style:
    * trainable: parameters with ``requires_grad=True``;
    * non-trainable: parameters with ``requires_grad=False`` (frozen layers) plus the floating-point buffers of
      normalisation layers: ``running_mean``, ``running_var`` and, for Batch Renormalization, its extra moving
      statistics; for FrozenBatchNorm2d (torchvision, timm, detectron2-style look-alikes) all four tensors, gamma
      and beta included, since they are buffers; in a TorchScript model, the floating buffers of every module
      that holds ``running_mean`` and ``running_var``. Integer counters such as ``num_batches_tracked`` have no
      Keras counterpart and are not counted; neither are other buffers (they are not Keras weights);
    * total = trainable + non-trainable.

PyTorch style: parameters (all), trainable parameters (``requires_grad=True``), buffers (every element of every
buffer in the state dict, ``num_batches_tracked`` included; non-persistent ones such as ``skipped_batches`` are
not saved and not counted). Tensors shared between modules are counted once, where first met.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bnkit.inspection._common import layer_type
from bnkit.layers.find import is_batch_independent_norm
from bnkit.layers.kinds import describe_batchnorm, unrecognised_running_stats
from bnkit.shared.errors import first_line
from bnkit.shared.summary import LayerSummary, Summary
from bnkit.tools.model_edit import check_model
from bnkit.tools.model_inputs import ExampleInputs, call_with_example, eval_run, input_device_dtype

__all__ = ["LayerSummary", "Summary", "summary"]


def _holds_norm_state(module: nn.Module) -> bool:
    """A normalisation layer whose floating buffers Keras would hold as non-trainable weights."""
    if describe_batchnorm(module) is not None or is_batch_independent_norm(module):
        return True
    # a module with running statistics bnkit does not know (a TorchScript module, an unregistered look-alike)
    buffers = dict(module.named_buffers(recurse=False))
    return all(isinstance(buffers.get(key), torch.Tensor) for key in ("running_mean", "running_var"))


def _is_keras_state(module: nn.Module, buffer: torch.Tensor) -> bool:
    """A buffer Keras would hold as a non-trainable weight: floating statistics of a norm layer."""
    return buffer.is_floating_point() and _holds_norm_state(module)


def summary(
    model: nn.Module,
    input_size: Sequence[int] | Sequence[Sequence[int]] | None = None,
    *,
    example_inputs: ExampleInputs = None,
) -> Summary:
    """Count parameters per layer and in total, Keras style and PyTorch style side by side.

    Keras style counts a BatchNorm's running mean and variance as non-trainable parameters and moves frozen
    parameters (``requires_grad=False``) to non-trainable, so ``.total`` equals Keras's ``count_params()`` for
    the same network; PyTorch style reports parameters, trainable parameters and buffers. See the module
    docstring for the exact rules.

    Args:
        model: Any module.
        input_size: Optional input shape WITHOUT the batch dimension (e.g. ``(1, 64, 64)``), or a list of shapes
            for a model with several inputs. When given, the model runs once on zeros (batch of 2, eval mode,
            no gradients; every training flag restored afterwards) to record each layer's output shape.
        example_inputs: Instead of ``input_size``, inputs to record the output shapes with, in bnkit's one
            convention (docs/tools.md, "Example inputs"): a tensor or a list is ONE positional argument (a
            detector's ``[image, ...]``), a tuple positional arguments, a dict keyword arguments, a callable
            ``forward(model)``. Same run: eval mode, no gradients, flags restored.

    Returns:
        A :class:`Summary` with ``.total``, ``.trainable``, ``.non_trainable``, ``.parameters``,
        ``.trainable_parameters``, ``.buffers`` and per-layer ``.rows``.

    Raises:
        ValueError: ``input_size`` or ``example_inputs`` does not fit the model, or both are given.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Flatten(),
        ...                       nn.Linear(32 * 64 * 64, 100), nn.Linear(100, 10))
        >>> s = summary(model, input_size=(1, 64, 64))
        >>> s.total, s.trainable, s.non_trainable
        (13108758, 13108694, 64)
    """
    check_model(model, "summary")
    _warn_unrecognised(model)
    if input_size is not None and example_inputs is not None:
        raise ValueError("summary: give input_size or example_inputs, not both")
    shapes: dict[str, list[int]] = {}
    if input_size is not None:
        shapes = _output_shapes(model, _zeros_for(model, input_size))
    elif example_inputs is not None:
        shapes = _output_shapes(model, example_inputs, "example_inputs do not fit the model")
    result = Summary()
    seen: set[int] = set()
    for name, module in model.named_modules():
        own_params = [p for _, p in module.named_parameters(recurse=False) if id(p) not in seen]
        own_buffers = [
            b
            for name, b in module.named_buffers(recurse=False)
            if id(b) not in seen and name not in module._non_persistent_buffers_set  # bnkit's skipped_batches
        ]
        seen.update(id(t) for t in (*own_params, *own_buffers))
        is_leaf = next(iter(module.children()), None) is None
        if not (own_params or own_buffers or is_leaf):
            continue
        trainable = sum(p.numel() for p in own_params if p.requires_grad)
        frozen = sum(p.numel() for p in own_params if not p.requires_grad)
        state = sum(b.numel() for b in own_buffers if _is_keras_state(module, b))
        row = LayerSummary(
            name=name,
            type=layer_type(module),
            output_shape=shapes.get(name),
            total=trainable + frozen + state,
            trainable=trainable,
            non_trainable=frozen + state,
            parameters=trainable + frozen,
            trainable_parameters=trainable,
            buffers=sum(b.numel() for b in own_buffers),
        )
        result.rows.append(row)
        result.total += row.total
        result.trainable += row.trainable
        result.non_trainable += row.non_trainable
        result.parameters += row.parameters
        result.trainable_parameters += row.trainable_parameters
        result.buffers += row.buffers
    return result


def _warn_unrecognised(model: nn.Module) -> None:
    names = [
        name or "<model>"
        for name, module in unrecognised_running_stats(model)
        if not isinstance(module, torch.jit.ScriptModule)  # TorchScript keeps no class: counted by buffer names
    ]
    if names:
        warnings.warn(
            f"summary: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''} hold running statistics but "
            "bnkit does not recognise their class; their floating buffers are counted as Keras non-trainable "
            "weights (teach bnkit the class with bnkit.register_batchnorm)",
            UserWarning,
            stacklevel=3,
        )


def _zeros_for(model: nn.Module, input_size: Sequence[int] | Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
    """Zeros of ``input_size`` (batch of 2) as positional arguments, in the model's device and dtype."""
    sizes = list(input_size)
    if not sizes:
        raise ValueError("input_size must not be empty: give the input shape without the batch dimension")
    multi = all(isinstance(s, (tuple, list)) for s in sizes)
    shapes_in = [tuple(int(d) for d in s) for s in sizes] if multi else [tuple(int(d) for d in sizes)]
    device, dtype = input_device_dtype(model)
    return tuple(torch.zeros((2, *shape), device=device, dtype=dtype) for shape in shapes_in)


def _output_shapes(model: nn.Module, inputs: ExampleInputs, what: str | None = None) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}

    def record(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if name not in shapes and isinstance(output, torch.Tensor):
                shapes[name] = [-1, *output.shape[1:]]

        return hook

    with eval_run(model) as handles:
        for name, module in model.named_modules():
            handles.append(module.register_forward_hook(record(name)))
        try:
            call_with_example(model, inputs)
        except Exception as exc:  # the model decides which errors a wrong shape raises
            if what is None:
                described = " and ".join(str(list(t.shape[1:])) for t in inputs)
                what = f"input_size {described} (batch dimension excluded) does not fit the model"
            raise ValueError(f"summary: {what}: {first_line(exc)}") from exc
    return shapes
