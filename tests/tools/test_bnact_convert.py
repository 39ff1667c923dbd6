"""``bnkit.convert(model, "bnact")``: BatchNorm + activation pairs become ``bnkit.BatchNormAct``.

Oracles: the unconverted model itself (real torchvision and timm classes built without weights, ``torch.nn``
BatchNorm and activations): each converted layer against its BatchNorm + activation to 1e-5, whole networks to
1e-4 of their scale in eval mode and over a few SGD steps in training (outputs, gradients, running statistics);
the input model is compared bit for bit with a snapshot taken before the call.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bnkit
from bnkit.tools.convert import convert, convert_with_report
from tests.models.zoo import randomise_statistics
from tests.tools.conftest import assert_snapshot_equal, take_snapshot

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

LAYER = 1e-5
NET = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    scale = max(1.0, expected.detach().abs().max().item())
    diff = (actual.detach() - expected.detach()).abs().max().item()
    assert diff <= tol * scale, f"{what}: max difference {diff:.3g} > {tol:g} * {scale:.3g}"


def quiet_convert(model: nn.Module, to: str = "bnact", **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_with_report(model, to, **kwargs)


def check_training(original: nn.Module, converted: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """Same outputs, gradients and running statistics over ``steps`` SGD steps (both models trained): one step
    in float32, then ``steps`` in float64 (after a step, float32 rounding differences of 1e-6 are amplified by
    deep networks trained on tiny batches; float64 shows the arithmetic itself is the same)."""
    _train_both(original, converted, x, 1, torch.float32)
    _train_both(original, converted, x, steps, torch.float64)


def _train_both(original: nn.Module, converted: nn.Module, x: torch.Tensor, steps: int, dtype: torch.dtype) -> None:
    a, b = copy.deepcopy(original).to(dtype).train(), copy.deepcopy(converted).to(dtype).train()
    x = x.to(dtype)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.01)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.01)
    for step in range(steps):
        batch = x + 0.1 * step
        out_a, out_b = a(batch), b(batch)
        assert_close(out_b, out_a, NET, f"step {step} output")
        out_a.square().mean().backward()
        out_b.square().mean().backward()
        grads_b = dict(b.named_parameters())
        for name, param in a.named_parameters():
            assert_close(grads_b[name].grad, param.grad, NET, f"step {step} grad {name}")
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    state_b = b.state_dict()
    for key, value in a.state_dict().items():
        if value.is_floating_point():
            assert_close(state_b[key], value, NET, key)
        else:
            assert torch.equal(state_b[key], value), key


def check_eval(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert_close(converted.eval()(x), original.eval()(x), NET, "eval output")


def bnacts(model: nn.Module) -> dict[str, bnkit.BatchNormAct]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnkit.BatchNormAct)}


# ------------------------------------------------------------------------------------------- single layers


@pytest.mark.parametrize(
    ("act", "kind"),
    [
        (nn.ReLU(), "relu"),
        (nn.ReLU(inplace=True), "relu"),
        (nn.LeakyReLU(0.2), "leaky_relu"),
        (nn.ELU(0.5), "elu"),
        (nn.Identity(), "identity"),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_each_layer_matches_its_batchnorm_and_activation(act: nn.Module, kind: str, training: bool) -> None:
    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), act))
    model.train(training)
    result, report = convert_with_report(model, "bnact")
    assert isinstance(result[1], bnkit.BatchNormAct) and result[1].activation == kind
    assert isinstance(result[2], nn.Identity) and type(result) is nn.Sequential
    assert list(report.converted) == ["1"]
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    reference = act(model[1](x)) if not getattr(act, "inplace", False) else act(model[1](x) * 1)
    out = result[1](x2)
    assert_close(out, reference, LAYER, "layer output")
    weight = torch.randn_like(out)
    (reference * weight).sum().backward()
    (out * weight).sum().backward()
    assert_close(x2.grad, x.grad, LAYER, "input grad")
    assert_close(result[1].weight.grad, model[1].weight.grad, LAYER, "gamma grad")
    assert_close(result[1].running_var, model[1].running_var, LAYER, "running var")


class Functional(nn.Module):
    """BatchNorms followed by functional activations (graph rewrite) and pairs that must be left."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.bn2, self.bn3, self.bn4 = (nn.BatchNorm2d(8) for _ in range(4))
        self.bn5 = nn.BatchNorm2d(8)
        self.lrelu = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(self.conv(x)))
        b = F.leaky_relu(self.bn2(a), 0.2)
        c = F.elu(self.bn3(b), alpha=0.7)
        d = self.bn4(c)  # two consumers: the activation and the sum
        e = torch.relu(d) + d
        f = self.lrelu(self.bn5(e))
        # in place on the activated output: the low-memory backward needs it unchanged (``f += a`` is traced by
        # fx as an out-of-place add, so only explicit in-place calls are seen)
        return f.add_(a)


