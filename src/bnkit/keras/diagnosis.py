"""``bnkit.keras.doctor``: the Keras BatchNormalization traps, each with a fix.

=======  ========  ==========================================================================================
code     severity  rule
=======  ========  ==========================================================================================
KBN001   warning   ``training=False`` given when a functional model was built: ``fit()`` overrides it
KBN002   error     ``trainable`` changed since ``compile()`` (what happens then depends on the backend)
KBN003   warning   a per-BN ``trainable=False`` inside a container whose ``trainable=True`` would undo it
KBN004   warning   too few steps at this momentum for the moving statistics to be the population's
KBN005   error     moving statistics never updated (0 / 1) in a model used to predict or already trained
KBN006   warning   batches under 8 for a BN on batch statistics (error for a batch of one: Keras returns beta)
KBN007   error     large-mean BN inputs on the torch backend (its E[x^2]-E[x]^2 variance goes negative)
KBN008   info      BN after an activation: no deployment folding (TFLite keeps MUL+ADD)
KBN009   info      a conv/Dense bias feeding a BN: the BN's mean subtraction cancels it
KBN010   warning   ``synchronized=True`` off TensorFlow
=======  ========  ==========================================================================================

KBN006 and KBN007 need ``x`` (one batch, as ``fit()`` would receive it per step); the model runs on it in
inference mode and no variable changes. ``intent`` (``"inference"``, ``"training"``, ``"fine-tune"`` or None)
sharpens KBN005 and KBN006.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnkit.keras import compat
from bnkit.keras.find import Found, check_model, recorded_training, trains_in_fit, walk
from bnkit.shared.diagnosis import MIN_BATCH, Diagnosis, Finding

__all__ = ["KERAS_RULES", "doctor"]

_INTENTS = (None, "inference", "training", "fine-tune")

#: mean^2 / variance above which float32 E[x^2]-E[x]^2 loses the variance (2^-24 * ratio > ~1%).
LARGE_MEAN_RATIO = 1e5

_ACTIVATION_LAYERS = ("Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax")
_BIAS_PRODUCERS = (
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "Dense",
)


@dataclass
class KerasContext:
    """What every Keras rule receives.

    Attributes:
        model: The model examined.
        items: Every BatchNormalization layer found (path, layer, containers above it).
        intent: ``None``, ``"inference"``, ``"training"`` or ``"fine-tune"``.
        x: The example batch, or None.

    Example:
        >>> KerasContext(None, [], None, None).will_train()
        True
    """

    model: Any
    items: list[Found]
    intent: str | None
    x: Any

    def will_train(self) -> bool:
        """The model is meant to train (a training intent, or no intent).

        Example:
            >>> KerasContext(None, [], "inference", None).will_train()
            False
        """
        return self.intent in (None, "training", "fine-tune")

    def for_inference(self) -> bool:
        """The model is meant to predict (``intent="inference"``).

        Example:
            >>> KerasContext(None, [], "inference", None).for_inference()
            True
        """
        return self.intent == "inference"


def check_construction_training(ctx: KerasContext) -> list[Finding]:
    """KBN001: ``training=False`` recorded at construction, which ``fit()`` overrides (keras#20285).

    Example:
        >>> keras = compat.import_keras()
        >>> inp = keras.Input((2,)); bn = keras.layers.BatchNormalization(name="bn")
        >>> [f.code for f in doctor(keras.Model(inp, bn(inp, training=False)))]
        ['KBN001']
    """
    return [
        Finding(
            "KBN001",
            "warning",
            item.path,
            "called with training=False when the model was built, but fit() runs it in training mode: batch "
            "statistics, moving statistics updated, gamma/beta trained (keras#20285)",
            "set trainable=False on the layer or its container before compile(), or bnkit.keras.freeze(model, "
            f"layers={item.path!r})",
        )
        for item in ctx.items
        if trains_in_fit(item) and recorded_training(item) is False
    ]


def check_trainable_changed_since_compile(ctx: KerasContext) -> list[Finding]:
    """KBN002: ``trainable`` changed on the BN or a container above it since ``compile()``.

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(name="bn")])
        >>> m.compile("sgd", "mse"); m.trainable = False
        >>> [f.code for f in doctor(m)]
        ['KBN002']
    """
    state = compat.compiled_trainable_state(ctx.model)
    if state is None:
        return []
    found = []
    for item in ctx.items:
        chain = [*item.ancestors, item.layer]
        changed = [c for c in chain if id(c) in state and state[id(c)] != c.trainable]
        if changed:
            names = ", ".join(c.name for c in changed)
            found.append(
                Finding(
                    "KBN002",
                    "error",
                    item.path,
                    f"trainable changed since compile() on {names}; {compat.recompile_consequence()}",
                    "call model.compile(...) again after changing trainable, before fit()",
                )
            )
    return found


def check_per_bn_freeze_in_container(ctx: KerasContext) -> list[Finding]:
    """KBN003: a BN frozen with its own ``trainable=False`` inside a trainable container.

    Example:
        >>> keras = compat.import_keras()
        >>> bn = keras.layers.BatchNormalization(name="bn"); bn.trainable = False
        >>> [f.code for f in doctor(keras.Sequential([keras.Input((2,)), bn]))]
        ['KBN003']
    """
    return [
        Finding(
            "KBN003",
            "warning",
            item.path,
            "frozen by its own trainable=False; setting trainable=True on a container above it (the usual "
            "fine-tuning step) turns it back on (recursive setter)",
            f"bnkit.keras.freeze(model, layers={item.path!r}) keeps it frozen through trainable changes",
        )
        for item in ctx.items
        if item.ancestors and not item.layer.trainable and all(a.trainable for a in item.ancestors)
    ]


def check_stale_moving_statistics(ctx: KerasContext) -> list[Finding]:
    """KBN004: fewer optimizer steps than the moving statistics need to forget their start (``ln 0.01 / ln m``).

    Example:
        >>> check_stale_moving_statistics(KerasContext(None, [], None, None))
        []
    """
    steps = compat.optimizer_steps(ctx.model) if ctx.model is not None else None
    if not steps:
        return []
    found = []
    for item in ctx.items:
        m = float(item.layer.momentum)
        if not (trains_in_fit(item) and 0.0 < m < 1.0):
            continue
        needed = math.log(0.01) / math.log(m)
        if steps < needed:
            found.append(
                Finding(
                    "KBN004",
                    "warning",
                    item.path,
                    f"{steps} steps at momentum {m:g}: the moving statistics still carry {m**steps:.0%} of their "
                    f"initial values and lag the weights (99% forgotten only after {needed:.0f} steps)",
                    "recompute them exactly from training data: bnkit.keras.recalibrate(model, data)",
                )
            )
    return found


def check_never_updated(ctx: KerasContext) -> list[Finding]:
    """KBN005: moving mean 0 and variance 1 exactly, in a model meant to predict or already trained.

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(name="bn")])
        >>> [f.code for f in doctor(m, intent="inference")]
        ['KBN005']
    """
    steps = compat.optimizer_steps(ctx.model) or 0
    if not (ctx.for_inference() or steps > 0):
        return []
    found = []
    for item in ctx.items:
        layer = item.layer
        if not layer.built:
            continue
        mean, var = compat.to_numpy(layer.moving_mean), compat.to_numpy(layer.moving_variance)
        if np.all(mean == 0) and np.all(var == 1):
            found.append(
                Finding(
                    "KBN005",
                    "error",
                    item.path,
                    "moving statistics never updated (mean 0, variance 1): predict() normalises with nothing "
                    "learned from data",
                    "compute them from data: bnkit.keras.recalibrate(model, data)",
                )
            )
    return found


def _batch_size(x: Any) -> int | None:
    first = x
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, dict) and first:
        first = next(iter(first.values()))
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) and shape[0] is not None else None


def check_small_batch(ctx: KerasContext) -> list[Finding]:
    """KBN006: a training batch under 8 (or of one) for BNs on batch statistics (needs ``x``).

    Example:
        >>> import numpy as np
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(name="bn")])
        >>> [f.code for f in doctor(m, np.ones((2, 2), "float32"), intent="training")]
        ['KBN006']
    """
    if ctx.x is None or not ctx.will_train():
        return []
    batch = _batch_size(ctx.x)
    if batch is None or batch >= MIN_BATCH:
        return []
    found = []
    for item in ctx.items:
        if not trains_in_fit(item):
            continue
        if batch == 1:
            message = "a batch of one in training mode: every value is its own mean, so the layer outputs beta"
            severity = "error"
        else:
            message = f"batch of {batch} (< {MIN_BATCH}): noisy batch statistics, train/test mismatch"
            severity = "warning"
        found.append(
            Finding(
                "KBN006",
                severity,
                item.path,
                message,
                "use batches of 8 or more, or freeze the BN statistics: bnkit.keras.freeze(model, affine=False)",
            )
        )
    return found


def _bn_inputs(ctx: KerasContext) -> dict[str, np.ndarray]:
    """The input of every BN on ``x`` (functional graphs only; empty when the graph is not reachable)."""
    keras = compat.import_keras()
    items = [item for item in ctx.items if item.layer.built]
    try:
        inputs = ctx.model.inputs[0] if len(ctx.model.inputs) == 1 else ctx.model.inputs
        probe = keras.Model(inputs, [item.layer.input for item in items])
        values = probe(ctx.x, training=False)
    except (AttributeError, ValueError, TypeError, RuntimeError):
        return {}
    if not isinstance(values, (list, tuple)):
        values = [values]
    return {item.path: compat.to_numpy(v) for item, v in zip(items, values, strict=True)}


def check_large_mean_on_torch(ctx: KerasContext) -> list[Finding]:
    """KBN007: BN inputs whose mean dwarfs their spread, on a backend with one-pass variance (needs ``x``).

    Example:
        >>> check_large_mean_on_torch(KerasContext(None, [], None, None))
        []
    """
    if ctx.x is None or not ctx.items or not compat.variance_is_one_pass():
        return []
    found = []
    for path, values in _bn_inputs(ctx).items():
        item = next(i for i in ctx.items if i.path == path)
        axis = item.layer.axis if isinstance(item.layer.axis, int) else item.layer.axis[0]
        moved = np.moveaxis(values.astype(np.float64), axis, -1).reshape(-1, values.shape[axis])
        mean, var = moved.mean(axis=0), moved.var(axis=0)
        spread = var > 0  # constant channels have no variance to lose
        ratio = float(np.max(mean[spread] ** 2 / var[spread])) if spread.any() else 0.0
        if ratio > LARGE_MEAN_RATIO:
            found.append(
                Finding(
                    "KBN007",
                    "error",
                    path,
                    f"inputs with mean^2/variance up to {ratio:.3g}: Keras on {compat.backend()} computes the batch "
                    "variance as E[x^2]-E[x]^2, which cancels to garbage (negative variance, NaN outputs)",
                    "centre the inputs first (subtract the data mean, keras.layers.Normalization) or train on "
                    "the TensorFlow or JAX backend",
                )
            )
    return found


def _activation(layer: Any) -> str | None:
    if type(layer).__name__ in _ACTIVATION_LAYERS:
        return type(layer).__name__
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None)
    if name and name != "linear":
        return name
    return None


def check_bn_after_activation(ctx: KerasContext) -> list[Finding]:
    """KBN008: a BN fed by an activation: no conv/Dense to fold it into at deployment.

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="relu"),
        ...                       keras.layers.BatchNormalization(name="bn")])
        >>> "KBN008" in doctor(m).codes()
        True
    """
    found = []
    for item in ctx.items:
        for producer in compat.producers(item.layer):
            activation = _activation(producer)
            if activation:
                found.append(
                    Finding(
                        "KBN008",
                        "info",
                        item.path,
                        f"follows the activation {activation!r} of {producer.name}: it cannot be folded into a "
                        "conv/Dense (TFLite keeps a MUL+ADD, bnkit.keras.fold refuses it)",
                        "put the BN between the conv/Dense and its activation (Conv -> BN -> ReLU)",
                    )
                )
    return found


def check_bias_before_bn(ctx: KerasContext) -> list[Finding]:
    """KBN009: a conv/Dense with ``use_bias=True`` feeding a centring BN (the bias is cancelled).

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
        >>> doctor(m).codes()
        ['KBN009']
    """
    found = []
    for item in ctx.items:
        if not item.layer.center:
            continue
        for producer in compat.producers(item.layer):
            if type(producer).__name__ in _BIAS_PRODUCERS and getattr(producer, "use_bias", False):
                if _activation(producer):
                    continue
                found.append(
                    Finding(
                        "KBN009",
                        "info",
                        item.path,
                        f"{producer.name} has a bias that the BN's mean subtraction cancels (beta does its job)",
                        f"build {producer.name} with use_bias=False",
                    )
                )
    return found


def check_synchronized_off_tensorflow(ctx: KerasContext) -> list[Finding]:
    """KBN010: ``synchronized=True`` on a backend other than TensorFlow.

    Example:
        >>> check_synchronized_off_tensorflow(KerasContext(None, [], None, None))
        []
    """
    if not ctx.items or compat.backend() == "tensorflow":
        return []
    return [
        Finding(
            "KBN010",
            "warning",
            item.path,
            f"synchronized=True only synchronises across replicas on TensorFlow; on {compat.backend()} each "
            "device normalises with its own batch",
            "use the TensorFlow backend for cross-replica BN, or larger per-device batches",
        )
        for item in ctx.items
        if getattr(item.layer, "synchronized", False)
    ]


KerasRule = Callable[[KerasContext], list[Finding]]

#: Every rule, in code order.
KERAS_RULES: list[KerasRule] = [
    check_construction_training,
    check_trainable_changed_since_compile,
    check_per_bn_freeze_in_container,
    check_stale_moving_statistics,
    check_never_updated,
    check_small_batch,
    check_large_mean_on_torch,
    check_bn_after_activation,
    check_bias_before_bn,
    check_synchronized_off_tensorflow,
]


def doctor(model: Any, x: Any = None, intent: str | None = None) -> Diagnosis:
    """Check a Keras model's BatchNormalization layers for the Keras traps; each finding has a fix.

    See the module docstring for the rules. No variable changes: with ``x`` the model runs in inference mode.

    Args:
        model: A Keras 3 model or layer.
        x: Optional batch as one ``fit()`` step would receive it (enables KBN006, KBN007).
        intent: ``"inference"``, ``"training"``, ``"fine-tune"`` or None.

    Returns:
        A :class:`bnkit.shared.diagnosis.Diagnosis` (the same records and table as ``bnkit.doctor``).

    Raises:
        TypeError: not a Keras model. ValueError: unknown ``intent``.

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, use_bias=False),
        ...                       keras.layers.BatchNormalization(name="bn")])
        >>> str(doctor(m))
        'no problems found'
    """
    check_model(model, "doctor")
    if intent not in _INTENTS:
        raise ValueError(
            f"bnkit.keras.doctor: intent must be 'inference', 'training', 'fine-tune' or None; got {intent!r}"
        )
    if compat.is_batchnorm(model):
        items = [Found("", model, [])]
    else:
        items = [f for f in walk(model) if compat.is_batchnorm(f.layer)]
    ctx = KerasContext(model=model, items=items, intent=intent, x=x)
    findings = Diagnosis()
    for rule in KERAS_RULES:
        findings.extend(rule(ctx))
    return findings
