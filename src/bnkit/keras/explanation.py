"""``bnkit.keras.explain``: what every BatchNormalization layer of a Keras model does under ``fit()``,
``evaluate()``/``predict()`` and a plain call, and why.

The rule Keras applies on every backend: a BatchNormalization layer uses batch statistics (and moves its moving
statistics) iff the call is in training mode AND the layer is trainable, where ``trainable=False`` on the layer or
any container above it makes it non-trainable. ``fit()`` runs in training mode and overrides a ``training=False``
recorded when a functional model was built (keras#20285); ``evaluate()``/``predict()`` run in inference mode; a
plain ``model(x)`` passes ``training=None`` (inference, unless a construction-time ``training=True`` says
otherwise). A subclassed model's ``call()`` may pass its own ``training``: only a check with ``x`` can see that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bnkit.keras import compat
from bnkit.keras.find import Found, check_model, recorded_training, walk
from bnkit.shared.table import RowList

__all__ = ["KerasExplanation", "KerasLayerExplanation", "explain"]

BATCH = "batch statistics, updates moving"
MOVING = "moving statistics"
NOT_CALLED = "not called"


@dataclass
class KerasLayerExplanation:
    """One BatchNormalization layer.

    Attributes:
        name: Path (``"base/bn2"``).
        type: Class name.
        fit: Mode under ``fit()`` (:data:`BATCH`, :data:`MOVING` or, when checked with ``x``, :data:`NOT_CALLED`).
        evaluate: Mode under ``evaluate()`` / ``predict()``.
        call: Mode under a plain ``model(x)``.
        gamma_beta: ``"learn"``, ``"frozen"`` or ``"none"`` (no center/scale) in the compiled train step.
        momentum: Keras convention (weight of the old value).
        momentum_torch: PyTorch convention (weight of the new batch), ``1 - momentum``.
        memory_steps: Half-life of the moving statistics in steps, ``ln 0.5 / ln momentum``.
        epsilon, axis, center, scale, renorm, synchronized, dtype_policy: the layer's settings.
        checked: True when ``x`` was given and the fit/call modes were observed on a real call.
        reasons: Why, one short sentence each.

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="bn")])
        >>> row = explain(m)[0]
        >>> row.fit == BATCH, row.evaluate == MOVING, round(row.memory_steps)
        (True, True, 69)
    """

    name: str
    type: str
    fit: str
    evaluate: str
    call: str
    gamma_beta: str
    momentum: float
    momentum_torch: float
    memory_steps: float | None
    epsilon: float
    axis: Any
    center: bool
    scale: bool
    renorm: bool
    synchronized: bool
    dtype_policy: str
    checked: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready).

        Example:
            >>> keras = compat.import_keras()
            >>> explain(keras.layers.BatchNormalization())[0].to_dict()["fit"]
            'not built'
        """
        return asdict(self)


class KerasExplanation(RowList):
    """A list of :class:`KerasLayerExplanation` that prints as a table.

    Example:
        >>> keras = compat.import_keras()
        >>> print(explain(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])))
        no BatchNormalization layer found
    """

    columns = ("layer", "in fit()", "in evaluate()/predict()", "plain call", "gamma/beta", "momentum", "why")
    empty = "no BatchNormalization layer found"

    def rows(self) -> list[list[Any]]:
        """Table rows matching :attr:`columns`.

        Example:
            >>> KerasExplanation().rows()
            []
        """
        return [
            [
                r.name or "(model)",
                r.fit,
                r.evaluate,
                r.call,
                r.gamma_beta,
                f"{r.momentum:g} (torch {r.momentum_torch:g})",
                "\n".join(r.reasons),
            ]
            for r in self
        ]


def _half_life(momentum: float) -> float | None:
    if not 0.0 < momentum < 1.0:
        return None
    return math.log(0.5) / math.log(momentum)


def _who_freezes(item: Found) -> str | None:
    if not item.layer.trainable:
        return "its own trainable=False"
    for ancestor in item.ancestors:
        if not ancestor.trainable:
            return f"trainable=False on the container {ancestor.name!r}"
    return None


