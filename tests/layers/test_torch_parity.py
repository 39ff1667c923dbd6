"""bnkit.BatchNorm against torch.nn.BatchNorm1d/2d/3d: outputs, gradients, running statistics, state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnkit import BatchNorm

CASES = {
    "1d-NC": (nn.BatchNorm1d, (12, 5), None),
    "1d-NCL": (nn.BatchNorm1d, (6, 5, 7), None),
    "2d": (nn.BatchNorm2d, (4, 5, 6, 3), torch.contiguous_format),
    "2d-channels_last": (nn.BatchNorm2d, (4, 5, 6, 3), torch.channels_last),
    "3d": (nn.BatchNorm3d, (3, 5, 4, 3, 2), torch.contiguous_format),
    "3d-channels_last": (nn.BatchNorm3d, (3, 5, 4, 3, 2), torch.channels_last_3d),
}


def _batch(shape: tuple[int, ...], fmt: torch.memory_format | None, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(shape, generator=g) * (1.0 + step % 3) + (step % 5 - 2)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def _run_pair(ref: nn.Module, ours: nn.Module, shape, fmt, steps: int, mask_all: bool = False) -> None:
    """Train both for ``steps`` steps, then eval; compare everything after every step."""
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1) if list(ref.parameters()) else None
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1) if list(ours.parameters()) else None
    for step in range(steps):
        x = _batch(shape, fmt, step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = ref(xa)
        if mask_all:
            mask_shape = x.shape[:1] + x.shape[2:]
            yb = ours(xb, mask=torch.ones(mask_shape, dtype=torch.bool))
        else:
            yb = ours(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        weights = torch.linspace(-1, 1, ya.numel()).reshape(ya.shape)
        (ya * weights).sum().backward()
        (yb * weights).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
        if ref.affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
            opt_ref.step()
            opt_ours.step()
            opt_ref.zero_grad()
            opt_ours.zero_grad()
        if ref.track_running_stats:
            torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    ref.eval()
    ours.eval()
    x = _batch(shape, fmt, 99)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_native_path_matches_torch(case: str, momentum: float | None, affine: bool, track: bool) -> None:
    cls, shape, fmt = CASES[case]
    torch.manual_seed(0)
    ref = cls(5, momentum=momentum, affine=affine, track_running_stats=track)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours = BatchNorm.from_torch(ref)
    _run_pair(ref, ours, shape, fmt, steps=30)


@pytest.mark.parametrize("case", ["1d-NCL", "2d", "2d-channels_last", "3d"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_general_path_matches_torch(case: str, momentum: float | None) -> None:
    """An all-True mask forces the pure-torch general path; it must still agree with torch's kernel."""
    cls, shape, fmt = CASES[case]
    ref = cls(5, momentum=momentum)
    ours = BatchNorm.from_torch(ref)
    _run_pair(ref, ours, shape, fmt, steps=30, mask_all=True)


def test_native_path_is_bit_identical_to_torch() -> None:
    ref = nn.BatchNorm2d(8)
    ours = BatchNorm(8)
    for step in range(5):
        x = _batch((4, 8, 5, 5), torch.channels_last, step)
        assert torch.equal(ours(x), ref(x))
    assert torch.equal(ours.running_var, ref.running_var)


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(nn.BatchNorm1d, (4, 7)), (nn.BatchNorm2d, (4, 7, 3, 3)), (nn.BatchNorm3d, (4, 7, 3, 3, 3))],
)
def test_state_dict_loads_strictly_both_ways(cls: type, shape: tuple[int, ...]) -> None:
    ref = cls(7)
    ref(torch.randn(shape))
    ours = BatchNorm(7)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
        assert ours.state_dict()[key].dtype == value.dtype
    back = cls(7)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert int(back.num_batches_tracked) == 1


def test_state_dict_of_untracked_layer_matches_torch() -> None:
    assert list(BatchNorm(3, track_running_stats=False).state_dict()) == list(
        nn.BatchNorm2d(3, track_running_stats=False).state_dict()
    )


def test_from_torch_to_torch_round_trip_is_exact() -> None:
    ref = nn.BatchNorm3d(4, eps=1e-3, momentum=0.3)
    ref(torch.randn(3, 4, 2, 2, 2))
    ref.weight.requires_grad_(False)
    ref.eval()
    ours = BatchNorm.from_torch(ref)
    assert not ours.training and not ours.weight.requires_grad
    back = ours.to_torch(dim=3)
    assert type(back) is nn.BatchNorm3d
    assert (back.eps, back.momentum, back.training) == (1e-3, 0.3, False)
    assert not back.weight.requires_grad
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


def test_to_torch_picks_dimensionality_from_last_input() -> None:
    bn = BatchNorm(3)
    bn(torch.randn(2, 3, 4, 4, 4))
    assert type(bn.to_torch()) is nn.BatchNorm3d
    bn(torch.randn(5, 3))
    assert type(bn.to_torch()) is nn.BatchNorm1d


def test_to_torch_refuses_what_torch_cannot_express() -> None:
    with pytest.raises(ValueError, match="biased running variance"):
        BatchNorm(3, unbiased_running_var=False).to_torch()
    with pytest.raises(ValueError, match="channel axis -1"):
        BatchNorm(3, axis=-1).to_torch()
    lenient = BatchNorm.from_keras(3).to_torch(dim=1, strict=False)
    assert lenient.eps == pytest.approx(1e-3)


def test_deepcopy_keeps_state_and_switches() -> None:
    bn = BatchNorm(4)
    bn(torch.randn(6, 4))
    bn.freeze_stats = True
    bn.freeze_affine = True
    clone = copy.deepcopy(bn)
    assert clone.freeze_stats and clone.freeze_affine and not clone.weight.requires_grad
    assert torch.equal(clone.running_mean, bn.running_mean)


def test_bias_free_torch_layer_round_trips() -> None:
    ref = nn.BatchNorm2d(4, bias=False)
    ref(torch.randn(3, 4, 2, 2))
    ours = BatchNorm.from_torch(ref)
    assert ours.bias is None and list(ours.state_dict()) == list(ref.state_dict())
    back = ours.to_torch(dim=2)
    assert back.bias is None
    x = torch.randn(3, 4, 2, 2)
    assert torch.equal(ours.eval()(x), ref.eval()(x)) and torch.equal(back.eval()(x), ref(x))


def test_untracked_layer_is_bit_identical_to_torch_in_training() -> None:
    ref = nn.BatchNorm2d(4, track_running_stats=False)
    ours = BatchNorm.from_torch(ref)
    x = torch.randn(3, 4, 5, 5) * 7 + 3
    assert torch.equal(ours(x), ref(x))
