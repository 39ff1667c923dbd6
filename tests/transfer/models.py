"""The issue's Keras model and its hand-written PyTorch twin (the user's models, built as a user would)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import torch
from torch import nn

import bnkit.keras
from bnkit import BatchNorm

SIZE, CHANNELS, CLASSES = 16, 3, 5


def keras_model(seed: int = 0, calibrate: bool = True) -> keras.Model:
    """Conv2D s2 'same' -> BN -> ReLU -> Depthwise -> BN -> ReLU -> Separable -> BN -> ReLU -> 1x1 relu -> Flatten ->
    Dense -> BN -> ReLU -> Dense, with moving statistics that are not the defaults."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inp = keras.Input((SIZE, SIZE, CHANNELS))
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.SeparableConv2D(12, 3, padding="same", use_bias=False, name="sep")(x)
    x = layers.BatchNormalization(name="bn3")(x)
    x = layers.ReLU(name="relu3")(x)
    x = layers.Conv2D(6, 1, activation="relu", name="pw")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(16, name="fc1")(x)
    x = layers.BatchNormalization(name="bn4")(x)
    x = layers.ReLU(name="relu4")(x)
    out = layers.Dense(CLASSES, name="logits")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # affine parameters that are not the identity
        if isinstance(layer, layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.5, c).astype("float32"))
    # exact population statistics, as the measurement has them
    if calibrate:
        bnkit.keras.recalibrate(model, inputs(256, seed=seed + 100), sequential=True)
    return model


class Twin(nn.Module):
    """The PyTorch twin; ``mistake`` builds it wrongly the way the issue's table describes."""

    def __init__(self, mistake: str = "", bnkit_bn: bool = False) -> None:
        super().__init__()

        def bn(c: int, dim: int = 2) -> nn.Module:
            if bnkit_bn:
                return BatchNorm(c)
            return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d)(c)

        self.mistake = mistake
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv1 = nn.Conv2d(CHANNELS, 8, 3, stride=2, padding=1 if mistake == "padding" else 0, bias=False)
        self.bn1 = bn(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = bn(8)
        self.sep_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.sep_pw = nn.Conv2d(8, 12, 1, bias=False)
        self.bn3 = bn(12)
        self.pw = nn.Conv2d(12, 6, 1)
        self.fc1 = nn.Linear(6 * (SIZE // 2) ** 2, 16)
        self.bn4 = bn(16, 1)
        self.logits = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x if self.mistake == "padding" else self.pad(x))
        x = torch.relu(self.bn1(x))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.bn3(self.sep_pw(self.sep_dw(x))))
        x = self.pw(x)
        if self.mistake != "activation":
            x = torch.relu(x)
        x = torch.relu(self.bn4(self.fc1(torch.flatten(x, 1))))
        return self.logits(x)


def inputs(n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, CHANNELS)).astype("float32")


def padding_twin() -> Twin:
    """A twin built with symmetric padding where Keras pads asymmetrically (a CLI factory)."""
    return Twin("padding")
