"""Layer-by-layer verification of a Keras <-> PyTorch port, in inference and in one training step.

Both models run on the same batch; every pair's input and output are compared in PyTorch's layout. A pair
whose input matches but whose output differs is where the models part (its weights, eps, stride and padding
are tested as explanations); a pair whose input differs although the previous pair matched points at what
lies between them (a dropped fused activation, a different activation, a reshape). The training check runs
one step with batch statistics on each side, then compares each BatchNorm (fed Keras's input, so an earlier
difference does not hide a later one) on its output and its updated running statistics. Both models are left
exactly as they were.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from bnkit.transfer import diagnose, layouts
from bnkit.transfer.keras_side import KerasLayer, keras_tensors, restore_keras, snapshot_keras
from bnkit.transfer.pairing import Pair
from bnkit.transfer.report import LayerCheck, TransferReport
from bnkit.transfer.torch_side import TorchCall, restore_torch, snapshot_torch, torch_calls
from bnkit.transfer.weights import bias_offset, expected_torch, read_keras, read_torch

__all__ = ["check_pairs"]


def _channel(offset: Any, ndim: int) -> Any:
    if np.isscalar(offset):
        return offset
    return np.asarray(offset).reshape(1, -1, *([1] * (ndim - 2)))


def _expected_in(pair: Pair, keras_in: np.ndarray, torch_in: np.ndarray) -> np.ndarray:
    value = layouts.activation_to_torch(keras_in, torch_in.shape, pair.keras.flatten_from)
    if pair.folded_from is not None:
        value = value - _channel(bias_offset(pair.folded_from), value.ndim)
    layer = pair.keras.layer
    if pair.kind in ("conv", "depthwise", "separable") and value.ndim == torch_in.ndim and value.ndim >= 3:
        extra = [torch_in.shape[i] - value.shape[i] for i in range(2, value.ndim)]
        if any(extra) and all(e >= 0 for e in extra):
            sizes = keras_in.shape[1:-1]
            pads = layouts.keras_padding(
                layer.padding, sizes, tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate)
            )
            value = np.pad(value, [(0, 0), (0, 0), *pads])
    return value.astype(np.float32)


def _run_isolated(pair: Pair, x: np.ndarray, training: bool) -> tuple[np.ndarray, list[Any]]:
    """The pair's PyTorch modules on ``x`` (copies, so the originals keep their state)."""
    import torch

    modules = [copy.deepcopy(module) for _, module in pair.modules]
    value = torch.from_numpy(np.ascontiguousarray(x))
    with torch.no_grad():
        for module in modules:
            module.train(training)
            value = module(value)
    return value.numpy(), modules


def _output(pair: Pair, raw: np.ndarray) -> np.ndarray:
    return diagnose.apply_activation(pair.keras.activation, raw + _channel(bias_offset(pair), raw.ndim))


def _inference_checks(
    pairs: list[Pair], keras_io: list[tuple[np.ndarray, np.ndarray]], calls: list[TorchCall], rtol: float
) -> list[LayerCheck]:
    checks = []
    diverged = False
    previous_ok = True
    for index, pair in enumerate(pairs):
        first, last = calls[pair.call_index], calls[pair.call_index + len(pair.modules) - 1]
        keras_in, keras_out = keras_io[index]
        expected_in = _expected_in(pair, keras_in, first.input)
        expected_out = layouts.activation_to_torch(keras_out, last.output.shape)
        out_err = diagnose.rel_error(_output(pair, last.output), expected_out)
        in_err = diagnose.rel_error(first.input, expected_in)
        iso_err = float("inf")
        if expected_in.shape == first.input.shape:
            iso, _ = _run_isolated(pair, expected_in, training=False)
            iso_err = diagnose.rel_error(_output(pair, iso), expected_out)
        classes = f"{pair.keras.class_name} -> {' + '.join(type(m).__name__ for _, m in pair.modules)}"
        status, reason = "ok", ""
        if in_err > rtol and previous_ok:
            # the previous layer matched but this input does not: the mistake sits between the two layers
            status = "diverged"
            prev = pairs[index - 1] if index else None
            prev_out = None
            if prev is not None:
                raw = calls[prev.call_index + len(prev.modules) - 1].output
                prev_out = raw + _channel(bias_offset(prev), raw.ndim)
                if pair.folded_from is not None:
                    prev_out = prev_out - _channel(bias_offset(pair.folded_from), raw.ndim)
            reason = diagnose.between_reason(prev, prev_out, first.input, expected_in, rtol)
        elif iso_err > rtol:
            # the layer on Keras's own input differs: the mistake is in this layer
            status = "diverged"
            k_values, t_values = read_keras(pair), read_torch(pair)
            reason = diagnose.layer_reason(
                pair,
                k_values,
                t_values,
                expected_torch(pair, k_values),
                expected_in,
                expected_out,
                tuple(keras_in.shape),
                rtol,
            )
        elif in_err > rtol:
            status, reason = "upstream", "input differs because of an earlier divergence; the layer itself matches"
        previous_ok = out_err <= rtol
        diverged = diverged or status == "diverged"
        checks.append(LayerCheck(pair.keras.name, pair.torch_names, classes, "inference", out_err, status, reason))
    return checks


