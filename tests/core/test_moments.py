"""The numerical core against float64 numpy: moments, masked moments, Chan merges, update rules, divergence."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from bnkit.core.divergence import gaussian_symmetric_kl
from bnkit.core.moments import Moments, channel_moments, ghost_moments, merge_all, merge_moments, variance
from bnkit.core.normalize import scale_shift
from bnkit.core.running import ema_update, keras_ema_update, momentum_factor, unbias


@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(lambda s: sum(s) > 1),
    offset=st.sampled_from([0.0, 1e4, -3.0]),
    seed=st.integers(0, 1000),
)
def test_chan_merge_of_parts_equals_moments_of_whole(sizes: list[int], offset: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64) + offset
    parts = [channel_moments(chunk, (0,)) for chunk in torch.split(x, sizes)]
    merged = merge_all(parts)
    np.testing.assert_allclose(merged.mean.numpy(), x.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(variance(merged).numpy(), x.var(0, correction=0).numpy(), rtol=1e-9)
    np.testing.assert_allclose(variance(merged, unbiased=True).numpy(), x.var(0).numpy(), rtol=1e-9)
    assert float(merged.count) == sum(sizes)


def test_empty_parts_are_neutral_and_give_no_nan() -> None:
    empty = channel_moments(torch.zeros(0, 2), (0,))
    assert float(empty.count) == 0 and torch.equal(empty.mean, torch.zeros(2))
    full = channel_moments(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), (0,))
    merged = merge_moments(empty, merge_moments(full, empty))
    assert torch.equal(merged.mean, full.mean) and torch.equal(merged.m2, full.m2)
    nothing = merge_moments(empty, empty)
    assert torch.isfinite(nothing.mean).all() and float(variance(nothing, unbiased=True).sum()) == 0.0


def test_masked_moments_use_only_true_positions() -> None:
    x = torch.tensor([[1.0, 10.0], [3.0, 20.0], [100.0, 30.0]])
    mask = torch.tensor([[True], [True], [False]])
    m = channel_moments(x, (0,), mask)
    assert m.mean.tolist() == [2.0, 15.0] and variance(m).tolist() == [1.0, 25.0]
    none = channel_moments(x, (0,), torch.zeros(3, 1, dtype=torch.bool))
    assert none.mean.tolist() == [0.0, 0.0] and none.count.tolist() == [0.0, 0.0]


def test_ghost_moments_are_per_contiguous_group() -> None:
    x = torch.arange(24.0).reshape(4, 3, 2)  # batch 4, channels 3, length 2
    count, mean, var = ghost_moments(x, 1, 2)
    assert float(count) == 4 and mean.shape == (2, 3)
    first = x[:2].transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mean[0], first.mean(1))
    torch.testing.assert_close(var[0], first.var(1, correction=0))


def test_update_rules_follow_both_conventions() -> None:
    running, batch = torch.tensor([1.0]), torch.tensor([3.0])
    assert ema_update(running, batch, 0.25).item() == 1.5
    assert keras_ema_update(running, batch, 0.75).item() == 1.5
    assert momentum_factor(None, 5) == 0.2
    assert unbias(torch.tensor([3.0]), 4.0).item() == 4.0


def test_scale_shift_is_inference_batchnorm() -> None:
    bn = torch.nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    a, b = scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    x = torch.randn(5, 3)
    torch.testing.assert_close(x * a + b, bn(x))


def test_symmetric_kl_is_symmetric_zero_on_equal_and_grows_with_shift() -> None:
    m, v = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])
    assert gaussian_symmetric_kl(m, v, m, v).abs().max() < 1e-12
    a = gaussian_symmetric_kl(m, v, m + 1, v * 3)
    torch.testing.assert_close(a, gaussian_symmetric_kl(m + 1, v * 3, m, v))
    assert (gaussian_symmetric_kl(m, v, m + 2, v) > gaussian_symmetric_kl(m, v, m + 1, v)).all()


def test_moments_namedtuple_fields() -> None:
    assert Moments._fields == ("count", "mean", "m2")
