"""Monitor sees every BatchNorm kind bnkit describes: real torchvision FrozenBatchNorm2d, timm BatchNormAct2d and
FrozenBatchNormAct2d, registered classes; and says so when it recognises nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnkit
from bnkit.layers.kinds import unregister_batchnorm
from bnkit.monitor import Monitor

torchvision_ops = pytest.importorskip("torchvision.ops")
timm_layers = pytest.importorskip("timm.layers")


def _moments(x: torch.Tensor, axis: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.ndim) if d != axis]
    x64 = x.detach().double()
    return x64.mean(dims), x64.var(dims, unbiased=False)


def _record_inputs(model: nn.Module, kinds: tuple[type, ...]) -> dict[nn.Module, torch.Tensor]:
    seen: dict[nn.Module, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, kinds):
            module.register_forward_pre_hook(lambda m, args: seen.__setitem__(m, args[0].detach().clone()))
    return seen


def test_frozen_and_bnact_layers_are_recorded_with_their_true_batch_statistics() -> None:
    torch.manual_seed(0)
    frozen = torchvision_ops.FrozenBatchNorm2d(4)
    frozen.running_mean.uniform_(-1, 1)
    frozen.running_var.uniform_(0.5, 2)
    bnact = timm_layers.BatchNormAct2d(4, act_layer=nn.SiLU)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), frozen, nn.Conv2d(4, 4, 3), bnact).train()
    inputs = _record_inputs(model, (torchvision_ops.FrozenBatchNorm2d, timm_layers.BatchNormAct2d))
    before = {module: module.running_mean.double().mean() for module in (frozen, bnact)}  # as the layer saw them
    monitor = Monitor(model).attach()
    model(torch.randn(6, 3, 9, 9))
    records = {r["layer"]: r for r in monitor.flush()}
    monitor.close()
    assert set(records) == {"1", "3"}
    # a FrozenBatchNorm2d normalises with its fixed statistics in train() too; BatchNormAct2d with batch statistics
    assert records["1"]["uses_batch_stats"] is False and records["3"]["uses_batch_stats"] is True
    for name, module in (("1", frozen), ("3", bnact)):
        mean, var = _moments(inputs[module])
        assert records[name]["batch_mean"] == pytest.approx(float(mean.mean()), rel=1e-5, abs=1e-6)
        assert records[name]["batch_var"] == pytest.approx(float(var.mean()), rel=1e-5, abs=1e-6)
        assert records[name]["running_mean"] == pytest.approx(float(before[module]), abs=1e-6)
    assert not torch.equal(bnact.running_mean, torch.zeros(4))  # the BatchNormAct2d did update in train()


def test_timm_frozen_bnact_from_freeze_batch_norm_2d_is_seen() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU))
    model = timm_layers.freeze_batch_norm_2d(model).train()
    assert type(model[1]).__name__ == "FrozenBatchNormAct2d"
    monitor = Monitor(model).attach()
    model(torch.randn(2, 3, 6, 6))
    (record,) = monitor.flush()
    monitor.close()
    assert record["layer"] == "1" and record["uses_batch_stats"] is False


def test_registered_layer_with_other_attribute_names_is_read_through_its_description() -> None:
    class ChannelsLastNorm(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.register_buffer("mu", torch.linspace(-1, 1, c))
            self.register_buffer("sigma2", torch.linspace(1, 2, c))
            self.epsilon = 1e-3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - self.mu) / torch.sqrt(self.sigma2 + self.epsilon)

    bnkit.register_batchnorm(
        ChannelsLastNorm,
        channel_axis=-1,
        eps="epsilon",
        running_mean="mu",
        running_var="sigma2",
        weight=None,
        bias=None,
        frozen=True,
    )
    try:
        layer = ChannelsLastNorm(5)
        monitor = Monitor(layer).attach()
        x = torch.randn(4, 7, 5)
        layer.train()(x)
        (record,) = monitor.flush()
        monitor.close()
        mean, var = _moments(x, axis=2)
        assert record["channels"] == 5 and record["uses_batch_stats"] is False
        assert record["batch_mean"] == pytest.approx(float(mean.mean()), abs=1e-6)
        assert record["batch_var"] == pytest.approx(float(var.mean()), rel=1e-5)
        assert record["running_mean"] == pytest.approx(0.0, abs=1e-6)
        assert record["running_var"] == pytest.approx(1.5, rel=1e-6)
    finally:
        unregister_batchnorm(ChannelsLastNorm)


def test_a_model_with_unrecognised_statistics_is_named_not_passed_silently() -> None:
    class Mystery(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(3))
            self.register_buffer("running_var", torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential(nn.Linear(3, 3), Mystery())
    with pytest.warns(UserWarning, match="1"), pytest.raises(ValueError, match="register_batchnorm"):
        Monitor(model)
