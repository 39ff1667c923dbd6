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
selected layer's ``call`` (:mod:`bnkit.keras.moment_capture`), so it works the same on every backend and for
every kind of model. Each pass runs one compiled Keras step per batch (the model wrapped in a small
``keras.Model`` whose outputs are only the moment vectors, run with ``predict_on_batch``: ``tf.function`` /
``jax.jit`` / ``torch.no_grad`` as ``predict`` uses), or, when the model cannot be traced, eager calls.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnkit.keras import compat
from bnkit.keras.find import Found, select_batchnorms
from bnkit.keras.moment_capture import Capture, MomentsStep, compiled_step
from bnkit.shared.moments import NumpyMoments
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
        compiled: Whether the passes ran through the compiled step (False: eager calls).
        fallback: Why eager calls ran although ``compiled=True`` was asked for ("" otherwise).

    Example:
        >>> print(KerasRecalibrationReport(layers=["bn"], batches=2, samples=10, passes=1))
        recalibrated bn from 10 samples in 2 batches (1 pass)
    """

    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    passes: int = 0
    compiled: bool = False
    fallback: str = ""

    def __str__(self) -> str:
        plural = "es" if self.passes != 1 else ""
        lines = [
            f"recalibrated {', '.join(self.layers) or 'nothing'} from {self.samples} samples in {self.batches} "
            f"batches ({self.passes} pass{plural})"
        ]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        if self.fallback:
            lines.append(f"note: {self.fallback}")
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


def _run_pass(step: MomentsStep, batches: Callable[[], Iterator[Any]], num_batches: int | None) -> tuple[int, int]:
    count = samples = 0
    with step:
        for x in itertools.islice(batches(), num_batches):
            step(x)
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
    compiled: bool = True,
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
        compiled: Run each pass through one compiled Keras step that returns only the moment vectors (the
            eager calls are used when the model cannot be traced: see the report's ``fallback``); False: call
            the model eagerly on every batch. Both give the same statistics (float32 rounding apart).

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
    if not isinstance(compiled, bool):
        raise TypeError(f"bnkit.keras.recalibrate: compiled must be True or False; got {compiled!r}")
    batches = _batches(data, batch_size)
    variables = list(model.variables)
    saved = _snapshot(variables)
    report = KerasRecalibrationReport()
    try:
        if sequential:
            order = _call_order(model, found, batches)
            step = compiled_step(model, order, batch_mode=False, compiled=compiled)
            for index in range(len(order)):
                for capture in step.captures:
                    capture.reset()
                report.batches, report.samples = _run_pass(step, batches, num_batches)
                report.passes += 1
                _finish(report, [step.captures[index]])
            for item in found:
                if item not in order:
                    report.skipped[item.path] = "never called during the forward passes"
        else:
            step = compiled_step(model, found, batch_mode=True, compiled=compiled)
            report.batches, report.samples = _run_pass(step, batches, num_batches)
            report.passes = 1
            _finish(report, step.captures)
        report.compiled, report.fallback = step.compiled, step.fallback
        if report.batches == 0:
            raise ValueError("bnkit.keras.recalibrate: data yielded no batch")
    except BaseException:
        for v, value in zip(variables, saved, strict=True):
            v.assign(value)
        raise
    return report


def _snapshot(variables: list[Any]) -> list[Any]:
    """Exact copies of the variables' values, to restore on an exception.

    TensorFlow: on-device copies (half the time of NumPy copies). JAX: NumPy copies, since ``predict_on_batch``
    donates the variables' buffers to the compiled step. torch: NumPy copies (no faster way through keras.ops).
    """
    if compat.backend() == "tensorflow":
        ops = compat.import_keras().ops
        return [ops.copy(v.value) for v in variables]
    return [compat.to_numpy(v) for v in variables]


def _finish(report: KerasRecalibrationReport, captures: list[Capture]) -> None:
    for capture in captures:
        path = capture.item.path
        if capture.moments is None:
            report.skipped[path] = "never called during the forward passes"
            continue
        if not (np.isfinite(capture.moments.mean).all() and np.isfinite(capture.moments.m2).all()):
            raise ValueError(f"bnkit.keras.recalibrate: {path}: non-finite statistics (inf/NaN in its inputs)")
        _assign(capture.item, capture.moments)
        report.layers.append(path)


def _call_order(model: Any, found: list[Found], batches: Callable[[], Iterator[Any]]) -> list[Found]:
    """The selected layers in the order one batch calls them (a first pass on one batch, nothing assigned)."""
    order: list[Found] = []

    class _Order(Capture):
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