def _training_checks(
    pairs: list[Pair],
    keras_io: list[tuple[np.ndarray, np.ndarray]],
    calls: list[TorchCall],
    keras_after: dict[str, dict[str, np.ndarray]],
    rtol: float,
) -> list[LayerCheck]:
    checks = []
    for index, pair in enumerate(pairs):
        if pair.kind != "bn":
            continue
        first = calls[pair.call_index]
        keras_in, keras_out = keras_io[index]
        expected_in = _expected_in(pair, keras_in, first.input)
        expected_out = layouts.activation_to_torch(keras_out, first.output.shape)
        classes = f"{pair.keras.class_name} -> {type(pair.modules[0][1]).__name__}"
        module = pair.modules[0][1]
        if expected_in.shape != first.input.shape or not module.track_running_stats:
            continue
        iso, (copy_module,) = _run_isolated(pair, expected_in, training=True)
        out_err = diagnose.rel_error(iso, expected_out)
        offset = _channel(bias_offset(pair.folded_from), 2)[0] if pair.folded_from is not None else 0.0
        keras_stats = {
            "mean": keras_after[pair.keras.name]["mean"] - offset,
            "var": keras_after[pair.keras.name]["var"],
        }
        torch_stats = {"mean": copy_module.running_mean.numpy(), "var": copy_module.running_var.numpy()}
        stat_err = max(diagnose.rel_error(torch_stats[k], keras_stats[k]) for k in ("mean", "var"))
        status, reason = "ok", ""
        if out_err > rtol:
            status = "diverged"
            reason = diagnose.layer_reason(
                pair, read_keras(pair), read_torch(pair), {}, expected_in, expected_out, tuple(keras_in.shape), rtol
            )
            if module.eps != pair.keras.layer.epsilon:
                reason = (
                    f"eps: torch {pair.torch_names} has eps={module.eps:g}, Keras epsilon={pair.keras.layer.epsilon:g}"
                )
        elif stat_err > rtol:
            before = {"mean": module.running_mean.detach().numpy(), "var": module.running_var.detach().numpy()}
            count = expected_in.size // expected_in.shape[1]
            status, reason = diagnose.training_reason(pair, keras_stats, torch_stats, before, count, rtol)
        checks.append(
            LayerCheck(pair.keras.name, pair.torch_names, classes, "training", max(out_err, stat_err), status, reason)
        )
    return checks


def _keras_stats(layers: list[KerasLayer]) -> dict[str, dict[str, np.ndarray]]:
    from bnkit.keras.compat import import_keras

    keras = import_keras()
    found = {}
    for item in layers:
        if item.kind == "bn":
            layer = item.layer
            found[item.name] = {
                "mean": np.asarray(keras.ops.convert_to_numpy(layer.moving_mean)),
                "var": np.asarray(keras.ops.convert_to_numpy(layer.moving_variance)),
            }
    return found


def check_pairs(
    keras_model: Any,
    torch_model: Any,
    layers: list[KerasLayer],
    pairs: list[Pair],
    keras_x: np.ndarray,
    torch_x: Any,
    *,
    rtol: float = 1e-4,
    training: bool = True,
) -> TransferReport:
    """Verify already-paired models on one batch and return the report (``direction="verify"``).

    Args:
        keras_model: The Keras model.
        torch_model: The PyTorch model.
        layers: Its weight layers (:func:`bnkit.transfer.keras_side.keras_weight_layers`).
        pairs: The pairs (:func:`bnkit.transfer.pairing.pair_layers`).
        keras_x: The batch in Keras's layout.
        torch_x: The same batch as a PyTorch tensor in PyTorch's layout.
        rtol: Relative error (L2) above which a layer diverges.
        training: Also check one training step (needs a batch of at least 2).

    Returns:
        A :class:`bnkit.transfer.report.TransferReport`; both models are left as they were.

    Example:
        >>> check_pairs.__name__
        'check_pairs'
    """
    report = TransferReport("verify", pairs=[(p.keras.name, p.torch_names) for p in pairs])
    keras_io = keras_tensors(keras_model, layers, keras_x, training=False)
    calls = torch_calls(torch_model, torch_x, training=False)
    report.checks += _inference_checks(pairs, keras_io, calls, rtol)
    final_k = layouts.activation_to_torch(keras_io[-1][1], calls[-1].output.shape)
    report.output_error["inference"] = diagnose.rel_error(calls[-1].output, final_k)
    if final_k.ndim == 2 and final_k.shape == calls[-1].output.shape and final_k.shape[1] > 1:
        report.argmax_agreement = float(np.mean(final_k.argmax(1) == calls[-1].output.argmax(1)))
    if not training:
        return report
    if keras_x.shape[0] < 2:
        report.notes.append("training check skipped: it needs a batch of at least 2 samples")
        return report
    keras_state, torch_state = snapshot_keras(keras_model), snapshot_torch(torch_model)
    try:
        keras_train = keras_tensors(keras_model, layers, keras_x, training=True)
        keras_after = _keras_stats(layers)
        torch_train = torch_calls(torch_model, torch_x, training=True)
    finally:
        restore_keras(keras_model, keras_state)
        restore_torch(torch_model, torch_state)
    report.checks += _training_checks(pairs, keras_train, torch_train, keras_after, rtol)
    final_k = layouts.activation_to_torch(keras_train[-1][1], torch_train[-1].output.shape)
    report.output_error["training"] = diagnose.rel_error(torch_train[-1].output, final_k)
    return report
