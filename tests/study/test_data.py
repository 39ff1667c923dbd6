"""Splits are disjoint and stratified; shifts are the documented transformations, reproducible by seed."""

from __future__ import annotations

import pytest
import torch

from bnkit.study.data import DOMAINS, Dataset, apply_shift, load_digits_tensors, make_domain, make_splits


def test_splits_are_disjoint_stratified_and_complete() -> None:
    digits = load_digits_tensors()
    # tag every image with its index in an extra pixel channel so disjointness is exact
    tagged = Dataset(
        torch.cat([digits.x, torch.arange(len(digits)).float().view(-1, 1, 1, 1).expand(-1, 1, 8, 8)], dim=1), digits.y
    )
    s = make_splits(3, data=tagged)
    parts = [s.source_train, s.source_test, s.target_train, s.target_test]
    ids = [set(p.x[:, 1, 0, 0].long().tolist()) for p in parts]
    assert sum(len(i) for i in ids) == len(digits) == len(set().union(*ids))
    for part, per_class in zip(parts[:3], (80, 20, 20), strict=True):
        assert torch.bincount(part.y, minlength=10).tolist() == [per_class] * 10
    for part in parts:  # labels follow their images
        torch.testing.assert_close(part.y, digits.y[part.x[:, 1, 0, 0].long()])


def test_splits_depend_on_the_seed_only() -> None:
    a, b, c = make_splits(0), make_splits(0), make_splits(1)
    assert torch.equal(a.target_test.x, b.target_test.x)
    assert not torch.equal(a.target_test.x, c.target_test.x)


def test_shifts_are_the_documented_transformations() -> None:
    x = load_digits_tensors().x[:50]
    torch.testing.assert_close(apply_shift(x, "contrast", 0), 0.3 * x + 0.6)
    torch.testing.assert_close(apply_shift(x, "invert", 0), 1.0 - x)
    noisy = apply_shift(x, "noise", 0)
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert 0.15 < float((noisy - x).std()) < 0.35
    assert torch.equal(noisy, apply_shift(x, "noise", 0))
    assert not torch.equal(noisy, apply_shift(x, "noise", 1))
    blurred = apply_shift(x, "blur", 0)
    assert blurred.shape == x.shape
    # a blur keeps constant images constant and lowers the contrast between neighbouring pixels
    torch.testing.assert_close(apply_shift(torch.full((1, 1, 8, 8), 0.4), "blur", 0), torch.full((1, 1, 8, 8), 0.4))
    assert float(blurred.diff(dim=-1).abs().mean()) < float(x.diff(dim=-1).abs().mean())
    assert torch.equal(apply_shift(x, "source", 0), x)


def test_unknown_domain_and_impossible_split() -> None:
    with pytest.raises(ValueError, match="unknown domain 'fog'"):
        apply_shift(torch.zeros(1, 1, 8, 8), "fog", 0)
    with pytest.raises(ValueError, match="lower source_per_class"):
        make_splits(0, source_per_class=200)
    assert set(DOMAINS) == {"contrast", "blur", "noise", "invert"}
    assert make_domain(Dataset(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2])), "invert", 0).y.tolist() == [1, 2]
