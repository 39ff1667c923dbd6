"""Settings validated on assignment, all-or-nothing state dict loads, and the promise as a property:
"a clear error and the state bit-identical, or a correct result"."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trained(name: str = "bn1") -> bnkit.BatchNorm:
    bn = bnkit.BatchNorm(3, name=name)
    bn(torch.randn(8, 3, 2, 2) * 2 + 1)
    return bn


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("momentum", 1.5),
        ("momentum", float("nan")),
        ("momentum", -0.1),
        ("momentum", "0.1"),
        ("eps", -1.0),
        ("eps", 0.0),
        ("eps", float("inf")),
        ("virtual_batch_size", 0),
        ("virtual_batch_size", 2.5),
        ("on_nonfinite", "ignore"),
        ("keras_momentum", 1.2),
    ],
)
def test_bad_assignment_raises_the_constructor_message_and_keeps_the_old_value(setting: str, value: object) -> None:
    bn = _trained()
    old = getattr(bn, setting)
    with pytest.raises(ValueError, match=rf"^bn1: {setting} ") as assigned:
        setattr(bn, setting, value)
    assert "\n" not in str(assigned.value) and getattr(bn, setting) == old
    if setting != "keras_momentum":  # not a constructor argument (from_keras sets it)
        with pytest.raises(ValueError) as constructed:
            bnkit.BatchNorm(3, name="bn1", **{setting: value})
        assert str(constructed.value) == str(assigned.value)


def test_good_assignments_are_stored_normalised() -> None:
    bn = bnkit.BatchNorm(3)
    bn.momentum = 1
    bn.eps = 1
    bn.virtual_batch_size = 4
    bn.momentum = None
    assert (bn.momentum, bn.eps, bn.virtual_batch_size) == (None, 1.0, 4)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.pop("running_var"), r"missing 'running_var'"),
        (lambda s: s.update(extra=torch.ones(1)), r"unexpected 'extra'"),
        (lambda s: s.update(num_batches_tracked=torch.tensor([1, 2])), r"'num_batches_tracked' has shape \(2,\)"),
        (lambda s: s.update(weight=[1.0, 2.0, 3.0]), r"'weight' is a list, not a tensor"),
        (lambda s: s.update(running_mean=torch.ones(4)), r"'running_mean' has shape \(4,\)"),
        (lambda s: s.update(num_batches_tracked=torch.tensor(1.5)), r"'num_batches_tracked' has dtype torch.float32"),
    ],
)
def test_load_state_dict_is_all_or_nothing(change, match: str) -> None:
    bn = _trained()
    before = _state(bn)
    new = {k: v + 1 for k, v in _state(_trained("other")).items()}
    change(new)
    with pytest.raises(ValueError, match=rf"^bn1: .*{match}.*nothing was loaded") as info:
        bn.load_state_dict(new)
    assert "\n" not in str(info.value) and _same(_state(bn), before)


def test_torch_state_dicts_still_load_both_ways() -> None:
    torch_bn = nn.BatchNorm2d(3)
    torch_bn(torch.randn(8, 3, 2, 2))
    bn = bnkit.BatchNorm(3)
    bn.load_state_dict(torch_bn.state_dict())
    assert _same(_state(bn), _state(torch_bn))
    old = {k: v for k, v in torch_bn.state_dict().items() if k != "num_batches_tracked"}
    bn.load_state_dict(old)  # pre-1.2 checkpoints without num_batches_tracked, as torch allows
    nn.BatchNorm2d(3).load_state_dict(bn.state_dict())


def test_model_level_load_through_bnkit_changes_nothing_on_error() -> None:
    model = nn.Sequential(bnkit.BatchNorm(3), bnkit.BatchNorm(4))
    before = _state(model)
    new = {k: v + 1 for k, v in _state(model).items()}
    new["1.running_mean"] = torch.ones(5)
    with pytest.raises(bnkit.WeightsMismatchError, match=r"1\.running_mean"):
        bnkit.load_weights(model, new)
    assert _same(_state(model), before)  # layer 0 was not loaded before layer 1 failed


_SETTING_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["raise", "warn", "skip", "", "0.1"]),
)


def _valid(setting: str, value: object) -> bool:
    real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if setting == "momentum":
        return value is None or (real and 0 <= value <= 1)
    if setting == "eps":
        return real and value > 0
    if setting == "virtual_batch_size":
        return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    return value in ("skip", "raise", "warn")


@settings(max_examples=150, deadline=None)
@given(
    setting=st.sampled_from(["momentum", "eps", "virtual_batch_size", "on_nonfinite"]),
    value=_SETTING_VALUES,
    nan_input=st.booleans(),
)
def test_property_bad_settings_and_inputs(setting: str, value: object, nan_input: bool) -> None:
    bn = _trained()
    before, old = _state(bn), getattr(bn, setting)
    try:
        setattr(bn, setting, value)
    except ValueError as error:
        assert not _valid(setting, value) and "\n" not in str(error) and setting in str(error)
        assert getattr(bn, setting) == old and _same(_state(bn), before)
        return
    assert _valid(setting, value)
    x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    if nan_input:
        x[0, 0, 0, 0] = float("nan")
    before = _state(bn)
    try:
        y = bn(x)
    except (ValueError, FloatingPointError) as error:
        assert "\n" not in str(error) and _same(_state(bn), before)  # a clear error, nothing changed
        return
    if nan_input:
        # skipped update (warn): the statistics are untouched, whatever the output
        assert _same(
            {k: v for k, v in _state(bn).items() if k != "num_batches_tracked"},
            {k: v for k, v in before.items() if k != "num_batches_tracked"},
        )
        return
    reference = nn.BatchNorm2d(3, eps=bn.eps, momentum=bn.momentum).double()
    reference.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in before.items()})
    if bn.virtual_batch_size is None:
        torch.testing.assert_close(y.double(), reference(x.double()), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), reference.running_var, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(y).all()
