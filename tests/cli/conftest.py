"""Fixtures for the CLI tests: a factory module on disk, saved models, checkpoints and data files."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

FACTORY_MODULE = "bnkit_cli_fixture_models"

SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    def net():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.99), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 8 * 8, 10),
        )


    def batches():
        g = torch.Generator().manual_seed(1)
        return [torch.randn(16, 1, 8, 8, generator=g) for _ in range(3)]


    def broken():
        raise RuntimeError("no GPU here")


    NOT_CALLABLE = 3
    """
)


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with the factory module, a pickled model, checkpoints and data; also the cwd."""
    (tmp_path / f"{FACTORY_MODULE}.py").write_text(SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(FACTORY_MODULE, None)
    import importlib

    models = importlib.import_module(FACTORY_MODULE)
    model = models.net()
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8) * 2 + 1)
    torch.save(model, tmp_path / "whole.pt")
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ckpt.pt"
    )
    torch.save(model.state_dict(), tmp_path / "state.pt")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 1, 8, 8, generator=g)
    np.save(tmp_path / "x.npy", x.double().numpy())
    np.savez(tmp_path / "xy.npz", x=x.numpy(), y=np.arange(50) % 10)
    torch.save((x, torch.arange(50) % 10), tmp_path / "xy.pt")
    torch.save(torch.rand(10, 3, 8, 8), tmp_path / "wrong.pt")
    torch.jit.save(torch.jit.script(models.net()), str(tmp_path / "scripted.pt"))
    yield tmp_path
    sys.modules.pop(FACTORY_MODULE, None)
