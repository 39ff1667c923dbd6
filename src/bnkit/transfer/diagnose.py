"""Why a layer pair diverges: candidate explanations tested against the numbers, each named in one line.

Every porting mistake of the layout table leaves a fingerprint that can be tested directly:

* kernel reshaped instead of transposed: the PyTorch weight equals the Keras kernel ``reshape``-d;
* Dense after Flatten with rows not reordered: the weight equals the plain transpose of the Keras kernel;
* PyTorch's default eps: the output matches once the layer uses Keras's ``epsilon``;
* symmetric padding where Keras pads asymmetrically: the output matches with Keras's ``(before, after)`` pads;
* fused activation dropped: the next layer's input is the previous layer's output before the activation;
* Keras momentum copied as is / not converted: the running statistics move by ``m`` instead of ``1 - m``;
* unbiased running variance: PyTorch's running variance is Keras's with ``n / (n - 1)`` on the batch term.
"""

from __future__ import annotations

import numpy as np

from bnkit.transfer import layouts
from bnkit.transfer.pairing import Pair

__all__ = ["ACTIVATIONS", "apply_activation", "between_reason", "layer_reason", "rel_error", "training_reason"]


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``||actual - expected|| / ||expected||`` (inf when the shapes differ).

    Example:
        >>> rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
        0.0
    """
    if actual.shape != expected.shape:
        return float("inf")
    diff = np.linalg.norm((actual.astype(np.float64) - expected).ravel())
    scale = np.linalg.norm(expected.astype(np.float64).ravel())
    return float(diff / max(scale, 1e-12))


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    return a.size == b.size and rel_error(a.reshape(-1), b.reshape(-1)) <= rtol


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


#: Keras activation name -> the same function on channels-first NumPy arrays (softmax over axis 1).
ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "relu6": lambda x: np.clip(x, 0.0, 6.0),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "swish": lambda x: x / (1.0 + np.exp(-x)),
    "gelu": _gelu,
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "softmax": _softmax,
}


def apply_activation(name: str, x: np.ndarray) -> np.ndarray:
    """Keras's activation ``name`` on a channels-first NumPy array.

    Raises:
        ValueError: an activation the port does not know.

    Example:
        >>> apply_activation("relu", np.array([-1.0, 2.0])).tolist()
        [0.0, 2.0]
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"transfer: activation {name!r} is not supported (known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name](x.astype(np.float64)).astype(np.float32)


def _weight_reason(pair: Pair, key: str, actual: np.ndarray, expected: np.ndarray, keras_values: dict) -> str:
    index, name = key.split(".", 1)
    module_name = pair.modules[int(index)][0]
    kind = pair.kind
    source = {"conv": "kernel", "transpose": "kernel", "depthwise": "kernel", "dense": "kernel"}.get(kind)
    if kind == "separable":
        source = "depthwise_kernel" if index == "0" else "pointwise_kernel"
    if name == "weight" and source is not None:
        kernel = keras_values[source]
        if kernel.size == actual.size and np.array_equal(kernel.reshape(actual.shape), actual):
            return (
                f"kernel layout: torch {module_name}.weight {tuple(actual.shape)} is the Keras {source} "
                f"{tuple(kernel.shape)} reshaped; it must be transposed (Keras keeps channels last: "
                "(k..., in, out) -> torch (out, in, k...))"
            )
        if kind == "dense" and pair.keras.flatten_from is not None:
            if np.allclose(actual, layouts.dense_kernel_to_torch(kernel, None)):
                shape = pair.keras.flatten_from
                return (
                    f"Flatten order: torch {module_name}.weight is the Keras kernel transposed but its rows are "
                    f"not reordered: Keras flattens {shape} as (H, W, C), torch flattens (C, H, W); reorder the "
                    "rows (bnkit.transfer.layouts.dense_kernel_to_torch(kernel, flatten_from))"
                )
    if name == "running_mean" and pair.folded_from is not None:
        moving = keras_values["moving_mean"]
        if np.allclose(actual, moving):
            return (
                f"conv bias not folded: the bias of Keras layer {pair.folded_from.keras.name!r} has no place in "
                f"torch {pair.folded_from.torch_names} (bias=False); fold it: running_mean = moving_mean - bias"
            )
    keras_name = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
    if pair.kind == "bn" and name in ("weight", "bias"):
        other = keras_values.get("beta" if name == "weight" else "gamma")
        if other is not None and np.allclose(actual, other):
            return f"gamma and beta swapped: torch {module_name}.{name} holds Keras's {keras_name[name]}'s partner"
    what = keras_name.get(name, name) if pair.kind == "bn" else name
    diff = float(np.max(np.abs(actual - expected)))
    return f"weights: torch {module_name}.{name} differs from what Keras's {what} gives (max abs diff {diff:.3g})"


