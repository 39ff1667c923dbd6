"""Every bad input gets a one-line error that names the layer and says what to do, and changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnkit import BatchNorm, Renorm


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _unchanged(bn: BatchNorm, before: dict) -> bool:
    return all(torch.equal(value, before[key]) for key, value in bn.state_dict().items())


@pytest.fixture
def bn() -> BatchNorm:
    layer = BatchNorm(4, name="encoder.bn1")
    layer(torch.randn(8, 4, 2, 2))
    return layer


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.randn(8, 3, 2, 2), "encoder.bn1: expected 4 channels on axis 1, got 3"),
        (torch.randn(4), "encoder.bn1: expected an input of rank >= 2"),
        (torch.randn(1, 4), "encoder.bn1: only one value per channel in training"),
        (torch.randn(1, 4, 1, 1), "freeze_stats=True or call eval"),
        (torch.ones(2, 4, dtype=torch.long), "floating-point input"),
    ],
)
def test_bad_inputs(bn: BatchNorm, x: torch.Tensor, match: str) -> None:
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises((ValueError, TypeError), match=match) as excinfo:
        bn(x)
    _one_line(excinfo)
    assert _unchanged(bn, before)


def test_batch_of_one_is_fine_in_eval_and_with_frozen_stats(bn: BatchNorm) -> None:
    assert bn.eval()(torch.randn(1, 4)).shape == (1, 4)
    bn.train()
    bn.freeze_stats = True
    assert bn(torch.randn(1, 4)).shape == (1, 4)


def test_axis_out_of_range() -> None:
    with pytest.raises(ValueError, match="axis 3 is out of range for an input of rank 2") as excinfo:
        BatchNorm(4, axis=3)(torch.randn(2, 4))
    _one_line(excinfo)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.ones(8, 2, dtype=torch.bool), r"mask must be a bool tensor of shape \(8, 2, 2\)"),
        (torch.ones(8, 2, 2), "Received: \\(8, 2, 2\\) torch.float32"),
        ([[True]], "Received: list"),
    ],
)
def test_bad_masks(bn: BatchNorm, mask, match: str) -> None:
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match=match) as excinfo:
        bn(torch.randn(8, 4, 2, 2), mask=mask)
    _one_line(excinfo)
    assert _unchanged(bn, before)


def test_mask_leaving_a_single_value_gives_beta_and_updates_nothing(bn: BatchNorm) -> None:
    # decided on the device (no host sync): one value per channel has no variance, so, as in Keras, the output
    # is beta and the running statistics (and num_batches_tracked) stay as they were
    mask = torch.zeros(8, 2, 2, dtype=torch.bool)
    mask[3, 1, 0] = True
    with torch.no_grad():
        bn.bias.copy_(torch.arange(4.0))
    before = copy.deepcopy(bn.state_dict())
    y = bn(torch.randn(8, 4, 2, 2), mask=mask)
    assert torch.equal(y[3, :, 1, 0], bn.bias.detach())
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items()) and int(bn.skipped_batches) == 0


def test_state_dict_of_wrong_shape_names_layer_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(3, 4), BatchNorm(4))
    before = copy.deepcopy(model[1].state_dict())
    state = nn.BatchNorm1d(5).state_dict()
    with pytest.raises(ValueError, match=r"BatchNorm\(4\): state dict entry 'weight' has shape \(5,\)") as excinfo:
        model[1].load_state_dict(state)
    _one_line(excinfo)
    assert _unchanged(model[1], before)
    with pytest.raises(ValueError, match=r"^1: state dict entry"):
        model.load_state_dict({**model.state_dict(), "1.running_mean": torch.zeros(5)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_features": 0}, "num_features must be a positive int"),
        ({"num_features": 4, "momentum": 0.99 + 1}, "weight of the NEW batch"),
        ({"num_features": 4, "eps": -1.0}, "eps must be > 0"),
        ({"num_features": 4, "virtual_batch_size": 0}, "virtual_batch_size must be a positive int"),
        ({"num_features": 4, "on_nonfinite": "ignore"}, "on_nonfinite must be one of 'skip', 'raise', 'warn'"),
        ({"num_features": 4, "renorm": True, "track_running_stats": False}, "renorm needs running statistics"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as excinfo:
        BatchNorm(**kwargs)
    _one_line(excinfo)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rmax": 0.5}, "rmax must be >= 1"),
        ({"dmax": -1.0}, "dmax must be >= 0"),
        ({"rmin": 5.0}, "need 0 <= rmin <= rmax"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ],
)
def test_bad_renorm_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Renorm(**kwargs)


def test_bad_keras_arguments() -> None:
    with pytest.raises(ValueError, match="unknown renorm_clipping keys"):
        BatchNorm.from_keras(3, renorm=True, renorm_clipping={"rmax": 2.0, "r_max": 1.0})
    with pytest.raises(ValueError, match="weight of the OLD value"):
        BatchNorm.from_keras(3, momentum=1.5)


def test_from_torch_rejects_non_batchnorm() -> None:
    with pytest.raises(TypeError, match="Received: LayerNorm"):
        BatchNorm.from_torch(nn.LayerNorm(3))
