"""bnkit.fuse and the fold functions of bnkit.core.fold.

Oracles: the unfused torch model in eval mode (float32 outputs to 1e-5 of their scale), float64 references for the
fold functions, torch.nn.utils.fusion where it is right (groups=1), onnxruntime for the ONNX export.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

import bnkit
from bnkit.core.fold import fold_after_conv, fold_after_linear, fold_before_conv, fold_before_linear
from bnkit.tools.fuse import FuseReport, fuse, fuse_with_report
from bnkit.tools.fuse.trace import Tracer

# ---------------------------------------------------------------------------------------------- helpers


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, so that every fold changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if bnkit.is_batchnorm(m) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def assert_matches(fused: nn.Module, model: nn.Module, *args: torch.Tensor, rel: float = 1e-5) -> None:
    """Fused eval output equals the original's eval output to ``rel`` of the output's scale."""
    reference_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = reference_model(*args)
        got = fused(*args)
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=rel, atol=rel * scale)


def bn_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if bnkit.is_batchnorm(m))


def folded(report: FuseReport) -> dict[str, tuple[str, str]]:
    return {f.bn: (f.into, f.position) for f in report.folded}


def skipped(report: FuseReport) -> dict[str, str]:
    return {s.bn: s.reason for s in report.skipped}


def assert_folds(
    model: nn.Module, x: torch.Tensor, expected: dict[str, tuple[str, str]]
) -> tuple[nn.Module, FuseReport]:
    """Fuse on ``x``: exactly the ``expected`` folds (``{bn: (into, position)}``), and the output is unchanged."""
    fused, report = fuse_with_report(model, x)
    assert folded(report) == expected
    assert_matches(fused, model, x)
    return fused, report


def assert_folds_nothing(model: nn.Module, x: torch.Tensor, bn: str, reason: str) -> None:
    """Fuse on ``x``: nothing folds (a warning says so), ``bn`` is skipped for a reason containing ``reason``, the
    output is unchanged."""
    with pytest.warns(UserWarning, match="could be folded"):
        fused, report = fuse_with_report(model, x)
    assert report.folded == [] and reason in skipped(report)[bn]
    assert_matches(fused, model, x)


class Block(nn.Module):
    """ResNet basic block with a projection shortcut (conv + BN) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.ModuleList([Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1)])
        self.head = nn.Linear(16, 5)
        self.head_bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head_bn(self.head(x.mean(dim=(2, 3))))


def resnet_style() -> nn.Module:
    torch.manual_seed(0)
    return randomize(ResNetStyle())


# ---------------------------------------------------------------------------------------------- model level


def test_resnet_style_model_with_residual_additions_fuses_every_bn():
    model = resnet_style()
    x = torch.randn(2, 3, 16, 16)
    fused, report = fuse_with_report(model, x)
    assert bn_count(model) == 9 and bn_count(fused) == 0
    assert report.skipped == [] and len(report.folded) == 9
    assert folded(report)["blocks.1.short.1"] == ("blocks.1.short.0", "after")
    assert folded(report)["head_bn"] == ("head", "after")
    assert isinstance(fused, ResNetStyle) and not fused.training
    assert fused.bnkit_fuse_report is report
    assert report.checked and report.max_abs_diff <= report.tolerance
    assert_matches(fused, model, x)


def test_resnet_style_agrees_with_torch_fx_fuse_where_that_is_right():
    model = resnet_style()
    x = torch.randn(2, 3, 16, 16)
    from torch.fx.experimental.optimization import fuse as fx_fuse

    ours = fuse(model, x)
    theirs = fx_fuse(copy.deepcopy(model).eval())
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.stem.weight, theirs.stem.weight, rtol=1e-6, atol=1e-7)


