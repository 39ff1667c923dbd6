"""The six fine-tuning policies of the study written with Keras's own switches and ``bnkit.keras``.

=================== =====================================================================================
key                 what it does in Keras
=================== =====================================================================================
source              the source model untouched (baseline)
head                1. head only: every layer but the head ``trainable = False`` (a BatchNormalization with
                    ``trainable = False`` runs in inference mode, Keras's transfer-learning guide)
all_bn_frozen       2. all layers train, BN kept in inference mode with gamma/beta fixed (the guide's "keep
                    BN frozen" when unfreezing): ``bnkit.keras.freeze(model)``, which survives
                    ``model.trainable = True`` and ``compile()``
all                 3. all layers train, BN in training mode: ``model.trainable = True``; the moving
                    statistics follow Keras's default momentum (0.99 unless the model says otherwise)
bn_only             4. BN layers only (statistics, gamma and beta): every other layer ``trainable = False``
recalibrate         5. ``bnkit.keras.recalibrate(model, target_images)``, no gradient step
recalibrate_head    6. recalibration, then head only as in policy 1
=================== =====================================================================================

Every policy works on a clone of the source model (``keras.models.clone_model`` with the source weights) and
trains with ``model.fit`` (Adam, sparse categorical cross-entropy on logits, shuffled batches).

Example:
    >>> list(KERAS_POLICIES)[:3]
    ['source', 'head', 'all_bn_frozen']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bnkit.keras import compat
from bnkit.keras.find import walk
from bnkit.study.catalog import FinetuneSettings, resolve_policy
from bnkit.study.keras_data import ArrayDataset

__all__ = [
    "KERAS_POLICIES",
    "accuracy",
    "apply_keras_policy",
    "check_head",
    "clone",
    "default_head",
    "fit",
    "recalibrate_exact",
]

keras = compat.import_keras()


def clone(model: Any) -> Any:
    """A new model with ``model``'s architecture and weights (``keras.models.clone_model`` + ``set_weights``).

    Example:
        >>> from bnkit.study.keras_model import digits_net
        >>> src = digits_net()
        >>> copy = clone(src)
        >>> copy is not src and len(copy.get_weights()) == len(src.get_weights())
        True
    """
    copied = keras.models.clone_model(model)
    copied.set_weights(model.get_weights())
    return copied


def _is_bn(layer: Any) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def default_head(model: Any) -> str:
    """Name of ``model``'s head: a top-level layer named ``"head"``, else the last top-level layer with weights.

    Raises:
        ValueError: no top-level layer has weights.

    Example:
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"), keras.layers.Dense(2, name="b")])
        >>> default_head(m)
        'b'
    """
    names = [layer.name for layer in model.layers if layer.weights]
    if "head" in names:
        return "head"
    if not names:
        raise ValueError("could not find the model's head (no top-level layer has weights): pass --head NAME")
    return names[-1]


def check_head(model: Any, head: str) -> Any:
    """The top-level layer ``head`` of ``model`` (the layer policies 1 and 6 train).

    Raises:
        ValueError: no such top-level layer (naming the candidates).

    Example:
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="out")])
        >>> check_head(m, "out").name
        'out'
    """
    try:
        return model.get_layer(head)
    except ValueError as exc:
        names = [layer.name for layer in model.layers if layer.weights]
        raise ValueError(
            f"model has no top-level layer named {head!r} to use as the head; pass one of: {', '.join(names[-5:])}"
        ) from exc


def _trainable_only(model: Any, keep: Callable[[Any], bool]) -> None:
    """``trainable`` on every leaf layer set to ``keep(layer)`` (containers trainable so their leaves decide)."""
    model.trainable = True
    for found in walk(model):
        layer = found.layer
        if not compat.sublayers(layer):
            layer.trainable = bool(keep(layer))


def fit(model: Any, data: ArrayDataset, *, epochs: int, batch_size: int, lr: float, seed: int) -> Any:
    """Compile ``model`` (Adam at ``lr``, cross-entropy on logits) and ``fit`` it on ``data``; returns ``model``.

    Nothing is trained (and nothing compiled) when the model has no trainable weight and no BatchNormalization
    layer that updates its statistics.

    Raises:
        ValueError: ``batch_size`` larger than the data.

    Example:
        >>> from bnkit.study.keras_model import digits_net
        >>> ds = ArrayDataset(np.random.rand(16, 8, 8, 1).astype("float32"), np.arange(16) % 10)
        >>> fit(digits_net(), ds, epochs=1, batch_size=8, lr=1e-3, seed=0).optimizer is not None
        True
    """
    if batch_size > len(data):
        raise ValueError(f"batch_size {batch_size} is larger than the {len(data)} training samples")
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(data.x, data.y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
    return model


def predict(model: Any, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Class predictions of ``model`` in inference mode (``training=False``).

    Example:
        >>> from bnkit.study.keras_model import digits_net
        >>> predict(digits_net(), np.zeros((3, 8, 8, 1), "float32")).shape
        (3,)
    """
    outs = [
        keras.ops.convert_to_numpy(model(x[i : i + batch_size], training=False)) for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs).argmax(-1)


