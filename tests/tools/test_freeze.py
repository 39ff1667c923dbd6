"""freeze/unfreeze: Keras trainable=False semantics that survive model.train(), on torch and bnkit layers."""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from torch import nn

import bnkit
from bnkit.tools.freeze import FreezeReport, freeze, is_frozen_affine, is_frozen_stats, unfreeze

KINDS = ["torch", "sync", "bnkit"]


def make_bn(kind: str, channels: int) -> nn.Module:
    if kind == "torch":
        return nn.BatchNorm2d(channels)
    if kind == "sync":
        return nn.SyncBatchNorm(channels)
    return bnkit.BatchNorm(channels)


class Net(nn.Module):
    """Not a Sequential: BatchNorm at two depths, plus a BatchNorm1d in the head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), make_bn(kind, 4), nn.ReLU())
        self.block = nn.ModuleDict({"conv": nn.Conv2d(4, 4, 3, padding=1), "bn": make_bn(kind, 4)})
        self.head = nn.Linear(4, 2)
        self.head_bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block["bn"](self.block["conv"](x)))
        return self.head_bn(self.head(x.mean((2, 3))))


def warmed(kind: str) -> Net:
    """A model whose running statistics and gamma/beta are not at their initial values."""
    model = Net(kind)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6) * 2 + 1)
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, bnkit.BatchNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in bnkit.named_batchnorms(model)]


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_freeze_survives_train_and_a_training_step(kind: str) -> None:
    model = warmed(kind)
    report = freeze(model)
    assert set(report.changed) == {"stem.1", "block.bn", "head_bn"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 6, 6)

    model.train()
    assert all(m.training for m in model.modules())  # train() still reaches every layer
    train_step(model, x)

    after = model.state_dict()
    for key, value in before.items():
        if ".bn." in key or "stem.1." in key or "head_bn." in key:
            assert torch.equal(value, after[key]), key  # stats, num_batches_tracked, gamma, beta
    assert not torch.equal(before["head.weight"], after["head.weight"])  # the rest did train
    for bn in bn_layers(model):
        assert bn.weight.grad is None and bn.bias.grad is None
    train_out = model(x)
    assert torch.equal(train_out, model.eval()(x))
    assert model.train().training  # flags still follow train()/eval()
    assert all(m.training for m in bn_layers(model))


@pytest.mark.parametrize("kind", KINDS)
def test_unfreeze_restores_training_behaviour_exactly(kind: str) -> None:
    reference = warmed(kind)
    model = copy.deepcopy(reference)
    freeze(model)
    report = unfreeze(model)
    assert set(report.changed) == {"stem.1", "block.bn", "head_bn"}
    assert not any(is_frozen_stats(m) or is_frozen_affine(m) for m in bn_layers(model))
    x = torch.randn(8, 3, 6, 6)
    train_step(reference.train(), x)
    train_step(model.train(), x)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert torch.equal(reference(x), model(x))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keys_unchanged_and_load_into_original_architecture(kind: str) -> None:
    model = warmed(kind)
    keys = list(model.state_dict())
    freeze(model)
    assert list(model.state_dict()) == keys
    fresh = Net(kind)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    # and a frozen model loads an ordinary checkpoint
    freeze(fresh)
    fresh.load_state_dict(warmed(kind).state_dict(), strict=True)
    assert all(is_frozen_stats(m) for m in bn_layers(fresh))


@pytest.mark.parametrize("kind", KINDS)
def test_layer_types_are_kept(kind: str) -> None:
    model = warmed(kind)
    types = [type(m) for m in model.modules()]
    freeze(model)
    assert [type(m) for m in model.modules()] == types


@pytest.mark.parametrize("kind", KINDS)
def test_freeze_stats_only_lets_gamma_beta_learn(kind: str) -> None:
    model = warmed(kind)
    freeze(model, affine=False)
    bn = model.block["bn"]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    gamma = bn.weight.detach().clone()
    x = torch.randn(8, 3, 6, 6)
    model.train()
    # In training mode the frozen layer normalises with its running statistics.
    inp = model.block["conv"](model.stem(x))
    expected = nn.functional.batch_norm(inp, stats[0], stats[1], bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(bn(inp), expected, rtol=0, atol=0)
    train_step(model, x)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert not torch.equal(bn.weight.detach(), gamma)
    assert is_frozen_stats(bn) and not is_frozen_affine(bn)


@pytest.mark.parametrize("kind", KINDS)
def test_freeze_affine_only_lets_statistics_adapt(kind: str) -> None:
    model = warmed(kind)
    freeze(model, stats=False)
    bn = model.block["bn"]
    mean = bn.running_mean.clone()
    gamma, beta = bn.weight.detach().clone(), bn.bias.detach().clone()
    train_step(model.train(), torch.randn(8, 3, 6, 6))
    assert not torch.equal(bn.running_mean, mean)
    assert torch.equal(bn.weight.detach(), gamma) and torch.equal(bn.bias.detach(), beta)
    assert is_frozen_affine(bn) and not is_frozen_stats(bn)


def test_freeze_matches_keras_trainable_false() -> None:
    """Oracle: a Keras 3 BatchNormalization with trainable=False called with training=True."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    gamma, beta = torch.rand(5) + 0.5, torch.randn(5)
    mean, var = torch.randn(5), torch.rand(5) + 0.1
    layer = keras.layers.BatchNormalization(epsilon=1e-5)
    layer.build((None, 3, 3, 5))
    layer.set_weights([gamma.numpy(), beta.numpy(), mean.numpy(), var.numpy()])
    layer.trainable = False
    x = torch.randn(6, 5, 3, 3)
    expected = keras.ops.convert_to_numpy(layer(x.permute(0, 2, 3, 1).numpy(), training=True))

    bn = nn.BatchNorm2d(5)
    bn.load_state_dict(
        {
            "weight": gamma,
            "bias": beta,
            "running_mean": mean,
            "running_var": var,
            "num_batches_tracked": torch.tensor(0),
        }
    )
    freeze(bn)
    got = bn.train()(x).permute(0, 2, 3, 1).detach()
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in bn.parameters())
    assert [w.shape for w in layer.non_trainable_weights] == [(5,)] * 4