def _row(model: Any, item: Found, compiled: dict[int, bool] | None) -> KerasLayerExplanation:
    layer = item.layer
    reasons: list[str] = []
    frozen_by = _who_freezes(item)
    freeze_stats = bool(getattr(layer, "freeze_stats", False))
    freeze_affine = bool(getattr(layer, "freeze_affine", False))
    trains = frozen_by is None and not freeze_stats
    fit = BATCH if trains else MOVING
    if frozen_by:
        reasons.append(f"{frozen_by} puts it in inference mode under fit() (Keras: training AND trainable)")
    if freeze_stats:
        reasons.append("bnkit freeze_stats=True: always moving statistics, never updated")
    call_mode = MOVING
    recorded = recorded_training(item)
    if recorded is False and trains:
        reasons.append(
            "training=False given when the functional model was built is ignored by fit(): it trains (keras#20285); "
            "set trainable=False or use bnkit.keras.freeze"
        )
    if recorded is True and frozen_by is None and not freeze_stats:
        call_mode = BATCH
    affine_vars = [v for v in (getattr(layer, "gamma", None), getattr(layer, "beta", None)) if v is not None]
    if not affine_vars:
        gamma_beta = "none"
    else:
        learn = frozen_by is None and not freeze_affine and all(v.trainable for v in affine_vars)
        gamma_beta = "learn" if learn else "frozen"
        if compiled is not None:
            chain = [*item.ancestors, layer]
            at_compile = all(compiled.get(id(c), c.trainable) for c in chain) and not freeze_affine
            now = all(c.trainable for c in chain)
            if at_compile != now:
                gamma_beta = "learn" if at_compile and not freeze_affine else "frozen"
                reasons.append(
                    f"trainable changed since compile() (was {at_compile}, now {now}): compile again; without it "
                    + compat.recompile_consequence()
                )
    if not layer.trainable and any(a.trainable for a in item.ancestors[1:]) and item.ancestors[1:]:
        reasons.append(
            "per-layer trainable=False inside a container: setting the container's trainable=True turns it back on "
            "(recursive setter); bnkit.keras.freeze survives that"
        )
    if not reasons:
        reasons.append("trainable, so fit() uses batch statistics; evaluate()/predict() use the moving ones")
    momentum = float(layer.momentum)
    policy = getattr(layer, "dtype_policy", None)
    return KerasLayerExplanation(
        name=item.path,
        type=type(layer).__name__,
        fit=fit,
        evaluate=MOVING,
        call=call_mode,
        gamma_beta=gamma_beta,
        momentum=momentum,
        momentum_torch=round(1.0 - momentum, 12),
        memory_steps=_half_life(momentum),
        epsilon=float(layer.epsilon),
        axis=layer.axis,
        center=bool(layer.center),
        scale=bool(layer.scale),
        renorm=bool(getattr(layer, "renorm", False)),
        synchronized=bool(getattr(layer, "synchronized", False)),
        dtype_policy=str(getattr(policy, "name", policy)),
        reasons=reasons,
    )


def _observe(model: Any, x: Any, rows: list[KerasLayerExplanation], items: list[Found]) -> None:
    """Call the model in training mode and plainly, see which BN moved, then restore every variable."""
    variables = list(model.variables)
    saved = [compat.to_numpy(v) for v in variables]
    try:
        for training, attribute in ((True, "fit"), (None, "call")):
            before = [compat.to_numpy(item.layer.moving_mean) for item in items]
            if training is None:
                model(x)
            else:
                model(x, training=training)
            for row, item, old in zip(rows, items, before, strict=True):
                moved = not (compat.to_numpy(item.layer.moving_mean) == old).all()
                observed = BATCH if moved else MOVING
                if observed != getattr(row, attribute):
                    row.reasons.append(
                        f"observed with x: {attribute} gives {observed} (the model's own call() decides it)"
                    )
                    setattr(row, attribute, observed)
            for v, value in zip(variables, saved, strict=True):
                v.assign(value)
            for row in rows:
                row.checked = True
    finally:
        for v, value in zip(variables, saved, strict=True):
            v.assign(value)


def explain(model: Any, x: Any = None) -> KerasExplanation:
    """For every BatchNormalization layer: its mode under ``fit()``, ``evaluate()``/``predict()`` and a plain call,
    whether gamma/beta train in the compiled step, its settings, and the reasons in words.

    Without ``x`` the modes follow Keras's rule from the model's structure (see the module docstring). With ``x``
    the model is also called once in training mode and once plainly to observe which layers move their
    statistics (this catches a subclassed ``call()`` that passes its own ``training``); every variable is
    restored to its exact value afterwards.

    Args:
        model: A Keras 3 model or layer.
        x: Optional input batch for the check.

    Returns:
        A :class:`KerasExplanation` (prints as a table; ``to_json()``).

    Example:
        >>> keras = compat.import_keras()
        >>> inp = keras.Input((4,))
        >>> base = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="bn")], name="base")
        >>> base.trainable = False
        >>> m = keras.Model(inp, base(inp))
        >>> [(r.name, r.fit) for r in explain(m)]
        [('base/bn', 'moving statistics')]
    """
    check_model(model, "explain")
    compiled = compat.compiled_trainable_state(model)
    if compat.is_batchnorm(model):
        items = [Found("", model, [])]
    else:
        items = [f for f in walk(model) if compat.is_batchnorm(f.layer)]
    rows = []
    for item in items:
        if not item.layer.built:
            rows.append(_unbuilt(item))
            continue
        rows.append(_row(model, item, compiled))
    result = KerasExplanation(rows)
    if x is not None and rows:
        built = [(r, i) for r, i in zip(rows, items, strict=True) if i.layer.built]
        _observe(model, x, [r for r, _ in built], [i for _, i in built])
    return result


def _unbuilt(item: Found) -> KerasLayerExplanation:
    layer = item.layer
    return KerasLayerExplanation(
        name=item.path,
        type=type(layer).__name__,
        fit="not built",
        evaluate="not built",
        call="not built",
        gamma_beta="none",
        momentum=float(layer.momentum),
        momentum_torch=round(1.0 - float(layer.momentum), 12),
        memory_steps=_half_life(float(layer.momentum)),
        epsilon=float(layer.epsilon),
        axis=layer.axis,
        center=bool(layer.center),
        scale=bool(layer.scale),
        renorm=bool(getattr(layer, "renorm", False)),
        synchronized=bool(getattr(layer, "synchronized", False)),
        dtype_policy=str(getattr(getattr(layer, "dtype_policy", None), "name", "")),
        reasons=["not built yet: call the model on an input first"],
    )