def test_original_model_is_never_mutated_and_keeps_its_training_flag():
    model = resnet_style().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse(model, torch.randn(2, 3, 16, 16))
    assert model.training and all(m.training for m in model.modules())
    assert bn_count(model) == 9
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert fused is not model and not fused.training


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_grouped_dilated_conv_transpose_is_exact_where_torch_fuse_is_not(dim: int, groups: int):
    torch.manual_seed(dim * 10 + groups)
    conv_t = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    model = randomize(
        nn.Sequential(conv_t(8, 12, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=groups), bn(12))
    )
    x = torch.randn(2, 8, *([5] * dim))
    assert_folds(model, x, {"1": ("0", "after")})

    # torch's fuser scales weight dim 1 by the whole vector: right for groups=1 only (pytorch#180995); with
    # groups > 1 its weights have the wrong shape, so building or running the fused layer fails (torch 2.13).
    c, b = model[0], model[1]

    def torch_fused_output() -> torch.Tensor | None:
        try:
            w, bias = fuse_conv_bn_weights(
                c.weight, c.bias, b.running_mean, b.running_var, b.eps, b.weight, b.bias, transpose=True
            )
            layer = copy.deepcopy(c)
            layer.weight, layer.bias = w, bias
            with torch.no_grad():
                return layer(x)
        except RuntimeError:
            return None

    theirs = torch_fused_output()
    with torch.no_grad():
        expected = model.eval()(x)
    if groups == 1:
        torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    else:
        assert theirs is None or theirs.shape != expected.shape or not torch.allclose(theirs, expected)


@pytest.mark.parametrize("dim", [1, 3])
def test_conv1d_and_conv3d_with_stride_dilation_groups(dim: int):
    torch.manual_seed(dim)
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dim]
    bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dim]
    model = randomize(nn.Sequential(conv(4, 6, 3, stride=2, dilation=2, groups=2, padding=2), bn(6), nn.ReLU()))
    x = torch.randn(3, 4, *([9] * dim))
    assert_folds(model, x, {"1": ("0", "after")})


def test_linear_without_bias_then_bn1d_without_affine():
    torch.manual_seed(1)
    model = randomize(nn.Sequential(nn.Linear(6, 4, bias=False), nn.BatchNorm1d(4, affine=False)))
    x = torch.randn(5, 6)
    fused, _ = assert_folds(model, x, {"1": ("0", "after")})
    assert fused[0].bias is not None and fused[0].bias.requires_grad


def test_bn1d_after_linear_on_3d_input_is_not_folded():
    # Linear works on the last axis, BatchNorm1d on axis 1; equal sizes must not fool the fuser.
    torch.manual_seed(2)
    model = randomize(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)))
    x = torch.randn(2, 5, 4)
    assert_folds_nothing(model, x, "1", "rank 3")


def test_bn_before_padded_conv_is_not_folded_because_borders_would_break():
    torch.manual_seed(3)
    model = randomize(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)))
    x = torch.randn(2, 4, 7, 7)
    assert_folds_nothing(model, x, "0", "zero padding")

    # The rule matters: folding anyway is right in the interior and wrong on the border.
    bn, conv = model[0].eval(), model[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    wrong = copy.deepcopy(conv)
    with torch.no_grad():
        w, b = fold_before_conv(conv.weight, conv.bias, scale, shift)
        wrong.weight.copy_(w)
        wrong.bias.copy_(b)
        error = (wrong(x) - model.eval()(x)).abs()
    assert error[..., 1:-1, 1:-1].max() < 1e-5 and error[..., 0, :].max() > 1e-2


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(4, 6, 3),
        nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2),
        nn.Conv2d(4, 6, 3, padding="valid"),
        nn.Conv2d(4, 6, 1, padding="same"),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 6, 3, padding=2, padding_mode="circular"),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"),
        nn.ConvTranspose2d(4, 6, 1, groups=2),
    ],
    ids=["plain", "strided-grouped", "valid", "same-1x1", "reflect", "circular", "replicate", "convT-1x1"],
)
def test_bn_before_conv_is_folded_where_exact(layer: nn.Module):
    torch.manual_seed(4)
    model = randomize(nn.Sequential(nn.BatchNorm2d(4), layer))
    x = torch.randn(2, 4, 9, 9)
    assert_folds(model, x, {"0": ("1", "before")})


def test_bn_before_strided_conv_transpose_is_not_folded():
    model = randomize(nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3, stride=2)))
    x = torch.randn(2, 4, 5, 5)
    assert_folds_nothing(model, x, "0", "fewer taps")