@pytest.mark.parametrize("kind", ["torch", "sync"])
def test_frozen_torch_layer_survives_deepcopy_and_torch_save(kind: str) -> None:
    model = warmed(kind)
    freeze(model, affine=False)
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 3, 6, 6)
    for other in (clone, loaded):
        assert all(is_frozen_stats(m) for m in bn_layers(other))
        other.train()
        before = other.block["bn"].running_mean.clone()
        assert torch.equal(other(x), other.eval()(x))
        assert torch.equal(other.block["bn"].running_mean, before)
    # the copies' hooks act on the copies, not on the original
    model.train()
    assert model.block["bn"].training


def test_training_flag_is_put_back_even_when_the_layer_raises() -> None:
    bn = nn.BatchNorm2d(3)
    freeze(bn)
    bn.train()
    with pytest.raises(RuntimeError):
        bn(torch.randn(2, 4, 2, 2))  # wrong channel count
    assert bn.training
    bn.eval()
    bn(torch.randn(2, 3, 2, 2))
    assert not bn.training


def test_report_changed_unchanged_skipped_and_selection() -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.BatchNorm1d(3, track_running_stats=False),
        nn.BatchNorm1d(3, affine=False, track_running_stats=False),
        nn.Sequential(bnkit.BatchNorm(3)),
    )
    report = freeze(model)
    assert isinstance(report, FreezeReport)
    assert report.changed == ("0", "1", "3.0")  # "1" has gamma/beta to freeze
    assert list(report) == ["0", "1", "3.0"] and len(report) == 3
    assert set(report.skipped) == {"2"} and "track_running_stats=False" in report.skipped["2"]
    assert not is_frozen_stats(model[1]) and is_frozen_affine(model[1])
    again = freeze(model)
    assert again.changed == () and again.unchanged == ("0", "1", "3.0")
    assert "changed: none" in str(again)

    assert unfreeze(model, layers="3.*").changed == ("3.0",)
    assert unfreeze(model, layers=nn.BatchNorm1d).changed == ("0", "1")
    freeze(model, layers=lambda name, m: name == "0")
    assert is_frozen_stats(model[0]) and not is_frozen_stats(model[3][0])
    assert freeze(model, layers=["0", "3.0"], stats=False).changed == ("3.0",)


