"""Every tool on every BatchNorm kind, on real torchvision and timm architectures (tests/models/zoo.py).

Oracles: the real classes themselves (which modules are BatchNorm layers is decided here with isinstance on
torch's, torchvision's and timm's classes, not with bnkit's recognition), counts computed from the tensors, the
model's own training-mode forward for frozen statistics, and for recalibration the float64 statistics of every
layer's inputs captured while the REAL layers normalise with batch statistics in training mode (frozen layers
turned back into trainable ones with timm's own ``unfreeze_batch_norm_2d``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import bnkit
from tests.models.zoo import ZOO, ZooModel, build

torchvision = pytest.importorskip("torchvision")
timm_layers = pytest.importorskip("timm.layers")

FROZEN_CLASSES = (torchvision.ops.FrozenBatchNorm2d, timm_layers.FrozenBatchNormAct2d)
BN_CLASSES = (nn.modules.batchnorm._BatchNorm, bnkit.BatchNorm, *FROZEN_CLASSES)

IDS = [entry.name for entry in ZOO]


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers by their real classes (the oracle for bnkit's recognition)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BN_CLASSES)]


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_explain_has_one_row_per_batchnorm(entry: ZooModel) -> None:
    model = build(entry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unrecognised in a stock model: no warning
        rows = bnkit.explain(model)
    expected = _batchnorms(model)
    assert [row.name for row in rows] == [name for name, _ in expected]
    for row, (_, module) in zip(rows, expected, strict=True):
        assert row.kind in entry.kinds
        assert row.channels == module.running_mean.numel()
        act = getattr(module, "act", None)
        assert row.after == ([] if act is None or isinstance(act, nn.Identity) else [type(act).__name__])
        if isinstance(module, FROZEN_CLASSES):
            assert (row.train.normalize, row.eval.normalize, row.affine) == ("running", "running", "fixed")
            assert not row.train.updates_running_stats
        else:
            assert (row.train.normalize, row.eval.normalize, row.affine) == ("batch", "running", "learn")
            assert row.train.updates_running_stats


@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_summary_counts_match_the_tensors(entry: ZooModel) -> None:
    model = build(entry)
    trainable_layers = [name for name, m in _batchnorms(model) if not isinstance(m, FROZEN_CLASSES)]
    if trainable_layers:  # some frozen gamma/beta move to non-trainable
        bnkit.freeze(model, stats=False, layers=trainable_layers[:3])
    params = list(model.parameters())  # unique
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    statistics = 0
    for _, module in _batchnorms(model):
        statistics += module.running_mean.numel() + module.running_var.numel()
        if isinstance(module, FROZEN_CLASSES):
            statistics += module.weight.numel() + module.bias.numel()  # buffers: non-trainable in Keras
    buffers = sum(b.numel() for b in model.state_dict().values()) - sum(p.numel() for p in params)
    result = bnkit.summary(model)
    assert (result.trainable, result.non_trainable) == (trainable, frozen + statistics)
    assert result.total == trainable + frozen + statistics
    assert (result.parameters, result.trainable_parameters, result.buffers) == (trainable + frozen, trainable, buffers)


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_mobilenet_v3_small"])
def test_summary_of_a_saved_torchscript_file_counts_the_statistics(name: str, tmp_path) -> None:
    model = build(name)
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = torch.jit.load(str(path))
    expected, scripted = bnkit.summary(model), _quiet(bnkit.summary, loaded)
    assert (scripted.total, scripted.trainable, scripted.non_trainable) == (
        expected.total,
        expected.trainable,
        expected.non_trainable,
    )
    assert "BatchNorm2d" in {row.type for row in scripted.rows}


@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_freeze_survives_train(entry: ZooModel) -> None:
    model = build(entry)
    report = bnkit.freeze(model)
    layers = _batchnorms(model)
    fixed = {name for name, m in layers if isinstance(m, FROZEN_CLASSES)}
    assert set(report.changed) == {name for name, _ in layers} - fixed
    assert set(report.skipped) == fixed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.no_grad():
        entry.train_step(model)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    for name, module in layers:
        assert not any(p.requires_grad for p in module.parameters(recurse=False)), name
        assert bnkit.is_frozen_stats(module), name


def _reference_statistics(entry: ZooModel, model: nn.Module, names: set[str]) -> dict[str, tuple[Any, Any, int]]:
    """Float64 mean and unbiased variance of each layer's inputs over all batches, with the real layers in
    training mode (batch statistics) and everything else in eval mode."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, FROZEN_CLASSES) and not hasattr(module, "num_features"):
            module.num_features, module.affine = module.weight.numel(), True  # what timm's converter reads
    reference = timm_layers.unfreeze_batch_norm_2d(reference).double().eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in reference.named_modules():
        if name in names:
            assert isinstance(module, (nn.modules.batchnorm._BatchNorm, bnkit.BatchNorm)), name
            module.train()

            def hook(mod: nn.Module, args: Any, name: str = name) -> None:
                inputs.setdefault(name, []).append(args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1))

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in _double_batches(entry):
            reference(batch)
    for handle in handles:
        handle.remove()
    stats = {}
    for name, parts in inputs.items():
        values = torch.cat(parts, dim=1)
        stats[name] = (values.mean(1), values.var(1, unbiased=True), values.shape[1])
    return stats


