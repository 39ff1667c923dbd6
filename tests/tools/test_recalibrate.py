"""recalibrate: precise population statistics (oracle: float64 statistics of the whole data set), EMA updates,
sequential mode, exact restoration on success and on any exception, distributed merging, bad inputs."""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import bnkit
from bnkit.tools.freeze import freeze, is_frozen_affine, is_frozen_stats
from bnkit.tools.recalibrate import RecalibrationReport, recalibrate


@contextlib.contextmanager
def _no_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


SPLITS = [[64, 64, 64, 13], [1, 100, 7, 50, 47], [205]]


def dataset(n: int = 205, channels: int = 4) -> torch.Tensor:
    """float32 data with |mean| >> std on some channels, where E[x^2] - E[x]^2 would cancel."""
    x = torch.randn(n, channels, 5, 5)
    return x * torch.tensor([0.5, 3.0, 0.01, 1.0])[:channels].view(1, -1, 1, 1) + torch.tensor([100.0, -3.0, 7.0, 0.0])[
        :channels
    ].view(1, -1, 1, 1)


def whole(x: torch.Tensor, axis: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dims = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
    x64 = x.double()
    return x64.mean(dims), x64.var(dims, correction=1), x64.var(dims, correction=0)


def assert_rel(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6, scale: torch.Tensor | None = None
) -> None:
    """Relative error per channel; ``scale`` (the standard deviation, for means) replaces |expected| when larger,
    since a mean of 0 +- rounding has no meaningful relative error."""
    denom = expected.abs() if scale is None else torch.maximum(expected.abs(), scale)
    err = ((actual.double() - expected).abs() / denom.clamp_min(1e-12)).max().item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def first_layer_models() -> dict[str, tuple[nn.Module, bool, int]]:
    """name -> (model whose first layer is the BatchNorm, stores unbiased variance, channel axis)."""
    tail = nn.Sequential(nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    return {
        "torch": (nn.Sequential(nn.BatchNorm2d(4), copy.deepcopy(tail)), True, 1),
        "sync": (nn.Sequential(nn.SyncBatchNorm(4), copy.deepcopy(tail)), True, 1),
        "bnkit": (nn.Sequential(bnkit.BatchNorm(4), copy.deepcopy(tail)), True, 1),
        "bnkit-biased": (nn.Sequential(bnkit.BatchNorm(4, unbiased_running_var=False), copy.deepcopy(tail)), False, 1),
        "bnkit-keras-channels-last": (nn.Sequential(bnkit.BatchNorm.from_keras(4, axis=-1)), False, -1),
        "bnkit-ghost": (nn.Sequential(bnkit.BatchNorm(4, virtual_batch_size=1), copy.deepcopy(tail)), True, 1),
        "bnkit-renorm": (nn.Sequential(bnkit.BatchNorm(4, renorm=True), copy.deepcopy(tail)), True, 1),
    }


@pytest.mark.parametrize("split", SPLITS, ids=["uneven-last", "ragged", "one-batch"])
@pytest.mark.parametrize("kind", list(first_layer_models()))
def test_precise_equals_whole_dataset_statistics(kind: str, split: list[int]) -> None:
    model, unbiased, axis = first_layer_models()[kind]
    x = dataset()
    if axis == -1:
        x = x.permute(0, 2, 3, 1).contiguous()
    mean, var_unbiased, var_biased = whole(x, axis)
    report = recalibrate(model, list(x.split(split)), progress=False)
    bn = model[0]
    assert_rel(bn.running_mean, mean, scale=var_biased.sqrt())
    assert_rel(bn.running_var, var_unbiased if unbiased else var_biased)
    assert report.counts["0"] == x.numel() // 4
    assert report.batches == len(split) and report.passes == 1 and report.method == "precise"
    if kind == "bnkit-renorm":
        torch.testing.assert_close(bn.running_std, torch.sqrt(bn.running_var + bn.eps))


def test_precise_batchnorm1d_on_features() -> None:
    x = torch.randn(301, 6) * 5 + 40
    model = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 2))
    recalibrate(model, list(x.split(32)), progress=False)
    mean, var, _ = whole(x)
    assert_rel(model[0].running_mean, mean, scale=var.sqrt())
    assert_rel(model[0].running_var, var)


