"""Pairing a Keras model's weight layers with a PyTorch model's weight modules, in execution order.

A Keras layer pairs with the next PyTorch module(s) that ``forward`` calls: ConvND -> ConvNd, DepthwiseConvND
-> ConvNd with ``groups = in_channels``, SeparableConvND -> two ConvNd (depthwise, then 1x1 pointwise),
ConvNDTranspose -> ConvTransposeNd, Dense -> Linear, BatchNormalization -> a BatchNorm (torch's or bnkit's).
Every pair is checked on its kind and on the shape of every weight before anything is copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bnkit.transfer.keras_side import KerasLayer
from bnkit.transfer.torch_side import TorchCall, torch_kind

__all__ = ["Pair", "pair_layers"]

_WANTS = {
    "conv": ("conv",),
    "depthwise": ("conv",),
    "separable": ("conv", "conv"),
    "transpose": ("transpose",),
    "dense": ("linear",),
    "bn": ("bn",),
}


@dataclass
class Pair:
    """A Keras layer and the PyTorch module(s) that compute the same thing.

    Attributes:
        keras: The Keras layer.
        modules: ``(qualified name, module)`` of the PyTorch modules (two for a separable convolution).
        call_index: Index of the first module's call in the recorded forward pass.
        fold_into_next: The layer's bias lives in the next pair's BatchNorm running mean on the side that has
            no bias (Keras conv with ``use_bias=True`` before BN, torch conv with ``bias=False``, or the reverse).
        folded_from: For a BatchNorm pair: the pair whose bias is folded into its running mean, else None.

    Example:
        >>> Pair(keras=None, modules=[("fc", None)], call_index=0).torch_names
        'fc'
    """

    keras: KerasLayer
    modules: list[tuple[str, Any]]
    call_index: int
    fold_into_next: bool = False
    folded_from: Pair | None = None

    @property
    def torch_names(self) -> str:
        """The PyTorch module names, joined with ``+``."""
        return " + ".join(name for name, _ in self.modules)

    @property
    def title(self) -> str:
        """``keras_name (Class) -> torch_name (Class)`` for messages."""
        classes = " + ".join(type(m).__name__ for _, m in self.modules)
        return f"{self.keras.name} ({self.keras.class_name} -> {classes} {self.torch_names})"

    @property
    def kind(self) -> str:
        """The Keras layer's kind (see :class:`bnkit.transfer.keras_side.KerasLayer`)."""
        return self.keras.kind


def _torch_has_bias(module: Any) -> bool:
    return getattr(module, "bias", None) is not None


def _keras_has_bias(layer: Any) -> bool:
    return getattr(layer, "bias", None) is not None


def _feeds(previous: Any, layer: Any) -> bool:
    history = getattr(getattr(layer, "input", None), "_keras_history", None)
    return history is not None and history[0] is previous


def _check_kind(item: KerasLayer, calls: list[TorchCall], where: int) -> None:
    wanted = _WANTS[item.kind]
    got = [torch_kind(c.module) for c in calls]
    names = ", ".join(f"{c.name} ({type(c.module).__name__})" for c in calls) or "nothing"
    if tuple(got) != wanted:
        raise ValueError(
            f"transfer: Keras layer {item.name!r} ({item.class_name}) pairs with torch {names} at call {where}; "
            f"expected {' + '.join(wanted)}: the models must have the same layers in the same execution order"
        )
    module = calls[0].module
    if item.kind == "depthwise" and module.groups != module.in_channels:
        raise ValueError(
            f"transfer: Keras layer {item.name!r} is depthwise but torch {calls[0].name} has groups={module.groups} "
            f"(needs groups=in_channels={module.in_channels})"
        )
    if item.kind == "separable" and (
        module.groups != module.in_channels or any(k != 1 for k in calls[1].module.kernel_size)
    ):
        raise ValueError(
            f"transfer: Keras layer {item.name!r} is separable: torch needs a depthwise conv (groups=in_channels) "
            f"then a 1x1 conv. Received: {names}"
        )


def pair_layers(keras_layers: list[KerasLayer], calls: list[TorchCall]) -> list[Pair]:
    """Pair the Keras weight layers with the recorded PyTorch calls, checking kinds and bias placement.

    Args:
        keras_layers: From :func:`bnkit.transfer.keras_side.keras_weight_layers`.
        calls: From :func:`bnkit.transfer.torch_side.torch_calls` (the last entry is the model output).

    Returns:
        One :class:`Pair` per Keras layer.

    Raises:
        ValueError: kinds or counts differ, or a bias has nowhere to go (one line naming both layers).

    Example:
        >>> import numpy as np
        >>> pair_layers([], [TorchCall("<output>", None, np.zeros(1), np.zeros(1))])
        []
    """
    from bnkit.transfer.weights import expected_torch, read_keras, read_torch

    modules = calls[:-1]
    used: set[int] = set()
    pairs: list[Pair] = []
    for item in keras_layers:
        need = len(_WANTS[item.kind])
        # the next unused modules of the right kind, preferring the first whose weight shapes fit: parallel
        # branches (a ResNet shortcut) may run in another order in PyTorch than in Keras's graph
        starts = [
            i
            for i in range(len(modules) - need + 1)
            if all(i + j not in used for j in range(need))
            and tuple(torch_kind(c.module) for c in modules[i : i + need]) == _WANTS[item.kind]
        ]
        if not starts:
            first = min((i for i in range(len(modules)) if i not in used), default=len(modules))
            _check_kind(item, modules[first : first + need], first)
        chosen = starts[0]
        keras_values = read_keras(Pair(item, [], 0))
        for start in starts:
            candidate = Pair(item, [(c.name, c.module) for c in modules[start : start + need]], start)
            try:
                wanted = expected_torch(candidate, keras_values)
            except (ValueError, KeyError):
                continue
            have = read_torch(candidate)
            if all(have.get(key) is not None and have[key].shape == value.shape for key, value in wanted.items()):
                chosen = start
                break
        chunk = modules[chosen : chosen + need]
        _check_kind(item, chunk, chosen)
        used.update(range(chosen, chosen + need))
        pairs.append(Pair(item, [(c.name, c.module) for c in chunk], chosen))
    if len(used) != len(modules):
        extra = ", ".join(c.name for i, c in enumerate(modules) if i not in used)
        raise ValueError(f"transfer: torch modules {extra} have no Keras layer to pair with (Keras has fewer layers)")
    for pair in pairs:
        if pair.kind == "bn":
            continue
        keras_bias = _keras_has_bias(pair.keras.layer)
        torch_bias = _torch_has_bias(pair.modules[-1][1])
        if keras_bias == torch_bias:
            continue
        fed = [p for p in pairs if p.kind == "bn" and _feeds(pair.keras.layer, p.keras.layer)]
        nxt = fed[0] if fed else None
        if nxt is not None and pair.keras.activation == "linear":
            pair.fold_into_next = True
            nxt.folded_from = pair
            continue
        have, lack = ("Keras layer " + pair.keras.name, "torch " + pair.torch_names)
        if torch_bias:
            have, lack = lack, have
        raise ValueError(
            f"transfer: {have} has a bias but {lack} has none, and no BatchNorm follows directly to fold it into; "
            "give both the same use_bias/bias setting"
        )
    return pairs
