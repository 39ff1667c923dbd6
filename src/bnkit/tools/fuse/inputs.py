"""Example inputs made up for a model when none are given: a random batch shaped for its first layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from bnkit.tools.fuse.trace import LAYERS, RecordedRun, Tracer, is_leaf_kind, run_recording

__all__ = ["GeneratedRun", "generate_inputs"]

# Input sizes tried, per number of spatial dimensions, when inputs are generated from the first layer.
_GENERATED_SIZES: dict[int, tuple[int, ...]] = {0: (0,), 1: (64, 256), 2: (32, 64, 224), 3: (16, 32)}


@dataclass
class GeneratedRun:
    """Inputs generated for a model, and the recorded run of the model on them.

    Example:
        >>> generated = generate_inputs(nn.Sequential(nn.Linear(3, 2)))
        >>> tuple(generated.inputs.shape), tuple(generated.run.output.shape)
        ((2, 3), (2, 2))
    """

    inputs: Tensor
    run: RecordedRun


def _first_layer(model: nn.Module) -> nn.Module | None:
    try:
        graph = Tracer(set()).trace(model)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) == 1:
            for user in placeholders[0].users:
                if user.op == "call_module" and user.args and user.args[0] is placeholders[0]:
                    return model.get_submodule(str(user.target))
    except Exception:  # fall back to registration order
        pass
    for module in model.modules():
        if is_leaf_kind(module):
            return module
    return None


def _generated_shapes(first: nn.Module) -> list[list[int]]:
    if isinstance(first, nn.Linear):
        return [[2, first.in_features]]
    if isinstance(first, _ConvNd):
        spatial = len(first.kernel_size)
        return [[2, first.in_channels] + [size] * spatial for size in _GENERATED_SIZES[spatial]]
    if isinstance(first, _BatchNorm) and not isinstance(first, nn.SyncBatchNorm):
        spatial = {nn.BatchNorm1d: 0, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(first))
        if spatial is not None:
            return [[2, first.num_features] + [size] * spatial for size in _GENERATED_SIZES[spatial]]
    return []


def generate_inputs(model: nn.Module) -> GeneratedRun | None:
    """A random batch of 2 shaped for ``model``'s first layer (``Conv``/``Linear``/``BatchNorm{1,2,3}d``) on
    which the model runs in eval mode, trying a few spatial sizes; None when there is none.

    Example:
        >>> tuple(generate_inputs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).inputs.shape)
        (2, 3, 32, 32)
        >>> generate_inputs(nn.Sequential(nn.ReLU())) is None
        True
    """
    first = _first_layer(model)
    if first is None or not isinstance(first, (*LAYERS, _BatchNorm)):
        return None
    tensor = next(iter(first.parameters(recurse=False)), None)
    if tensor is None:
        tensor = next(iter(first.buffers(recurse=False)), None)
    if tensor is None or isinstance(tensor, nn.parameter.UninitializedTensorMixin):
        return None
    generator = torch.Generator().manual_seed(0)
    for shape in _generated_shapes(first):
        x = torch.randn(shape, generator=generator, dtype=torch.float64).to(tensor.device, tensor.dtype)
        try:
            run = run_recording(model, x)
        except Exception:  # try the next size
            continue
        return GeneratedRun(x, run)
    return None