def test_precise_captures_between_batch_variance_unlike_update_bn() -> None:
    """Batches with different means: averaging per-batch variances (swa_utils.update_bn) misses the spread."""
    batches = [torch.randn(50, 3) + shift for shift in (-5.0, 0.0, 5.0)]
    _, var, _ = whole(torch.cat(batches))
    ours = nn.Sequential(nn.BatchNorm1d(3))
    recalibrate(ours, batches, progress=False)
    assert_rel(ours[0].running_var, var)
    theirs = nn.Sequential(nn.BatchNorm1d(3))
    torch.optim.swa_utils.update_bn(batches, theirs)
    assert (theirs[0].running_var.double() < 0.2 * var).all()


def test_one_pass_deeper_layer_sees_earlier_layers_on_batch_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5))
    batches = list((torch.randn(70, 3, 6, 6) * 2 + 1).split([32, 32, 6]))
    reference = copy.deepcopy(model).train()
    inputs = []
    reference[4].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        for batch in batches:
            reference(batch)
    mean, var, _ = whole(torch.cat(inputs))
    recalibrate(model, batches, progress=False)
    assert_rel(model[4].running_mean, mean, 1e-5, scale=var.sqrt())
    assert_rel(model[4].running_var, var, 1e-5)


def test_sequential_uses_earlier_layers_new_population_statistics() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 2, 1),
        bnkit.BatchNorm(2, unbiased_running_var=False),
    )
    data = torch.randn(90, 3, 6, 6) * 3 + 2
    batches = list(data.split([40, 40, 10]))
    report = recalibrate(model, batches, progress=False, sequential=True)
    assert report.passes == 3 and report.batches == 3
    # Oracle: in eval mode, each layer's input over the whole data set has exactly its statistics.
    seen: dict[int, torch.Tensor] = {}
    check = copy.deepcopy(model).eval()
    for index in (1, 4, 7):
        check[index].register_forward_pre_hook(lambda m, a, i=index: seen.__setitem__(i, a[0].detach()))
    with torch.no_grad():
        check(data)
    for index, unbiased in ((1, True), (4, True), (7, False)):
        mean, var_u, var_b = whole(seen[index])
        assert_rel(model[index].running_mean, mean, 1e-5, scale=var_u.sqrt())
        assert_rel(model[index].running_var, var_u if unbiased else var_b, 1e-5)
    one_pass = copy.deepcopy(model)
    recalibrate(one_pass, batches, progress=False)
    assert torch.equal(one_pass[1].running_var, model[1].running_var)  # the first layer: identical
    assert not torch.allclose(one_pass[7].running_var, model[7].running_var, rtol=1e-3)


def test_ema_is_plain_momentum_updates() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4, momentum=0.3), bnkit.BatchNorm.from_keras(4, axis=1)
    )
    batches = [torch.randn(8, 3, 5, 5) for _ in range(3)]
    reference = copy.deepcopy(model)
    reference.eval()
    reference[2].train()
    reference[3].train()
    with torch.no_grad():
        for batch in batches:
            reference(batch)
    model.eval()
    report = recalibrate(model, batches, method="ema", progress=False)
    assert report.counts == {"2": 3, "3": 3} and report.method == "ema"
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert not any(m.training for m in model.modules())


def test_flags_momentum_freeze_and_hooks_are_restored_on_success(snapshot) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Dropout(), bnkit.BatchNorm(4))
    freeze(model, layers="1")
    freeze(model, layers="3", affine=False)
    model.train()
    model[2].eval()
    model[0].register_forward_hook(lambda m, a, o: None)
    before = snapshot(model)
    data = torch.randn(20, 3, 6, 6) * 4 - 1
    report = recalibrate(model, list(data.split(7)), progress=False)
    after = snapshot(model)
    for field in ("training", "requires_grad", "types", "momentum", "freeze", "hooks"):
        assert before[field] == after[field], field
    assert is_frozen_stats(model[1]) and is_frozen_affine(model[1]) and model[3].freeze_stats
    assert set(report.counts) == {"1", "3"}  # frozen layers are recalibrated too
    assert torch.equal(after["state"]["1.num_batches_tracked"], before["state"]["1.num_batches_tracked"])
    h = model[0](data).detach()
    mean, var, _ = whole(h)
    assert_rel(model[1].running_mean, mean, scale=var.sqrt())
    assert_rel(model[1].running_var, var)