def test_bn_before_linear_is_folded_and_bnkit_channels_last_too():
    torch.manual_seed(5)
    model = randomize(
        nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3), nn.Unflatten(1, (1, 3)), bnkit.BatchNorm(3, axis=-1))
    )
    x = torch.randn(4, 6)
    _, report = assert_folds(model, x, {"0": ("1", "before")})
    assert "3" in skipped(report)  # after Unflatten, not after the Linear
    model2 = randomize(nn.Sequential(bnkit.BatchNorm(6, axis=-1), nn.Linear(6, 3), bnkit.BatchNorm(3, axis=-1)))
    x2 = torch.randn(2, 7, 6)
    assert_folds(model2, x2, {"2": ("1", "after"), "0": ("1", "before")})


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)  # its producer's output also feeds the skip connection
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)  # its output feeds two branches: fine, it folds into conv2
        self.left = nn.Conv2d(4, 2, 1)
        self.right = nn.Conv2d(4, 2, 3)
        self.bn3 = nn.BatchNorm2d(2)  # before two unpadded convs: two consumers, not foldable before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn2(self.conv2(self.bn(y) + y))
        a = self.left(z)
        return self.bn3(a + 1)[..., 1:-1, 1:-1] + self.right(z)


def test_bn_whose_producer_feeds_two_branches_is_folded_only_where_exact():
    torch.manual_seed(6)
    model = randomize(TwoBranches())
    x = torch.randn(2, 3, 8, 8)
    _, report = assert_folds(model, x, {"bn2": ("conv2", "after")})
    reasons = skipped(report)
    assert "conv's output also feeds 1 other consumer" in reasons["bn"]
    assert "`add` is not a Conv" in reasons["bn3"]


class SharedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return self.a(y) + self.b(y)


def test_bn_feeding_two_consumers_is_not_folded_before_either():
    model = randomize(SharedInput())
    x = torch.randn(2, 3, 4, 4)
    assert_folds_nothing(model, x, "bn", "feeds 2 consumers")


def test_chains_of_batchnorms_collapse_into_one_layer():
    torch.manual_seed(7)
    model = randomize(
        nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 2), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    )
    x = torch.randn(2, 3, 6, 6)
    fused, report = fuse_with_report(model, x)
    assert set(folded(report)) == {"0", "1", "3", "4"} and bn_count(fused) == 0
    assert_matches(fused, model, x)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.conv(x)))


def test_layer_called_twice_or_registered_twice_is_left_alone():
    model = randomize(Shared())
    x = torch.randn(2, 3, 4, 4)
    assert_folds_nothing(model, x, "bn", "called 2 times")

    conv = nn.Conv2d(3, 3, 1)
    aliased = randomize(nn.Sequential(conv, nn.BatchNorm2d(3)))
    aliased.alias = conv  # the same conv under a second name
    assert_folds_nothing(aliased, x, "1", "several names")


def test_syncbn_and_bnkit_batchnorm_fold_and_unfoldable_ones_are_reported():
    torch.manual_seed(8)

    class BNAct(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(x))

    model = randomize(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.SyncBatchNorm(4),
            nn.Conv2d(4, 4, 3),
            bnkit.BatchNorm(4),
            nn.Conv2d(4, 4, 3),
            BNAct(4),
            nn.Conv2d(4, 4, 3),
            nn.BatchNorm2d(4, track_running_stats=False),
            nn.Conv2d(4, 4, 1),
            bnkit.BatchNorm(4, track_running_stats=False),
            nn.Conv2d(4, 4, 1),
            nn.Flatten(2),
            bnkit.BatchNorm(4),
        )
    )
    x = torch.randn(2, 3, 12, 12)
    fused, report = assert_folds(model, x, {"1": ("0", "after"), "3": ("2", "after")})
    reasons = skipped(report)
    assert "overrides forward" in reasons["5"]
    assert "batch statistics" in reasons["7"] and "batch statistics" in reasons["9"]
    assert "Flatten" in reasons["12"]
    assert isinstance(fused[5], BNAct)


def test_bnkit_batchnorm_on_a_non_channel_axis_is_not_folded_into_a_conv():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 1), bnkit.BatchNorm(4, axis=-1)))
    x = torch.randn(2, 3, 5, 4)
    assert_folds_nothing(model, x, "1", "not the channel axis 1")