def _double_batches(entry: ZooModel) -> list[Any]:
    return [[x.double() for x in b] if isinstance(b, list) else b.double() for b in entry.batches()]


@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_recalibrate_is_exact_against_a_float64_reference(entry: ZooModel) -> None:
    # Both in float64, so the comparison measures recalibrate's arithmetic (per-batch moments, Chan merges),
    # not float32 rounding, which batch-statistics normalisation amplifies through deep stacks when a batch has
    # few values per channel (1e-3 in the last stage of a 32x32 ResNet-18 at batches of 2); averaging per-batch
    # variances instead of merging them would miss the between-batch variance and fail here.
    model = build(entry).double()
    names = {name for name, _ in _batchnorms(model)}
    fixed = {name for name, m in _batchnorms(model) if isinstance(m, FROZEN_CLASSES)}
    if fixed == names:  # every layer frozen by class: nothing without include_frozen, and the report says why
        with pytest.raises(ValueError, match="include_frozen=True"):
            bnkit.recalibrate(model, entry.batches(), forward=entry.forward, progress=False)
    reference = _reference_statistics(entry, model, names)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="recalibrate: .* never ran")  # Inception's aux head in eval()
        report = bnkit.recalibrate(
            model, _double_batches(entry), forward=entry.forward, progress=False, include_frozen=True
        )
    assert set(report.counts) == set(reference)
    assert set(report.skipped) == names - set(reference)
    modules = dict(model.named_modules())
    for name, (mean, var, count) in reference.items():
        module = modules[name]
        assert report.counts[name] == count, name
        torch.testing.assert_close(module.running_mean, mean, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(module.running_var, var, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("entry", [e for e in ZOO if e.classification], ids=lambda e: e.name)
def test_doctor_is_quiet_on_stock_models_for_inference(entry: ZooModel) -> None:
    model = build(entry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        findings = bnkit.doctor(model, entry.example(), intent="inference")
    assert [f for f in findings if f.severity != "info"] == [], str(findings)


def test_doctor_takes_a_detectors_list_of_images() -> None:
    entry = next(e for e in ZOO if e.detector)
    model = build(entry)
    findings = bnkit.doctor(model, entry.example(), intent="inference")  # a list is ONE positional argument
    assert findings.codes() == []
    model.backbone.body.layer1[0].bn1.running_var.zero_()
    assert "BN009" in bnkit.doctor(model, entry.example(), intent="inference").codes()


@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_shift_sees_every_layer(entry: ZooModel) -> None:
    model = build(entry)
    report = bnkit.shift(model, entry.batches(), forward=entry.forward)
    names = [name for name, _ in _batchnorms(model)]
    seen = [layer.name for layer in report.layers]
    assert seen == [name for name in names if name in seen]
    assert set(names) - set(seen) == {s.split(" ")[0] for s in report.skipped}
    assert all(layer.distance >= 0 for layer in report.layers)
