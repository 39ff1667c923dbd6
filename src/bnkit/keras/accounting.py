"""``bnkit.keras.summary``: Keras and PyTorch parameter accountings of a Keras model side by side.

Keras style is what Keras itself reports: ``count_params()``, ``trainable_weights`` and ``non_trainable_weights``
(a weight is trainable when it and every layer above it are trainable). PyTorch style is what the same network
ported to PyTorch holds: parameters are every weight except BatchNormalization's moving statistics, which become
buffers (``running_mean``, ``running_var`` and one ``num_batches_tracked`` element per BatchNorm; renorm's
``moving_stddev`` counts as a buffer too). Same JSON shape as ``bnkit.summary``.
"""

from __future__ import annotations

import math
from typing import Any

from bnkit.keras import compat
from bnkit.keras.find import check_model, walk
from bnkit.shared.summary import LayerSummary, Summary

__all__ = ["summary"]

_STATISTICS = ("moving_mean", "moving_variance", "moving_stddev")


def _size(variable: Any) -> int:
    return int(math.prod(int(d) for d in variable.shape))


def _output_shape(layer: Any) -> list[int] | None:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError, RuntimeError):
        return None
    return [-1 if d is None else int(d) for d in shape]


def summary(model: Any) -> Summary:
    """Per-layer and total counts, Keras style and PyTorch style (see the module docstring for the rules).

    Rows list every layer that owns weights, and every leaf layer, under its path (``base/bn2``); a layer's row
    counts its own weights only. Weights shared between layers are counted once, where first met.

    Args:
        model: A Keras 3 model or layer (built: its weights must exist).

    Returns:
        A :class:`bnkit.shared.summary.Summary`; ``total``/``trainable``/``non_trainable`` equal
        ``model.count_params()`` / the sizes of ``trainable_weights`` / ``non_trainable_weights``.

    Raises:
        TypeError: ``model`` is not a Keras layer.
        ValueError: ``model`` is not built yet (no weights to count).

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
        >>> s = summary(m)
        >>> s.total, s.trainable, s.non_trainable, s.parameters, s.buffers
        (18, 14, 4, 14, 5)
    """
    check_model(model, "summary")
    if not model.built:
        raise ValueError(
            f"bnkit.keras.summary: {model.name} is not built; call it on an input or give it a keras.Input first"
        )
    trainable_ids = {id(v) for v in model.trainable_weights}
    entries = [(f.path, f.layer) for f in walk(model)] if compat.sublayers(model) else [("", model)]
    seen: set[int] = set()
    rows: list[LayerSummary] = []
    for path, layer in entries:
        children = {id(w) for sub in compat.sublayers(layer) for w in sub.weights}
        own = [w for w in layer.weights if id(w) not in children and id(w) not in seen]
        seen.update(id(w) for w in own)
        if not own and compat.sublayers(layer):
            continue
        is_bn = compat.is_batchnorm(layer)
        trainable = sum(_size(w) for w in own if id(w) in trainable_ids)
        total = sum(_size(w) for w in own)
        stats = [w for w in own if is_bn and any(w is getattr(layer, n, None) for n in _STATISTICS)]
        parameters = [w for w in own if not any(w is s for s in stats)]
        rows.append(
            LayerSummary(
                name=path,
                type=type(layer).__name__,
                output_shape=_output_shape(layer),
                total=total,
                trainable=trainable,
                non_trainable=total - trainable,
                parameters=sum(_size(w) for w in parameters),
                trainable_parameters=sum(_size(w) for w in parameters if id(w) in trainable_ids),
                buffers=sum(_size(w) for w in stats) + (1 if is_bn else 0),
            )
        )
    result = Summary(rows=rows)
    for field_name in ("total", "trainable", "non_trainable", "parameters", "trainable_parameters", "buffers"):
        setattr(result, field_name, sum(getattr(row, field_name) for row in rows))
    return result