def accuracy(model: Any, data: ArrayDataset) -> float:
    """Fraction of ``data`` that ``model`` (in inference mode) classifies correctly.

    Example:
        >>> from bnkit.study.keras_model import digits_net
        >>> 0.0 <= accuracy(digits_net(), ArrayDataset(np.zeros((2, 8, 8, 1), "float32"), np.array([0, 1]))) <= 1
        True
    """
    return float((predict(model, data.x) == data.y).mean())


def recalibrate_exact(model: Any, data: ArrayDataset, batch_size: int = 64) -> Any:
    """``bnkit.keras.recalibrate`` of ``model`` on ``data``'s images (exact statistics), in place; returns it.

    Example:
        >>> from bnkit.study.keras_model import digits_net
        >>> m = recalibrate_exact(digits_net(), ArrayDataset(np.random.rand(8, 8, 8, 1).astype("float32"), np.zeros(8)))
        >>> float(keras.ops.convert_to_numpy(m.get_layer("bn1").moving_mean).std()) > 0
        True
    """
    import bnkit.keras

    bnkit.keras.recalibrate(model, data.x, batch_size=batch_size)
    return model


def _source(model: Any, data: ArrayDataset, cfg: FinetuneSettings, seed: int) -> Any:
    return model


def _head(model: Any, data: ArrayDataset, cfg: FinetuneSettings, seed: int) -> Any:
    head = check_head(model, cfg.head)
    _trainable_only(model, lambda layer: False)
    head.trainable = True
    return fit(model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)


def _all_bn_frozen(model: Any, data: ArrayDataset, cfg: FinetuneSettings, seed: int) -> Any:
    import bnkit.keras

    model.trainable = True
    bnkit.keras.freeze(model)
    return fit(model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)


def _all(model: Any, data: ArrayDataset, cfg: FinetuneSettings, seed: int) -> Any:
    model.trainable = True
    return fit(model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)


def _bn_only(model: Any, data: ArrayDataset, cfg: FinetuneSettings, seed: int) -> Any:
    _trainable_only(model, _is_bn)
    return fit(model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)


def _recalibrate(model: Any, data: ArrayDataset, cfg: FinetuneSettings, seed: int) -> Any:
    return recalibrate_exact(model, data, cfg.recalibration_batch_size)


def _recalibrate_head(model: Any, data: ArrayDataset, cfg: FinetuneSettings, seed: int) -> Any:
    return _head(_recalibrate(model, data, cfg, seed), data, cfg, seed)


#: Every policy's Keras implementation by key (names and titles: :data:`bnkit.study.catalog.POLICY_INFO`).
KERAS_POLICIES: dict[str, Callable[[Any, ArrayDataset, FinetuneSettings, int], Any]] = {
    "source": _source,
    "head": _head,
    "all_bn_frozen": _all_bn_frozen,
    "all": _all,
    "bn_only": _bn_only,
    "recalibrate": _recalibrate,
    "recalibrate_head": _recalibrate_head,
}


def apply_keras_policy(
    policy: str, source_model: Any, data: ArrayDataset, settings: FinetuneSettings, seed: int
) -> Any:
    """Adapt a clone of ``source_model`` to ``data`` with ``policy`` (key or number); the source is untouched.

    Raises:
        ValueError: unknown policy, or a head that is not a top-level layer.

    Example:
        >>> from bnkit.study.keras_model import digits_net
        >>> src = digits_net()
        >>> ds = ArrayDataset(np.random.rand(8, 8, 8, 1).astype("float32"), np.arange(8))
        >>> apply_keras_policy("source", src, ds, FinetuneSettings(), 0) is not src
        True
    """
    key = resolve_policy(policy)
    return KERAS_POLICIES[key](clone(source_model), data, settings, seed)
