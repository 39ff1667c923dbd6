"""The mode model: freeze switches, trainable, per-call training, ghost batches, renorm schedule, masks, precision."""

from __future__ import annotations

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from bnkit import BatchNorm, Renorm


def _trained(bn: BatchNorm, steps: int = 3, shape=(8, 4, 3, 3)) -> BatchNorm:
    for step in range(steps):
        bn(torch.randn(shape, generator=torch.Generator().manual_seed(step)) * 2 + 1)
    return bn


@pytest.mark.parametrize(
    ("training", "freeze_stats", "track", "batch", "update"),
    [
        (True, False, True, True, True),
        (True, True, True, False, False),
        (False, False, True, False, False),
        (False, True, True, False, False),
        (True, False, False, True, False),
        (False, False, False, True, False),
    ],
)
def test_truth_table(training: bool, freeze_stats: bool, track: bool, batch: bool, update: bool) -> None:
    bn = BatchNorm(4, track_running_stats=track)
    if track:
        _trained(bn)
    bn.freeze_stats = freeze_stats
    bn.train(training)
    assert bn.uses_batch_stats() is batch
    assert bn.updates_running_stats() is update
    before = copy.deepcopy(bn.state_dict())
    x = torch.randn(6, 4, 2, 2) * 3 - 1
    y = bn(x)
    changed = any(not torch.equal(before[k], v) for k, v in bn.state_dict().items())
    assert changed is update
    batch_y = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert torch.allclose(y, batch_y, atol=1e-6) is batch


def test_freeze_survives_train_eval_and_deepcopy() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNorm(4), nn.ReLU())
    _trained(model[1])
    model[1].trainable = False
    model.train()
    model = copy.deepcopy(model)
    bn = model[1]
    assert bn.training and bn.freeze_stats and bn.freeze_affine and not bn.trainable
    before = copy.deepcopy(bn.state_dict())
    x = torch.randn(5, 3, 4, 4)
    out = model(x)
    out.sum().backward()
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key])
    assert bn.weight.grad is None and model[0].weight.grad is not None
    torch.testing.assert_close(out, model.eval()(x))


def test_freeze_affine_blocks_gradients_even_if_requires_grad_is_reenabled() -> None:
    bn = BatchNorm(3)
    bn.freeze_affine = True
    bn.requires_grad_(True)  # a common fine-tuning loop re-enables every parameter
    x = torch.randn(4, 3, requires_grad=True)
    bn(x).pow(2).sum().backward()
    assert bn.weight.grad is None and x.grad is not None


def test_trainable_alias() -> None:
    bn = BatchNorm(2)
    bn.freeze_stats = True
    assert bn.trainable  # only one switch set
    bn.trainable = False
    assert (bn.freeze_stats, bn.freeze_affine, bn.trainable) == (True, True, False)
    bn.trainable = True
    assert (bn.freeze_stats, bn.freeze_affine, bn.weight.requires_grad) == (False, False, True)


def test_statistics_only_freeze_keeps_learning_affine() -> None:
    bn = _trained(BatchNorm(4))
    bn.freeze_stats = True
    mean = bn.running_mean.clone()
    bn(torch.randn(6, 4, 2, 2)).pow(2).sum().backward()
    assert torch.equal(bn.running_mean, mean) and bn.weight.grad is not None


def test_training_override_is_per_call_and_per_layer() -> None:
    model = nn.Sequential(BatchNorm(3), BatchNorm(3)).eval()
    x = torch.randn(8, 3)
    model[0](x, training=True)
    assert not model[0].training and not model[1].training
    assert int(model[0].num_batches_tracked) == 1 and int(model[1].num_batches_tracked) == 0
    before = model[0].running_mean.clone()
    model[0](x)  # the next call is back in eval mode
    assert torch.equal(model[0].running_mean, before)
    model.train()
    model[1](x, training=False)
    assert int(model[1].num_batches_tracked) == 0


def test_ghost_requires_divisible_batch_and_documents_contiguous_groups() -> None:
    bn = BatchNorm(2, virtual_batch_size=3)
    with pytest.raises(ValueError, match="not a multiple of virtual_batch_size=3"):
        bn(torch.randn(7, 2))
    assert int(bn.num_batches_tracked) == 0
    x = torch.cat([torch.randn(3, 2), torch.randn(3, 2) * 10 + 50])
    y = bn(x)
    # contiguous chunks: each chunk is normalised on its own
    torch.testing.assert_close(y[:3], BatchNorm(2)(x[:3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[3:], BatchNorm(2)(x[3:]), rtol=1e-5, atol=1e-5)
    bn.eval()
    assert bn(torch.randn(5, 2)).shape == (5, 2)  # any batch size in eval


def test_renorm_schedule_starts_as_plain_batchnorm() -> None:
    renorm = Renorm(rmax=3.0, dmax=5.0, warmup_steps=2, rmax_ramp_steps=4, dmax_ramp_steps=2)
    assert renorm.bounds(0) == (1.0, 1.0, 0.0)
    assert renorm.bounds(1) == (1.0, 1.0, 0.0)
    rmin, rmax, dmax = renorm.bounds(2)
    assert (rmax, dmax) == (1.5, 2.5) and rmin == pytest.approx(1 / 1.5)
    assert renorm.bounds(10) == (pytest.approx(1 / 3), 3.0, 5.0)
    bn = BatchNorm(3, renorm=renorm)
    plain = BatchNorm(3)
    with torch.no_grad():
        bn.renorm_mean.fill_(100.0)  # far from the batch: renorm would move the output a lot
    x = torch.randn(8, 3)
    torch.testing.assert_close(bn(x), plain(x))
    bn(x)
    assert not torch.allclose(bn(x), plain(x))


def test_renorm_paper_schedule() -> None:
    paper = Renorm.paper()
    assert paper.bounds(4999) == (1.0, 1.0, 0.0)
    assert paper.bounds(24_999)[2] == 5.0 and paper.bounds(39_999)[1] == 3.0
    assert 1.0 < paper.bounds(20_000)[1] < 3.0


def test_renorm_state_dict_has_extra_buffers_and_loads_plain_checkpoints() -> None:
    bn = BatchNorm(3, renorm=True)
    assert {"running_std", "renorm_mean", "renorm_std"} <= set(bn.state_dict())
    plain = nn.BatchNorm1d(3)
    plain(torch.randn(6, 3) * 3)
    bn.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(bn.running_std, plain.running_var.sqrt())


def test_fully_masked_batch_changes_nothing_and_gives_no_nan() -> None:
    bn = _trained(BatchNorm(4, axis=-1), shape=(8, 3, 4))
    before = copy.deepcopy(bn.state_dict())
    y = bn(torch.randn(2, 5, 4), mask=torch.zeros(2, 5, dtype=torch.bool))
    assert torch.isfinite(y).all()
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key])


