"""convert on the real-architecture matrix (tests/models/zoo.py): round trips exact and type-preserving without
running the model, SyncBN -> BN without dim (Inception/GoogLeNet-style aux heads included), frozen <-> trainable,
timm BatchNormAct kept or converted with its activation; the input model is never touched."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import bnkit
from bnkit.layers.kinds import FROZEN_KINDS, named_batchnorm_like
from bnkit.tools.convert import convert, convert_with_report
from tests.models.zoo import ZOO, ZooModel, build
from tests.tools.conftest import assert_snapshot_equal, take_snapshot
from tests.tools.convert_checks import assert_trains_alike

IDS = [entry.name for entry in ZOO]


def _types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def _quiet(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``function``; the warnings it gives are checked through its report instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _eval_out(entry: ZooModel, model: nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(entry.example())
    if entry.detector:
        return [t for d in out for t in d.values()]
    return [out]


@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_bnkit_round_trip_is_type_preserving_exact_and_leaves_the_input_alone(entry: ZooModel) -> None:
    model = build(entry)
    before = take_snapshot(model)
    as_bnkit, report = _quiet(convert_with_report, model, "bnkit")
    back, back_report = _quiet(convert_with_report, as_bnkit, "torch")  # never run, no dim, no inputs
    if "bnkit" in entry.kinds:  # a bnkit model's round trip is bnkit -> torch -> bnkit
        back = _quiet(convert, back, "bnkit")
    if entry.kinds & {"sync", "timm-sync-bnact"}:
        # "torch" is plain BatchNorm (SyncBN -> BN is what it is for); "torch-sync" synchronises them again
        back = _quiet(convert, back, "torch-sync")
    assert _types(back) == _types(model)
    _assert_same_state(back, model)
    assert_snapshot_equal(before, take_snapshot(model))
    kinds = {info.kind for _, info in named_batchnorm_like(model)}
    if kinds & {"torch", "sync"}:
        assert len(report) == len(back_report) > 0
    if kinds & FROZEN_KINDS:
        assert report.kept and not report.skipped  # frozen layers stay frozen: nothing lost, no warning
    if kinds & {"timm-bnact", "timm-sync-bnact"}:
        assert report.skipped and all("BatchNorm+activation" in reason for reason in report.skipped.values())
    assert not report.unrecognised


def _train_call(entry: ZooModel) -> Any:
    if not entry.detector:
        return None
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 30.0, 28.0]]), "labels": torch.tensor([1])}] * 2
    return lambda model, images: model(images, targets[: len(images)])


@pytest.mark.parametrize("entry", [e for e in ZOO if {"torch", "sync"} & e.kinds], ids=lambda e: e.name)
def test_bnkit_model_trains_and_infers_exactly_as_the_original(entry: ZooModel) -> None:
    model = build(entry)
    as_bnkit = _quiet(convert, model, "bnkit")
    # 4 samples: with 2, EfficientNet's 1x1 late layers leave running variances that blow up eval (torch's own too)
    shape = entry.train_shape or (4, *entry.shape[1:])
    steps = 1 if entry.train_shape else 2
    batches = [torch.randn(shape) for _ in range(steps)]
    assert_trains_alike(model, as_bnkit, batches, eval_input=entry.example())


def _torch_sync(entry: ZooModel, model: nn.Module) -> nn.Module:
    """The model as the ecosystem's own converters make it synchronised (they forget BatchNorm1d/2d/3d)."""
    if "timm-bnact" in entry.kinds:
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(copy.deepcopy(model))
    return nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))


@pytest.mark.parametrize("entry", [e for e in ZOO if e.kinds & {"torch", "timm-bnact"}], ids=lambda e: e.name)
def test_syncbn_to_plain_batchnorm_without_dim_or_inputs(entry: ZooModel) -> None:
    model = build(entry)
    synced = _torch_sync(entry, model)
    assert {type(m).__name__ for m in synced.modules()} & {"SyncBatchNorm", "SyncBatchNormAct"}
    plain, report = _quiet(convert_with_report, synced, "torch")
    assert _types(plain) == _types(model)  # aux heads too: they are not run in eval, the model's graph says
    assert not report.skipped
    _assert_same_state(plain, model)


@pytest.mark.parametrize("name", ["tv_resnet18_sync", "timm_lcnet_050_sync"])
def test_synchronised_zoo_models_become_plain_and_run(name: str) -> None:
    entry = next(e for e in ZOO if e.name == name)
    model = build(entry)
    plain = _quiet(convert, model, "torch")
    names = {type(m).__name__ for m in plain.modules()}
    assert not names & {"SyncBatchNorm", "SyncBatchNormAct"}
    assert names & {"BatchNorm2d", "BatchNormAct2d"}
    torch.testing.assert_close(_eval_out(entry, plain), _eval_out(entry, model), rtol=0, atol=0)


@pytest.mark.parametrize("entry", [e for e in ZOO if e.name != "tv_r3d_18"], ids=lambda e: e.name)
def test_frozen_and_trainable_round_trip(entry: ZooModel) -> None:
    model = build(entry)
    before = take_snapshot(model)
    frozen, report = _quiet(convert_with_report, model, "frozen")
    assert not report.skipped, report.skipped
    kinds = {info.kind for _, info in named_batchnorm_like(frozen)}
    assert kinds <= FROZEN_KINDS, kinds
    torch.testing.assert_close(_eval_out(entry, frozen), _eval_out(entry, model), rtol=1e-4, atol=1e-4)
    thawed = _quiet(convert, frozen, "trainable")
    thawed_kinds = {info.kind for _, info in named_batchnorm_like(thawed)}
    assert thawed_kinds <= {"torch", "timm-bnact"}, thawed_kinds
    assert all(p.requires_grad for _, info in named_batchnorm_like(thawed) for p in (info.weight, info.bias))
    torch.testing.assert_close(_eval_out(entry, thawed), _eval_out(entry, model), rtol=1e-4, atol=1e-4)
    if entry.kinds & FROZEN_KINDS:  # a detector's frozen backbone comes back as it was
        refrozen = _quiet(convert, thawed, "frozen")
        assert _types(refrozen) == _types(model)
        _assert_same_state(refrozen, model)
    assert_snapshot_equal(before, take_snapshot(model))


def test_3d_model_to_frozen_is_skipped_layer_by_layer_not_refused() -> None:
    model = build("tv_r3d_18")
    with pytest.warns(UserWarning, match=r"left as they are for to='frozen'.*takes 4-D inputs"):
        frozen, report = convert_with_report(model, "frozen")
    assert _types(frozen) == _types(model) and len(report.skipped) == 20


@pytest.mark.parametrize("name", ["tv_resnet18", "timm_efficientnet_b0"])
def test_frozen_model_trains_as_bnkit_freeze_says(name: str) -> None:
    """A frozen layer is one that normalises with its running statistics and learns nothing: to="frozen" is
    bnkit.freeze of the same model, in train and eval (to float rounding: FrozenBatchNorm2d's x*scale+shift)."""
    entry = next(e for e in ZOO if e.name == name)
    model = build(entry)
    reference = copy.deepcopy(model)
    bnkit.freeze(reference)
    frozen = convert(model, "frozen")
    assert_trains_alike(reference, frozen, [torch.randn(entry.shape) for _ in range(2)], tol=1e-4)
