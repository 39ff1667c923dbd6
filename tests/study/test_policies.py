"""Each policy trains exactly what it says, through bnkit's public API, and never touches the source model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnkit.study.data import Dataset, make_domain, make_splits
from bnkit.study.model import DigitsNet
from bnkit.study.policies import POLICIES, FinetuneSettings, apply_policy, resolve_policy

SETTINGS = FinetuneSettings(epochs=2, batch_size=16, lr=1e-2)


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Dataset]:
    torch.manual_seed(0)
    splits = make_splits(0, target_per_class=8)
    model = DigitsNet()
    # a few steps so the running statistics are not the initial 0/1
    model.train()
    with torch.no_grad():
        model(splits.source_train.x[:256])
    return model.eval(), make_domain(splits.target_train, "contrast", seed=0)


def _groups(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return {
        "conv": [c.weight for c in convs],
        "head": [model.head.weight, model.head.bias],
        "bn_affine": [p for b in bns for p in (b.weight, b.bias)],
        "bn_stats": [t for b in bns for t in (b.running_mean, b.running_var)],
    }


def _changed(before: nn.Module, after: nn.Module) -> set[str]:
    a, b = _groups(before), _groups(after)
    return {k for k in a if any(not torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True))}


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("source", set()),
        ("head", {"head"}),
        ("all_bn_frozen", {"conv", "head"}),
        ("all", {"conv", "head", "bn_affine", "bn_stats"}),
        ("bn_only", {"bn_affine", "bn_stats"}),
        ("recalibrate", {"bn_stats"}),
        ("recalibrate_head", {"bn_stats", "head"}),
    ],
)
def test_policy_changes_exactly_its_parts(setup: tuple[nn.Module, Dataset], policy: str, expected: set) -> None:
    model, data = setup
    original = copy.deepcopy(model.state_dict())
    adapted = apply_policy(policy, model, data, SETTINGS, seed=0)
    assert _changed(model, adapted) == expected
    assert not adapted.training
    for key, value in model.state_dict().items():  # the source model is untouched
        assert torch.equal(value, original[key]), key


def test_recalibration_is_the_population_statistics_of_the_target(setup: tuple[nn.Module, Dataset]) -> None:
    model, data = setup
    adapted = apply_policy("recalibrate", model, data, SETTINGS, seed=0)
    with torch.no_grad():
        conv_out = model.features[0](data.x).double()  # the first BN sees the first conv's output
    mean = conv_out.mean(dim=(0, 2, 3))
    var = conv_out.var(dim=(0, 2, 3), unbiased=True)
    bn = adapted.features[1]
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_frozen_bn_stays_in_inference_mode_under_train(setup: tuple[nn.Module, Dataset]) -> None:
    model, data = setup
    adapted = apply_policy("all_bn_frozen", model, data, SETTINGS, seed=0)
    adapted.train()
    x = data.x[:8]
    with torch.no_grad():
        train_out = adapted(x)
        adapted.eval()
        eval_out = adapted(x)
    torch.testing.assert_close(train_out, eval_out)


def test_policy_numbers_and_errors() -> None:
    assert [resolve_policy(str(p.number)) for p in POLICIES.values()] == list(POLICIES)
    with pytest.raises(ValueError, match="unknown policy 'freeze'"):
        resolve_policy("freeze")
    with pytest.raises(ValueError, match="no module named 'classifier'"):
        apply_policy(
            "head",
            DigitsNet(),
            Dataset(torch.rand(4, 1, 8, 8), torch.arange(4)),
            FinetuneSettings(head="classifier"),
            seed=0,
        )
