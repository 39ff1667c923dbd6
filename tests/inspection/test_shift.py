"""shift: exact per-layer distances, model untouched, and a real ranking on scikit-learn's digits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import bnkit
from bnkit.core.divergence import gaussian_symmetric_kl
from bnkit.inspection import shift as shift_mod


def _digits_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def digits():
    """A small conv-BN net trained a few seconds on 2/3 of load_digits; the rest is the held-out split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1200], order[1200:]
    torch.manual_seed(0)
    model = _digits_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for epoch in range(5):
        if epoch == 4:  # a last epoch at a low rate, as pretrained models end: running statistics settle
            for group in opt.param_groups:
                group["lr"] = 1e-3
        perm = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))]
        for i in range(0, len(perm) - 31, 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy > 0.8
    return model, x[test]


def test_contrast_shift_ranks_far_above_held_out_split(digits) -> None:
    model, held_out = digits
    contrast = 0.3 * held_out + 0.6
    batches = lambda t: list(t.split(100))  # noqa: E731
    same = bnkit.shift(model, batches(held_out))
    shifted = bnkit.shift(model, batches(contrast))
    assert shifted.score > 100 * same.score
    assert same.recommendation == "keep-frozen"
    assert shifted.recommendation == "recalibrate"
    # every layer moved, not only the first
    assert all(s.distance > 10 * h.distance for s, h in zip(shifted.layers, same.layers, strict=True))


def test_held_out_digits_model_untouched(digits) -> None:
    model, held_out = digits
    state = copy.deepcopy(model.state_dict())
    model.train()
    model[1].eval()
    bnkit.shift(model, [held_out])
    assert model.training and not model[1].training and model[4].training
    assert all(not m._forward_pre_hooks for m in model.modules())
    model.eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_first_layer_distance_is_exact_against_float64() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, eps=1e-3).eval()
    bn.running_mean.copy_(torch.tensor([0.0, 1.0, -2.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    data = torch.randn(300, 3, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.1], dtype=torch.float64) + 5
    uneven = list(data.float().split([7, 100, 193]))
    report = bnkit.shift(nn.Sequential(bn), uneven)
    mean, var = data.mean(0), data.var(0, unbiased=False)
    expected = gaussian_symmetric_kl(bn.running_mean.double(), bn.running_var.double(), mean, var, eps=1e-3)
    layer = report.layers[0]
    assert layer.samples == 300 and report.batches == 3
    assert layer.distance == pytest.approx(float(expected.mean()), rel=1e-5)
    assert layer.max_channel_distance == pytest.approx(float(expected.max()), rel=1e-5)
    z = ((mean - bn.running_mean.double()).abs() / (bn.running_var.double() + 1e-3).sqrt()).mean()
    assert layer.mean_shift == pytest.approx(float(z), rel=1e-5)
    assert report.score == pytest.approx(layer.distance)


def test_bnkit_channels_last_axis_and_batch_forms() -> None:
    torch.manual_seed(0)
    bn = bnkit.BatchNorm(4, axis=-1).eval()
    x = torch.randn(64, 5, 5, 4) * 2 + 3
    report = bnkit.shift(nn.Sequential(bn), [(x, torch.zeros(64))])  # (inputs, labels) batches
    assert report.layers[0].channels == 4 and report.layers[0].samples == 64 * 25
    expected = gaussian_symmetric_kl(
        torch.zeros(4), torch.ones(4), x.double().mean((0, 1, 2)), x.double().var((0, 1, 2), unbiased=False)
    )
    assert report.layers[0].distance == pytest.approx(float(expected.mean()), rel=1e-4)


def test_num_batches_forward_and_skipped_layers() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2, track_running_stats=False)).eval()
    seen = []

    def forward(m, batch):
        seen.append(batch["x"].shape[0])
        return m(batch["x"])

    data = [{"x": torch.randn(8, 2)} for _ in range(5)]
    report = bnkit.shift(model, data, num_batches=2, forward=forward)
    assert seen == [8, 8] and report.batches == 2
    assert [r.name for r in report.layers] == ["0"] and report.skipped == ["1 (track_running_stats=False)"]


def test_recommendation_thresholds() -> None:
    assert shift_mod.recommend(shift_mod.KEEP_FROZEN_BELOW / 2)[0] == "keep-frozen"
    assert shift_mod.recommend(shift_mod.KEEP_FROZEN_BELOW)[0] == "recalibrate"
    assert shift_mod.recommend(shift_mod.FINE_TUNE_ABOVE)[0] == "fine-tune-bn"
    assert shift_mod.recommend(float("inf"))[0] == "fine-tune-bn"
    assert shift_mod.recommend(float("nan"))[0] == "fine-tune-bn"
    assert shift_mod.KEEP_FROZEN_BELOW < shift_mod.FINE_TUNE_ABOVE


def test_report_forms() -> None:
    report = bnkit.shift(nn.Sequential(nn.BatchNorm1d(2)).eval(), [torch.randn(16, 2) + 100])
    data = json.loads(report.to_json())
    assert data["recommendation"] == report.recommendation == "fine-tune-bn"
    assert data["thresholds"] == {
        "keep_frozen_below": shift_mod.KEEP_FROZEN_BELOW,
        "fine_tune_above": shift_mod.FINE_TUNE_ABOVE,
    }
    assert "fine-tune-bn" in str(report) and str(report).startswith("layer")


def test_errors() -> None:
    with pytest.raises(ValueError, match="needs BatchNorm layers with running statistics"):
        bnkit.shift(nn.Sequential(nn.Linear(2, 2)), [torch.randn(4, 2)])
    with pytest.raises(ValueError, match="data yielded no batches"):
        bnkit.shift(nn.Sequential(nn.BatchNorm1d(2)), [])
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match=r"failed on batch 0 \(shape \[4, 3\]\)"):
        bnkit.shift(model, [torch.randn(4, 3)])
    assert model.training and not model[0]._forward_pre_hooks
    with pytest.raises(ValueError, match="num_batches"):
        bnkit.shift(model, [torch.randn(4, 2)], num_batches=0)


def test_frozen_batchnorm_counts_like_a_torch_layer() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    frozen = torchvision.ops.FrozenBatchNorm2d(3)
    torch_bn = nn.BatchNorm2d(3).eval()
    for layer in (frozen, torch_bn):
        layer.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0]))
        layer.running_var.copy_(torch.tensor([1.0, 2.0, 0.5]))
    data = [torch.randn(4, 3, 6, 6) * 2 + 1 for _ in range(3)]
    a, b = bnkit.shift(nn.Sequential(frozen), data), bnkit.shift(nn.Sequential(torch_bn), data)
    assert [layer.name for layer in a.layers] == ["0"] and a.skipped == []
    assert a.layers[0].distance == pytest.approx(b.layers[0].distance, rel=1e-12)
