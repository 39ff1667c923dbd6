"""bnkit.keras.summary equals Keras's own counts (count_params, trainable_weights, non_trainable_weights)."""

from __future__ import annotations

import math

import keras
import pytest

import bnkit.keras as bk
from bnkit.shared.summary import Summary
from tests.keras.helpers import transfer_model


def _keras_counts(model: keras.Model) -> tuple[int, int, int]:
    def size(ws):
        return sum(math.prod(w.shape) for w in ws)

    return model.count_params(), size(model.trainable_weights), size(model.non_trainable_weights)


def seed_network() -> keras.Model:
    """The network of keras.md: Conv2D(32, 3, 'same') on 64x64x1 -> BN -> Flatten -> Dense(100) -> Dense(10)."""
    return keras.Sequential(
        [
            keras.Input((64, 64, 1)),
            keras.layers.Conv2D(32, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(100),
            keras.layers.Dense(10),
        ]
    )


def test_seed_network_matches_keras_and_the_documented_figures() -> None:
    model = seed_network()
    s = bk.summary(model)
    assert (s.total, s.trainable, s.non_trainable) == _keras_counts(model) == (13_108_758, 13_108_694, 64)
    # the PyTorch port: moving statistics become buffers (plus num_batches_tracked)
    assert (s.parameters, s.trainable_parameters, s.buffers) == (13_108_694, 13_108_694, 65)
    assert Summary.from_dict(s.to_dict()) == s
    assert set(s.to_dict()) == set(Summary().to_dict())


@pytest.mark.parametrize("base_trainable", [True, False])
def test_nested_and_frozen_containers(base_trainable) -> None:
    model, base = transfer_model("functional", False)
    base.trainable = base_trainable
    base.get_layer("bn1").trainable = False
    s = bk.summary(model)
    assert (s.total, s.trainable, s.non_trainable) == _keras_counts(model)
    assert [r.name for r in s.rows] == ["base/d1", "base/bn1", "base/d2", "base/bn2", "head"]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("MobileNetV2", {"alpha": 0.35, "input_shape": (96, 96, 3)}),
        ("MobileNetV3Small", {"input_shape": (96, 96, 3)}),
        ("MobileNetV3Large", {"input_shape": (96, 96, 3)}),
        ("ResNet50", {}),
        ("ResNet50V2", {"input_shape": (64, 64, 3), "include_top": False}),
        ("DenseNet121", {"input_shape": (64, 64, 3), "include_top": False}),
        ("InceptionV3", {"input_shape": (75, 75, 3), "include_top": False}),
        ("Xception", {"input_shape": (71, 71, 3), "include_top": False}),
        ("EfficientNetB0", {"input_shape": (64, 64, 3), "include_top": False}),
        ("VGG16", {"input_shape": (32, 32, 3), "include_top": False}),
    ],
)
def test_keras_applications(name, kwargs) -> None:
    model = getattr(keras.applications, name)(weights=None, **kwargs)
    s = bk.summary(model)
    assert (s.total, s.trainable, s.non_trainable) == _keras_counts(model)
    documented = {"ResNet50": (25_636_712, 25_583_592, 53_120)}  # keras.md
    if name in documented:
        assert (s.total, s.trainable, s.non_trainable) == documented[name]


def test_unbuilt_model_is_one_line() -> None:
    with pytest.raises(ValueError, match="not built"):
        bk.summary(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(TypeError, match="expected a Keras 3 model"):
        bk.summary(object())
