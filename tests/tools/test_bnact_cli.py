"""``bnkit convert MODEL --to bnact``: the fused model is written (a GraphModule where the graph was rewritten),
what was left is listed with the reason, and the notes are shown."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import bnkit
from bnkit.cli.commands.convert import render
from bnkit.cli.main import build_parser

torchvision = pytest.importorskip("torchvision")


def _run(*argv: str):
    args = build_parser(argv[0]).parse_args(list(argv))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return args.func(args)


def test_convert_command_to_bnact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(model, "resnet.pt")
    data = _run("convert", "resnet.pt", "--trust-pickle", "--to", "bnact", "-o", "fused.pt")
    assert {"layer": "bn1", "from": "BatchNorm2d + ReLU (module relu)", "to": "BatchNormAct(relu)"} in data["converted"]
    assert len(data["converted"]) == 9 and len(data["left"]) == 11 and data["notes"]
    text = [block if isinstance(block, str) else block.title for block in render(data)]
    assert any(str(line).startswith("note: the result is a torch.fx.GraphModule") for line in text)
    fused = torch.load("fused.pt", weights_only=False)
    assert isinstance(fused.layer1[0].bn1, bnkit.BatchNormAct)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fused.eval()(x), model(x), atol=1e-5)

    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6()), "relu6.pt")
    data = _run("convert", "relu6.pt", "--trust-pickle", "--to", "bnact", "-o", "same.pt")
    assert data["converted"] == [] and "ReLU6 is not supported" in data["left"][0]["reason"]
