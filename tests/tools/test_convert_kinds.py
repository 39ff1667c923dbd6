"""convert on real torchvision / timm layers: type-preserving round trips without running the model, SyncBN -> BN
without dim, FrozenBatchNorm2d <-> trainable BatchNorm2d, timm BatchNormAct kept or converted with its activation,
and the report (kept, skipped, unrecognised layers are never passed over silently)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from timm.layers import BatchNormAct2d
from timm.layers.norm_act import FrozenBatchNormAct2d, SyncBatchNormAct, convert_sync_batchnorm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import bnkit
from bnkit.tools.convert import ConvertReport, convert, convert_with_report
from tests.tools.convert_checks import assert_trains_alike


def _types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial gamma, beta and running statistics in every norm layer (parameters and frozen buffers)."""
    with torch.no_grad():
        for module in model.modules():
            for key in ("weight", "bias", "running_mean", "running_var"):
                tensor = getattr(module, key, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 1 and not isinstance(module, nn.Linear):
                    tensor.copy_(torch.rand_like(tensor) + 0.5 if key != "bias" else torch.randn_like(tensor))
    return model


def convnet() -> nn.Sequential:
    """1d, 2d and 3d BatchNorms whose rank the model's structure fixes (no forward needed)."""
    return nn.Sequential(
        nn.Conv3d(2, 4, 1),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Flatten(2),  # [N, 4, D*H*W]
        nn.Conv1d(4, 4, 1),
        nn.BatchNorm1d(4, momentum=0.3),
        nn.Unflatten(2, (3, 4)),  # [N, 4, 3, 4]
        nn.BatchNorm2d(4, affine=False),
        nn.Conv2d(4, 3, 1),
        nn.BatchNorm2d(3, eps=1e-3),
        nn.Flatten(),
        nn.Linear(36, 5),
        nn.BatchNorm1d(5),
    )


def convnet_inputs(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 2, 3, 2, 2) * 2 + 0.5


def test_torch_bnkit_torch_keeps_classes_without_running_the_model() -> None:
    original = _randomise(convnet())
    as_bnkit = convert(original, "bnkit")
    assert [m.torch_dim for m in as_bnkit if isinstance(m, bnkit.BatchNorm)] == [3, 1, 2, 2, 1]
    back = convert(as_bnkit, "torch")  # no dim, no example_inputs, never run
    assert _types(back) == _types(original)
    assert_trains_alike(original, back, [convnet_inputs() for _ in range(3)])
    assert_trains_alike(original, as_bnkit, [convnet_inputs() for _ in range(3)])
    # the remembered class survives deepcopy and pickling (torch.save of the whole model)
    assert _types(convert(copy.deepcopy(as_bnkit), "torch")) == _types(original)


def test_syncbn_to_bn_without_dim_reads_the_model() -> None:
    original = _randomise(convnet())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original))  # torch's own: forgets the class
    assert all(type(m) is nn.SyncBatchNorm for m in synced if "BatchNorm" in type(m).__name__)
    plain, report = convert_with_report(synced, "torch")
    assert _types(plain) == _types(original)
    assert len(report) == 5 and not report.skipped
    assert_trains_alike(original, plain, [convnet_inputs() for _ in range(2)])
    # through bnkit's own torch-sync the class is remembered, so no inference is needed either way
    assert _types(convert(convert(original, "torch-sync"), "torch")) == _types(original)
    # and SyncBN -> bnkit records the inferred class on the bnkit layer
    assert [m.torch_dim for m in convert(synced, "bnkit") if isinstance(m, bnkit.BatchNorm)] == [3, 1, 2, 2, 1]