def test_mask_with_one_channel() -> None:
    bn = BatchNorm(1, axis=-1, momentum=1.0, unbiased_running_var=False)
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    bn(x, mask=torch.tensor([[True, True, False]]))
    assert bn.running_mean.tolist() == [2.0] and bn.running_var.tolist() == [1.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32(dtype: torch.dtype) -> None:
    bn = BatchNorm(3, momentum=1.0)
    x32 = torch.randn(16, 3, 4) * 3 + 2
    x = x32.to(dtype)
    y = bn(x)
    assert y.dtype == dtype and bn.running_mean.dtype == torch.float32 and bn.weight.dtype == torch.float32
    ref = BatchNorm(3, momentum=1.0)(x.float())
    torch.testing.assert_close(y, ref.to(dtype))
    torch.testing.assert_close(bn.running_var, torch.var(x.float(), dim=(0, 2)))


def test_bfloat16_values_around_7e4_do_not_overflow() -> None:
    x = (torch.randn(32, 2, 8) * 3e3 + 7e4).to(torch.bfloat16)
    bn = BatchNorm(2)
    y = bn(x)
    assert torch.isfinite(y).all() and torch.isfinite(bn.running_var).all()
    expected = torch.var(x.double(), dim=(0, 2))
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("path", ["native", "general"])
def test_variance_is_stable_when_mean_dwarfs_std(path: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 4, 8, 8, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
    bn = BatchNorm(4, momentum=1.0, unbiased_running_var=path == "native")
    bn(x)
    expected = x.double().transpose(0, 1).reshape(4, -1).var(dim=1, correction=1 if path == "native" else 0)
    rel = ((bn.running_var.double() - expected) / expected).abs().max()
    assert rel < 0.01
    naive = (x * x).mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)) ** 2
    assert ((naive.double() - expected) / expected).abs().max() > 0.01  # the trap this guards against


@pytest.mark.parametrize("where", ["native", "general", "ghost", "renorm"])
def test_nonfinite_batch_never_poisons_running_stats(where: str) -> None:
    kwargs = {
        "native": {},
        "general": {"axis": -1},
        "ghost": {"virtual_batch_size": 2},
        "renorm": {"renorm": True},
    }[where]
    bn = BatchNorm(3, **kwargs)
    x = torch.randn(4, 3)
    bn(x)
    before = copy.deepcopy(bn.state_dict())
    bad = x.clone()
    bad[1, 2] = math.inf if where == "ghost" else math.nan
    bn(bad)  # default on_nonfinite="skip": decided on the device, counted, nothing else changes
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert int(bn.skipped_batches) == 1 and "skipped_batches" not in bn.state_dict()
    bn.on_nonfinite = "raise"
    with pytest.raises(FloatingPointError, match="not finite"):
        bn(bad)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    bn.on_nonfinite = "warn"
    with pytest.warns(RuntimeWarning, match="not finite"):
        bn(bad)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_from_keras_maps_every_argument() -> None:
    bn = BatchNorm.from_keras(
        5,
        momentum=0.9,
        epsilon=1e-4,
        axis=1,
        center=False,
        renorm=True,
        renorm_clipping={"rmax": 2.0},
        renorm_momentum=0.5,
    )
    assert bn.eps == 1e-4 and bn.keras_momentum == 0.9 and bn.momentum == pytest.approx(0.1)
    assert bn.axis == 1 and bn.bias is None and bn.weight is not None and not bn.unbiased_running_var
    assert bn.renorm.keras_momentum == 0.5 and bn.renorm.bounds(0) == (0.0, 2.0, math.inf)


def test_layer_pickles_and_saves_whole() -> None:
    bn = _trained(BatchNorm(4, renorm=True))
    bn.trainable = False
    buffer = io.BytesIO()
    torch.save(bn, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.freeze_stats and not loaded.trainable
    assert torch.equal(loaded.renorm_std, bn.renorm_std)
    assert pickle.loads(pickle.dumps(bn)).freeze_affine


def test_float64_layer_keeps_float64() -> None:
    bn = BatchNorm(3, dtype=torch.float64)
    y = bn(torch.randn(4, 3, dtype=torch.float64))
    assert y.dtype == torch.float64 and bn.running_var.dtype == torch.float64
    np.testing.assert_allclose(bn.running_mean.numpy().shape, (3,))
