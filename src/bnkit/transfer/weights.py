"""What each side's weights must be for a pair, computed from the other side (the layouts applied per pair).

Keys are ``"<module index>.<parameter>"`` on the PyTorch side (``"0.weight"``, ``"1.bias"``, ``"0.running_var"``)
and the Keras weight names on the Keras side (``kernel``, ``depthwise_kernel``, ``gamma``, ``moving_mean``, ...).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnkit.transfer import layouts
from bnkit.transfer.pairing import Pair

__all__ = [
    "bias_offset",
    "bn_settings",
    "check_shapes",
    "expected_keras",
    "expected_torch",
    "read_keras",
    "read_torch",
    "write_keras",
    "write_torch",
]

_KERAS_NAMES = (
    "kernel",
    "depthwise_kernel",
    "pointwise_kernel",
    "bias",
    "gamma",
    "beta",
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
)
_TORCH_NAMES = ("weight", "bias", "running_mean", "running_var", "running_std", "renorm_mean", "renorm_std")
_RENORM = (("running_std", "moving_stddev"), ("renorm_mean", "renorm_mean"), ("renorm_std", "renorm_stddev"))


def read_keras(pair: Pair) -> dict[str, np.ndarray]:
    """The Keras layer's weights by name, as float32 NumPy arrays.

    Example:
        >>> read_keras.__name__
        'read_keras'
    """
    from bnkit.keras.compat import import_keras

    keras = import_keras()
    layer = pair.keras.layer
    found = {}
    for name in _KERAS_NAMES:
        value = getattr(layer, name, None)
        if value is not None and hasattr(value, "assign"):
            found[name] = np.array(keras.ops.convert_to_numpy(value), dtype=np.float32, copy=True)
    return found


def read_torch(pair: Pair) -> dict[str, np.ndarray]:
    """The PyTorch modules' parameters and statistics by ``"<index>.<name>"``, as NumPy arrays.

    Example:
        >>> read_torch.__name__
        'read_torch'
    """
    found = {}
    for index, (_, module) in enumerate(pair.modules):
        for name in _TORCH_NAMES:
            value = getattr(module, name, None)
            if value is not None and hasattr(value, "detach"):
                found[f"{index}.{name}"] = value.detach().cpu().float().numpy().copy()
    return found


def bias_offset(pair: Pair) -> np.ndarray | float:
    """Keras's bias minus PyTorch's for a layer whose bias is folded into the next BatchNorm (else 0).

    The Keras layer's output is the PyTorch module's output plus this, per channel.

    Example:
        >>> bias_offset.__name__
        'bias_offset'
    """
    if not pair.fold_into_next:
        return 0.0
    keras_bias = read_keras(pair).get("bias")
    torch_bias = read_torch(pair).get(f"{len(pair.modules) - 1}.bias")
    return (0.0 if keras_bias is None else keras_bias) - (0.0 if torch_bias is None else torch_bias)


def expected_torch(pair: Pair, keras_values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The PyTorch values that compute what the Keras layer computes (the layouts applied, biases folded).

    Raises:
        ValueError: Keras has gamma/beta where the PyTorch BatchNorm has no affine parameters and they are not
            the identity (one line naming both).

    Example:
        >>> expected_torch.__name__
        'expected_torch'
    """
    kind, k = pair.kind, keras_values
    module = pair.modules[-1][1]
    out: dict[str, np.ndarray] = {}
    if kind in ("conv", "transpose"):
        out["0.weight"] = layouts.conv_kernel_to_torch(k["kernel"])
    elif kind == "depthwise":
        out["0.weight"] = layouts.depthwise_kernel_to_torch(k["kernel"])
    elif kind == "separable":
        out["0.weight"] = layouts.depthwise_kernel_to_torch(k["depthwise_kernel"])
        out["1.weight"] = layouts.conv_kernel_to_torch(k["pointwise_kernel"])
        if pair.modules[0][1].bias is not None:
            out["0.bias"] = np.zeros(out["0.weight"].shape[0], np.float32)
    elif kind == "dense":
        out["0.weight"] = layouts.dense_kernel_to_torch(k["kernel"], pair.keras.flatten_from)
    if kind != "bn":
        last = len(pair.modules) - 1
        if module.bias is not None:
            out[f"{last}.bias"] = k.get("bias", np.zeros(module.bias.shape, np.float32))
        return out
    channels = k["moving_mean"].shape[0]
    gamma, beta = k.get("gamma"), k.get("beta")
    if module.weight is None or getattr(module, "bias", None) is None:
        for name, value, identity in (("gamma", gamma, 1.0), ("beta", beta, 0.0)):
            missing = module.weight is None if name == "gamma" else module.bias is None
            if missing and value is not None and not np.allclose(value, identity):
                raise ValueError(
                    f"transfer: Keras layer {pair.keras.name!r} has {name} but torch {pair.torch_names} has no "
                    f"{'weight' if name == 'gamma' else 'bias'}: build it with affine=True"
                )
    if module.weight is not None:
        out["0.weight"] = gamma if gamma is not None else np.ones(channels, np.float32)
    if getattr(module, "bias", None) is not None:
        out["0.bias"] = beta if beta is not None else np.zeros(channels, np.float32)
    mean = k["moving_mean"]
    source = pair.folded_from
    if source is not None and source.modules[-1][1].bias is None:
        keras_bias = read_keras(source).get("bias")
        if keras_bias is not None:
            mean = mean - keras_bias
    out["0.running_mean"] = mean
    out["0.running_var"] = k["moving_variance"]
    if getattr(module, "renorm", None) is not None and "moving_stddev" in k:
        for ours, theirs in _RENORM:
            out[f"0.{ours}"] = k[theirs]
    return out