def test_functional_activations_rewrite_the_graph_and_leave_what_cannot_fuse() -> None:
    model = randomise_statistics(Functional())
    before = take_snapshot(model)
    result, report = quiet_convert(model)
    assert isinstance(result, fx.GraphModule)
    assert set(report.converted) == {"bn1", "bn2", "bn3"}
    assert [bnacts(result)[n].activation for n in ("bn1", "bn2", "bn3")] == ["relu", "leaky_relu", "elu"]
    assert bnacts(result)["bn2"].negative_slope == 0.2 and bnacts(result)["bn3"].alpha == 0.7
    assert "2 consumers" in report.skipped["bn4"]
    assert "modified in place" in report.skipped["bn5"]
    assert any("GraphModule" in note for note in report.notes)
    assert_snapshot_equal(before, take_snapshot(model))
    x = torch.randn(4, 3, 6, 6)
    check_eval(model, result, x)
    check_training(model, result, x)


def test_unsupported_activation_is_left_with_a_warning() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU())
    with pytest.warns(UserWarning, match="left as they are"):
        result, report = convert_with_report(model, "bnact")
    assert "SiLU is not supported" in report.skipped["1"]
    assert type(result[1]) is nn.BatchNorm2d


def test_untraceable_model_falls_back_to_sequential_neighbours() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ELU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) if x.sum() > -1e9 else x  # data-dependent control flow: fx cannot trace it

    model = randomise_statistics(Branchy())
    result, report = convert_with_report(model, "bnact")
    assert type(result) is Branchy and isinstance(result.body[1], bnkit.BatchNormAct)
    assert "Sequential neighbour" in report.converted["body.1"]
    x = torch.randn(4, 3, 6, 6)
    check_eval(model, result, x)
    check_training(model, result, x)