class Opaque(nn.Module):
    """A model whose BatchNorm input comes through a reshape fx cannot see through."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.SyncBatchNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.view(x.shape[0], 4, -1, 2))


def test_syncbn_rank_that_the_model_does_not_fix_needs_dim_or_inputs(snapshot, same) -> None:
    model = Opaque()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'bn' needs BatchNorm1d, 2d or 3d .*pass dim=1\|2\|3.*example_inputs"):
        convert(model, "torch")
    with pytest.raises(ValueError, match=r"layer '<model>' needs BatchNorm1d, 2d or 3d"):
        convert(nn.SyncBatchNorm(3), "torch")
    same(before, snapshot(model))
    assert type(convert(model, "torch", example_inputs=torch.randn(2, 4, 3, 2)).bn) is nn.BatchNorm2d
    assert type(convert(model, "torch", dim={"bn": 3}).bn) is nn.BatchNorm3d
    with pytest.raises(ValueError, match=r"the model failed on example_inputs \(RuntimeError: .*leave them out"):
        convert(model, "torch", example_inputs=torch.randn(2, 5, 3))
    same(before, snapshot(model))


def _frozen_backbone() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4, eps=1e-3), nn.ReLU(), nn.Conv2d(4, 5, 1), FrozenBatchNorm2d(5)
    )
    return _randomise(model)


@pytest.mark.parametrize("inplace", [False, True])
def test_frozen_to_trainable_and_back(inplace: bool) -> None:
    frozen = _frozen_backbone().eval()
    reference = copy.deepcopy(frozen)
    thawed, report = convert_with_report(frozen if not inplace else copy.deepcopy(frozen), "trainable")
    assert [type(m) for m in thawed] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
    bn = thawed[1]
    assert bn.eps == 1e-3 and bn.momentum == 0.1 and int(bn.num_batches_tracked) == 0
    assert bn.weight.requires_grad and bn.bias.requires_grad and not bn.training  # the mode the model was in
    assert report.converted == {"1": "FrozenBatchNorm2d -> BatchNorm2d", "4": "FrozenBatchNorm2d -> BatchNorm2d"}
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(thawed(x), reference(x), rtol=1e-6, atol=1e-6)  # x*scale+shift vs the kernel
    # eval mode is exact; train mode now fine-tunes with batch statistics, like any BatchNorm2d
    refrozen, back = convert_with_report(thawed, "frozen")
    assert _types(refrozen) == _types(reference)
    assert back.converted == {"1": "BatchNorm2d -> FrozenBatchNorm2d", "4": "BatchNorm2d -> FrozenBatchNorm2d"}
    for key, value in reference.state_dict().items():
        assert torch.equal(value, refrozen.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(refrozen.train()(x), reference.train()(x))


def test_frozen_conversion_equals_the_source_in_eval_and_its_frozen_self_in_train() -> None:
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.SyncBatchNorm(4)))
    frozen, report = convert_with_report(model, "frozen")  # the SyncBN's rank comes from the model
    assert [type(m) for m in frozen] == [nn.Conv2d, FrozenBatchNorm2d, nn.ReLU, FrozenBatchNorm2d]
    assert len(report) == 2
    as_frozen = copy.deepcopy(model)
    bnkit.freeze(as_frozen)  # what a frozen layer is: running statistics, fixed gamma/beta, in train and eval
    batches = [torch.randn(4, 3, 5, 5) for _ in range(2)]
    assert_trains_alike(as_frozen, frozen, batches, tol=1e-5)


def test_frozen_skips_what_frozenbatchnorm2d_cannot_hold() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Unflatten(1, (4, 1, 1)), nn.BatchNorm2d(4, track_running_stats=False)
    )
    with pytest.warns(UserWarning, match=r"2 layer\(s\) left as they are for to='frozen': 1, 3"):
        frozen, report = convert_with_report(model, "frozen")
    assert _types(frozen) == _types(model)
    assert "BatchNorm1d" in report.skipped["1"] and "no running statistics" in report.skipped["3"]


def test_timm_batchnormact_is_kept_for_bnkit_and_converted_with_its_activation_elsewhere(snapshot, same) -> None:
    act = BatchNormAct2d(4, act_layer=nn.SiLU)
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"left as they are for to='bnkit': 1 \(timm BatchNorm\+activation"):
        as_bnkit, report = convert_with_report(model, "bnkit")
    assert type(as_bnkit[1]) is BatchNormAct2d and type(as_bnkit[3]) is bnkit.BatchNorm
    assert report.converted == {"3": "BatchNorm2d -> BatchNorm"} and "1" in report.skipped
    with pytest.warns(UserWarning, match=r"for to='sync': 1 .*to='torch-sync' gives timm's SyncBatchNormAct"):
        convert(model, "sync")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back, back_report = convert_with_report(as_bnkit, "torch")  # kept: it already is a BatchNorm2d
    assert _types(back) == _types(model) and "1" in back_report.kept
    synced = convert(model, "torch-sync")
    assert type(synced[1]) is SyncBatchNormAct and type(synced[1].act) is nn.SiLU
    plain = convert(synced, "torch")
    assert _types(plain) == _types(model)
    batches = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    assert_trains_alike(model, plain, batches)
    assert_trains_alike(model, synced, batches)
    frozen = convert(model, "frozen")
    assert type(frozen[1]) is FrozenBatchNormAct2d and type(frozen[1].act) is nn.SiLU
    thawed = convert(frozen, "trainable")
    assert type(thawed[1]) is BatchNormAct2d and type(thawed[1].act) is nn.SiLU
    with torch.no_grad():
        torch.testing.assert_close(thawed.eval()(batches[0]), model.eval()(batches[0]), rtol=1e-5, atol=1e-5)
    grouped = convert(model, "group")
    assert type(grouped[1]).__name__ == "GroupNormAct" and type(grouped[1].act) is nn.SiLU
    same(before, snapshot(model.train()))  # only its mode was changed here, by the test itself


def test_timm_sync_conversion_round_trip() -> None:
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.BatchNorm2d(4)))
    synced = convert_sync_batchnorm(copy.deepcopy(model))  # timm's own converter
    plain, report = convert_with_report(synced, "torch")
    assert _types(plain) == _types(model)
    assert report.converted == {"1": "SyncBatchNormAct -> BatchNormAct2d", "2": "SyncBatchNorm -> BatchNorm2d"}
    assert_trains_alike(model, plain, [torch.randn(4, 3, 5, 5) for _ in range(2)])


class Scaled(nn.BatchNorm2d):
    """A user's own subclass with behaviour of its own (not a library class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class CustomFrozen(nn.Module):
    """Running statistics under a class bnkit does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(3))
        self.register_buffer("running_var", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean[:, None]) / self.running_var[:, None].sqrt()


@pytest.mark.parametrize("to", ["bnkit", "sync", "torch-sync", "torch", "group", "frozen"])
def test_unknown_subclass_is_kept_and_reported_never_refused(to: str, snapshot, same) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(Scaled(4)))
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"left as they are .*2\.0 \(a Scaled, a subclass of torch\.nn BatchNorm"):
        converted, report = convert_with_report(model, to)
    assert type(converted[2][0]) is Scaled and "2.0" in report.skipped
    same(before, snapshot(model))


def test_unrecognised_running_statistics_and_empty_models_are_never_silent() -> None:
    model = nn.Sequential(nn.Conv1d(3, 3, 1), CustomFrozen())
    with pytest.warns(UserWarning, match=r"convert: modules with running statistics .* were left out: 1;"):
        _, report = convert_with_report(model, "bnkit")
    assert report.unrecognised == ("1",) and len(report) == 0
    assert "not recognised (hold running statistics): 1" in str(report)
    with pytest.warns(UserWarning, match=r"the model \(Linear\) has no BatchNorm layer; nothing to convert"):
        convert(nn.Linear(2, 2), "torch")
    with pytest.warns(UserWarning, match=r"nothing to convert to 'trainable': the 1 selected layer"):
        convert(nn.Sequential(nn.BatchNorm2d(2)), "trainable")
    with pytest.raises(ValueError, match=r"layers='x\*' matched no BatchNorm layer; the model has: 1"):
        convert(nn.Sequential(nn.Conv2d(1, 1, 1), FrozenBatchNorm2d(1)), "trainable", layers="x*")


def test_report_is_serialisable_and_not_attached_to_the_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), FrozenBatchNorm2d(4))
    converted, report = convert_with_report(model, "bnkit")
    assert not hasattr(converted, "bnkit_convert_report")  # a converted model pickles without bnkit's report
    assert isinstance(report, ConvertReport) and list(report) == ["1"]
    assert report.to_dict() == {
        "to": "bnkit",
        "converted": {"1": "BatchNorm2d -> BatchNorm"},
        "unchanged": [],
        "kept": {"2": "frozen layer (statistics and gamma/beta fixed), kept as it is; to='trainable' thaws it"},
        "skipped": {},
        "unrecognised": [],
    }
    assert str(report).splitlines()[0] == "converted: 1 (BatchNorm2d -> BatchNorm)"


@pytest.mark.parametrize("example", [None, torch.randn(1, 3, 64, 64)], ids=["no-inputs", "example-inputs"])
def test_googlenet_aux_heads_syncbn_to_bn(example: torch.Tensor | None) -> None:
    """The aux heads only run in training: an eval forward never reaches them, the model's graph does."""
    from torchvision.models import googlenet

    model = googlenet(weights=None, aux_logits=True, init_weights=False)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    plain = convert(synced, "torch", example_inputs=example)
    assert _types(plain) == _types(model)
    assert type(plain.aux1.conv.bn) is nn.BatchNorm2d