class Boom(Exception):
    pass


def failing(batches: list[torch.Tensor], after: int, error: BaseException) -> Iterator[torch.Tensor]:
    for index, batch in enumerate(batches):
        if index == after:
            raise error
        yield batch


@pytest.mark.parametrize("error", [Boom("data"), KeyboardInterrupt()], ids=["exception", "keyboard-interrupt"])
@pytest.mark.parametrize(("method", "sequential"), [("precise", False), ("precise", True), ("ema", False)])
def test_iterator_exception_leaves_model_bit_identical(error, method, sequential, snapshot, same) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=None),
        nn.ReLU(),
        nn.Dropout(),
        nn.Sequential(bnkit.BatchNorm(4, renorm=True), nn.SyncBatchNorm(4)),
        nn.BatchNorm2d(4),
    )
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 6, 6))
        model[1].running_var[0] = float("nan")  # a diverged layer: restored bit for bit, NaN included
    freeze(model, layers="5")
    model[3].eval()
    batches = [torch.randn(8, 3, 6, 6) for _ in range(4)]
    before = snapshot(model)

    class Data:
        """Re-iterable; the pass that breaks depends on the mode (sequential breaks in a later pass)."""

        def __init__(self) -> None:
            self.passes = 0

        def __iter__(self) -> Iterator[torch.Tensor]:
            self.passes += 1
            if sequential and self.passes == 1:
                return iter(batches)
            return failing(batches, 2, error)

    with pytest.raises(type(error)):
        recalibrate(model, Data(), method=method, progress=True, sequential=sequential)
    same(before, snapshot(model))


def test_forward_exception_leaves_model_bit_identical(snapshot, same) -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    before = snapshot(model)
    batches = [torch.randn(4, 3, 2, 2), torch.randn(4, 5, 2, 2)]  # the second has the wrong channel count
    with pytest.raises(RuntimeError):
        recalibrate(model, batches, progress=False)
    same(before, snapshot(model))


def test_non_finite_data_raises_and_leaves_model_unchanged(snapshot, same) -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3))
    before = snapshot(model)
    bad = torch.randn(8, 3)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="layer 0 got non-finite statistics"):
        recalibrate(model, [torch.randn(8, 3), bad], progress=False)
    same(before, snapshot(model))


def test_custom_forward_dict_and_tuple_batches() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.bn(a + b)

    a, b = torch.randn(30, 2) * 2, torch.randn(30, 2) + 3
    mean, var, _ = whole(a + b)
    for batches, kwargs in (
        ([{"a": a[:20], "b": b[:20]}, {"a": a[20:], "b": b[20:]}], {}),
        ([(a[:11], b[:11]), (a[11:], b[11:])], {"forward": lambda model, batch: model(*batch)}),
    ):
        model = TwoInputs()
        recalibrate(model, batches, progress=False, **kwargs)
        assert_rel(model.bn.running_mean, mean, scale=var.sqrt())
        assert_rel(model.bn.running_var, var)
    # a DataLoader-style (inputs, targets) pair feeds inputs only
    x = torch.randn(40, 2) + 1
    model = nn.Sequential(nn.BatchNorm1d(2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(40)), batch_size=16)
    recalibrate(model, loader, progress=False)
    assert_rel(model[0].running_var, whole(x)[1])