def test_mode_dependent_forward_refuses_the_graph_rewrite() -> None:
    class Moody(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.act(self.bn(x))
            return self.act(y - 1) if self.training else y  # act called twice in training only

    result, report = quiet_convert(Moody())
    assert "differs in train and eval" in report.skipped["bn"]
    assert type(result) is Moody


def test_inplace_true_does_module_level_rewrites_only() -> None:
    model = torchvision.models.resnet18(num_classes=4)
    same, report = quiet_convert(model, inplace=True)
    assert same is model and set(report.converted) == {"bn1"}
    assert "inplace=True" in report.skipped["layer1.0.bn1"]


# ------------------------------------------------------------------------------------------- real models


def test_resnet18_reused_relu() -> None:
    model = randomise_statistics(torchvision.models.resnet18(num_classes=5))
    before = take_snapshot(model)
    result, report = convert_with_report(model, "bnact")
    assert_snapshot_equal(before, take_snapshot(model))
    assert isinstance(result, fx.GraphModule) and list(result.state_dict()) == list(model.state_dict())
    assert type(result.layer1) is nn.Sequential and type(result.layer1[0]) is type(model.layer1[0])
    # bn1 of every block feeds the block's ReLU (also called after the residual sum); bn2/downsample feed the sum
    expected = {"bn1"} | {f"layer{i}.{j}.bn1" for i in range(1, 5) for j in range(2)}
    assert set(report.converted) == expected
    assert all("add" in reason for reason in report.kept.values()) and len(report.kept) == 11
    assert not report.skipped
    x = torch.randn(4, 3, 32, 32)
    check_eval(model, result, x)
    check_training(model, result, x, steps=2)
    buffer = io.BytesIO()
    torch.save(result, buffer)
    buffer.seek(0)
    check_eval(model, torch.load(buffer, weights_only=False), x)  # the GraphModule pickles and loads


class PreActBlock(nn.Module):
    """He et al.'s pre-activation block: BN -> ReLU -> conv, twice, plus the shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.LeakyReLU(0.1, inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        return self.conv2(self.relu2(self.bn2(out))) + x


def test_preactivation_block_keeps_its_class() -> None:
    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 8, 3), PreActBlock(8), PreActBlock(8)))
    result, report = convert_with_report(model, "bnact")
    assert type(result) is nn.Sequential and not report.notes
    assert len(report.converted) == 4 and not report.skipped and not report.kept
    assert bnacts(result)["1.bn2"].activation == "leaky_relu"
    x = torch.randn(4, 3, 10, 10)
    check_eval(model, result, x)
    check_training(model, result, x)


def test_mobilenet_v2_relu6_is_left() -> None:
    model = torchvision.models.mobilenet_v2(num_classes=4)
    with pytest.warns(UserWarning, match="left as they are"):
        result, report = convert_with_report(model, "bnact")
    assert not report.converted and type(result) is type(model)
    relu6 = [name for name, reason in report.skipped.items() if "ReLU6 is not supported" in reason]
    assert len(relu6) == 35
    assert "2 consumers" in report.skipped["features.2.conv.3"]
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(result.eval()(x), model.eval()(x))


@pytest.mark.parametrize(("name", "unsupported"), [("efficientnet_b0", "SiLU"), ("mobilenetv3_small_050", "Hardswish")])
def test_timm_batchnormact2d(name: str, unsupported: str) -> None:
    model = randomise_statistics(timm.create_model(name, num_classes=4, pretrained=False))
    before = take_snapshot(model)
    with pytest.warns(UserWarning, match="left as they are"):
        result, report = convert_with_report(model, "bnact")
    assert_snapshot_equal(before, take_snapshot(model))
    assert type(result) is type(model)
    assert report.converted and all("BatchNormAct2d -> BatchNormAct" in c for c in report.converted.values())
    assert report.skipped and all(f"{unsupported} is not supported" in r for r in report.skipped.values())
    for layer_name, layer in bnacts(result).items():
        assert layer.source_class == "timm.layers.norm_act.BatchNormAct2d", layer_name
    x = torch.randn(4, 3, 64, 64)  # 2x2 maps at the end: 16 values per channel for the batch statistics
    check_eval(model, result, x)
    check_training(model, result, x, steps=2)


def test_timm_drop_layer_is_left() -> None:
    layer = timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=nn.Dropout)
    result, report = quiet_convert(nn.Sequential(nn.Conv2d(3, 4, 1), layer))
    assert "drop layer Dropout" in report.skipped["1"] and result[1].__class__ is type(layer)


# ------------------------------------------------------------------------------------------- other tools


def test_fuse_of_a_converted_model_is_exact() -> None:
    model = randomise_statistics(torchvision.models.resnet18(num_classes=5)).eval()
    converted = convert(model, "bnact").eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = bnkit.fuse(converted, x)
    assert not bnacts(fused)
    with torch.no_grad():
        assert_close(fused(x), model(x), NET, "fused output")


def test_fuse_replaces_batchnormact_by_its_activation() -> None:
    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.BatchNormAct(4, "elu", alpha=0.5))).eval()
    fused = bnkit.fuse(model, torch.randn(2, 3, 6, 6))
    assert isinstance(fused[1], nn.ELU) and fused[1].alpha == 0.5
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(fused(x), model(x), LAYER, "fused")


def test_convert_back_to_torch() -> None:
    timm_model = randomise_statistics(timm.create_model("mobilenetv3_small_050", num_classes=4, pretrained=False))
    converted = quiet_convert(timm_model)[0]
    back, report = quiet_convert(converted, "torch")
    assert not bnacts(back), report
    originals = dict(timm_model.named_modules())
    for name, module in back.named_modules():
        if name in originals and type(originals[name]).__name__ == "BatchNormAct2d":
            assert type(module) is type(originals[name]), name
            assert type(module.act) is type(originals[name].act) or isinstance(originals[name].act, nn.Identity)
    assert set(back.state_dict()) == set(timm_model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    check_eval(timm_model, back, x)

    # layers that did not come from timm: left and listed, never a refusal of the whole call
    resnet = quiet_convert(torchvision.models.resnet18(num_classes=4))[0]
    with pytest.warns(UserWarning, match="left as they are"):
        back, report = convert_with_report(resnet, "torch")
    assert set(report.skipped) == set(bnacts(resnet))
    assert "torch.nn BatchNorm has no activation" in report.skipped["bn1"]
    identity = convert(nn.Sequential(nn.Conv2d(3, 2, 1), bnkit.BatchNormAct(2, "identity")), "torch")
    assert type(identity[1]) is nn.BatchNorm2d


def test_explain_summary_freeze_recalibrate_on_batchnormact() -> None:
    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.3)))
    converted = convert(model, "bnact")
    rows = {row.name: row for row in bnkit.explain(converted)}
    assert rows["1"].kind == "bnkit-bnact" and rows["1"].after == ["LeakyReLU"]
    assert "LeakyReLU" in str(bnkit.explain(converted))
    assert "1" in str(bnkit.summary(converted, (3, 8, 8)))

    frozen = copy.deepcopy(converted)
    bnkit.freeze(frozen)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(frozen.train()(x), frozen.eval()(x))

    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    expected, actual = copy.deepcopy(model), copy.deepcopy(converted)
    bnkit.recalibrate(expected, data, progress=False)
    report = bnkit.recalibrate(actual, data, progress=False)
    assert list(report.counts) == ["1"]
    assert_close(actual[1].running_mean, expected[1].running_mean, LAYER, "mean")
    assert_close(actual[1].running_var, expected[1].running_var, LAYER, "var")


def test_report_to_dict_has_notes() -> None:
    _, report = quiet_convert(torchvision.models.resnet18(num_classes=2))
    data = report.to_dict()
    assert data["to"] == "bnact" and data["notes"] and "layer1.0.bn1" in data["converted"]


def test_modules_inside_an_untraceable_submodule_are_not_trusted_to_the_graph() -> None:
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.bn(x)) if x.sum() > -1e9 else x  # fx cannot trace this: it stays opaque

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Opaque()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(self.inner.act(self.inner.bn(x)))  # bn and act also called inside `inner`

    model = Root()
    result, report = quiet_convert(model)
    assert "untraceable submodule" in report.skipped["inner.bn"]
    x = torch.randn(6, 4)
    check_eval(model, result, x)


def test_a_frozen_batchnorm_stays_frozen() -> None:
    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    bnkit.freeze(model)
    result = convert(model, "bnact").train()
    assert result[1].freeze_stats and not result[1].weight.requires_grad
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert_close(result(x), model.train()(x), LAYER, "frozen output")
    assert torch.equal(result[1].running_mean, model[1].running_mean)