class FixedNorm(nn.Module):
    """A frozen BatchNorm of a user's own, with its own attribute names (taught with register_batchnorm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mu", torch.randn(channels))
        self.register_buffer("var", torch.rand(channels) + 0.5)
        self.register_buffer("gamma", torch.rand(channels) + 0.5)
        self.eps = 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.gamma.view(shape) * (x - self.mu.view(shape)) / (self.var.view(shape) + self.eps).sqrt()


def test_registered_frozen_class_thaws_through_its_description() -> None:
    from bnkit.layers.kinds import register_batchnorm, unregister_batchnorm

    register_batchnorm(FixedNorm, running_mean="mu", running_var="var", weight="gamma", bias=None, frozen=True)
    try:
        model = nn.Sequential(nn.Conv1d(3, 4, 1), FixedNorm(4), nn.Sequential(FixedNorm(4)))
        with pytest.warns(UserWarning, match="nothing to convert to 'bnkit'"):
            kept = convert_with_report(model, "bnkit")[1]
        assert set(kept.kept) == {"1", "2.0"}
        thawed, report = convert_with_report(model, "trainable")  # BatchNorm1d: from the Conv1d and the Sequential
        assert type(thawed[1]) is nn.BatchNorm1d and type(thawed[2][0]) is nn.BatchNorm1d
        assert thawed[1].eps == 1e-3 and torch.equal(thawed[1].weight, model[1].gamma)
        assert torch.equal(thawed[1].bias, torch.zeros(4)) and len(report) == 2
        x = torch.randn(5, 3, 7)
        with torch.no_grad():
            torch.testing.assert_close(thawed.eval()(x), model(x), rtol=1e-5, atol=1e-5)
        lone = FixedNorm(4)
        with pytest.raises(ValueError, match=r"layer '<model>' needs BatchNorm1d, 2d or 3d \(to='trainable'\)"):
            convert(lone, "trainable")
        assert type(convert(lone, "trainable", dim=3)) is nn.BatchNorm3d
    finally:
        unregister_batchnorm(FixedNorm)
