"""``transfer_weights`` and ``verify_transfer``: copy weights between a Keras model and its PyTorch twin, then prove it.

The two models are built by the user with the same layers in the same execution order (PyTorch
channels-first, Keras channels-last). The transfer pairs the layers (:mod:`bnkit.transfer.pairing`), computes
every destination value from the source with the layout rules (:mod:`bnkit.transfer.layouts`), checks every
shape, and only then writes; the BatchNorm settings follow (eps, momentum ``1 - m``; a :class:`bnkit.BatchNorm`
also gets Keras's update formula and biased running variance). It then verifies layer by layer
(:mod:`bnkit.transfer.verify`) and returns the report.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from bnkit.transfer import layouts
from bnkit.transfer.keras_side import keras_weight_layers
from bnkit.transfer.pairing import pair_layers
from bnkit.transfer.report import TransferReport
from bnkit.transfer.torch_side import torch_calls
from bnkit.transfer.verify import check_pairs
from bnkit.transfer.weights import (
    bn_settings,
    check_shapes,
    expected_keras,
    expected_torch,
    read_keras,
    read_torch,
    write_keras,
    write_torch,
)

__all__ = ["transfer_weights", "verify_transfer"]


def _sides(first: Any, second: Any) -> tuple[Any, Any, bool]:
    """(keras model, torch model, keras is first)."""
    from bnkit.keras.compat import import_keras

    keras = import_keras()
    import torch

    # on Keras's torch backend a keras.Model is also a torch.nn.Module: test Keras first
    if isinstance(first, keras.Model) and isinstance(second, torch.nn.Module) and not isinstance(second, keras.Model):
        return first, second, True
    if isinstance(second, keras.Model) and isinstance(first, torch.nn.Module) and not isinstance(first, keras.Model):
        return second, first, False
    raise TypeError(
        "transfer: expected one keras.Model and one torch.nn.Module. Received: "
        f"{type(first).__name__} and {type(second).__name__}"
    )


def _inputs(example_inputs: Any) -> tuple[np.ndarray, Any]:
    """(Keras batch channels-last, torch batch channels-first) from a NumPy array (Keras layout) or a tensor."""
    import torch

    if isinstance(example_inputs, torch.Tensor):
        torch_x = example_inputs.detach().float().cpu()
        keras_x = layouts.activation_to_keras(torch_x.numpy())
    else:
        keras_x = np.asarray(example_inputs, dtype=np.float32)
        torch_x = torch.from_numpy(np.ascontiguousarray(layouts.activation_to_torch(keras_x)))
    if keras_x.ndim < 2:
        raise ValueError(f"transfer: example_inputs must be a batch (rank >= 2). Received shape {keras_x.shape}")
    return np.ascontiguousarray(keras_x, dtype=np.float32), torch_x


def _prepare(keras_model: Any, torch_model: Any, example_inputs: Any) -> tuple:
    keras_x, torch_x = _inputs(example_inputs)
    layers = keras_weight_layers(keras_model)
    calls = torch_calls(torch_model, torch_x, training=False)
    return layers, pair_layers(layers, calls), keras_x, torch_x


def verify_transfer(
    keras_model: Any, torch_model: Any, example_inputs: Any, *, rtol: float = 1e-4, training: bool = True
) -> TransferReport:
    """Check, layer by layer, that a PyTorch model computes what a Keras model computes (nothing is copied).

    For models ported by hand or by another tool: the report names the first layer that diverges and why
    (kernel reshaped instead of transposed, Flatten rows not reordered, eps, asymmetric 'same' padding, a
    dropped fused activation, momentum not converted, unbiased running variance).

    Args:
        keras_model: A Sequential or functional Keras model (either argument order works).
        torch_model: The PyTorch model.
        example_inputs: A batch: a NumPy array in Keras's layout (channels last) or a torch tensor in
            PyTorch's layout (channels first). At least 2 samples for the training check.
        rtol: Relative (L2) error above which a layer counts as diverged.
        training: Also check one training step (batch statistics, running-statistics update).

    Returns:
        :class:`bnkit.transfer.report.TransferReport`. Both models are left exactly as they were.

    Example:
        >>> import keras, numpy as np, torch
        >>> k = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
        >>> t = torch.nn.Linear(3, 2, bias=False)
        >>> report = verify_transfer(k, t, np.ones((4, 3), "float32"))
        >>> report.ok, report.first_divergence.reason[:8]
        (False, 'weights:')
    """
    keras_model, torch_model, _ = _sides(keras_model, torch_model)
    layers, pairs, keras_x, torch_x = _prepare(keras_model, torch_model, example_inputs)
    return check_pairs(keras_model, torch_model, layers, pairs, keras_x, torch_x, rtol=rtol, training=training)


def transfer_weights(
    src: Any, dst: Any, example_inputs: Any, *, verify: bool = True, rtol: float = 1e-4
) -> TransferReport:
    """Copy every weight of ``src`` into ``dst`` (a Keras model and its PyTorch twin, either way), then verify.

    Layers pair in execution order with kind and shape checks; every destination value is computed and checked
    before the first one is written, so a refused transfer leaves ``dst`` untouched. Layout rules: ConvND,
    DepthwiseConvND, SeparableConvND (two PyTorch convs), ConvNDTranspose and Dense kernels; Dense rows after a
    Flatten reordered from (H, W, C) to (C, H, W); a conv bias on one side only folded into the next
    BatchNorm's running mean; ``scale=False``/``center=False`` as gamma 1 / beta 0. BatchNorm settings: eps,
    momentum (PyTorch's ``1 - m`` for Keras's ``m``); a :class:`bnkit.BatchNorm` destination also gets Keras's
    update formula and biased running variance, so it trains as Keras does. What cannot be copied (a
    convolution's padding, a missing activation) is found by the verification and named in the report.

    Args:
        src: The model to copy from (``keras.Model`` or ``torch.nn.Module``).
        dst: The model to copy into, changed in place (weights, statistics and BatchNorm eps/momentum only).
        example_inputs: A batch, as in :func:`verify_transfer`.
        verify: Verify after copying (inference and one training step); a divergence warns.
        rtol: Verification tolerance.

    Returns:
        :class:`bnkit.transfer.report.TransferReport` with ``direction``, the settings changed and the checks.

    Raises:
        TypeError: not one Keras and one PyTorch model.
        ValueError: the models do not pair (layer kinds, counts or shapes differ; a bias with nowhere to go),
            in one line naming the layers; ``dst`` is then unchanged.

    Example:
        >>> import keras, numpy as np, torch
        >>> k = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
        >>> t = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        >>> report = transfer_weights(k, t, np.random.default_rng(0).normal(size=(8, 3)).astype("float32"))
        >>> report.direction, report.ok, t[1].eps, round(t[1].momentum, 6)
        ('keras -> torch', True, 0.001, 0.01)
    """
    keras_model, torch_model, keras_first = _sides(src, dst)
    layers, pairs, keras_x, torch_x = _prepare(keras_model, torch_model, example_inputs)
    to = "torch" if keras_first else "keras"
    plan = []
    changes: list[str] = []
    for pair in pairs:  # everything computed and checked before anything is written
        if to == "torch":
            values = expected_torch(pair, read_keras(pair))
        else:
            values = expected_keras(pair, read_torch(pair))
        check_shapes(pair, values, to)
        if pair.kind == "bn":
            changes += bn_settings(pair, to, apply=False)
        if pair.fold_into_next:
            bn = next(p for p in pairs if p.folded_from is pair)
            lacking = f"torch {pair.torch_names}" if to == "torch" else f"Keras {pair.keras.name}"
            target = f"torch {bn.torch_names}" if to == "torch" else f"Keras {bn.keras.name}"
            changes.append(f"{lacking} has no bias: it is folded into the running mean of {target}")
        plan.append((pair, values))
    for pair, values in plan:
        (write_torch if to == "torch" else write_keras)(pair, values)
        if pair.kind == "bn":
            bn_settings(pair, to, apply=True)
    direction = "keras -> torch" if keras_first else "torch -> keras"
    if not verify:
        return TransferReport(direction, pairs=[(p.keras.name, p.torch_names) for p in pairs], changes=changes)
    report = check_pairs(keras_model, torch_model, layers, pairs, keras_x, torch_x, rtol=rtol)
    report.direction, report.changes = direction, changes
    if not report.ok:
        first = report.first_divergence
        warnings.warn(f"transfer_weights: the models differ after the transfer: {first.line()}", stacklevel=2)
    return report