class Untraceable(nn.Module):
    """Data-dependent control flow in the root's forward: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.sum() > 0:
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_forward_still_fuses_its_traceable_parts():
    model = randomize(Untraceable())
    x = torch.randn(2, 3, 6, 6)
    _, report = assert_folds(model, x, {"features.1": ("features.0", "after")})
    assert "cannot trace" in skipped(report)["bn"]
    assert any("cannot trace" in note for note in report.notes)

    wrapped = randomize(nn.Sequential(Untraceable(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3)))
    assert_folds(wrapped, x, {"2": ("1", "after"), "0.features.1": ("0.features.0", "after")})


def test_module_patterns_are_used_when_tracing_fails(monkeypatch: pytest.MonkeyPatch):
    def broken(self, root, concrete_args=None):
        raise RuntimeError("tracing unavailable")

    monkeypatch.setattr(Tracer, "trace", broken)
    model = randomize(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 2, 1),
            nn.BatchNorm2d(2),
            nn.BatchNorm2d(2),
            nn.Conv2d(2, 2, 3, padding=1),
        )
    )
    x = torch.randn(2, 3, 6, 6)
    _, report = assert_folds(model, x, {"1": ("0", "after"), "3": ("4", "before"), "5": ("4", "after")})
    assert "zero padding" in skipped(report)["6"]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc, self.fc_bn = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(image)).mean(dim=(2, 3)) + self.fc_bn(self.fc(vector))


@pytest.mark.parametrize("convention", ["tuple", "mapping", "callable"])
def test_example_inputs_follow_the_one_calling_convention(convention: str):
    model = randomize(TwoInputs())
    image, vector = torch.randn(2, 3, 6, 6), torch.randn(2, 5)
    example = {
        "tuple": (image, vector),
        "mapping": {"image": image, "vector": vector},
        "callable": lambda m: m(image, vector=vector),
    }[convention]
    fused, report = fuse_with_report(model, example)
    assert folded(report) == {"bn": ("conv", "after"), "fc_bn": ("fc", "after")} and report.compared == 8
    assert_matches(fused, model, image, vector)


def test_example_inputs_are_not_changed_by_an_in_place_first_layer():
    model = randomize(nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    before = x.clone()
    fused, report = fuse_with_report(model, x)
    assert torch.equal(x, before) and len(report.folded) == 1
    assert_matches(fused, model, x.clone())


def test_check_failure_raises_one_line_and_leaves_the_model_untouched():
    model = resnet_style()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    for inplace in (False, True):
        with pytest.raises(ValueError, match=r"differs from ResNetStyle.*first after folding .* into ") as info:
            fuse(model, x, atol=0.0, rtol=0.0, inplace=inplace)
        assert "\n" not in str(info.value)
        assert bn_count(model) == 9 and model.training
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class NoDetections(nn.Module):
    """Keeps only the rows whose score passes a threshold none reaches: an empty output, like a detector with no
    detections."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.bn(self.conv(x)).mean(dim=(2, 3))
        keep = scores.amax(dim=1) > 1e6
        return {"scores": scores[keep], "labels": scores.argmax(dim=1)[keep]}


def test_check_that_compared_nothing_fails_in_one_line_and_leaves_the_model_untouched(snapshot, same):
    model = randomize(NoDetections())
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    for inplace in (False, True):
        with pytest.raises(
            ValueError, match=r"check compared nothing: NoDetections returned 2 tensors, all empty"
        ) as info:
            fuse(model, x, inplace=inplace)
        assert "\n" not in str(info.value) and "produces output" in str(info.value)
        same(before, snapshot(model))
    _, report = fuse_with_report(model, x, check=False)  # unchecked, it folds
    assert folded(report) == {"bn": ("conv", "after")} and not report.checked and report.compared is None


def test_compared_values_are_counted_and_reported():
    model = resnet_style()
    _, report = fuse_with_report(model, torch.randn(2, 3, 16, 16))
    assert report.compared == 2 * 5 and "over 10 output values" in str(report)


