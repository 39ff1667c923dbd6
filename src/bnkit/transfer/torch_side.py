"""The PyTorch side of a port: the modules that carry weights, in the order ``forward`` calls them.

torch is imported inside the functions (``bnkit.transfer`` sits above ``bnkit.keras``, which never imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TorchCall", "restore_torch", "snapshot_torch", "torch_calls", "torch_kind"]


@dataclass
class TorchCall:
    """One call of a weight module during ``forward``.

    Attributes:
        name: Qualified module name.
        module: The module.
        input: Its first input, as a NumPy array.
        output: Its output, as a NumPy array.

    Example:
        >>> TorchCall("fc", None, np.zeros(1), np.zeros(1)).name
        'fc'
    """

    name: str
    module: Any
    input: np.ndarray
    output: np.ndarray


def torch_kind(module: Any) -> str | None:
    """``"conv"``, ``"transpose"``, ``"linear"``, ``"bn"`` for the modules a port pairs, else None.

    Example:
        >>> import torch.nn as nn
        >>> torch_kind(nn.Conv2d(2, 2, 1)), torch_kind(nn.BatchNorm1d(2)), torch_kind(nn.ReLU())
        ('conv', 'bn', None)
    """
    from torch import nn

    from bnkit.layers.batchnorm import BatchNorm

    if isinstance(module, (nn.modules.batchnorm._BatchNorm, BatchNorm)):
        return "bn"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transpose"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def torch_calls(model: Any, x: Any, training: bool) -> list[TorchCall]:
    """Run ``model`` on ``x`` in train or eval mode and record each weight module's input and output in order.

    The mode of every module is put back afterwards; a training run updates running statistics (see
    :func:`snapshot_torch`). The last entry, named ``"<output>"``, holds the model's output.

    Raises:
        ValueError: a module with parameters the port does not know, or a weight module called twice.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
        >>> [c.name for c in torch_calls(m, torch.ones(4, 3), training=False)]
        ['0', '<output>']
    """
    import torch

    label = f"torch model {type(model).__name__}"
    names = {}
    for name, module in model.named_modules():
        if torch_kind(module) is not None:
            names[module] = name
        elif any(True for _ in module.parameters(recurse=False)):
            raise ValueError(
                f"{label}: module {name!r} ({type(module).__name__}) has parameters the port does not know "
                "(supported: ConvNd, ConvTransposeNd, Linear, BatchNorm)"
            )
    calls: list[TorchCall] = []

    def hook(module: Any, args: tuple, output: Any) -> None:
        calls.append(TorchCall(names[module], module, args[0].detach().cpu().numpy(), output.detach().cpu().numpy()))

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        model.train(training)
        with torch.no_grad():
            out = model(x)
    except Exception as error:  # the user's model: one line naming it, the cause chained
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"transfer: {label} failed on example_inputs: {type(error).__name__}: {first}") from error
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    seen = set()
    for call in calls:
        if call.name in seen:
            raise ValueError(f"{label}: module {call.name!r} is called more than once; share nothing in a port")
        seen.add(call.name)
    final = out.detach().cpu().numpy()
    calls.append(TorchCall("<output>", None, final, final))
    return calls


def snapshot_torch(model: Any) -> dict[str, Any]:
    """A deep copy of ``model``'s state dict (to undo a verification's training step).

    Example:
        >>> import torch
        >>> sorted(snapshot_torch(torch.nn.BatchNorm1d(2)))[:2]
        ['bias', 'num_batches_tracked']
    """
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def restore_torch(model: Any, state: dict[str, Any]) -> None:
    """Load what :func:`snapshot_torch` took back into ``model`` (in place, values only).

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2); s = snapshot_torch(bn); bn.running_mean += 1
        >>> restore_torch(bn, s); bn.running_mean.tolist()
        [0.0, 0.0]
    """
    import torch

    current = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            current[key].copy_(value)
