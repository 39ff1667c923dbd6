"""summary: Keras-style counts checked against Keras 3 itself (torch backend), PyTorch-style against torch."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

import bnkit

os.environ.setdefault("KERAS_BACKEND", "torch")


def _acceptance_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.Flatten(),
        nn.Linear(32 * 64 * 64, 100),
        nn.Linear(100, 10),
    )


def _keras_model(freeze: tuple[str, ...] = ()):
    import keras

    layers = {
        "conv": keras.layers.Conv2D(32, 3, padding="same", name="conv"),
        "bn": keras.layers.BatchNormalization(name="bn"),
        "flatten": keras.layers.Flatten(name="flatten"),
        "dense1": keras.layers.Dense(100, name="dense1"),
        "dense2": keras.layers.Dense(10, name="dense2"),
    }
    for name in freeze:
        layers[name].trainable = False
    return keras.Sequential([keras.Input((64, 64, 1)), *layers.values()])


def _keras_counts(model) -> tuple[int, int, int]:
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    non_trainable = sum(int(w.numpy().size) for w in model.non_trainable_weights)
    return model.count_params(), trainable, non_trainable


def test_acceptance_numbers() -> None:
    s = bnkit.summary(_acceptance_model(), input_size=(1, 64, 64))
    assert (s.total, s.trainable, s.non_trainable) == (13_108_758, 13_108_694, 64)
    assert (s.parameters, s.trainable_parameters, s.buffers) == (13_108_694, 13_108_694, 65)
    assert [r.output_shape for r in s.rows] == [[-1, 32, 64, 64], [-1, 32, 64, 64], [-1, 131072], [-1, 100], [-1, 10]]
    text = str(s)
    assert "13,108,758" in text and "13,108,694" in text and "non-trainable 64" in text


# torch module index per Keras layer name
_TORCH_INDEX = {"conv": 0, "bn": 1, "dense1": 3, "dense2": 4}


@pytest.mark.parametrize("frozen", [(), ("bn",), ("dense2",), ("conv", "bn")])
def test_keras_style_equals_keras(frozen: tuple[str, ...]) -> None:
    """Keras's trainable=False on a layer == requires_grad=False (BN: bnkit.freeze) on the torch layer."""
    keras_total, keras_trainable, keras_non_trainable = _keras_counts(_keras_model(frozen))
    model = _acceptance_model()
    for name in frozen:
        layer = model[_TORCH_INDEX[name]]
        if name == "bn":
            bnkit.freeze(model, layers=str(_TORCH_INDEX[name]))
        else:
            layer.requires_grad_(False)
    s = bnkit.summary(model)
    assert (s.total, s.trainable, s.non_trainable) == (keras_total, keras_trainable, keras_non_trainable)


def test_keras_style_per_layer_equals_keras() -> None:
    keras_model = _keras_model()
    rows = {r.name: r for r in bnkit.summary(_acceptance_model()).rows}
    for keras_name, index in _TORCH_INDEX.items():
        assert rows[str(index)].total == keras_model.get_layer(keras_name).count_params()


def test_bnkit_batchnorm_counts_like_torch_and_keras() -> None:
    model = nn.Sequential(nn.Linear(4, 6), bnkit.BatchNorm(6))
    s = bnkit.summary(model)
    assert (s.total, s.trainable, s.non_trainable) == (30 + 24, 30 + 12, 12)
    assert (s.parameters, s.buffers) == (42, 13)
    model[1].trainable = False
    s = bnkit.summary(model)
    assert (s.trainable, s.non_trainable) == (30, 24)


def test_pytorch_style_equals_parameters_and_buffers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model[0].requires_grad_(False)
    model.register_buffer("scale", torch.ones(7))
    s = bnkit.summary(model)
    assert s.parameters == sum(p.numel() for p in model.parameters())
    assert s.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert s.buffers == sum(b.numel() for b in model.buffers())
    # other buffers are not Keras weights; frozen conv parameters are non-trainable
    assert s.non_trainable == sum(p.numel() for p in model[0].parameters()) + 16
    assert s.total == s.trainable + s.non_trainable
    assert sum(r.total for r in s.rows) == s.total


def test_shared_parameters_counted_once() -> None:
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    s = bnkit.summary(model)
    assert s.parameters == 30 == sum(p.numel() for p in model.parameters())


def test_multiple_inputs_and_bad_input_size() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    s = bnkit.summary(Two(), input_size=[(3,), (4,)])
    assert [r.output_shape for r in s.rows if r.name] == [[-1, 2], [-1, 2]]
    with pytest.raises(ValueError, match=r"input_size \[1, 32, 32\] .* does not fit the model"):
        bnkit.summary(_acceptance_model(), input_size=(1, 32, 32))


def test_summary_changes_nothing() -> None:
    model = _acceptance_model()
    model[1].train()
    state = copy.deepcopy(model.state_dict())
    bnkit.summary(model, input_size=(1, 64, 64))
    assert model[1].training and model.training
    assert not model[1]._forward_hooks and not model._forward_hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_json() -> None:
    data = json.loads(bnkit.summary(_acceptance_model()).to_json())
    assert data["total"] == 13_108_758 and data["rows"][1]["non_trainable"] == 64


def test_saved_torchscript_file_counts_the_statistics(tmp_path) -> None:
    path = tmp_path / "seed.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.x deprecates TorchScript
        torch.jit.save(torch.jit.script(_acceptance_model()), str(path))
        loaded = torch.jit.load(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bnkit says nothing: a TorchScript model keeps no classes to recognise
        s = bnkit.summary(loaded)
    assert (s.total, s.trainable, s.non_trainable) == (13_108_758, 13_108_694, 64)
    assert [r.type for r in s.rows] == ["Conv2d", "BatchNorm2d", "Flatten", "Linear", "Linear"]


def test_frozen_batchnorm_counts_all_four_tensors_as_non_trainable() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), torchvision.ops.FrozenBatchNorm2d(8))
    s = bnkit.summary(model)
    assert (s.trainable, s.non_trainable, s.total) == (72, 32, 104)
    assert (s.parameters, s.buffers) == (72, 32)
    assert s.rows[1].type == "FrozenBatchNorm2d" and s.rows[1].non_trainable == 32


def test_example_inputs_follow_the_one_convention() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
    by_size = bnkit.summary(model, input_size=(1, 8, 8))
    by_example = bnkit.summary(model, example_inputs=torch.randn(3, 1, 8, 8))
    assert [r.output_shape for r in by_example.rows] == [r.output_shape for r in by_size.rows]

    class TakesAList(nn.Module):  # a detector's convention: one positional list of images
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(1)

        def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([self.bn(image[None])[0] for image in images])

    s = bnkit.summary(TakesAList(), example_inputs=[torch.randn(1, 5, 5), torch.randn(1, 5, 5)])
    assert s.rows[-1].output_shape == [-1, 1, 5, 5]
    with pytest.raises(ValueError, match="give input_size or example_inputs, not both"):
        bnkit.summary(model, (1, 8, 8), example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="example_inputs do not fit the model"):
        bnkit.summary(model, example_inputs=torch.randn(3, 2, 8, 8))


def test_unrecognised_running_statistics_warn() -> None:
    class Stats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(2))
            self.register_buffer("running_var", torch.ones(2))

    with pytest.warns(UserWarning, match=r"summary: 0 hold running statistics but bnkit does not recognise"):
        s = bnkit.summary(nn.Sequential(Stats()))
    assert s.non_trainable == 4
