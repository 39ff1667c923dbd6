"""bnkit.plot and ``bnkit plot``: PNGs of the expected size from real monitor logs, errors as one line."""

from __future__ import annotations

import argparse
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bnkit.monitor import JSONL_NAME, Monitor, plot


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _deep_model(blocks: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 4, 3, padding=1)]
    for _ in range(blocks):
        layers += [nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)]
    return nn.Sequential(*layers).train()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real log of a 55-layer model over 6 steps, with a distribution shift that raises alerts."""
    path = tmp_path_factory.mktemp("log")
    model = _deep_model(55)
    gen = torch.Generator().manual_seed(0)
    with Monitor(model, log_dir=path, tensorboard=False, warn=False, thresholds={"drift_warmup": 2}) as monitor:
        for step in range(6):
            with torch.no_grad():
                model(torch.randn(4, 3, 6, 6, generator=gen) * (10.0 if step >= 4 else 1.0))
            monitor.step()
    assert monitor.alerts, "the shifted steps should raise alerts"
    return path


def test_plot_writes_png_of_expected_size(log_dir: Path, tmp_path: Path) -> None:
    out = plot(log_dir, tmp_path / "bn.png")
    assert out == tmp_path / "bn.png"
    assert _png_size(out) == (1400, 1000)
    small = plot(log_dir / JSONL_NAME, tmp_path / "small.png", size=(6, 4.5), dpi=80, layers="1*")
    assert _png_size(small) == (480, 360)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert oct(out.stat().st_mode & 0o777) != "0o600"


def test_plot_with_few_layers_and_nonfinite_values(tmp_path: Path) -> None:
    bn = nn.BatchNorm1d(3).train()
    with Monitor(bn, log_dir=tmp_path, tensorboard=False, warn=False):
        bn(torch.randn(4, 3))
        bn(torch.full((4, 3), float("nan")))
        bn(torch.randn(4, 3))
    out = plot(tmp_path, tmp_path / "p.png", size=(8, 6), dpi=50)
    assert _png_size(out) == (400, 300)


def test_plot_errors(log_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no monitor log"):
        plot(tmp_path / "nothing", tmp_path / "x.png")
    with pytest.raises(ValueError, match="the monitor log itself"):
        plot(log_dir, log_dir / JSONL_NAME)
    with pytest.raises(ValueError, match="no stats records for layers"):
        plot(log_dir, tmp_path / "x.png", layers="nope*")
    with pytest.raises(ValueError, match="folder of"):
        plot(log_dir, tmp_path / "missing" / "x.png")
    with pytest.raises(ValueError, match="size must be"):
        plot(log_dir, tmp_path / "x.png", size=(0, 3))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / JSONL_NAME).write_text('{"kind": "meta", "layers": []}\n')
    with pytest.raises(ValueError, match="no stats records"):
        plot(empty, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_cli_handler_and_parser(log_dir: Path, tmp_path: Path) -> None:
    from bnkit.cli.commands import plot as plot_command
    from bnkit.cli.io import CliError
    from bnkit.cli.main import build_parser

    args = build_parser("plot").parse_args(
        ["plot", str(log_dir), "-o", str(tmp_path / "c.png"), "--size", "7,5", "--dpi", "60"]
    )
    data = args.func(args)
    assert data["output"] == str(tmp_path / "c.png")
    assert (data["width"], data["height"]) == (420, 300) == _png_size(tmp_path / "c.png")
    assert data["layers"] == 55 and data["steps"] == 6 and data["alerts"] > 0
    assert plot_command.render(data)[0].startswith(f"wrote {tmp_path / 'c.png'} (420x300): 55 layers")
    bad = argparse.Namespace(log_dir=str(log_dir), output="x.png", layers=None, size="7", dpi=60, title=None)
    with pytest.raises(CliError, match="--size"):
        plot_command.run(bad)


def _bnkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "bnkit", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_cli_subprocess(log_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.png"
    done = _bnkit("plot", str(log_dir), "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert _png_size(out) == (1400, 1000)
    assert '"layers": 55' in done.stdout
    failed = _bnkit("plot", str(tmp_path / "nothing"), "-o", str(tmp_path / "y.png"))
    assert failed.returncode == 2
    assert len(failed.stderr.strip().splitlines()) == 1 and "no monitor log" in failed.stderr
    assert not (tmp_path / "y.png").exists()


def test_plot_reads_back_same_values(log_dir: Path) -> None:
    from bnkit.monitor import read_log

    stats = read_log(log_dir)["stats"]
    assert len(stats) == 55 * 6
    assert all(math.isfinite(r["drift"]) for r in stats)