def expected_keras(pair: Pair, torch_values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Keras weights that compute what the PyTorch module(s) compute (inverse of :func:`expected_torch`).

    Raises:
        ValueError: the PyTorch BatchNorm has a gamma/beta that is not the identity where the Keras layer has
            ``scale=False``/``center=False``.

    Example:
        >>> expected_keras.__name__
        'expected_keras'
    """
    kind, t, layer = pair.kind, torch_values, pair.keras.layer
    out: dict[str, np.ndarray] = {}
    if kind in ("conv", "transpose"):
        out["kernel"] = layouts.conv_kernel_to_keras(t["0.weight"])
    elif kind == "depthwise":
        out["kernel"] = layouts.depthwise_kernel_to_keras(t["0.weight"], pair.modules[0][1].in_channels)
    elif kind == "separable":
        dw_bias = t.get("0.bias")
        if dw_bias is not None and not np.allclose(dw_bias, 0.0):
            raise ValueError(
                f"transfer: torch {pair.modules[0][0]} (depthwise half of {pair.keras.name!r}) has a non-zero "
                "bias; Keras's SeparableConv has one bias, after the pointwise conv"
            )
        out["depthwise_kernel"] = layouts.depthwise_kernel_to_keras(t["0.weight"], pair.modules[0][1].in_channels)
        out["pointwise_kernel"] = layouts.conv_kernel_to_keras(t["1.weight"])
    elif kind == "dense":
        out["kernel"] = layouts.dense_kernel_to_keras(t["0.weight"], pair.keras.flatten_from)
    if kind != "bn":
        bias = t.get(f"{len(pair.modules) - 1}.bias")
        if getattr(layer, "bias", None) is not None:
            out["bias"] = bias if bias is not None else np.zeros(tuple(layer.bias.shape), np.float32)
        return out
    channels = t["0.running_mean"].shape[0]
    weight, bias = t.get("0.weight"), t.get("0.bias")
    for name, value, identity, present in (
        ("scale", weight, 1.0, layer.scale),
        ("center", bias, 0.0, layer.center),
    ):
        if not present and value is not None and not np.allclose(value, identity):
            raise ValueError(
                f"transfer: torch {pair.torch_names} has a learned {'weight' if name == 'scale' else 'bias'} but "
                f"Keras layer {layer.name!r} has {name}=False: build it with {name}=True"
            )
    if layer.scale:
        out["gamma"] = weight if weight is not None else np.ones(channels, np.float32)
    if layer.center:
        out["beta"] = bias if bias is not None else np.zeros(channels, np.float32)
    mean = t["0.running_mean"]
    source = pair.folded_from
    if source is not None and getattr(source.keras.layer, "bias", None) is None:
        torch_bias = read_torch(source).get(f"{len(source.modules) - 1}.bias")
        if torch_bias is not None:
            mean = mean + torch_bias
    out["moving_mean"] = mean
    out["moving_variance"] = t["0.running_var"]
    if layer.renorm and "0.running_std" in t:
        for ours, theirs in _RENORM:
            out[theirs] = t[f"0.{ours}"]
    return out


def check_shapes(pair: Pair, values: dict[str, np.ndarray], side: str) -> None:
    """Refuse, in one line naming both layers, a value whose shape differs from the weight it is for.

    Example:
        >>> check_shapes.__name__
        'check_shapes'
    """
    current = read_torch(pair) if side == "torch" else read_keras(pair)
    for key, value in values.items():
        have = current.get(key)
        if have is not None and have.shape != value.shape:
            where = f"torch {pair.torch_names} {key}" if side == "torch" else f"Keras {pair.keras.name} {key}"
            raise ValueError(
                f"transfer: {pair.title}: {where} has shape {tuple(have.shape)} but the other model gives "
                f"{tuple(value.shape)}; the layers differ in size"
            )


def write_torch(pair: Pair, values: dict[str, np.ndarray]) -> None:
    """Copy ``values`` into the PyTorch modules (no autograd, dtype and device kept).

    Example:
        >>> write_torch.__name__
        'write_torch'
    """
    import torch

    with torch.no_grad():
        for key, value in values.items():
            index, name = key.split(".", 1)
            target = getattr(pair.modules[int(index)][1], name)
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype))


def write_keras(pair: Pair, values: dict[str, np.ndarray]) -> None:
    """Assign ``values`` to the Keras layer's weights.

    Example:
        >>> write_keras.__name__
        'write_keras'
    """
    for name, value in values.items():
        getattr(pair.keras.layer, name).assign(np.ascontiguousarray(value, dtype=np.float32))


def _show(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def bn_settings(pair: Pair, to: str, apply: bool = True) -> list[str]:
    """Make the destination BatchNorm's eps and momentum match the source's; returns the changes (made or not).

    PyTorch's momentum is ``1 - m`` for Keras's ``m``; a :class:`bnkit.BatchNorm` also gets Keras's update
    formula and biased running variance (``keras_momentum``, ``unbiased_running_var=False``).

    Raises:
        ValueError: a bnkit.BatchNorm whose channel axis is not 1, or a cumulative average (momentum None)
            going to Keras.

    Example:
        >>> bn_settings.__name__
        'bn_settings'
    """
    from bnkit.layers.batchnorm import BatchNorm

    layer, (name, module) = pair.keras.layer, pair.modules[0]
    changes: list[str] = []
    is_bnkit = isinstance(module, BatchNorm)

    def change(obj: Any, attr: str, value: Any, label: str) -> None:
        old = getattr(obj, attr)
        if old != value and not (isinstance(old, float) and isinstance(value, float) and abs(old - value) < 1e-12):
            if apply:
                setattr(obj, attr, value)
            changes.append(f"{label}: {attr} {_show(old)} -> {_show(value)}")

    if to == "torch":
        if is_bnkit and module.axis not in (1, -module._seen_dim + 1 if module._seen_dim else 1):
            raise ValueError(f"transfer: torch {name} is a bnkit.BatchNorm with axis={module.axis}; torch needs 1")
        change(module, "eps", float(layer.epsilon), name)
        change(module, "momentum", 1.0 - float(layer.momentum), name)
        if is_bnkit:
            change(module, "keras_momentum", float(layer.momentum), name)
            change(module, "unbiased_running_var", False, name)
        return changes
    momentum = module.keras_momentum if is_bnkit and module.keras_momentum is not None else module.momentum
    if momentum is None:
        raise ValueError(f"transfer: torch {name} has momentum=None (cumulative average); Keras has no equivalent")
    keras_momentum = float(momentum) if is_bnkit and module.keras_momentum is not None else 1.0 - float(momentum)
    change(layer, "epsilon", float(module.eps), layer.name)
    change(layer, "momentum", keras_momentum, layer.name)
    return changes
