"""transfer_weights / verify_transfer on real Keras models and hand-written PyTorch twins (KERAS_BACKEND=torch)."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
from torch import nn

import bnkit
from bnkit import BatchNorm
from bnkit.transfer import transfer_weights, verify_transfer
from tests.transfer.models import Twin, inputs, keras_model


def _np(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


def _logits_error(k, t, x: np.ndarray) -> float:
    expected = _np(k(x, training=False))
    got = t.eval()(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).detach().numpy()
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def _ported(mistake: str = "", bnkit_bn: bool = False):
    k, t = keras_model(), Twin(mistake, bnkit_bn)
    transfer_weights(k, t, inputs(8), verify=False)
    return k, t


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return inputs(64)


@pytest.mark.parametrize("bnkit_bn", [False, True], ids=["torch-bn", "bnkit-bn"])
def test_keras_to_torch_is_exact_and_verified(bnkit_bn: bool, x: np.ndarray) -> None:
    k, t = keras_model(), Twin(bnkit_bn=bnkit_bn)
    report = transfer_weights(k, t, x[:16])
    assert report.ok and report.direction == "keras -> torch" and len(report.pairs) == 10
    assert _logits_error(k, t, x) <= 1e-6
    assert report.argmax_agreement == 1.0
    assert "bn1: eps 1e-05 -> 0.001" in report.changes
    training = {c.keras: c for c in report.checks if c.mode == "training"}
    if bnkit_bn:  # Keras's update formula and biased variance: exact in training too
        assert all(c.status == "ok" for c in training.values())
        assert t.bn1.keras_momentum == 0.99 and not t.bn1.unbiased_running_var
    else:  # torch.nn's unbiased running variance is named, not hidden
        assert training["bn4"].status == "expected" and "unbiased" in training["bn4"].reason


def test_running_statistics_match_keras_after_20_training_steps(x: np.ndarray) -> None:
    k, t = keras_model(), Twin(bnkit_bn=True)
    transfer_weights(k, t, x[:8])
    t.train()
    for step in range(20):
        batch = inputs(8, seed=200 + step) * (1 + step % 3)
        k(batch, training=True)
        t(torch.from_numpy(np.moveaxis(batch, -1, 1).copy()))
    for name in ("bn1", "bn2", "bn3", "bn4"):
        layer, module = k.get_layer(name), getattr(t, name)
        for ours, theirs in ((module.running_mean, layer.moving_mean), (module.running_var, layer.moving_variance)):
            expected = _np(theirs)
            assert np.linalg.norm(ours.numpy() - expected) / np.linalg.norm(expected) <= 1e-6, name
    assert _logits_error(k, t, x) <= 1e-6


def test_torch_to_keras_and_back_is_exact(x: np.ndarray) -> None:
    torch.manual_seed(0)
    t = Twin()
    with torch.no_grad():
        for module in t.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.3)
    t.train()
    for step in range(3):
        t(torch.from_numpy(np.moveaxis(inputs(16, seed=step), -1, 1).copy()))
    k = keras_model(seed=5)
    report = transfer_weights(t, k, x[:16])
    assert report.ok and report.direction == "torch -> keras"
    assert _logits_error(k, t, x) <= 1e-6
    assert abs(k.get_layer("bn1").momentum - 0.9) < 1e-12 and k.get_layer("bn1").epsilon == 1e-5
    back = Twin()
    transfer_weights(k, back, x[:8])
    for (name, a), (_, b) in zip(t.state_dict().items(), back.state_dict().items(), strict=True):
        if name.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


# the table: each mistake made in a hand port, and what the report must name
def _eps(k, t):
    for module in t.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = 1e-5


def _reshape(k, t):
    kernel = _np(k.get_layer("conv1").kernel)
    with torch.no_grad():
        t.conv1.weight.copy_(torch.from_numpy(kernel.reshape(t.conv1.weight.shape)))


def _flatten(k, t):
    with torch.no_grad():
        t.fc1.weight.copy_(torch.from_numpy(_np(k.get_layer("fc1").kernel).T.copy()))


def _momentum(k, t):
    for module in t.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.99


@pytest.mark.parametrize(
    ("mistake", "edit", "layer", "mode", "named"),
    [
        ("", _eps, "bn1", "inference", "eps: torch bn1 has eps=1e-05, Keras epsilon=0.001; the output matches"),
        ("", _reshape, "conv1", "inference", "kernel layout: torch conv1.weight (8, 3, 3, 3) is the Keras kernel"),
        ("padding", None, "conv1", "inference", "padding: torch conv1 pads (1, 1) on both sides; Keras padding="),
        ("", _flatten, "fc1", "inference", "Flatten order: torch fc1.weight is the Keras kernel transposed but"),
        ("activation", None, "fc1", "inference", "activation: the fused activation 'relu' of Keras layer 'pw'"),
        ("", _momentum, "bn1", "training", "momentum: torch bn1 has momentum=0.99, Keras momentum=0.99"),
    ],
    ids=["eps", "kernel-reshape", "symmetric-padding", "flatten-order", "dropped-activation", "momentum-copied"],
)
def test_each_porting_mistake_is_detected_and_named(mistake, edit, layer, mode, named, x: np.ndarray) -> None:
    k, t = _ported(mistake)
    if edit is not None:
        edit(k, t)
    before = {key: value.clone() for key, value in t.state_dict().items()}
    report = verify_transfer(k, t, x[:32])
    first = report.first_divergence
    assert not report.ok and first is not None
    assert (first.keras, first.mode) == (layer, mode), first.line()
    assert first.reason.startswith(named), first.reason
    assert f"first divergence: {first.line()}" in str(report)
    for key, value in t.state_dict().items():  # verification leaves the model as it was
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_a_divergence_after_transfer_warns_with_the_layer(x: np.ndarray) -> None:
    k, t = keras_model(), Twin("activation")
    with pytest.warns(UserWarning, match="fc1 -> fc1 .*fused activation 'relu'"):
        transfer_weights(k, t, x[:16])


def test_models_that_do_not_pair_are_refused_in_one_line_and_left_untouched(x: np.ndarray) -> None:
    k = keras_model()
    t = Twin()
    t.fc1 = nn.Linear(6 * 64, 16, bias=True)
    t.sep_pw, t.bn3, t.pw = nn.Conv2d(8, 11, 1, bias=False), nn.BatchNorm2d(11), nn.Conv2d(11, 6, 1)  # Keras: 12
    before = {key: value.clone() for key, value in t.state_dict().items()}
    refusal = r"^transfer: sep \(SeparableConv2D -> Conv2d \+ Conv2d .* 1.weight has shape"
    with pytest.raises(ValueError, match=refusal) as info:
        transfer_weights(k, t, x[:4])
    assert "\n" not in str(info.value)
    for key, value in t.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="torch modules 1 have no Keras layer"):
        small = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        transfer_weights(small, nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), np.ones((2, 4), "float32"))
    with pytest.raises(ValueError, match=r"^transfer: torch model Linear failed on example_inputs: RuntimeError"):
        transfer_weights(k, nn.Linear(3, 2), x[:2])
    with pytest.raises(TypeError, match=r"one keras\.Model and one torch\.nn\.Module"):
        transfer_weights(t, t, x)


def test_public_exports_and_bnkit_keras_stays_torch_free() -> None:
    assert bnkit.transfer_weights is transfer_weights
    assert bnkit.keras.transfer_weights is transfer_weights
    code = (
        "import sys, bnkit.keras; assert 'transfer_weights' in bnkit.keras.__all__; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ, "KERAS_BACKEND": "numpy"})


def _keras_bn_stats(k, t, seed: int = 0) -> None:
    """Exact statistics for the Keras model, then the same for the torch twin after transfer (a sanity set)."""
    bnkit.keras.recalibrate(k, np.random.default_rng(seed).normal(size=(64, *k.input_shape[1:])).astype("float32"))


def test_resnet50_style_block_ports_with_the_conv_bias_folded_into_the_running_mean() -> None:
    keras.utils.set_random_seed(3)
    L = keras.layers
    inp = keras.Input((8, 8, 4))
    y = L.Conv2D(8, 1, name="c1")(inp)  # Keras ResNet50: use_bias=True before BN, eps 1.001e-5
    y = L.BatchNormalization(epsilon=1.001e-5, name="b1")(y)
    y = L.Activation("relu")(y)
    y = L.Conv2D(8, 3, padding="same", name="c2")(y)
    y = L.BatchNormalization(epsilon=1.001e-5, name="b2")(y)
    s = L.Conv2D(8, 1, name="cs")(inp)
    s = L.BatchNormalization(epsilon=1.001e-5, name="bs")(s)
    y = L.Activation("relu")(L.Add()([y, s]))
    out = L.Dense(3, name="fc")(L.GlobalAveragePooling2D()(y))
    k = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    for layer in k.layers:
        if isinstance(layer, L.Conv2D):
            layer.bias.assign(rng.normal(0, 1.0, layer.bias.shape).astype("float32"))
    _keras_bn_stats(k, None)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.cs, self.bs = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            # the shortcut runs after the main path here as in Keras's graph order
            y = torch.relu(y + self.bs(self.cs(x)))
            return self.fc(y.mean((2, 3)))

    t = Block()
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 4)).astype("float32")
    report = transfer_weights(k, t, x)
    assert report.ok, str(report)
    assert _logits_error(k, t, x) <= 1e-6
    bias = _np(k.get_layer("c1").bias)
    np.testing.assert_allclose(t.b1.running_mean.numpy(), _np(k.get_layer("b1").moving_mean) - bias, atol=1e-6)
    assert t.b1.eps == 1.001e-5
    # and back: the torch bias-free convs give Keras biases of zero, the running means take the bias back
    k2 = keras.models.clone_model(k)
    report = transfer_weights(t, k2, x)
    assert report.ok and _logits_error(k2, t, x) <= 1e-6
    # not folding is a named mistake
    with torch.no_grad():
        t.b1.running_mean.copy_(torch.from_numpy(_np(k.get_layer("b1").moving_mean)))
    assert verify_transfer(k, t, x).first_divergence.reason.startswith("conv bias not folded")


def test_mobilenetv2_style_block_ports_with_momentum_0999() -> None:
    keras.utils.set_random_seed(4)
    L = keras.layers
    inp = keras.Input((9, 9, 4))
    y = L.Conv2D(12, 1, use_bias=False, name="expand")(inp)
    y = L.BatchNormalization(epsilon=1e-3, momentum=0.999, name="expand_bn")(y)
    y = L.ReLU(6.0)(y)
    y = L.ZeroPadding2D(((0, 1), (0, 1)))(y)
    y = L.DepthwiseConv2D(3, strides=2, use_bias=False, name="depthwise")(y)
    y = L.BatchNormalization(epsilon=1e-3, momentum=0.999, name="depthwise_bn")(y)
    y = L.ReLU(6.0)(y)
    y = L.Conv2D(6, 1, use_bias=False, name="project")(y)
    y = L.BatchNormalization(epsilon=1e-3, momentum=0.999, scale=False, name="project_bn")(y)
    k = keras.Model(inp, L.Dense(3, name="fc")(L.GlobalAveragePooling2D()(y)))
    _keras_bn_stats(k, None)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand, self.expand_bn = nn.Conv2d(4, 12, 1, bias=False), BatchNorm(12)
            self.pad = nn.ZeroPad2d((0, 1, 0, 1))
            self.depthwise = nn.Conv2d(12, 12, 3, stride=2, groups=12, bias=False)
            self.depthwise_bn = BatchNorm(12)
            self.project, self.project_bn = nn.Conv2d(12, 6, 1, bias=False), BatchNorm(6)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            y = nn.functional.relu6(self.expand_bn(self.expand(x)))
            y = nn.functional.relu6(self.depthwise_bn(self.depthwise(self.pad(y))))
            return self.fc(self.project_bn(self.project(y)).mean((2, 3)))

    t = Block()
    x = np.random.default_rng(2).normal(size=(16, 9, 9, 4)).astype("float32")
    report = transfer_weights(k, t, x)
    assert report.ok and all(c.status == "ok" for c in report.checks), str(report)
    assert _logits_error(k, t, x) <= 1e-6
    assert t.expand_bn.keras_momentum == 0.999 and abs(t.expand_bn.momentum - 0.001) < 1e-12
    np.testing.assert_allclose(t.project_bn.weight.detach().numpy(), 1.0)  # scale=False -> gamma 1
    t.train()
    for step in range(20):
        batch = np.random.default_rng(300 + step).normal(size=(8, 9, 9, 4)).astype("float32")
        k(batch, training=True)
        t(torch.from_numpy(np.moveaxis(batch, -1, 1).copy()))
    for name in ("expand_bn", "depthwise_bn", "project_bn"):
        np.testing.assert_allclose(
            getattr(t, name).running_var.numpy(), _np(k.get_layer(name).moving_variance), rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("rank", [1, 3], ids=["conv1d", "conv3d"])
def test_conv1d_conv3d_and_transpose_layouts(rank: int) -> None:
    keras.utils.set_random_seed(5)
    L = keras.layers
    spatial = (10,) if rank == 1 else (4, 4, 4)
    conv = L.Conv1D if rank == 1 else L.Conv3D
    tconv = L.Conv1DTranspose if rank == 1 else L.Conv3DTranspose
    inp = keras.Input((*spatial, 3))
    y = conv(6, 3, padding="same", activation="tanh", name="conv")(inp)
    y = L.BatchNormalization(center=False, name="bn")(y)
    y = tconv(4, 2, strides=2, name="up")(y)
    out = L.Dense(2, name="fc")(L.Flatten()(y))
    k = keras.Model(inp, out)
    Conv = nn.Conv1d if rank == 1 else nn.Conv3d
    Up = nn.ConvTranspose1d if rank == 1 else nn.ConvTranspose3d
    Bn = nn.BatchNorm1d if rank == 1 else nn.BatchNorm3d
    flat = 4 * int(np.prod([2 * s for s in spatial]))
    t = nn.Sequential(
        Conv(3, 6, 3, padding=1), nn.Tanh(), Bn(6), Up(6, 4, 2, stride=2), nn.Flatten(), nn.Linear(flat, 2)
    )
    x = np.random.default_rng(3).normal(size=(8, *spatial, 3)).astype("float32")
    report = transfer_weights(k, t, x)
    assert report.ok, str(report)
    assert _logits_error(k, t, x) <= 1e-6
    np.testing.assert_allclose(t[2].bias.detach().numpy(), 0.0)  # center=False -> beta 0
