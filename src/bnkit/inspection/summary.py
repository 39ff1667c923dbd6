"""``bnkit.summary``: parameter counts in the Keras and the PyTorch convention side by side.

Why two conventions: Keras counts a BatchNorm's moving mean and variance as (non-trainable) weights, so
``model.count_params()`` of a Keras network is larger than ``sum(p.numel() for p in model.parameters())`` of the
same PyTorch network, and users porting models ask why. The Keras-style columns here give exactly what Keras
prints for the same network; the PyTorch-style columns give what ``parameters()``/``buffers()`` hold.

Keras style:
    * trainable: parameters with ``requires_grad=True``;
    * non-trainable: parameters with ``requires_grad=False`` (frozen layers) plus the floating-point running
      statistics of normalisation layers (``running_mean``, ``running_var`` and, for Batch Renormalization, its
      extra moving statistics). Integer counters such as ``num_batches_tracked`` have no Keras counterpart and
      are not counted; neither are other buffers (they are not Keras weights);
    * total = trainable + non-trainable.

PyTorch style: parameters (all), trainable parameters (``requires_grad=True``), buffers (every element of every
buffer in the state dict, ``num_batches_tracked`` included; non-persistent ones such as ``skipped_batches`` are
not saved and not counted). Tensors shared between modules are counted once, where first met.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bnkit.inspection._common import layer_type
from bnkit.layers.find import is_batch_independent_norm, is_batchnorm
from bnkit.shared.errors import first_line
from bnkit.shared.summary import LayerSummary, Summary
from bnkit.tools.model_edit import check_model
from bnkit.tools.model_inputs import eval_run, input_device_dtype

__all__ = ["LayerSummary", "Summary", "summary"]


def _is_keras_state(module: nn.Module, buffer: torch.Tensor) -> bool:
    """A buffer Keras would hold as a non-trainable weight: floating statistics of a norm layer."""
    if not buffer.is_floating_point():
        return False
    return is_batchnorm(module) or is_batch_independent_norm(module)


def summary(model: nn.Module, input_size: Sequence[int] | Sequence[Sequence[int]] | None = None) -> Summary:
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

    Returns:
        A :class:`Summary` with ``.total``, ``.trainable``, ``.non_trainable``, ``.parameters``,
        ``.trainable_parameters``, ``.buffers`` and per-layer ``.rows``.

    Raises:
        ValueError: ``input_size`` does not fit the model.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Flatten(),
        ...                       nn.Linear(32 * 64 * 64, 100), nn.Linear(100, 10))
        >>> s = summary(model, input_size=(1, 64, 64))
        >>> s.total, s.trainable, s.non_trainable
        (13108758, 13108694, 64)
    """
    check_model(model, "summary")
    shapes = _output_shapes(model, input_size) if input_size is not None else {}
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


def _output_shapes(model: nn.Module, input_size: Sequence[int] | Sequence[Sequence[int]]) -> dict[str, list[int]]:
    sizes = list(input_size)
    if not sizes:
        raise ValueError("input_size must not be empty: give the input shape without the batch dimension")
    multi = all(isinstance(s, (tuple, list)) for s in sizes)
    shapes_in = [tuple(int(d) for d in s) for s in sizes] if multi else [tuple(int(d) for d in sizes)]
    device, dtype = input_device_dtype(model)
    inputs = [torch.zeros((2, *shape), device=device, dtype=dtype) for shape in shapes_in]
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
            model(*inputs)
        except Exception as exc:  # the model decides which errors a wrong shape raises
            described = " and ".join(str(list(s)) for s in shapes_in)
            raise ValueError(
                f"input_size {described} (batch dimension excluded) does not fit the model: {first_line(exc)}"
            ) from exc
    return shapes