def test_num_batches_limits_and_does_not_overdraw() -> None:
    batches = [torch.randn(10, 3) * (i + 1) for i in range(5)]
    drawn = []

    def generator() -> Iterator[torch.Tensor]:
        for batch in batches:
            drawn.append(batch)
            yield batch

    model = nn.Sequential(nn.BatchNorm1d(3))
    report = recalibrate(model, generator(), num_batches=2, progress=False)
    assert len(drawn) == 2 and report.batches == 2
    assert_rel(model[0].running_var, whole(torch.cat(batches[:2]))[1])


def test_layers_selection_leaves_other_layers_untouched() -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.Linear(3, 3),
        nn.BatchNorm1d(3),
        nn.BatchNorm1d(3, affine=False, track_running_stats=False),
    )
    untouched = model[0].state_dict()
    untouched = {k: v.clone() for k, v in untouched.items()}
    report = recalibrate(model, [torch.randn(16, 3) * 3 + 1], layers=["2", "3"], progress=False)
    assert set(report.counts) == {"2"} and "track_running_stats=False" in report.skipped["3"]
    for key, value in untouched.items():
        assert torch.equal(model[0].state_dict()[key], value)
    # the unselected layer ran in eval mode: layer 2 saw inputs normalised with layer 0's running statistics
    x = torch.randn(16, 3)
    fresh = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()})
    recalibrate(fresh, [x], layers="2", progress=False)
    with torch.no_grad():
        h = fresh[1](fresh[0].eval()(x))
    assert_rel(fresh[2].running_mean, whole(h)[0], 1e-5, scale=whole(h)[1].sqrt())


def test_layer_never_called_is_skipped_with_a_warning() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.BatchNorm1d(2)
            self.unused = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Branchy()
    before = model.unused.running_var.clone()
    with pytest.warns(UserWarning, match="unused never ran"):
        report = recalibrate(model, [torch.randn(5, 2) + 4], progress=False)
    assert report.skipped == {"unused": "never called during the forward passes"}
    assert torch.equal(model.unused.running_var, before)


def test_shared_layer_pools_all_its_calls() -> None:
    bn = nn.BatchNorm1d(2)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = bn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x) + self.bn(x * 2 + 5)

    x = torch.randn(12, 2)
    model = Twice()
    report = recalibrate(model, [x[:7], x[7:]], progress=False, sequential=True)
    assert report.counts == {"bn": 24}
    _, var, _ = whole(torch.cat([x[:7], x[:7] * 2 + 5, x[7:], x[7:] * 2 + 5]))
    assert_rel(model.bn.running_var, var)


def test_bad_inputs_raise_and_leave_the_model_unchanged(snapshot, same) -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    before = snapshot(model)
    x = torch.randn(4, 3)
    cases = [
        (TypeError, "got a single Tensor", dict(data=x)),
        (TypeError, "must be an iterable of batches", dict(data=3)),
        (ValueError, "method must be one of precise, ema", dict(data=[x], method="fast")),
        (ValueError, "num_batches must be a positive int", dict(data=[x], num_batches=0)),
        (ValueError, "num_batches must be a positive int", dict(data=[x], num_batches=True)),
        (TypeError, "forward must be a callable", dict(data=[x], forward="model")),
        (ValueError, "sequential=True applies to method='precise' only", dict(data=[x], method="ema", sequential=True)),
        (ValueError, "must be re-iterable", dict(data=iter([x]), sequential=True)),
        (ValueError, "data yielded no batches", dict(data=[])),
        (ValueError, "matched no BatchNorm layer", dict(data=[x], layers="head.*")),
        (TypeError, "progress must be True or False", dict(data=[x], progress="yes")),
    ]
    for error, message, kwargs in cases:
        data = kwargs.pop("data")
        with pytest.raises(error, match=message):
            recalibrate(model, data, **{"progress": False, **kwargs})
        same(before, snapshot(model))
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        recalibrate(None, [x])
    with pytest.raises(ValueError, match="no selected BatchNorm layer has running statistics"):
        recalibrate(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), [x], progress=False)
    with pytest.raises(ValueError, match="lazy module"):
        recalibrate(nn.Sequential(nn.LazyBatchNorm1d()), [x], progress=False)


