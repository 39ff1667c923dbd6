"""Reading the per-channel moments of BatchNormalization inputs during a forward pass (for ``recalibrate``).

Each selected layer's ``call`` is temporarily replaced by a :class:`Capture`, which computes the two-pass
float32 moments ``(count, mean, m2)`` of the layer's input with ``keras.ops`` (masked positions left out) and
either normalises with them (batch statistics) or calls the layer in inference mode. The moment tensors are
collected per forward pass; :class:`MomentsStep` runs one pass over a batch either eagerly (``model(x,
training=False)``) or compiled: a small ``keras.Model`` wraps the model and returns only the moment vectors, and
its ``predict_on_batch`` compiles the step through Keras's own machinery on each backend (``tf.function`` on
TensorFlow, ``jax.jit`` with the variables passed as state on JAX, ``torch.no_grad`` on torch). Only the small
per-channel vectors leave the device; the float64 merge across batches happens in NumPy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bnkit.keras import compat
from bnkit.keras.find import Found, walk
from bnkit.shared.errors import first_line
from bnkit.shared.moments import NumpyMoments, merge

__all__ = ["Capture", "MomentsStep", "compiled_step"]

#: Attribute (set in the model's ``__dict__``, never tracked by Keras) that caches the compiled step per model.
CACHE_ATTRIBUTE = "_bnkit_recalibration_steps"
#: Compiled steps kept per model (precise and sequential mode, a few layer selections).
CACHE_SIZE = 4


class Capture:
    """Stands in for one layer's ``call``: records its inputs' moments, normalises as asked.

    Attributes:
        item: The layer and its path.
        batch_mode: True: normalise with the batch's own statistics; False: the layer's inference ``call``.
        pending: ``(count, mean, m2)`` tensors of the calls since the last :meth:`drain` (one per call).
        moments: The float64 merge of everything drained so far (None before the first call).

    Example:
        >>> import numpy as np
        >>> keras = compat.import_keras()
        >>> bn = keras.layers.BatchNormalization(); m = keras.Sequential([keras.Input((1,)), bn])
        >>> capture = Capture(Found("bn", bn), batch_mode=False); capture.install()
        >>> _ = m(np.array([[1.0], [3.0]], "float32")); capture.remove(); capture.drain()
        >>> capture.moments.mean.tolist(), capture.moments.variance().tolist()
        ([2.0], [1.0])
    """

    def __init__(self, item: Found, batch_mode: bool) -> None:
        self.item = item
        self.batch_mode = batch_mode
        self.pending: list[tuple[Any, Any, Any]] = []
        self.moments: NumpyMoments | None = None
        self.original = item.layer.call

    def __call__(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        layer = self.item.layer
        centred, var, triple = tensor_moments(layer, inputs, mask)
        self.pending.append(triple)
        if not self.batch_mode:
            return self.original(inputs, training=False, mask=mask)
        return normalise(layer, centred, var)

    def install(self) -> None:
        """Replace the layer's ``call`` with this capture (an instance attribute; the class is untouched)."""
        self.item.layer.call = self

    def remove(self) -> None:
        """Give the layer its own ``call`` back (a no-op when this capture is not installed)."""
        if self.item.layer.__dict__.get("call") is self:
            del self.item.layer.__dict__["call"]

    def reset(self) -> None:
        """Forget every moment recorded so far."""
        self.pending = []
        self.moments = None

    def drain(self) -> None:
        """Merge the pending moment tensors (eager values) into :attr:`moments` in float64."""
        for count, mean, m2 in self.pending:
            self.add(_triple(count, mean, m2))
        self.pending = []

    def add(self, moments: NumpyMoments) -> None:
        """Merge one batch's float64 moments into :attr:`moments`."""
        self.moments = moments if self.moments is None else merge(self.moments, moments)


def _vector(value: Any) -> np.ndarray:
    return np.asarray(compat.to_numpy(value), dtype=np.float64).reshape(-1)


def _triple(count: Any, mean: Any, m2: Any) -> NumpyMoments:
    means = _vector(mean)
    return NumpyMoments(np.broadcast_to(_vector(count), means.shape).copy(), means, _vector(m2))


