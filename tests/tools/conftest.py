"""Shared fixtures for the model-level tool tests: seeding and exact before/after snapshots of a model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _hook_counts(module: nn.Module) -> tuple[int, ...]:
    return tuple(
        len(getattr(module, attr) or {})
        for attr in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_always_called", "_backward_hooks")
    )


def take_snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a tool could change: state (cloned), flags, requires_grad, momentum, freeze switches, hooks."""
    modules = dict(model.named_modules(remove_duplicate=False))
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {name: m.training for name, m in modules.items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "types": {name: type(m) for name, m in modules.items()},
        "momentum": {name: getattr(m, "momentum", None) for name, m in modules.items()},
        "freeze": {name: getattr(m, "freeze_stats", None) for name, m in modules.items()},
        "hooks": {name: _hook_counts(m) for name, m in modules.items()},
    }


def assert_snapshot_equal(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Bit-identical state (torch.equal, NaN-safe by comparing bytes) and identical flags."""
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        other = after["state"][key]
        assert value.dtype == other.dtype and value.shape == other.shape, key
        assert torch.equal(value.view(-1).view(torch.uint8), other.view(-1).view(torch.uint8)), key
    for field in ("training", "requires_grad", "types", "momentum", "freeze", "hooks"):
        assert before[field] == after[field], field


@pytest.fixture
def snapshot() -> Callable[[nn.Module], dict[str, Any]]:
    return take_snapshot


@pytest.fixture
def same() -> Callable[[dict[str, Any], dict[str, Any]], None]:
    return assert_snapshot_equal