class RunningStatsNorm(nn.Module):
    """A normalisation layer of its own with running statistics, that bnkit cannot know."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean[:, None, None]) / (self.running_var[:, None, None] + 1e-3).sqrt() * 2


def test_unrecognised_modules_with_running_statistics_are_named_in_a_warning_and_the_report():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), RunningStatsNorm(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"fuse: modules with running statistics .* left out: 1; teach bnkit"):
        fused, report = fuse_with_report(model, x)
    assert report.unrecognised == ["1"] and folded(report) == {"3": ("2", "after")}
    assert "unrecognised: 1 module(s)" in str(report) and report.to_dict()["unrecognised"] == ["1"]
    assert_matches(fused, model, x)

    only_foreign = nn.Sequential(nn.Conv2d(3, 4, 3), RunningStatsNorm(4))
    with pytest.warns(UserWarning) as caught:
        fuse(only_foreign, x)
    messages = [str(w.message) for w in caught]
    assert any("left out: 1;" in m for m in messages) and any("has no BatchNorm layer bnkit" in m for m in messages)
    with pytest.warns(UserWarning, match=r"Sequential has no BatchNorm layer bnkit recognises; nothing was folded$"):
        fuse(nn.Sequential(nn.Conv2d(3, 4, 3)), x)


def test_inplace_folds_into_the_model_itself():
    model = resnet_style()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    fused = fuse(model, x, inplace=True)
    assert fused is model and bn_count(model) == 0 and not model.training
    assert isinstance(model.blocks[1].bn1, nn.Identity)
    assert_matches(model, reference, x)


def test_generated_inputs_and_their_limits():
    model = resnet_style()
    fused, report = fuse_with_report(model)  # inputs generated from the stem: [2, 3, 32, 32]
    assert bn_count(fused) == 0 and report.checked
    assert any("(2, 3, 32, 32)" in note for note in report.notes)
    assert_matches(fused, model, torch.randn(1, 3, 20, 20))

    class NeedsTwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + y

    with pytest.raises(ValueError, match="cannot generate example inputs for NeedsTwoInputs"):
        fuse(NeedsTwoInputs())
    _, report2 = fuse_with_report(NeedsTwoInputs(), check=False)
    assert folded(report2) == {"bn": ("conv", "after")} and not report2.checked
    assert "rank not verified" in report2.folded[0].note


def test_bad_arguments_give_one_line_errors():
    with pytest.raises(TypeError, match=r"expected an nn\.Module"):
        fuse("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Sequential failed on example_inputs"):
        fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(2, 5, 8, 8))


def test_dtype_device_requires_grad_are_kept_and_fused_model_pickles(tmp_path):
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).double()
    model[0].weight.requires_grad_(False)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    fused = fuse(model, x)
    assert fused[0].weight.dtype == torch.float64 and fused[0].bias.dtype == torch.float64
    assert not fused[0].weight.requires_grad and not fused[0].bias.requires_grad
    assert_matches(fused, model, x, rel=1e-12)
    path = tmp_path / "fused.pt"
    torch.save(fused, path)
    loaded = torch.load(path, weights_only=False)
    assert isinstance(loaded.bnkit_fuse_report, FuseReport)
    torch.testing.assert_close(loaded(x), fused(x), rtol=0, atol=0)
    assert pickle.loads(pickle.dumps(fused.bnkit_fuse_report)) == fused.bnkit_fuse_report


def test_report_is_readable_and_serialisable():
    model = randomize(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))
    )
    _, report = fuse_with_report(model, torch.randn(2, 3, 5, 5))
    text = str(report)
    assert "folded  1 -> 0 (after)" in text and "skipped 2:" in text and "check:" in text
    assert report.to_dict()["folded"][0] == {"bn": "1", "into": "0", "position": "after", "note": ""}


# ---------------------------------------------------------------------------------------------- ONNX


def test_onnx_export_of_fused_model_has_no_batchnorm_and_onnxruntime_agrees():
    import onnx
    import onnxruntime

    model = resnet_style()
    x = torch.randn(2, 3, 16, 16)
    fused = fuse(model, x)

    def export(m: nn.Module) -> bytes:
        buffer = io.BytesIO()
        torch.onnx.export(m, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"])
        return buffer.getvalue()

    def op_types(blob: bytes) -> set[str]:
        return {node.op_type for node in onnx.load_from_string(blob).graph.node}

    assert "BatchNormalization" in op_types(export(copy.deepcopy(model).eval()))  # the assertion below can fail
    blob = export(fused)
    assert "BatchNormalization" not in op_types(blob)
    session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


# ---------------------------------------------------------------------------------------------- fold functions


def conv_cls(dim: int, transposed: bool) -> type[nn.Module]:
    if transposed:
        return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]


def channel_view(v: torch.Tensor, dim: int) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * dim))


conv_configs = st.fixed_dictionaries(
    {
        "dim": st.integers(1, 3),
        "transposed": st.booleans(),
        "groups": st.sampled_from([1, 2, 3]),
        "in_per_group": st.integers(1, 3),
        "out_per_group": st.integers(1, 3),
        "kernel": st.integers(1, 3),
        "stride": st.integers(1, 3),
        "dilation": st.integers(1, 2),
        "padding": st.integers(0, 2),
        "bias": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def build_conv(c: dict, *, for_before: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(c["seed"])
    cin, cout = c["groups"] * c["in_per_group"], c["groups"] * c["out_per_group"]
    kwargs = dict(stride=c["stride"], dilation=c["dilation"], groups=c["groups"], bias=c["bias"])
    if for_before and c["transposed"]:  # exact only for unit kernel and stride; padding crops
        kwargs.update(stride=1, padding=0)
        layer = conv_cls(c["dim"], True)(cin, cout, 1, **kwargs)
    elif for_before:
        layer = conv_cls(c["dim"], False)(cin, cout, c["kernel"], padding=0, **kwargs)
    else:
        padding = min(c["padding"], c["dilation"] * (c["kernel"] - 1)) if c["transposed"] else c["padding"]
        layer = conv_cls(c["dim"], c["transposed"])(cin, cout, c["kernel"], padding=padding, **kwargs)
    size = 7 if c["dim"] < 3 else 5
    x = torch.randn(2, cin, *([size] * c["dim"]), dtype=torch.float64)
    return layer.double(), x


def assert_conv_fold(
    layer: nn.Module,
    x: torch.Tensor,
    c: dict,
    fold: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    scale: torch.Tensor,
    shift: torch.Tensor,
    expected: torch.Tensor,
) -> None:
    """``fold`` gives ``layer`` weights whose float64 output on ``x`` is ``expected`` to 1e-10."""
    with torch.no_grad():
        w, b = fold(layer.weight, layer.bias, scale, shift, transposed=c["transposed"], groups=c["groups"])
        layer.weight.copy_(w)
        layer.bias = nn.Parameter(b)
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@given(conv_configs)
def test_fold_after_conv_matches_float64_reference(c: dict):
    layer, x = build_conv(c)
    out_channels = layer.out_channels
    scale = torch.randn(out_channels, dtype=torch.float64)
    shift = torch.randn(out_channels, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x) * channel_view(scale, c["dim"]) + channel_view(shift, c["dim"])
    assert_conv_fold(layer, x, c, fold_after_conv, scale, shift, expected)


@given(conv_configs)
def test_fold_before_conv_matches_float64_reference_where_exact(c: dict):
    layer, x = build_conv(c, for_before=True)
    scale = torch.randn(layer.in_channels, dtype=torch.float64)
    shift = torch.randn(layer.in_channels, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x * channel_view(scale, c["dim"]) + channel_view(shift, c["dim"]))
    assert_conv_fold(layer, x, c, fold_before_conv, scale, shift, expected)


@given(st.integers(1, 5), st.integers(1, 5), st.booleans(), st.integers(0, 2**16))
def test_fold_linear_both_sides_match_float64_reference(n_in: int, n_out: int, bias: bool, seed: int):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias).double()
    x = torch.randn(3, n_in, dtype=torch.float64)
    s_out, t_out = torch.randn(n_out, dtype=torch.float64), torch.randn(n_out, dtype=torch.float64)
    s_in, t_in = torch.randn(n_in, dtype=torch.float64), torch.randn(n_in, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x * s_in + t_in) * s_out + t_out
        w, b = fold_after_linear(layer.weight, layer.bias, s_out, t_out)
        w, b = fold_before_linear(w, b, s_in, t_in)
        torch.testing.assert_close(nn.functional.linear(x, w, b), expected, rtol=1e-10, atol=1e-10)


def test_fold_functions_keep_the_weight_dtype_and_check_shapes():
    w = torch.randn(4, 2, 3, dtype=torch.bfloat16)
    new_w, new_b = fold_after_conv(w, None, torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64))
    assert new_w.dtype == torch.bfloat16 and new_b.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="4 channels here but scale has 3"):
        fold_after_conv(w, None, torch.rand(3), torch.rand(3))
    with pytest.raises(ValueError, match="groups=3 does not divide"):
        fold_before_conv(w, None, torch.rand(6), torch.rand(6), groups=3)
    with pytest.raises(ValueError, match="must be 2-D"):
        fold_after_linear(w, None, torch.rand(4), torch.rand(4))


def test_bn_frozen_by_bnkit_freeze_is_still_folded() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 6, 6))
    bnkit.freeze(model)
    fused, report = bnkit.fuse_with_report(model, torch.randn(2, 3, 6, 6))
    assert [record.bn for record in report.folded] == ["1"], report
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), model.eval()(x), rtol=1e-5, atol=1e-6)
