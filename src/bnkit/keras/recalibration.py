"""``bnkit.keras.recalibrate``: exact population statistics for a Keras model's BatchNormalization layers.

With Keras's default momentum 0.99 the moving statistics are an exponential average that lags the weights and
still remembers its initial values for hundreds of steps. ``recalibrate`` replaces them with the exact
statistics of what each selected layer sees over ``data``: per batch, two-pass moments ``(count, mean, m2)`` of
the layer's real input computed on the backend in float32 (masked positions left out), merged exactly across
batches in float64 NumPy (count-weighted mean, biased variance: Keras's convention).

During the passes the model is called with ``training=False`` (dropout off, every other BN on its moving
statistics); the selected layers normalise with their batch statistics (as Precise BN does) unless
``sequential=True``, where layers are recomputed one at a time in call order and each sees the earlier ones
already on their new statistics (one pass over ``data`` per layer). Inputs are read by temporarily wrapping each
selected layer's ``call`` (eager calls; no hooks inside a compiled step), so it works the same on every backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnkit.keras import compat
from bnkit.keras.find import Found, select_batchnorms
from bnkit.shared.moments import NumpyMoments, merge
from bnkit.shared.selection import Selector

__all__ = ["KerasRecalibrationReport", "recalibrate"]

METHODS = ("precise",)


@dataclass
class KerasRecalibrationReport:
    """What :func:`recalibrate` did.

    Attributes:
        layers: Paths of the layers given new statistics.
        skipped: Path -> reason, for selected layers the passes never reached.
        batches: Batches read (per pass).
        samples: Samples read (per pass; first dimension of the inputs).
        passes: Passes over ``data`` (1, or the number of layers with ``sequential=True``).

    Example:
        >>> print(KerasRecalibrationReport(layers=["bn"], batches=2, samples=10, passes=1))
        recalibrated bn from 10 samples in 2 batches (1 pass)
    """

    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    passes: int = 0

    def __str__(self) -> str:
        plural = "es" if self.passes != 1 else ""
        lines = [
            f"recalibrated {', '.join(self.layers) or 'nothing'} from {self.samples} samples in {self.batches} "
            f"batches ({self.passes} pass{plural})"
        ]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, (list, tuple, dict))


def _inputs_of(batch: Any) -> Any:
    """``x`` of a batch: ``(x, y)`` / ``(x, y, w)`` tuples give their first element."""
    if isinstance(batch, tuple) and 1 <= len(batch) <= 3:
        return batch[0]
    return batch


def _leading(x: Any) -> int:
    first = x
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, dict) and first:
        first = next(iter(first.values()))
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) else 0


def _batches(data: Any, batch_size: int) -> Callable[[], Iterator[Any]]:
    """A function returning a fresh iterator of model inputs, and whether ``data`` can be read again."""
    if isinstance(data, tuple) and data and _is_array(data[0]):
        data = data[0]  # (x, y) arrays
    if _is_array(data):
        array = data
        return lambda: (array[i : i + batch_size] for i in range(0, int(array.shape[0]), batch_size))
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and hasattr(data, "on_epoch_end"):
        sequence = data  # keras.utils.PyDataset
        return lambda: (_inputs_of(sequence[i]) for i in range(len(sequence)))
    if isinstance(data, Iterator):
        consumed = {"done": False}

        def once() -> Iterator[Any]:
            if consumed["done"]:
                raise TypeError(
                    "bnkit.keras.recalibrate: a generator can be read once; sequential=True needs a list, an "
                    "array, a tf.data.Dataset or a PyDataset"
                )
            consumed["done"] = True
            return (_inputs_of(b) for b in data)

        return once
    if isinstance(data, Iterable):
        return lambda: (_inputs_of(b) for b in data)
    raise TypeError(
        "bnkit.keras.recalibrate: data must be an array, (x, y) arrays, a list of batches, a tf.data.Dataset, a "
        f"keras.utils.PyDataset or a generator; got {type(data).__name__}"
    )


class _Capture:
    """Wraps one layer's ``call``: records float64 moments of its inputs, normalises as asked."""

    def __init__(self, item: Found, batch_mode: bool) -> None:
        self.item = item
        self.batch_mode = batch_mode
        self.moments: NumpyMoments | None = None
        self.original = item.layer.call

    def __call__(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        layer = self.item.layer
        mean, var, moments = _tensor_moments(layer, inputs, mask)
        self.moments = moments if self.moments is None else merge(self.moments, moments)
        if not self.batch_mode:
            return self.original(inputs, training=False, mask=mask)
        return _normalise(layer, inputs, mean, var)

    def install(self) -> None:
        self.item.layer.call = self

    def remove(self) -> None:
        if self.item.layer.__dict__.get("call") is self:
            del self.item.layer.__dict__["call"]


def _tensor_moments(layer: Any, inputs: Any, mask: Any) -> tuple[Any, Any, NumpyMoments]:
    """Two-pass moments of one batch on the backend (float32 or wider), and their float64 NumPy triple.

    Only the per-channel vectors leave the backend; the exact merge across batches happens in float64.
    """
    ops = compat.import_keras().ops
    ndim = len(inputs.shape)
    axes = (layer.axis,) if isinstance(layer.axis, int) else tuple(layer.axis)
    channel = {a % ndim for a in axes}
    reduce = [d for d in range(ndim) if d not in channel]
    x = ops.cast(inputs, "float32")
    if mask is None:
        count = float(np.prod([int(x.shape[d]) for d in reduce]))
        mean = ops.mean(x, axis=reduce, keepdims=True)
        m2 = ops.sum(ops.square(x - mean), axis=reduce, keepdims=True)
        var = m2 / max(count, 1.0)
        counts = np.full(_channels(x, channel), count)
    else:
        weights = ops.broadcast_to(ops.expand_dims(ops.cast(mask, "float32"), -1), ops.shape(x))
        total = ops.sum(weights, axis=reduce, keepdims=True)
        safe = ops.maximum(total, 1.0)
        mean = ops.sum(x * weights, axis=reduce, keepdims=True) / safe
        m2 = ops.sum(ops.square(x - mean) * weights, axis=reduce, keepdims=True)
        var = m2 / safe
        counts = compat.to_numpy(total).astype(np.float64).reshape(-1)
    triple = NumpyMoments(
        counts.reshape(-1),
        compat.to_numpy(mean).astype(np.float64).reshape(-1),
        compat.to_numpy(m2).astype(np.float64).reshape(-1),
    )
    return mean, var, triple


def _channels(x: Any, channel: set[int]) -> int:
    size = 1
    for d in channel:
        size *= int(x.shape[d])
    return size


def _normalise(layer: Any, inputs: Any, mean: Any, var: Any) -> Any:
    ops = compat.import_keras().ops
    ndim = len(inputs.shape)
    axes = (layer.axis,) if isinstance(layer.axis, int) else tuple(layer.axis)
    shape = [1] * ndim
    for a in axes:
        shape[a % ndim] = int(inputs.shape[a % ndim])
    x = ops.cast(inputs, "float32")
    y = (x - mean) * ops.rsqrt(var + layer.epsilon)
    if layer.scale:
        y = y * ops.reshape(ops.cast(layer.gamma, "float32"), shape)
    if layer.center:
        y = y + ops.reshape(ops.cast(layer.beta, "float32"), shape)
    return ops.cast(y, layer.compute_dtype)


def _assign(item: Found, moments: NumpyMoments) -> None:
    layer = item.layer
    mean = moments.mean
    var = moments.variance()
    layer.moving_mean.assign(mean.astype(np.float32))
    layer.moving_variance.assign(var.astype(np.float32))
    if getattr(layer, "renorm", False):
        stddev = np.sqrt(var + layer.epsilon).astype(np.float32)
        layer.moving_stddev.assign(stddev)
        layer.renorm_mean.assign(mean.astype(np.float32))
        layer.renorm_stddev.assign(stddev)


def _run_pass(model: Any, batches: Callable[[], Iterator[Any]], num_batches: int | None) -> tuple[int, int]:
    count = samples = 0
    for x in itertools.islice(batches(), num_batches):
        model(x, training=False)
        count += 1
        samples += _leading(x)
    return count, samples


def recalibrate(
    model: Any,
    data: Any,
    method: str = "precise",
    sequential: bool = False,
    layers: Selector = None,
    num_batches: int | None = None,
    *,
    batch_size: int = 32,
) -> KerasRecalibrationReport:
    """Replace the selected layers' moving statistics with the exact statistics of their inputs over ``data``.

    In place. See the module docstring for what each layer sees during the passes. On any exception (the data
    iterator's included) every variable of the model is restored to its exact value and every wrapped ``call``
    removed. Renorm layers also get ``moving_stddev`` (and ``renorm_mean`` / ``renorm_stddev``) set to
    ``sqrt(variance + epsilon)`` and the mean.

    Args:
        model: A Keras 3 model.
        data: Arrays (split into batches of ``batch_size``), ``(x, y)`` arrays, a list of batches, a
            ``tf.data.Dataset``, a ``keras.utils.PyDataset`` or a generator; batches may be ``(x, y)`` tuples
            and of uneven sizes.
        method: ``"precise"`` (the only method; ``fit()``-style EMA updates are what went wrong).
        sequential: Recompute layer by layer in call order (needs re-readable ``data``).
        layers: Which layers (None: all; a glob on the path such as ``"base/*"``, a type, a predicate, a list).
        num_batches: Use at most this many batches per pass.
        batch_size: Batch size for array ``data``.

    Returns:
        A :class:`KerasRecalibrationReport`.

    Raises:
        TypeError: not a Keras model or unusable ``data``. ValueError: bad ``method``/``num_batches``,
            ``layers`` matches nothing, ``data`` yields no batch, or non-finite statistics (model unchanged).

    Example:
        >>> import numpy as np
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(name="bn")])
        >>> x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]], "float32")
        >>> _ = recalibrate(m, [x[:2], x[2:]])
        >>> compat.to_numpy(m.layers[0].moving_mean).tolist(), compat.to_numpy(m.layers[0].moving_variance).tolist()
        ([3.0, 6.0], [2.6666667461395264, 10.666666984558105])
    """
    if method not in METHODS:
        raise ValueError(f"bnkit.keras.recalibrate: method must be one of {METHODS}; got {method!r}")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"bnkit.keras.recalibrate: num_batches must be a positive int or None; got {num_batches!r}")
    if not isinstance(sequential, bool):
        raise TypeError(f"bnkit.keras.recalibrate: sequential must be True or False; got {sequential!r}")
    found = select_batchnorms(model, layers, "recalibrate")
    if not found:
        raise ValueError("bnkit.keras.recalibrate: the model has no BatchNormalization layer; nothing to recalibrate")
    batches = _batches(data, batch_size)
    variables = list(model.variables)
    saved = [compat.to_numpy(v) for v in variables]
    report = KerasRecalibrationReport()
    captures: list[_Capture] = []
    try:
        if sequential:
            order = _call_order(model, found, batches, num_batches)
            for item in order:
                capture = _Capture(item, batch_mode=False)
                captures = [capture]
                capture.install()
                report.batches, report.samples = _run_pass(model, batches, num_batches)
                capture.remove()
                report.passes += 1
                _finish(report, [capture])
            for item in found:
                if item not in order:
                    report.skipped[item.path] = "never called during the forward passes"
        else:
            captures = [_Capture(item, batch_mode=True) for item in found]
            for capture in captures:
                capture.install()
            report.batches, report.samples = _run_pass(model, batches, num_batches)
            for capture in captures:
                capture.remove()
            report.passes = 1
            _finish(report, captures)
        if report.batches == 0:
            raise ValueError("bnkit.keras.recalibrate: data yielded no batch")
    except BaseException:
        for capture in captures:
            capture.remove()
        for v, value in zip(variables, saved, strict=True):
            v.assign(value)
        raise
    return report


def _finish(report: KerasRecalibrationReport, captures: list[_Capture]) -> None:
    for capture in captures:
        path = capture.item.path
        if capture.moments is None:
            report.skipped[path] = "never called during the forward passes"
            continue
        if not (np.isfinite(capture.moments.mean).all() and np.isfinite(capture.moments.m2).all()):
            raise ValueError(f"bnkit.keras.recalibrate: {path}: non-finite statistics (inf/NaN in its inputs)")
        _assign(capture.item, capture.moments)
        report.layers.append(path)


def _call_order(
    model: Any, found: list[Found], batches: Callable[[], Iterator[Any]], num_batches: int | None
) -> list[Found]:
    """The selected layers in the order one batch calls them (a first pass on one batch, nothing assigned)."""
    order: list[Found] = []

    class _Order(_Capture):
        def __call__(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
            if self.item not in order:
                order.append(self.item)
            return self.original(inputs, training=False, mask=mask)

    probes = [_Order(item, batch_mode=False) for item in found]
    for probe in probes:
        probe.install()
    try:
        for x in itertools.islice(batches(), 1):
            model(x, training=False)
    finally:
        for probe in probes:
            probe.remove()
    return order