def tensor_moments(layer: Any, inputs: Any, mask: Any) -> tuple[Any, Any, tuple[Any, Any, Any]]:
    """Two-pass float32 moments of one batch on the backend, traceable (dynamic batch sizes included).

    Returns the centred input ``x - mean`` and the variance kept in the input's rank (for normalising; the one
    full-size temporary is shared) and the per-channel ``(count, mean, m2)`` (``count`` is one int32 scalar
    without a mask, a float32 vector with one).

    Example:
        >>> import numpy as np
        >>> keras = compat.import_keras()
        >>> bn = keras.layers.BatchNormalization()
        >>> _, var, (count, mean, m2) = tensor_moments(bn, np.array([[1.0], [3.0]], "float32"), None)
        >>> compat.to_numpy(count).tolist(), compat.to_numpy(mean).tolist(), compat.to_numpy(m2).tolist()
        (2, [2.0], [2.0])
    """
    ops = compat.import_keras().ops
    ndim = len(inputs.shape)
    axes = (layer.axis,) if isinstance(layer.axis, int) else tuple(layer.axis)
    channel = {a % ndim for a in axes}
    reduce = [d for d in range(ndim) if d not in channel]
    x = ops.cast(inputs, "float32")
    if mask is None:
        dims = ops.shape(x)
        size: Any = 1
        for d in reduce:
            size = size * dims[d]
        count = ops.cast(size, "int32")
        mean = ops.mean(x, axis=reduce, keepdims=True)
        centred = x - mean
        m2 = ops.sum(ops.square(centred), axis=reduce, keepdims=True)
        var = m2 / ops.maximum(ops.cast(count, "float32"), 1.0)
        counts = count  # one int32 scalar: every channel counts the same
    else:
        weights = ops.broadcast_to(ops.expand_dims(ops.cast(mask, "float32"), -1), ops.shape(x))
        total = ops.sum(weights, axis=reduce, keepdims=True)
        safe = ops.maximum(total, 1.0)
        mean = ops.sum(x * weights, axis=reduce, keepdims=True) / safe
        centred = x - mean
        m2 = ops.sum(ops.square(centred) * weights, axis=reduce, keepdims=True)
        var = m2 / safe
        counts = ops.reshape(total, (-1,))
    return centred, var, (counts, ops.reshape(mean, (-1,)), ops.reshape(m2, (-1,)))


def normalise(layer: Any, centred: Any, var: Any) -> Any:
    """``layer``'s output from its centred float32 input ``x - mean`` and variance, cast to its compute dtype.

    Centred first (as Keras's inference path on torch does), so large means lose nothing to cancellation.

    Example:
        >>> import numpy as np
        >>> keras = compat.import_keras()
        >>> bn = keras.layers.BatchNormalization(epsilon=0.0); bn.build((None, 1))
        >>> centred = keras.ops.convert_to_tensor(np.array([[-1.0], [1.0]], "float32"))
        >>> compat.to_numpy(normalise(bn, centred, keras.ops.ones((1, 1)))).tolist()
        [[-1.0], [1.0]]
    """
    ops = compat.import_keras().ops
    ndim = len(centred.shape)
    axes = (layer.axis,) if isinstance(layer.axis, int) else tuple(layer.axis)
    shape = [1] * ndim
    for a in axes:
        shape[a % ndim] = int(centred.shape[a % ndim])
    factor = ops.rsqrt(var + layer.epsilon)
    if layer.scale:
        factor = factor * ops.reshape(ops.cast(layer.gamma, "float32"), shape)
    y = centred * factor
    if layer.center:
        y = y + ops.reshape(ops.cast(layer.beta, "float32"), shape)
    return ops.cast(y, layer.compute_dtype)


class MomentsStep:
    """One forward pass per batch that feeds every capture: compiled when possible, eager otherwise.

    Attributes:
        model: The model.
        captures: The captures, installed while the step is entered (``with step:``).
        compiled: Whether the next batch goes through the compiled step.
        fallback: Why the eager path runs although the compiled one was asked for ("" when it was not).

    Example:
        >>> import numpy as np
        >>> keras = compat.import_keras()
        >>> bn = keras.layers.BatchNormalization(name="bn"); m = keras.Sequential([keras.Input((1,)), bn])
        >>> step = MomentsStep(m, [Capture(Found("bn", bn), batch_mode=True)], compiled=False)
        >>> with step:
        ...     step(np.array([[1.0], [3.0]], "float32"))
        >>> step.captures[0].moments.variance().tolist()
        [1.0]
    """

    def __init__(
        self, model: Any, captures: list[Capture], compiled: bool, wrapper: Any = None, failures: Any = None
    ) -> None:
        self.model = model
        self.captures = captures
        self.compiled = compiled and wrapper is not None
        self.wrapper = wrapper
        self.fallback = ""
        self._succeeded = False
        self._failures = failures  # where a failed trace is remembered, so the next call goes eager at once

    def __enter__(self) -> MomentsStep:
        for capture in self.captures:
            capture.install()
        return self

    def __exit__(self, *exc: object) -> None:
        for capture in self.captures:
            capture.remove()
            capture.pending = []

    def __call__(self, x: Any) -> None:
        """Run one batch and merge the moments it gave into each capture."""
        if self.compiled:
            try:
                outputs = self.wrapper.predict_on_batch(_backend_inputs(x))
            except Exception as error:
                if self._succeeded:
                    raise
                self.compiled = False  # the model cannot be traced: every batch goes through eager calls
                self.fallback = f"compiled step failed ({first_line(error, with_type=True)}); eager calls used"
                if self._failures is not None:
                    self._failures.append(self.fallback)
                for capture in self.captures:
                    capture.pending = []
            else:
                self._succeeded = True
                for index, capture in enumerate(self.captures):
                    for count, mean, m2 in outputs.get(str(index), ()):
                        capture.add(_triple(count, mean, m2))
                return
        self.model(x, training=False)
        for capture in self.captures:
            capture.drain()