def test_report_type_and_progress_bar_runs() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    report = recalibrate(model, [torch.randn(4, 3)] * 3, progress=True)
    assert isinstance(report, RecalibrationReport) and report.counts == {"0": 12}


# ---------------------------------------------------------------- distributed: two gloo CPU processes

_SHARDS = [[30, 1], [7, 9, 40]]  # uneven per-rank data, uneven batches


def _dist_worker(rank: int, world: int, init_file: str, outdir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        data = dataset(87, 3)  # the same draw as in the parent test
        model = nn.Sequential(bnkit.BatchNorm(3, sync=True), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
        start = sum(sum(s) for s in _SHARDS[:rank])
        mine = data[start : start + sum(_SHARDS[rank])]
        report = recalibrate(model, list(mine.split(_SHARDS[rank])), progress=False)
        torch.save({"state": model.state_dict(), "counts": report.counts}, os.path.join(outdir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_statistics_are_merged_across_ranks() -> None:
    with tempfile.TemporaryDirectory() as outdir:
        init_file = os.path.join(outdir, "init")
        mp.start_processes(_dist_worker, args=(2, init_file, outdir), nprocs=2, start_method="spawn", join=True)
        results = [torch.load(os.path.join(outdir, f"{r}.pt")) for r in range(2)]
    data = dataset(87, 3)
    mean, var, _ = whole(data)
    for result in results:
        assert result["counts"]["0"] == data.numel() // 3
        assert_rel(result["state"]["0.running_mean"], mean, scale=var.sqrt())
        assert_rel(result["state"]["0.running_var"], var)
    for key in results[0]["state"]:
        assert torch.equal(results[0]["state"][key], results[1]["state"][key]), key


def test_include_frozen_recalibrates_frozen_batchnorm_exactly() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    frozen = torchvision.ops.FrozenBatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), frozen, nn.ReLU(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    batches = [torch.randn(4, 2, 6, 6) * 2 + 1, torch.randn(3, 2, 6, 6)]
    with _no_warning():
        report = recalibrate(model, batches, progress=False)
    assert list(report.counts) == ["4"]
    assert "pass include_frozen=True" in report.skipped["1"]
    assert torch.equal(frozen.running_mean, torch.zeros(3))  # left as it was
    # reference: the conv outputs over all batches, float64 (the frozen layer is the first BN: its input does not
    # depend on how BatchNorm layers normalise)
    with torch.no_grad():
        conv = torch.cat([model[0](b) for b in batches]).double().transpose(0, 1).reshape(3, -1)
    report = recalibrate(model, batches, progress=False, include_frozen=True)
    assert report.counts == {"1": conv.shape[1], "4": report.counts["4"]}
    torch.testing.assert_close(frozen.running_mean.double(), conv.mean(1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(frozen.running_var.double(), conv.var(1), rtol=1e-6, atol=1e-7)


def test_only_frozen_layers_raise_with_the_hint() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = nn.Sequential(torchvision.ops.FrozenBatchNorm2d(3))
    before = model[0].running_var.clone()
    with pytest.raises(ValueError, match=r"1 with statistics fixed by class, e\.g\. 0: pass include_frozen=True"):
        recalibrate(model, [torch.randn(2, 3, 4, 4)], progress=False)
    with pytest.raises(ValueError, match="no selected BatchNorm layer"):
        recalibrate(model, [torch.randn(2, 3, 4, 4)], progress=False, include_frozen=True, method="ema")
    assert torch.equal(model[0].running_var, before)
    with pytest.raises(TypeError, match="include_frozen must be True or False"):
        recalibrate(model, [torch.randn(2, 3, 4, 4)], include_frozen="yes")


def test_unrecognised_modules_with_running_statistics_are_reported() -> None:
    class Stats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(2))
            self.register_buffer("running_var", torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - self.running_mean

    model = nn.Sequential(nn.BatchNorm1d(2), Stats())
    with pytest.warns(UserWarning, match=r"recalibrate: .*not recognise.*: 1"):
        report = recalibrate(model, [torch.randn(4, 2)], progress=False)
    assert list(report.counts) == ["0"] and "does not recognise" in report.skipped["1"]
