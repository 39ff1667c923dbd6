"""Small real Keras models shared by the bnkit.keras tests."""

from __future__ import annotations

import keras
import numpy as np


def base_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, name="d1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.Dense(4, name="d2"),
            keras.layers.BatchNormalization(name="bn2"),
        ],
        name="base",
    )


class Subclassed(keras.Model):
    def __init__(self, base: keras.Model, inference_base: bool, **kwargs):
        super().__init__(**kwargs)
        self.base = base
        self.head = keras.layers.Dense(2, name="head")
        self.inference_base = inference_base

    def call(self, x, training=None):
        return self.head(self.base(x, training=False if self.inference_base else training))


def transfer_model(kind: str, training_false: bool) -> tuple[keras.Model, keras.Model]:
    """(model, base): ``kind`` is sequential, functional or subclassed; the base is called with training=False."""
    base = base_model()
    if kind == "sequential":
        return keras.Sequential([keras.Input((4,)), base, keras.layers.Dense(2, name="head")]), base
    if kind == "functional":
        inp = keras.Input((4,))
        y = base(inp, training=False) if training_false else base(inp)
        return keras.Model(inp, keras.layers.Dense(2, name="head")(y)), base
    model = Subclassed(base, training_false)
    model(np.zeros((2, 4), "float32"))
    return model, base


def data(n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(2.0, 3.0, (n, 4)).astype("float32"), rng.normal(size=(n, 2)).astype("float32"))


def snapshot(model: keras.Model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in model.variables]
