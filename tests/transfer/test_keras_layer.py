"""BatchNorm.from_keras_layer / to_keras_layer against Keras 3's own BatchNormalization (exact both ways)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import pytest
import torch

from bnkit import BatchNorm, Renorm


def _np(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


def _batch(shape: tuple[int, ...], step: int) -> np.ndarray:
    rng = np.random.default_rng(step)
    return (rng.normal(size=shape) * (1.0 + step % 4) + step % 3).astype("float32")


def _trained_keras(shape: tuple[int, ...], steps: int = 5, **kwargs) -> keras.layers.BatchNormalization:
    layer = keras.layers.BatchNormalization(**kwargs)
    layer.build(shape)
    for step in range(steps):
        layer(_batch(shape, step), training=True)
    return layer


def _assert_steps_match(layer, bn: BatchNorm, shape, steps: int = 20, mask: bool = False) -> None:
    """Outputs and statistics of Keras and bnkit after each of ``steps`` training steps, then inference."""
    for step in range(steps):
        x = _batch(shape, 100 + step)
        m = None
        if mask:
            m = np.random.default_rng(step).random(shape[:-1]) > 0.4
            m.flat[0] = True
        expected = _np(layer(x, training=True, mask=m))
        got = bn(torch.from_numpy(x), training=True, mask=None if m is None else torch.from_numpy(m))
        np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(bn.running_mean.numpy(), _np(layer.moving_mean), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.numpy(), _np(layer.moving_variance), rtol=1e-6, atol=1e-6)
    x = _batch(shape, 999)
    np.testing.assert_allclose(bn(torch.from_numpy(x), training=False).detach().numpy(), _np(layer(x)), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": 0.9, "epsilon": 1.001e-5},
        {"scale": False},
        {"center": False, "momentum": 0.999},
        {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}, "renorm_momentum": 0.9},
    ],
    ids=["defaults", "resnet-eps", "no-scale", "no-center", "renorm"],
)
@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 3, 5)], ids=["rank2", "rank4"])
def test_from_keras_layer_is_exact_over_training_steps(kwargs: dict, shape: tuple[int, ...]) -> None:
    layer = _trained_keras(shape, **kwargs)
    bn = BatchNorm.from_keras_layer(layer)
    assert (bn.weight is None) == (not layer.scale) and (bn.bias is None) == (not layer.center)
    _assert_steps_match(layer, bn, shape)
    if layer.renorm:
        np.testing.assert_allclose(bn.renorm_mean.numpy(), _np(layer.renorm_mean), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bn.renorm_std.numpy(), _np(layer.renorm_stddev), rtol=1e-6, atol=1e-6)


def test_from_keras_layer_with_masks_matches_keras() -> None:
    layer = _trained_keras((4, 7, 3), momentum=0.8)
    _assert_steps_match(layer, BatchNorm.from_keras_layer(layer), (4, 7, 3), mask=True)


def test_axis_override_reads_channels_first_tensors() -> None:
    layer = _trained_keras((4, 3, 3, 5))
    bn = BatchNorm.from_keras_layer(layer, axis=1)
    x = _batch((4, 3, 3, 5), 7)
    got = bn(torch.from_numpy(x).permute(0, 3, 1, 2), training=False).permute(0, 2, 3, 1)
    np.testing.assert_allclose(got.detach().numpy(), _np(layer(x)), atol=1e-6)


def test_trainable_false_becomes_both_freeze_switches_and_back() -> None:
    layer = _trained_keras((8, 4))
    layer.trainable = False
    bn = BatchNorm.from_keras_layer(layer)
    assert bn.freeze_stats and bn.freeze_affine and not bn.weight.requires_grad
    _assert_steps_match(layer, bn, (8, 4), steps=3)  # both stay in inference mode under training=True
    back = bn.to_keras_layer()
    assert back.trainable is False


def test_bnkit_keras_layer_flags_map_one_to_one() -> None:
    from bnkit.keras import BatchNormalization

    layer = BatchNormalization(freeze_stats=True, freeze_affine=False)
    layer.build((None, 3))
    bn = BatchNorm.from_keras_layer(layer)
    assert (bn.freeze_stats, bn.freeze_affine) == (True, False)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": 0.9, "center": False}, {"renorm": True, "renorm_clipping": {"rmax": 2.0}}],
    ids=["defaults", "no-center", "renorm"],
)
def test_to_keras_layer_round_trip_is_exact_over_training_steps(kwargs: dict) -> None:
    shape = (4, 3, 3, 5)
    bn = BatchNorm.from_keras_layer(_trained_keras(shape, **kwargs))
    for step in range(3):
        bn(torch.from_numpy(_batch(shape, 50 + step)), training=True)
    layer = bn.to_keras_layer()
    np.testing.assert_allclose(_np(layer.moving_mean), bn.running_mean.numpy())
    _assert_steps_match(layer, bn, shape)


def test_to_keras_layer_of_a_torch_layer() -> None:
    torch_bn = torch.nn.BatchNorm1d(4, momentum=0.2, eps=1e-4)
    torch_bn(torch.randn(16, 4))
    bn = BatchNorm.from_torch(torch_bn)
    with pytest.raises(ValueError, match="unbiased running variance"):
        bn.to_keras_layer()
    layer = bn.to_keras_layer(strict=False)
    assert abs(layer.momentum - 0.8) < 1e-12 and layer.epsilon == 1e-4 and layer.axis == 1
    x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    np.testing.assert_allclose(_np(layer(x)), torch_bn.eval()(torch.from_numpy(x)).detach().numpy(), atol=1e-6)


def test_refusals_are_one_line() -> None:
    with pytest.raises(TypeError, match="BatchNormalization"):
        BatchNorm.from_keras_layer(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="not built"):
        BatchNorm.from_keras_layer(keras.layers.BatchNormalization(name="raw"))
    with pytest.raises(ValueError, match="momentum=None"):
        BatchNorm(3, momentum=None).to_keras_layer()
    with pytest.raises(ValueError, match="warm-up"):
        BatchNorm(3, renorm=Renorm(warmup_steps=5), unbiased_running_var=False).to_keras_layer()
