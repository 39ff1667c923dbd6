"""A small Keras model factory for the Keras study's own-model path (``tests.study.keras_factory:tiny``)."""

from __future__ import annotations

from typing import Any


def tiny() -> Any:
    """Conv (8 channels) - BatchNormalization - ReLU - global average pooling - dense ``out`` (10 logits).

    Example:
        >>> tiny().layers[-1].name
        'out'
    """
    import keras

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="out")(x))
