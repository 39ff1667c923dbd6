"""``bnkit convert``: no --input-size needed for --to torch, frozen/trainable targets, what is left is listed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import bnkit
from bnkit.cli.commands.convert import render
from bnkit.cli.io import CliError
from bnkit.cli.main import build_parser


def _run(*argv: str):
    args = build_parser(argv[0]).parse_args(list(argv))
    return args.func(args)


def test_round_trip_to_torch_needs_no_input_size(workdir: Path) -> None:
    _run("convert", "whole.pt", "--trust-pickle", "--to", "bnkit", "-o", "b.pt")
    data = _run("convert", "b.pt", "--trust-pickle", "--to", "torch", "-o", "t.pt")
    assert data["converted"] == [{"layer": "1", "from": "BatchNorm", "to": "BatchNorm2d"}]
    back, original = torch.load("t.pt", weights_only=False), torch.load("whole.pt", weights_only=False)
    assert [type(m) for m in back.modules()] == [type(m) for m in original.modules()]
    for key, value in original.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


def test_syncbn_file_to_torch_without_input_size(workdir: Path) -> None:
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(torch.load("whole.pt", weights_only=False))
    torch.save(synced, "sync.pt")
    data = _run("convert", "sync.pt", "--trust-pickle", "--to", "torch", "-o", "t.pt")
    assert data["converted"] == [{"layer": "1", "from": "SyncBatchNorm", "to": "BatchNorm2d"}]
    assert data["left"] == [] and data["unrecognised"] == []


def test_unknown_rank_names_the_cli_options(workdir: Path) -> None:
    torch.save(nn.SyncBatchNorm(3), "lone.pt")
    with pytest.raises(CliError, match=r"layer '<model>' needs BatchNorm1d, 2d or 3d; pass --dim 1\|2\|3 or --input"):
        _run("convert", "lone.pt", "--trust-pickle", "--to", "torch", "-o", "t.pt")
    assert not Path("t.pt").exists()
    _run("convert", "lone.pt", "--trust-pickle", "--to", "torch", "--dim", "3", "-o", "t.pt")
    assert type(torch.load("t.pt", weights_only=False)) is nn.BatchNorm3d


def test_frozen_and_trainable_targets_and_what_is_left(workdir: Path) -> None:
    data = _run("convert", "whole.pt", "--trust-pickle", "--to", "frozen", "-o", "f.pt")
    assert data["converted"] == [{"layer": "1", "from": "BatchNorm2d", "to": "FrozenBatchNorm2d"}]
    assert type(torch.load("f.pt", weights_only=False)[1]) is FrozenBatchNorm2d
    with pytest.warns(UserWarning, match="nothing to convert to 'bnkit'"):
        data = _run("convert", "f.pt", "--trust-pickle", "--to", "bnkit", "-o", "b.pt")
    assert data["converted"] == [] and data["left"][0]["layer"] == "1"
    assert "kept as it is; to='trainable' thaws it" in data["left"][0]["reason"]
    assert any("left as they are" == getattr(block, "title", None) for block in render(data))
    data = _run("convert", "f.pt", "--trust-pickle", "--to", "trainable", "-o", "t.pt")
    thawed = torch.load("t.pt", weights_only=False)
    assert type(thawed[1]) is nn.BatchNorm2d and thawed[1].weight.requires_grad
    x = torch.randn(2, 1, 8, 8)
    original = torch.load("whole.pt", weights_only=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(thawed.eval()(x), original(x), rtol=1e-5, atol=1e-5)
    assert bnkit.named_batchnorms(thawed)