def test_model_that_is_itself_a_batchnorm() -> None:
    bn = nn.BatchNorm3d(2)
    assert freeze(bn).changed == ("",)
    assert is_frozen_stats(bn)


def test_bnkit_switches_are_used() -> None:
    bn = bnkit.BatchNorm(4)
    freeze(bn, affine=False)
    assert bn.freeze_stats and not bn.freeze_affine
    freeze(bn)
    assert bn.freeze_affine and not bn.weight.requires_grad and not bn.trainable
    assert not bn._forward_pre_hooks  # no hooks on bnkit layers
    unfreeze(bn)
    assert not bn.freeze_stats and not bn.freeze_affine and bn.weight.requires_grad


def test_freeze_clears_stale_gradients() -> None:
    bn = nn.BatchNorm1d(2)
    bn(torch.randn(4, 2)).sum().backward()
    assert bn.weight.grad is not None
    freeze(bn)
    assert bn.weight.grad is None and bn.bias.grad is None


def test_bad_inputs_leave_the_model_untouched(snapshot, same) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        freeze("model")
    with pytest.raises(ValueError, match="nothing to freeze"):
        freeze(model, stats=False, affine=False)
    with pytest.raises(ValueError, match=r"matched no BatchNorm layer; the model has: 1"):
        freeze(model, layers="features.*")
    with pytest.raises(TypeError, match="stats must be True or False"):
        freeze(model, stats="yes")
    with pytest.raises(TypeError, match="layers must be"):
        unfreeze(model, layers=3)
    same(before, snapshot(model))
    with pytest.warns(UserWarning, match="freeze: the model has no BatchNorm layer bnkit recognises; nothing to do"):
        assert freeze(nn.Linear(2, 2)).changed == ()  # no BatchNorm: nothing to do, not an error, but said


def test_freeze_timm_batchnorm_act_keeps_its_activation() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    layer = timm_layers.BatchNormAct2d(4, act_layer=nn.SiLU)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), layer)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 6, 6)
    expected = model.eval()(x)  # timm's own inference arithmetic, activation included
    assert freeze(model).changed == ("1",)
    state = copy.deepcopy(model.state_dict())
    out = model.train()(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert is_frozen_stats(layer) and not layer.weight.requires_grad
    assert unfreeze(model).changed == ("1",)
    model.train()(x)
    assert not torch.equal(layer.running_mean, state["1.running_mean"])  # statistics move again


def test_frozen_batchnorm_classes_are_skipped_with_the_reason() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = nn.Sequential(nn.BatchNorm2d(2), torchvision.ops.FrozenBatchNorm2d(2))
    report = freeze(model)
    assert report.changed == ("0",)
    assert list(report.skipped) == ["1"] and "FrozenBatchNorm2d fixes its statistics" in report.skipped["1"]
    assert is_frozen_stats(model[1])
    report = unfreeze(model)
    assert report.changed == ("0",) and "rebuild it as a trainable BatchNorm" in report.skipped["1"]


def test_unrecognised_running_statistics_are_named() -> None:
    class Stats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(2))
            self.register_buffer("running_var", torch.ones(2))

    with pytest.warns(UserWarning, match=r"no BatchNorm layer bnkit recognises; .*not recognised.*: 0"):
        assert freeze(nn.Sequential(Stats())).changed == ()
