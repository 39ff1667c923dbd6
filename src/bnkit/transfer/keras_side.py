"""The Keras side of a port: the layers that carry weights, in execution order, and their tensors on a batch.

Keras is imported inside the functions. A model must be Sequential or functional (a graph Keras can run
layer by layer) with one input, and without nested models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["KerasLayer", "keras_tensors", "keras_weight_layers", "restore_keras", "snapshot_keras"]

#: Keras layers that pass a Flatten's order on unchanged.
_PASSTHROUGH = ("Dropout", "Activation", "ReLU", "LeakyReLU", "ELU", "Identity", "GaussianNoise", "SpatialDropout")


@dataclass
class KerasLayer:
    """One Keras layer with weights, as the port sees it.

    Attributes:
        layer: The Keras layer.
        kind: ``"conv"``, ``"depthwise"``, ``"separable"``, ``"transpose"``, ``"dense"`` or ``"bn"``.
        activation: Name of the fused activation (``"linear"`` for none).
        flatten_from: For a Dense fed by a Flatten of a rank >= 3 tensor: that tensor's shape (no batch axis).

    Example:
        >>> KerasLayer(layer=None, kind="dense").activation
        'linear'
    """

    layer: Any
    kind: str
    activation: str = "linear"
    flatten_from: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        """The Keras layer's name."""
        return str(self.layer.name)

    @property
    def class_name(self) -> str:
        """The Keras layer's class name."""
        return type(self.layer).__name__


def _kind(keras: Any, layer: Any) -> str | None:
    layers = keras.layers
    if isinstance(layer, layers.BatchNormalization):
        return "bn"
    if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        return "separable"
    if isinstance(layer, (layers.DepthwiseConv1D, layers.DepthwiseConv2D)):
        return "depthwise"
    if isinstance(layer, (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)):
        return "transpose"
    if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)):
        return "conv"
    if isinstance(layer, layers.Dense):
        return "dense"
    return None


def _producer(tensor: Any) -> Any:
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history[0]


def _flatten_from(layer: Any) -> tuple[int, ...] | None:
    """The pre-Flatten shape when a Flatten (through dropout/activation layers) feeds ``layer``."""
    try:
        tensor = layer.input
    except (AttributeError, ValueError):
        return None
    op = _producer(tensor)
    while op is not None and type(op).__name__.startswith(_PASSTHROUGH):
        tensor = op.input
        op = _producer(tensor)
    if op is not None and type(op).__name__ == "Flatten":
        shape = tuple(op.input.shape[1:])
        if len(shape) >= 2 and all(isinstance(d, int) for d in shape):
            return shape
    return None


def keras_weight_layers(model: Any) -> list[KerasLayer]:
    """The layers of ``model`` that carry weights, in execution order, with what their layout depends on.

    Raises:
        ValueError: a subclassed or nested model, a layer with weights the port does not know, a
            channels-first layer, or several inputs (one line naming the layer).

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Flatten(), keras.layers.Dense(3)])
        >>> [(k.kind, k.flatten_from) for k in keras_weight_layers(m)]
        [('dense', (4, 4, 2))]
    """
    from bnkit.keras.compat import import_keras

    keras = import_keras()
    label = f"Keras model {getattr(model, 'name', '?')!r}"
    if not isinstance(model, keras.Model):
        raise ValueError(f"{label}: expected a keras.Model. Received: {type(model).__name__}")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(f"{label}: a Sequential model with an Input or a functional model is needed (a graph)")
    if len(inputs) != 1:
        raise ValueError(f"{label}: only models with one input are supported. Received: {len(inputs)} inputs")
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            raise ValueError(f"{label}: layer {layer.name!r} is a nested model; build the port on a flat model")
        kind = _kind(keras, layer)
        if kind is None:
            if layer.weights:
                raise ValueError(
                    f"{label}: layer {layer.name!r} ({type(layer).__name__}) has weights the port does not know "
                    "(supported: ConvND, DepthwiseConvND, SeparableConvND, ConvNDTranspose, Dense, BatchNormalization)"
                )
            continue
        if getattr(layer, "data_format", "channels_last") == "channels_first":
            raise ValueError(f"{label}: layer {layer.name!r} is channels_first; the port expects channels_last")
        if len(getattr(layer, "_inbound_nodes", [None])) > 1:
            raise ValueError(f"{label}: layer {layer.name!r} is called more than once; share nothing in a port")
        activation = getattr(getattr(layer, "activation", None), "__name__", "linear")
        found.append(KerasLayer(layer, kind, activation, _flatten_from(layer) if kind == "dense" else None))
    return found


def keras_tensors(model: Any, layers: list[KerasLayer], x: np.ndarray, training: bool) -> list[tuple[Any, Any]]:
    """``(input, output)`` of each layer on the batch ``x``, as NumPy arrays, in one call of the model graph.

    With ``training=True`` the BatchNormalization layers use batch statistics and update their moving
    statistics once (see :func:`snapshot_keras`).

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> [a.shape for a in keras_tensors(m, keras_weight_layers(m), np.ones((4, 3), "float32"), False)[0]]
        [(4, 3), (4, 2)]
    """
    from bnkit.keras.compat import import_keras

    keras = import_keras()
    wanted = []
    for item in layers:
        wanted += [item.layer.input, item.layer.output]
    probe = keras.Model(model.inputs[0], wanted + list(model.outputs))
    values = probe(x, training=training)
    arrays = [np.asarray(keras.ops.convert_to_numpy(v)) for v in values]
    return [(arrays[2 * i], arrays[2 * i + 1]) for i in range(len(layers))] + [(arrays[-1], arrays[-1])]


def snapshot_keras(model: Any) -> list[np.ndarray]:
    """Copies of every variable of ``model`` (to undo a verification's training step).

    Example:
        >>> import keras
        >>> len(snapshot_keras(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])))
        2
    """
    from bnkit.keras.compat import import_keras

    keras = import_keras()
    return [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in model.variables]


def restore_keras(model: Any, values: list[np.ndarray]) -> None:
    """Assign the values :func:`snapshot_keras` took back to ``model``'s variables.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> restore_keras(m, snapshot_keras(m))
    """
    for variable, value in zip(model.variables, values, strict=True):
        variable.assign(value)
