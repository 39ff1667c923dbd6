"""bnkit.BatchNorm.from_keras against Keras 3's own BatchNormalization layer (KERAS_BACKEND=torch)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import pytest
import torch

from bnkit import BatchNorm

assert keras.backend.backend() == "torch", "these tests need KERAS_BACKEND=torch"


def _np(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


def _pair(shape: tuple[int, ...], **kwargs):
    channels = shape[kwargs.get("axis", -1)]
    layer = keras.layers.BatchNormalization(**kwargs)
    layer.build(shape)
    ours = BatchNorm.from_keras(channels, **kwargs)
    return layer, ours


def _assert_same_state(layer, ours: BatchNorm) -> None:
    np.testing.assert_allclose(ours.running_mean.numpy(), _np(layer.moving_mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.running_var.numpy(), _np(layer.moving_variance), rtol=1e-5, atol=1e-6)


def _batch(shape: tuple[int, ...], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randn(shape, generator=g) * (1.0 + step % 4) + (step % 3)


@pytest.mark.parametrize("shape", [(16, 5), (4, 6, 6, 5)], ids=["rank2", "rank4-channels-last"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": 0.9, "epsilon": 1e-5}, {"momentum": 0.5, "center": False}, {"scale": False}],
    ids=["defaults", "momentum0.9-eps1e-5", "no-center", "no-scale"],
)
def test_training_steps_match_keras(shape: tuple[int, ...], kwargs: dict) -> None:
    layer, ours = _pair(shape, **kwargs)
    for step in range(30):
        x = _batch(shape, step)
        expected = _np(layer(x, training=True))
        got = ours(x, training=True).detach().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
        _assert_same_state(layer, ours)
    x = _batch(shape, 100)
    np.testing.assert_allclose(ours(x, training=False).detach().numpy(), _np(layer(x)), rtol=1e-5, atol=2e-5)


def test_input_gradient_matches_keras() -> None:
    layer, ours = _pair((8, 3, 3, 4), momentum=0.9)
    x = _batch((8, 3, 3, 4), 7)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    (layer(xa, training=True) * w).sum().backward()
    (ours(xb, training=True) * w).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)


def test_frozen_layer_runs_in_inference_mode_like_keras() -> None:
    layer, ours = _pair((16, 5))
    for step in range(5):
        layer(_batch((16, 5), step), training=True)
        ours(_batch((16, 5), step), training=True)
    layer.trainable = False
    ours.trainable = False
    x = _batch((16, 5), 50)
    np.testing.assert_allclose(
        ours(x, training=True).detach().numpy(), _np(layer(x, training=True)), rtol=1e-5, atol=2e-5
    )
    _assert_same_state(layer, ours)
    assert not ours.weight.requires_grad


def test_masked_statistics_match_keras() -> None:
    layer, ours = _pair((4, 9, 3), momentum=0.8)
    for step in range(30):
        x = _batch((4, 9, 3), step)
        mask = torch.rand((4, 9), generator=torch.Generator().manual_seed(step)) > 0.4
        mask[0, 0] = True
        expected = _np(layer(x, training=True, mask=mask))
        got = ours(x, training=True, mask=mask).detach().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
        _assert_same_state(layer, ours)


@pytest.mark.parametrize(
    "clipping",
    [{"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}, {"rmax": 2.0}, {}],
    ids=["all-bounds", "rmax-only", "no-clipping"],
)
@pytest.mark.parametrize("shape", [(16, 4), (4, 3, 3, 4)], ids=["rank2", "rank4"])
def test_renorm_matches_keras(clipping: dict, shape: tuple[int, ...]) -> None:
    kwargs = {"renorm": True, "renorm_clipping": clipping, "renorm_momentum": 0.9, "momentum": 0.8}
    layer, ours = _pair(shape, **kwargs)
    for step in range(30):
        x = _batch(shape, step) * (1 + step % 3)
        expected = _np(layer(x, training=True))
        np.testing.assert_allclose(ours(x, training=True).detach().numpy(), expected, rtol=1e-5, atol=5e-5)
        _assert_same_state(layer, ours)
        np.testing.assert_allclose(ours.renorm_mean.numpy(), _np(layer.renorm_mean), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.renorm_std.numpy(), _np(layer.renorm_stddev), rtol=1e-5, atol=1e-6)
    x = _batch(shape, 77)
    np.testing.assert_allclose(ours(x, training=False).detach().numpy(), _np(layer(x)), rtol=1e-5, atol=5e-5)


def test_keras_weights_load_by_the_documented_mapping() -> None:
    layer, ours = _pair((8, 6))
    for step in range(3):
        layer(_batch((8, 6), step), training=True)
    state = {
        "weight": torch.from_numpy(_np(layer.gamma)),
        "bias": torch.from_numpy(_np(layer.beta)),
        "running_mean": torch.from_numpy(_np(layer.moving_mean)),
        "running_var": torch.from_numpy(_np(layer.moving_variance)),
        "num_batches_tracked": torch.tensor(3),
    }
    ours.load_state_dict(state)
    x = _batch((8, 6), 9)
    np.testing.assert_allclose(ours(x, training=False).detach().numpy(), _np(layer(x)), rtol=1e-5, atol=2e-5)
