"""The weight arithmetic of :func:`bnkit.keras.fold`: an inference BatchNormalization folded into a Keras layer.

An inference BatchNormalization is the per-channel affine map ``y = scale * x + shift`` with
``scale = gamma / sqrt(moving_variance + epsilon)`` and ``shift = beta - moving_mean * scale`` (gamma 1 without
``scale``, beta 0 without ``center``). Folded AFTER a layer it multiplies the layer's output channels; folded
BEFORE a layer it multiplies the layer's input channels and the shift, pushed through the kernel, joins the bias
(exact only when every output sees every kernel tap on a real input: ``padding="valid"``; deciding that is
:mod:`bnkit.keras.folding`'s job). Everything here is float64 NumPy on copies; nothing touches a Keras object
except to read it.

Keras weight layouts (channels last or first does not change them):

- ``Conv1D/2D/3D``: ``kernel`` ``(*k, in / groups, out)``; output ``o`` belongs to group ``o // (out / groups)``.
- ``DepthwiseConv1D/2D``: ``kernel`` ``(*k, C, multiplier)``; output channel ``c * multiplier + m``.
- ``SeparableConv1D/2D``: ``depthwise_kernel`` ``(*k, C, multiplier)``, ``pointwise_kernel``
  ``(*1, C * multiplier, out)``, one ``bias`` ``(out,)`` after the pointwise step.
- ``Conv1D/2D/3DTranspose``: ``kernel`` ``(*k, out, in)`` (no groups in Keras 3).
- ``Dense``: ``kernel`` ``(in, out)``; it acts on the last axis of inputs of any rank.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnkit.keras import compat

__all__ = ["KINDS", "fold_after", "fold_before", "layer_kind", "layer_weights", "scale_shift"]

#: Layer kind -> the names of its weights, in the order ``fold_after`` / ``fold_before`` expect.
KINDS: dict[str, tuple[str, ...]] = {
    "conv": ("kernel", "bias"),
    "depthwise": ("kernel", "bias"),
    "separable": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "transpose": ("kernel", "bias"),
    "dense": ("kernel", "bias"),
}


def layer_kind(layer: Any) -> str | None:
    """``"conv"``, ``"depthwise"``, ``"separable"``, ``"transpose"`` or ``"dense"`` for a layer fold understands.

    A subclass counts only when it keeps the stock ``call`` (one with its own ``call`` may compute anything).

    Example:
        >>> keras = compat.import_keras()
        >>> layers = keras.layers
        >>> layer_kind(layers.Conv2D(4, 3)), layer_kind(layers.DepthwiseConv1D(3)), layer_kind(layers.ReLU())
        ('conv', 'depthwise', None)
    """
    layers = compat.import_keras().layers
    table = [
        ((layers.Conv1D, layers.Conv2D, layers.Conv3D), "conv"),
        ((layers.DepthwiseConv1D, layers.DepthwiseConv2D), "depthwise"),
        ((layers.SeparableConv1D, layers.SeparableConv2D), "separable"),
        ((layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose), "transpose"),
        ((layers.Dense,), "dense"),
    ]
    for classes, kind in table:
        for cls in classes:
            if isinstance(layer, cls):
                return kind if type(layer).call is cls.call else None
    return None


def layer_weights(layer: Any, kind: str) -> dict[str, np.ndarray | None]:
    """The layer's weights as float64 NumPy copies, keyed as in :data:`KINDS` (``bias`` None without one).

    Example:
        >>> keras = compat.import_keras()
        >>> dense = keras.layers.Dense(3, use_bias=False); dense.build((None, 2))
        >>> {k: None if v is None else v.shape for k, v in layer_weights(dense, "dense").items()}
        {'kernel': (2, 3), 'bias': None}
    """
    found: dict[str, np.ndarray | None] = {}
    for name in KINDS[kind]:
        variable = getattr(layer, name, None)
        found[name] = None if variable is None else compat.to_numpy(variable).astype(np.float64)
    return found


def scale_shift(bn: Any) -> tuple[np.ndarray, np.ndarray]:
    """The inference map ``(scale, shift)`` of a BatchNormalization layer, in float64.

    Example:
        >>> keras = compat.import_keras()
        >>> bn = keras.layers.BatchNormalization(epsilon=0.0, center=False); bn.build((None, 2))
        >>> _ = bn.moving_variance.assign([4.0, 0.25]), bn.moving_mean.assign([1.0, 1.0])
        >>> [v.tolist() for v in scale_shift(bn)]
        [[0.5, 2.0], [-0.5, -2.0]]
    """
    mean = compat.to_numpy(bn.moving_mean).astype(np.float64)
    variance = compat.to_numpy(bn.moving_variance).astype(np.float64)
    gamma = compat.to_numpy(bn.gamma).astype(np.float64) if bn.scale else np.ones_like(mean)
    beta = compat.to_numpy(bn.beta).astype(np.float64) if bn.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + float(bn.epsilon))
    return scale, beta - mean * scale


def _bias(weights: dict[str, np.ndarray | None], channels: int) -> np.ndarray:
    bias = weights.get("bias")
    return np.zeros(channels) if bias is None else bias


def fold_after(
    kind: str, weights: dict[str, np.ndarray | None], scale: np.ndarray, shift: np.ndarray
) -> dict[str, np.ndarray]:
    """The weights of ``bn(layer(x))`` as one layer: output channels scaled, ``bias * scale + shift``.

    Example:
        >>> w = {"kernel": np.ones((2, 3)), "bias": None}
        >>> out = fold_after("dense", w, np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 0.0]))
        >>> out["kernel"].tolist(), out["bias"].tolist()
        ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [0.0, 1.0, 0.0])
    """
    out = {name: value for name, value in weights.items() if value is not None}
    if kind in ("conv", "dense"):
        out["kernel"] = weights["kernel"] * scale
    elif kind == "depthwise":
        kernel = weights["kernel"]
        out["kernel"] = kernel * scale.reshape(kernel.shape[-2:])
    elif kind == "separable":
        out["pointwise_kernel"] = weights["pointwise_kernel"] * scale
    elif kind == "transpose":
        out["kernel"] = weights["kernel"] * scale[:, None]
    else:
        raise ValueError(f"fold_after: unknown layer kind {kind!r}")
    out["bias"] = _bias(weights, scale.shape[0]) * scale + shift
    return out


def fold_before(
    kind: str, weights: dict[str, np.ndarray | None], scale: np.ndarray, shift: np.ndarray, groups: int = 1
) -> dict[str, np.ndarray]:
    """The weights of ``layer(bn(x))`` as one layer: input channels scaled, the shift pushed into the bias.

    Exact for a valid-padded convolution (every tap sees a real input) and for ``Dense``; transposed
    convolutions are not handled (their border outputs receive fewer taps).

    Example:
        >>> w = {"kernel": np.array([[1.0], [2.0]]), "bias": np.array([0.5])}
        >>> out = fold_before("dense", w, np.array([2.0, 3.0]), np.array([1.0, -1.0]))
        >>> out["kernel"].tolist(), out["bias"].tolist()
        ([[2.0], [6.0]], [-0.5])
    """
    out = {name: value for name, value in weights.items() if value is not None}
    if kind == "dense":
        kernel = weights["kernel"]
        out["kernel"] = kernel * scale[:, None]
        out["bias"] = _bias(weights, kernel.shape[1]) + shift @ kernel
    elif kind == "conv":
        kernel = weights["kernel"]
        per_group_in, channels_out = kernel.shape[-2], kernel.shape[-1]
        group_of_output = np.arange(channels_out) // (channels_out // groups)
        index = group_of_output[None, :] * per_group_in + np.arange(per_group_in)[:, None]  # (in/g, out)
        out["kernel"] = kernel * scale[index]
        taps = kernel.reshape(-1, per_group_in, channels_out)
        out["bias"] = _bias(weights, channels_out) + np.einsum("tjo,jo->o", taps, shift[index])
    elif kind == "depthwise":
        kernel = weights["kernel"]
        out["kernel"] = kernel * scale[:, None]
        extra = (kernel.reshape(-1, *kernel.shape[-2:]).sum(axis=0) * shift[:, None]).reshape(-1)
        out["bias"] = _bias(weights, extra.shape[0]) + extra
    elif kind == "separable":
        depthwise, pointwise = weights["depthwise_kernel"], weights["pointwise_kernel"]
        out["depthwise_kernel"] = depthwise * scale[:, None]
        middle = (depthwise.reshape(-1, *depthwise.shape[-2:]).sum(axis=0) * shift[:, None]).reshape(-1)
        matrix = pointwise.reshape(-1, pointwise.shape[-1])  # (C * multiplier, out): pointwise taps are 1
        out["bias"] = _bias(weights, matrix.shape[1]) + middle @ matrix
    else:
        raise ValueError(f"fold_before: layer kind {kind!r} cannot absorb a BatchNormalization on its input")
    return out
