"""``bnkit.read_checkpoint`` / ``bnkit.load_weights``: no code runs without trust_pickle; all-or-nothing loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
from bnkit.tools.checkpoint import UntrustedFileError, WeightsMismatchError


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_payload_refused_before_it_runs_and_runs_when_trusted(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "extra": _Payload(marker)}, path)
    with pytest.raises(UntrustedFileError, match=r"evil\.pt.*io\.open.*trust_pickle=True") as info:
        bnkit.read_checkpoint(path)
    assert "\n" not in str(info.value) and not marker.exists()
    with pytest.raises(UntrustedFileError):
        bnkit.load_weights(_net(), path)
    assert not marker.exists()
    bnkit.read_checkpoint(path, trust_pickle=True)
    assert marker.exists()


def test_state_dicts_and_safetensors_load_without_trust(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source, target = _net(), _net()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "a.pt")
    bnkit.load_weights(target, tmp_path / "a.pt")
    assert _same(_snapshot(target), _snapshot(source))
    save_file(source.state_dict(), str(tmp_path / "b.safetensors"))
    fresh = bnkit.load_weights(_net(), tmp_path / "b.safetensors")
    assert _same(_snapshot(fresh), _snapshot(source))


def test_not_a_checkpoint_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"x\.pt") as info:
        bnkit.read_checkpoint(tmp_path / "x.pt")
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt"):
        bnkit.read_checkpoint(tmp_path / "nothing.pt")


def test_an_export_program_is_refused_in_one_line_even_when_trusted(tmp_path: Path) -> None:
    # torch.export.load unpickles parts of a .pt2 with weights_only=False: bnkit never reads one
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 3),)), tmp_path / "m.pt2")
    for trust in (False, True):
        with pytest.raises(ValueError, match=r"m\.pt2.*torch\.export program .*state dict") as info:
            bnkit.read_checkpoint(tmp_path / "m.pt2", trust_pickle=trust)
        assert "\n" not in str(info.value)


def test_a_bad_entry_in_a_later_layer_changes_nothing() -> None:
    model = _net()
    before = _snapshot(model)
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in _net().state_dict().items()}
    state["3.running_var"] = torch.ones(5)  # layer 3 is wrong; layers 0-2 come first in the dict
    with pytest.raises(WeightsMismatchError, match=r"size mismatch for '3\.running_var'") as info:
        bnkit.load_weights(model, state)
    assert "\n" not in str(info.value)
    assert _same(_snapshot(model), before)


@settings(max_examples=40, deadline=None)
@given(
    key=st.sampled_from(sorted(_net().state_dict())),
    fault=st.sampled_from(["drop", "extra", "shape", "int_for_float", "float_for_int", "not_a_tensor", "none"]),
)
def test_property_clear_error_and_state_unchanged_or_correct(key: str, fault: str) -> None:
    model = _net()
    before = _snapshot(model)
    good = {k: v + 1 for k, v in _net().state_dict().items()}
    state = dict(good)
    value = state[key]
    if fault == "drop":
        del state[key]
    elif fault == "extra":
        state["unknown.weight"] = torch.ones(1)
    elif fault == "shape":
        state[key] = torch.ones(*value.shape, 2)
    elif fault == "int_for_float" and value.is_floating_point():
        state[key] = value.long()
    elif fault == "float_for_int" and not value.is_floating_point():
        state[key] = value.float()
    elif fault == "not_a_tensor":
        state[key] = 1.0
    try:
        bnkit.load_weights(model, state)
    except WeightsMismatchError as exc:
        assert "\n" not in str(exc) and (key in str(exc) or "unknown.weight" in str(exc))
        assert _same(_snapshot(model), before)
    else:
        assert _same(_snapshot(model), {k: v.to(before[k].dtype) for k, v in good.items()})
