"""``bnkit.keras.fold``: a new Keras model with every foldable inference BatchNormalization folded away.

An inference BatchNormalization is a per-channel affine map, so it can be folded into the kernel and bias of the
Conv1D/2D/3D (any ``groups``), DepthwiseConv1D/2D, SeparableConv1D/2D, Conv1D/2D/3DTranspose or Dense layer that
produces its input (always exact), or of the conv / Dense layer that consumes its output (exact only for
``padding="valid"``: zero padding would see 0 where the folded layer expects the BN's shift). The rules, and the
reason given for each BN left, are in :mod:`bnkit.keras.fold_plan`; the weight arithmetic (float64, one rounding
at the end) in :mod:`bnkit.keras.fold_weights`.

The result is a new model of the same kind: Sequential stays Sequential, a functional model is rebuilt with
``keras.models.clone_model`` minus the folded BNs, nested Sequential/functional models are folded recursively.
Every layer is a fresh copy (``from_config`` + the original's weights): the input model is never modified and
shares no variable with the result. A layer that absorbed a BN gets ``use_bias=True``. Stock layers stay stock, so
the folded model's ``.keras`` file loads with plain ``keras.models.load_model``. A subclassed model cannot be
rebuilt (its graph lives in ``call()``): ``fold`` refuses one at the top, and copies one found inside as it is,
listing its BNs as skipped with that reason.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bnkit.keras import compat
from bnkit.keras.find import check_model, walk
from bnkit.keras.fold_plan import Fold, is_graph_model, plan_model
from bnkit.keras.fold_tflite import tflite_counts
from bnkit.keras.fold_weights import fold_after, fold_before, layer_weights, scale_shift
from bnkit.shared.errors import first_line

__all__ = ["KerasFoldRecord", "KerasFoldReport", "KerasSkipRecord", "fold", "fold_with_report"]

_SIZES = (16, 32, 64)  # spatial sizes tried for unknown input dimensions when inputs are generated


@dataclass(frozen=True)
class KerasFoldRecord:
    """One BatchNormalization folded into a layer.

    Attributes:
        bn: Path of the BN (``base/bn2``); it is gone from the folded model.
        into: Path of the layer that absorbed it.
        position: ``"after"`` when the BN followed the layer, ``"before"`` when it preceded it.

    Example:
        >>> KerasFoldRecord("bn1", "conv1", "after")
        KerasFoldRecord(bn='bn1', into='conv1', position='after')
    """

    bn: str
    into: str
    position: str


@dataclass(frozen=True)
class KerasSkipRecord:
    """One BatchNormalization left in the folded model, and why.

    Example:
        >>> KerasSkipRecord("bn0", "after: its input is a model input").bn
        'bn0'
    """

    bn: str
    reason: str


@dataclass
class KerasFoldReport:
    """What :func:`fold` folded, what it left and why, the check, and what TFLite leaves.

    Attributes:
        folded: The folds, in the order they were applied.
        skipped: Every BN of the model that was not folded, with its reason.
        notes: Model-level remarks (generated inputs, nothing to fold, files that need bnkit, TFLite skipped).
        checked: Whether folded and original outputs were compared.
        max_abs_diff: Largest absolute output difference seen by the check (None when unchecked).
        tolerance: The tolerance it was compared with (None when unchecked).
        tflite_before: MUL and ADD op counts of the original converted by TFLite (``tflite=True``), else None.
        tflite_after: The same for the folded model.

    Example:
        >>> print(KerasFoldReport(folded=[KerasFoldRecord("bn", "fc", "after")]))
        folded 1 BatchNormalization layer(s), skipped 0
          folded  bn -> fc (after)
    """

    folded: list[KerasFoldRecord] = field(default_factory=list)
    skipped: list[KerasSkipRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: bool = False
    max_abs_diff: float | None = None
    tolerance: float | None = None
    tflite_before: dict[str, int] | None = None
    tflite_after: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable data.

        Example:
            >>> sorted(KerasFoldReport().to_dict())[:3]
            ['checked', 'folded', 'max_abs_diff']
        """
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNormalization layer(s), skipped {len(self.skipped)}"]
        lines += [f"  folded  {f.bn} -> {f.into} ({f.position})" for f in self.folded]
        lines += [f"  skipped {s.bn}: {s.reason}" for s in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        if self.checked:
            lines.append(f"  check: max |folded - original| = {self.max_abs_diff:.3g} <= {self.tolerance:.3g}")
        if self.tflite_before is not None and self.tflite_after is not None:
            before, after = self.tflite_before, self.tflite_after
            lines.append(
                f"  TFLite MUL/ADD ops left: original {before.get('MUL', 0)}/{before.get('ADD', 0)}, "
                f"folded {after.get('MUL', 0)}/{after.get('ADD', 0)}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- public API


def fold(
    model: Any,
    check: Any = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    tflite: bool = False,
) -> Any:
    """A new model of the same kind with every foldable inference BatchNormalization folded into its neighbour.

    See the module docstring and :mod:`bnkit.keras.fold_plan` for the rules. The folded model's inference output
    (``predict``, or a call with ``training=False``) equals the original's up to float32 rounding; it has no BN
    left to train. :func:`fold_with_report` also returns the :class:`KerasFoldReport`.

    Args:
        model: A built Sequential or functional Keras 3 model (nested models, any backend). Never modified.
        check: What to compare the folded and original models on, both in inference mode: ``None`` (or True):
            a batch of 2 random inputs generated from ``model.inputs`` (unknown dimensions tried at 16, 32, 64);
            an array, or a list/tuple/dict of arrays: those inputs; ``False``: no check.
        atol: Absolute tolerance of the check (default 1e-6 for float32, 1e-12 for float64, 1e-3 for 16-bit).
        rtol: Tolerance relative to the largest absolute value of each output (default 1e-4, 1e-9, 2e-2).
        tflite: Also convert the original and the folded model with ``tf.lite.TFLiteConverter`` and report the
            MUL and ADD ops each keeps (the TensorFlow backend only; a few seconds per model; a note otherwise).

    Returns:
        The folded model (not compiled unless the original was; then with the original's compile config).

    Raises:
        TypeError: ``model`` is not a Keras model, or is a subclassed model (fold cannot rebuild ``call()``).
        ValueError: the model is not built, fails on the check inputs, or the folded output differs from the
            original beyond tolerance (the message names the fold responsible; the input model is untouched).

    Example:
        >>> keras = compat.import_keras()
        >>> model = keras.Sequential([keras.Input((8, 3)), keras.layers.Conv1D(4, 3, name="conv"),
        ...                           keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(name="relu")])
        >>> [layer.name for layer in fold(model).layers]
        ['conv', 'relu']
    """
    folded, _ = fold_with_report(model, check, atol=atol, rtol=rtol, tflite=tflite)
    return folded


def fold_with_report(
    model: Any,
    check: Any = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    tflite: bool = False,
) -> tuple[Any, KerasFoldReport]:
    """:func:`fold`, returning ``(folded_model, report)``.

    Example:
        >>> keras = compat.import_keras()
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="bn0"),
        ...                           keras.layers.Dense(3, name="fc"), keras.layers.ReLU(name="relu"),
        ...                           keras.layers.BatchNormalization(name="bn1")])
        >>> folded, report = fold_with_report(model)
        >>> print(report)  # doctest: +ELLIPSIS
        folded 1 BatchNormalization layer(s), skipped 1
          folded  bn0 -> fc (before)
          skipped bn1: activation between: its input comes from relu (ReLU); before: its output is the model output
          note: check on generated inputs of shape (2, 4)
          check: max |folded - original| = ... <= ...
    """
    _check_foldable(model)
    report = KerasFoldReport()
    plan = plan_model(model)
    report.folded = [KerasFoldRecord(f.bn, f.into, f.position) for f in plan.folds]
    report.skipped = [KerasSkipRecord(path, reason) for path, reason in plan.skipped.items()]
    report.skipped += _unreached(model, plan.folds, plan.skipped)
    if not report.folded and not report.skipped:
        report.notes.append(f"no BatchNormalization layer in {model.name}: nothing to fold (the result is a copy)")
        warnings.warn(f"bnkit.keras.fold: {report.notes[-1]}", stacklevel=2)
    elif not report.folded:
        warnings.warn(
            f"bnkit.keras.fold: no BatchNormalization layer of {model.name} could be folded (see the report)",
            stacklevel=2,
        )

    inputs = _check_inputs(model, check, report)
    reference = _outputs(model, inputs) if inputs is not None else None
    folded = _rebuild(model, plan.folds)
    if inputs is not None:
        differs, diff, tolerance = _compare(reference, _outputs(folded, inputs), atol, rtol)
        report.checked, report.max_abs_diff, report.tolerance = True, diff, tolerance
        if differs:
            raise ValueError(
                f"bnkit.keras.fold: the folded model differs from {model.name} by {diff:.3g} (tolerance "
                f"{tolerance:.3g}){_culprit(model, plan.folds, inputs, reference, atol, rtol)}; the input model is "
                "unchanged; raise atol/rtol or pass check=False if this rounding is acceptable"
            )
    kept = [s.bn for s in report.skipped if type(_layer_at(model, s.bn)).__module__.startswith("bnkit.")]
    if kept:
        report.notes.append(
            f"{', '.join(kept)} stay bnkit.keras.BatchNormalization: the saved file needs bnkit to load "
            "(bnkit.keras.unfreeze makes them stock)"
        )
    if tflite:
        report.tflite_before, report.tflite_after, note = tflite_counts(model, folded)
        if note:
            report.notes.append(note)
    return folded, report


# ---------------------------------------------------------------------------------------------- checks


def _check_foldable(model: Any) -> None:
    check_model(model, "fold")
    if not compat.is_model(model):
        raise TypeError(
            f"bnkit.keras.fold: expected a Sequential or functional Keras model, got the layer {model.name} "
            f"({type(model).__name__})"
        )
    if not is_graph_model(model):
        raise TypeError(
            f"bnkit.keras.fold: {model.name} is a subclassed model ({type(model).__name__}): its graph lives in "
            "call(), which fold cannot rebuild; build it as a Sequential or functional model (or fold the "
            "Sequential/functional models it holds)"
        )
    if not model.built or not model.inputs:
        raise ValueError(f"bnkit.keras.fold: {model.name} is not built; give it a keras.Input first")


def _unreached(model: Any, folds: list[Fold], skipped: dict[str, str]) -> list[KerasSkipRecord]:
    """BNs the graphs never reach (inside subclassed models or custom layers), each with its reason."""
    decided = {f.bn for f in folds} | set(skipped)
    records = []
    for found in walk(model):
        if not compat.is_batchnorm(found.layer) or found.path in decided:
            continue
        holders = [a for a in found.ancestors[1:] if not is_graph_model(a)]
        if holders:
            holder = holders[0]
            why = (
                f"inside {holder.name} ({type(holder).__name__}), a subclassed model or custom layer whose call() "
                "fold cannot rebuild: copied as it is"
            )
        else:
            why = "not called in the model's graph"
        records.append(KerasSkipRecord(found.path, why))
    return records


def _layer_at(model: Any, path: str) -> Any:
    for found in walk(model):
        if found.path == path:
            return found.layer
    return None


# ---------------------------------------------------------------------------------------------- rebuilding


class _Rebuild:
    """Builds the folded copy: fresh layers, the folded weights, the original's weights everywhere else."""

    def __init__(self, folds: list[Fold]) -> None:
        self.keras = compat.import_keras()
        self.dropped = {id(f.bn_layer) for f in folds}
        self.into: dict[int, list[Fold]] = {}
        for f in folds:
            self.into.setdefault(id(f.layer), []).append(f)
        self.cache: dict[int, Any] = {}
        self.pairs: list[tuple[Any, Any]] = []

    def model(self, model: Any) -> Any:
        keras = self.keras
        if isinstance(model, keras.Sequential):
            source = model.inputs[0]
            layers = [self.layer(layer) for layer in model.layers if id(layer) not in self.dropped]
            start = keras.Input(batch_shape=tuple(source.shape), dtype=source.dtype, name=source.name)
            new = keras.Sequential([start, *layers], name=model.name)
            if model.compiled:  # as keras.models.clone_model does for functional models
                new.compile_from_config(model.get_compile_config())
            return new

        def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
            if id(layer) in self.dropped:
                return args[0] if args else kwargs["inputs"]
            return layer(*args, **kwargs)

        return keras.models.clone_model(model, clone_function=self.layer, call_function=call)

    def layer(self, layer: Any) -> Any:
        if id(layer) in self.cache:
            return self.cache[id(layer)]
        if id(layer) in self.dropped or not isinstance(layer, self.keras.layers.Layer):
            return layer  # a dropped BN (the call skips it) or a stateless operation such as ops.add
        if is_graph_model(layer):
            new = self.model(layer)
        else:
            config = layer.get_config()
            if id(layer) in self.into:
                config["use_bias"] = True
            try:
                new = type(layer).from_config(config)
            except Exception as error:
                raise ValueError(
                    f"bnkit.keras.fold: cannot copy {layer.name} ({type(layer).__name__}) with from_config("
                    f"get_config()): {first_line(error, with_type=True)}; give the class a complete get_config()"
                ) from None
            self.pairs.append((layer, new))
        self.cache[id(layer)] = new
        return new

    def weights(self) -> None:
        for old, new in self.pairs:
            folds = self.into.get(id(old))
            if not folds:
                new.set_weights(old.get_weights())
                continue
            kind = folds[0].kind
            values: dict[str, Any] = layer_weights(old, kind)
            for f in folds:
                scale, shift = scale_shift(f.bn_layer)
                if f.position == "after":
                    values = fold_after(kind, values, scale, shift)
                else:
                    values = fold_before(kind, values, scale, shift, int(getattr(old, "groups", 1) or 1))
            for name, value in values.items():
                variable = getattr(new, name)
                variable.assign(np.asarray(value).astype(variable.dtype))
            rest = [w for w in old.weights if all(w is not getattr(old, n, None) for n in values)]
            if rest:  # e.g. a quantization scale: there is none on the kinds fold accepts
                raise ValueError(f"bnkit.keras.fold: {old.name} has weights fold does not handle: {rest}")


def _rebuild(model: Any, folds: list[Fold]) -> Any:
    builder = _Rebuild(folds)
    new = builder.model(model)
    builder.weights()
    copies = {found.path: found.layer for found in walk(new)}
    new.trainable = model.trainable
    for found in walk(model):  # outermost first: a container's recursive setter never undoes an inner flag
        twin = copies.get(found.path)
        if twin is not None and twin.trainable != found.layer.trainable:
            twin.trainable = found.layer.trainable
    return new


# ---------------------------------------------------------------------------------------------- check


def _check_inputs(model: Any, check: Any, report: KerasFoldReport) -> Any:
    if check is False:
        return None
    if check is not None and check is not True:
        return check
    rng = np.random.default_rng(0)
    problem = ""
    for size in _SIZES:
        arrays = []
        for tensor in model.inputs:
            shape = (2, *[size if d is None else int(d) for d in tuple(tensor.shape)[1:]])
            if "int" in str(tensor.dtype) or "bool" in str(tensor.dtype):
                arrays.append(rng.integers(0, 2, shape).astype(str(tensor.dtype)))
            else:
                arrays.append(rng.standard_normal(shape).astype(str(tensor.dtype)))
        inputs = arrays[0] if len(arrays) == 1 else arrays
        try:
            _outputs(model, inputs)
        except Exception as error:  # try the next size; the last error is reported
            problem = first_line(error, with_type=True)
            continue
        shapes = ", ".join(str(a.shape) for a in arrays)
        report.notes.append(f"check on generated inputs of shape {shapes}")
        return inputs
    raise ValueError(
        f"bnkit.keras.fold: cannot generate inputs for {model.name} from its input shapes ({problem}); "
        "pass check=<inputs> or check=False"
    )


def _outputs(model: Any, inputs: Any) -> list[np.ndarray]:
    """The model's inference output (``training=False``, what ``predict`` computes) as NumPy arrays.

    On JAX through ``predict`` (one compiled step per model: an eager call compiles every op for every new shape,
    about four times slower on small models); elsewhere an eager call (tracing a TensorFlow ``predict`` step costs
    more than it saves).
    """
    keras = compat.import_keras()
    try:
        if compat.backend() == "jax":
            leaves = keras.tree.flatten(inputs)
            batch = int(leaves[0].shape[0]) if leaves and getattr(leaves[0], "shape", None) else None
            result = model.predict(inputs, batch_size=batch, verbose=0)
        else:
            result = model(inputs, training=False)
    except Exception as error:
        raise ValueError(
            f"bnkit.keras.fold: {model.name} failed on the check inputs ({first_line(error, with_type=True)}); "
            "pass check=<inputs the model accepts> or check=False"
        ) from None
    return [np.asarray(keras.ops.convert_to_numpy(leaf)) for leaf in keras.tree.flatten(result)]


def _tolerances(dtype: np.dtype) -> tuple[float, float]:
    if dtype == np.float64:
        return 1e-12, 1e-9
    if dtype.itemsize <= 2:
        return 1e-3, 2e-2
    return 1e-6, 1e-4


def _compare(
    reference: list[np.ndarray], output: list[np.ndarray], atol: float | None, rtol: float | None
) -> tuple[bool, float, float]:
    """(differs, max_abs_diff, tolerance) over every output, the worst output relative to its tolerance."""
    if len(reference) != len(output):
        return True, math.inf, 0.0
    worst, worst_ratio = (False, 0.0, 0.0), -1.0
    for ref, out in zip(reference, output, strict=True):
        if ref.shape != out.shape:
            return True, math.inf, 0.0
        default_atol, default_rtol = _tolerances(ref.dtype)
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        finite = np.isfinite(ref64)
        if not np.array_equal(np.isfinite(out64), finite):
            return True, math.inf, 0.0
        diff = float(np.abs(ref64 - out64)[finite].max()) if finite.any() else 0.0
        scale = float(np.abs(ref64)[finite].max()) if finite.any() else 0.0
        tolerance = (default_atol if atol is None else atol) + (default_rtol if rtol is None else rtol) * scale
        ratio = diff / tolerance if tolerance > 0 else (math.inf if diff > 0 else 0.0)
        if ratio > worst_ratio:
            worst, worst_ratio = (diff > tolerance, diff, tolerance), ratio
    return worst


def _culprit(
    model: Any, folds: list[Fold], inputs: Any, reference: list[np.ndarray], atol: float | None, rtol: float | None
) -> str:
    """Rebuild with the first k folds, k = 1, 2, ..., and name the first fold that breaks the output."""
    try:
        for count in range(1, len(folds) + 1):
            if _compare(reference, _outputs(_rebuild(model, folds[:count]), inputs), atol, rtol)[0]:
                f = folds[count - 1]
                return f", first after folding {f.bn} into {f.into} ({f.position})"
    except Exception:  # best effort: the main error is raised anyway
        return ""
    return ""
