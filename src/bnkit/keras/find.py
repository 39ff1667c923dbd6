"""The one traversal of BatchNormalization layers in a Keras model, with paths like ``base/bn2``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bnkit.keras import compat
from bnkit.shared.selection import Selector, check_selector, matches

__all__ = ["Found", "named_batchnorms", "recorded_training", "select_batchnorms", "trains_in_fit", "walk"]


@dataclass
class Found:
    """One layer met in the traversal.

    Attributes:
        path: ``/``-joined layer names from the model down (``"base/bn2"``).
        layer: The layer object.
        ancestors: The containers above it, outermost first (the model itself included).

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(name="bn")])
        >>> [(f.path, len(f.ancestors)) for f in walk(m)]
        [('bn', 1)]
    """

    path: str
    layer: Any
    ancestors: list[Any] = field(default_factory=list)


def walk(model: Any) -> Iterator[Found]:
    """Every layer inside ``model`` at any depth, depth first, each once (a shared layer at its first path).

    Example:
        >>> keras = compat.import_keras()
        >>> inner = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="d")], name="base")
        >>> outer = keras.Sequential([keras.Input((2,)), inner])
        >>> [f.path for f in walk(outer)]
        ['base', 'base/d']
    """
    seen: set[int] = set()

    def visit(container: Any, prefix: str, ancestors: list[Any]) -> Iterator[Found]:
        for layer in compat.sublayers(container):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            path = f"{prefix}{layer.name}"
            yield Found(path, layer, list(ancestors))
            yield from visit(layer, f"{path}/", [*ancestors, layer])

    yield from visit(model, "", [model])


def named_batchnorms(model: Any, layers: Selector = None) -> list[tuple[str, Any]]:
    """Every BatchNormalization layer of ``model`` as ``(path, layer)``; ``layers`` narrows the selection.

    A model that is itself a BatchNormalization layer is returned under the path ``""``.

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name="bn")])
        >>> [p for p, _ in named_batchnorms(m)]
        ['bn']
    """
    return [(f.path, f.layer) for f in _batchnorms(model) if matches(layers, f.path, f.layer)]


def _batchnorms(model: Any) -> list[Found]:
    if compat.is_batchnorm(model):
        return [Found("", model, [])]
    return [f for f in walk(model) if compat.is_batchnorm(f.layer)]


def select_batchnorms(model: Any, layers: Selector, tool: str) -> list[Found]:
    """The BatchNormalization layers chosen by ``layers``; a selector the user wrote that matches none raises.

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="bn")])
        >>> [f.path for f in select_batchnorms(m, "bn", "freeze")]
        ['bn']
    """
    check_model(model, tool)
    check_selector(layers, tool)
    found = [f for f in _batchnorms(model) if matches(layers, f.path, f.layer)]
    if layers is not None and not found:
        available = [f.path or "<model>" for f in _batchnorms(model)]
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise ValueError(
            f"{tool}: layers={layers!r} matched no BatchNormalization layer; the model has: {shown or 'none'}"
        )
    return found


def check_model(model: Any, tool: str) -> None:
    """Raise a one-line TypeError unless ``model`` is a Keras layer or model.

    Example:
        >>> check_model(compat.import_keras().layers.Dense(2), "explain")
    """
    keras = compat.import_keras()
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"bnkit.keras.{tool}: expected a Keras 3 model or layer, got {type(model).__name__}")


def trains_in_fit(item: Found) -> bool:
    """Whether the layer uses batch statistics under ``fit()``: it and every container above it are trainable and
    it is not a bnkit layer with ``freeze_stats``.

    Example:
        >>> keras = compat.import_keras()
        >>> trains_in_fit(Found("bn", keras.layers.BatchNormalization(), []))
        True
    """
    chain = [*item.ancestors, item.layer]
    return all(c.trainable for c in chain) and not getattr(item.layer, "freeze_stats", False)


def recorded_training(item: Found) -> bool | None:
    """The ``training=`` recorded at construction on the path to the layer (the outermost wins), or None.

    Example:
        >>> keras = compat.import_keras()
        >>> inp = keras.Input((2,)); bn = keras.layers.BatchNormalization(name="bn")
        >>> m = keras.Model(inp, bn(inp, training=False))
        >>> [recorded_training(f) for f in walk(m)]
        [False]
    """
    for outer, inner in itertools.pairwise([*item.ancestors, item.layer]):
        recorded = compat.construction_training(outer, inner)
        if recorded is not None:
            return recorded
    return None