def _conv_reason(pair: Pair, x: np.ndarray, expected_out: np.ndarray, keras_in_shape: tuple, rtol: float) -> str:
    import torch
    import torch.nn.functional as F

    layer, (name, module) = pair.keras.layer, pair.modules[0]
    nd = len(module.kernel_size)
    strides, dilation = tuple(layer.strides), tuple(layer.dilation_rate)
    if tuple(module.stride) != strides:
        return f"stride: torch {name} has stride {tuple(module.stride)}, Keras strides {strides}"
    if tuple(module.dilation) != dilation:
        return f"dilation: torch {name} has dilation {tuple(module.dilation)}, Keras dilation_rate {dilation}"
    if pair.kind == "transpose" or isinstance(module.padding, str):
        return ""
    sizes = keras_in_shape[1:-1]
    pads = layouts.keras_padding(layer.padding, sizes, tuple(module.kernel_size), strides, dilation)
    extra = [x.shape[2 + i] - sizes[i] for i in range(nd)]
    if any(extra):
        return ""
    theirs = [(p, p) for p in module.padding]
    if theirs == pads:
        return ""
    flat = [v for before_after in reversed(pads) for v in before_after]
    with torch.no_grad():
        xt = F.pad(torch.from_numpy(x), flat)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        y = conv(xt, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
        if len(pair.modules) == 2:
            y = pair.modules[1][1](y)
    y = apply_activation(pair.keras.activation, y.numpy())
    fixed = _close(y, expected_out, rtol)
    padded = " x ".join(f"({b}, {a})" for b, a in pads)
    fix = f"nn.ZeroPad{nd}d({tuple(flat)}) before a conv with padding=0" if nd in (1, 2, 3) else "an explicit pad"
    return (
        f"padding: torch {name} pads {tuple(module.padding)} on both sides; Keras padding={layer.padding!r} "
        f"with strides {strides} on {tuple(sizes)} pads {padded} (before, after)"
        + (f": the output matches with Keras's padding; use {fix}" if fixed else "")
    )


def _bn_reason(pair: Pair, x: np.ndarray, expected_out: np.ndarray, rtol: float) -> str:
    import torch
    import torch.nn.functional as F

    layer, (name, module) = pair.keras.layer, pair.modules[0]
    if abs(module.eps - layer.epsilon) <= 1e-12:
        return ""
    with torch.no_grad():
        y = F.batch_norm(
            torch.from_numpy(x),
            module.running_mean,
            module.running_var,
            module.weight,
            module.bias,
            False,
            0.0,
            float(layer.epsilon),
        ).numpy()
    fixed = _close(y, expected_out, rtol)
    return f"eps: torch {name} has eps={module.eps:g}, Keras epsilon={layer.epsilon:g}" + (
        f"; the output matches with eps={layer.epsilon:g}" if fixed else ""
    )


def layer_reason(
    pair: Pair,
    keras_values: dict[str, np.ndarray],
    torch_values: dict[str, np.ndarray],
    expected_torch_values: dict[str, np.ndarray],
    x: np.ndarray,
    expected_out: np.ndarray,
    keras_in_shape: tuple,
    rtol: float,
) -> str:
    """Why a pair whose input matches gives a different output: weights, eps, stride/padding, or unexplained.

    Example:
        >>> layer_reason.__name__
        'layer_reason'
    """
    for key, expected in expected_torch_values.items():
        actual = torch_values.get(key)
        if actual is not None and actual.shape == expected.shape and not np.allclose(actual, expected, atol=1e-6):
            return _weight_reason(pair, key, actual, expected, keras_values)
    if pair.kind == "bn":
        reason = _bn_reason(pair, x, expected_out, rtol)
    elif pair.kind in ("conv", "depthwise", "separable", "transpose"):
        reason = _conv_reason(pair, x, expected_out, keras_in_shape, rtol)
    else:
        reason = ""
    return reason or (
        "output differs with the same input and weights: compare the layer settings (stride, padding, dilation, "
        "groups, activation)"
    )


def between_reason(
    previous: Pair | None, previous_out: np.ndarray | None, actual_in: np.ndarray, expected_in: np.ndarray, rtol: float
) -> str:
    """Why the input of a pair differs although the previous pair's output matched.

    Args:
        previous: The previous pair (None before the first layer).
        previous_out: The previous PyTorch module's raw output, plus any folded bias, channels first.
        actual_in: This pair's input in PyTorch.
        expected_in: Keras's input to this layer in PyTorch's layout.
        rtol: Tolerance.

    Example:
        >>> between_reason(None, None, np.zeros((2, 3)), np.ones((2, 3)), 1e-4)[:21]
        'input: the inputs of '
    """
    if previous is None or previous_out is None:
        return "input: the inputs of the two models differ before the first layer (check the input layout)"
    if actual_in.shape != expected_in.shape and actual_in.size != expected_in.size:
        return (
            f"shape: after {previous.keras.name} torch gives {tuple(actual_in.shape)}, Keras "
            f"{tuple(expected_in.shape)} in torch layout"
        )
    act = previous.keras.activation
    if act != "linear" and _close(actual_in, previous_out, rtol):
        return (
            f"activation: the fused activation {act!r} of Keras layer {previous.keras.name!r} "
            f"({previous.keras.class_name}(activation={act!r})) is missing in torch after {previous.torch_names}"
        )
    for name in ACTIVATIONS:
        if name not in (act, "swish") and _close(actual_in, apply_activation(name, previous_out), rtol):
            keras_does = f"applies {act!r}" if act != "linear" else "has no activation"
            return f"activation: torch applies {name!r} after {previous.torch_names}; Keras {keras_does} there"
    err = rel_error(actual_in.reshape(-1), expected_in.reshape(-1))
    return (
        f"between layers: the tensor after {previous.keras.name} differs (relative error {err:.2g}) although that "
        "layer matched: an operation between the two layers differs (pooling, padding, reshape, activation)"
    )


def training_reason(
    pair: Pair,
    keras_step: dict[str, np.ndarray],
    torch_step: dict[str, np.ndarray],
    before: dict[str, np.ndarray],
    batch_count: int,
    rtol: float,
) -> tuple[str, str]:
    """``(status, reason)`` for a BatchNorm whose running statistics differ after one training step.

    Args:
        pair: The BatchNorm pair.
        keras_step: Keras's ``moving_mean``/``moving_variance`` after the step (in torch's convention: any
            folded bias taken off the mean).
        torch_step: PyTorch's ``running_mean``/``running_var`` after the step.
        before: The statistics before the step (torch's).
        batch_count: Values per channel in the batch (``n`` of the ``n / (n - 1)`` correction).
        rtol: Tolerance.

    Example:
        >>> training_reason.__name__
        'training_reason'
    """
    from bnkit.layers.batchnorm import BatchNorm

    layer, (name, module) = pair.keras.layer, pair.modules[0]
    m = float(layer.momentum)
    torch_m = module.momentum
    if torch_m is None:
        return "diverged", f"momentum: torch {name} has momentum=None (cumulative average); Keras uses {m}"
    if isinstance(module, BatchNorm) and module.keras_momentum is not None:
        torch_m = 1.0 - module.keras_momentum
    if abs(torch_m - (1.0 - m)) > 1e-9:
        copied = abs(torch_m - m) < 1e-9
        return "diverged", (
            f"momentum: torch {name} has momentum={torch_m:g}, Keras momentum={m:g} weighs the OLD value; torch "
            f"needs 1 - {m:g} = {1.0 - m:g}" + (" (Keras's value was copied as is)" if copied else "")
        )
    unbiased = module.unbiased_running_var if isinstance(module, BatchNorm) else True
    if unbiased:
        batch_var = (keras_step["var"] - m * before["var"]) / (1.0 - m)
        corrected = m * before["var"] + (1.0 - m) * batch_var * batch_count / max(batch_count - 1, 1)
        if _close(torch_step["var"], corrected, rtol):
            return "expected", (
                f"running variance: torch {name} stores the unbiased batch variance (n/(n-1) = "
                f"{batch_count}/{batch_count - 1}), Keras the biased one; for Keras's training semantics use "
                "bnkit.BatchNorm (unbiased_running_var=False)"
            )
    return "diverged", "running statistics differ after one training step with matching settings"