def _backend_inputs(x: Any) -> Any:
    """``x`` with TensorFlow tensors (a ``tf.data`` batch) as NumPy arrays off the TensorFlow backend."""
    if compat.backend() == "tensorflow":
        return x
    keras = compat.import_keras()

    def convert(leaf: Any) -> Any:
        return np.asarray(leaf) if type(leaf).__module__.startswith("tensorflow") else leaf

    return keras.tree.map_structure(convert, x)


def compiled_step(model: Any, found: list[Found], batch_mode: bool, compiled: bool) -> MomentsStep:
    """A :class:`MomentsStep` over ``found``, its compiled wrapper cached on the model for the next calls.

    The cache is keyed by the selected layers, the mode and the identity, type and dtype policy of every layer
    of the model, so a model changed in between gets a new step. It lives in the model's ``__dict__`` (never
    tracked by Keras, left out of copies and pickles).

    Example:
        >>> keras = compat.import_keras()
        >>> bn = keras.layers.BatchNormalization(name="bn"); m = keras.Sequential([keras.Input((1,)), bn])
        >>> compiled_step(m, [Found("bn", bn)], batch_mode=True, compiled=False).compiled
        False
    """
    if not compiled:
        return MomentsStep(model, [Capture(item, batch_mode) for item in found], compiled=False)
    key = (
        batch_mode,
        tuple(id(item.layer) for item in found),
        tuple(
            (id(f.layer), type(f.layer), getattr(getattr(f.layer, "dtype_policy", None), "name", None))
            for f in walk(model)
        ),
    )
    cache = model.__dict__.get(CACHE_ATTRIBUTE)
    if not isinstance(cache, _Cache):
        cache = _Cache()
        model.__dict__[CACHE_ATTRIBUTE] = cache
    entry = cache.entries.get(key)
    if entry is None:
        captures = [Capture(item, batch_mode) for item in found]
        failures: list[str] = []
        try:
            wrapper = _moments_model(model, captures)
        except Exception as error:  # a model Keras cannot wrap: eager calls
            wrapper = None
            failures.append(f"cannot wrap the model ({first_line(error, with_type=True)}); eager calls used")
        entry = (wrapper, captures, failures)
        if len(cache.entries) >= CACHE_SIZE:
            del cache.entries[next(iter(cache.entries))]  # the oldest
        cache.entries[key] = entry
    wrapper, captures, failures = entry
    for capture in captures:
        capture.reset()
    if failures:
        step = MomentsStep(model, captures, compiled=False)
        step.fallback = failures[0]
        return step
    return MomentsStep(model, captures, compiled=True, wrapper=wrapper, failures=failures)


class _Cache:
    """Compiled steps of one model; copies and pickles of the model get an empty cache."""

    def __init__(self) -> None:
        self.entries: dict[Any, tuple[Any, list[Capture], list[str]]] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> _Cache:
        return _Cache()

    def __copy__(self) -> _Cache:
        return _Cache()

    def __reduce__(self) -> tuple[Callable[[], _Cache], tuple[()]]:
        return _Cache, ()


class _Holder:
    """Keeps the captures out of Keras's attribute tracking."""

    def __init__(self, captures: list[Capture]) -> None:
        self.captures = captures


def _moments_model(model: Any, captures: list[Capture]) -> Any:
    """A ``keras.Model`` that runs ``model(x, training=False)`` and returns the captures' moment vectors."""
    keras = compat.import_keras()

    class RecalibrationMoments(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="bnkit_recalibration_moments")
            self.inner = model
            self.holder = _Holder(captures)
            # No weights of its own: built, so predict_on_batch on JAX skips its eager building call (a whole
            # eager forward pass, often longer than the compilation) when the model is already built.
            self.built = True

        def call(self, x: Any) -> dict[str, list[tuple[Any, Any, Any]]]:
            for capture in self.holder.captures:
                capture.pending = []
            self.inner(x, training=False)
            outputs = {str(i): list(c.pending) for i, c in enumerate(self.holder.captures) if c.pending}
            for capture in self.holder.captures:
                capture.pending = []
            return outputs

    return RecalibrationMoments()
