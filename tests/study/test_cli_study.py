"""``bnkit study`` on the command line: the bundled study, the user's own model and data, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bnkit.cli.commands.study import load_labelled
from bnkit.cli.io import CliError
from bnkit.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _bnkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BNKIT_PLAIN": "1", "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "bnkit", "study", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )


def test_parser_options() -> None:
    args = build_parser("study").parse_args(
        ["study", "--quick", "--seeds", "4", "5", "6", "--domains", "blur", "--policies", "5", "all", "--out", "x"]
    )
    assert (args.quick, args.seeds, args.domains, args.policies, args.out) == (
        True,
        [4, 5, 6],
        ["blur"],
        ["5", "all"],
        "x",
    )


def test_bundled_study_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc = _bnkit(
        "--quick",
        "--seeds",
        "0",
        "--domains",
        "contrast",
        "--policies",
        "source",
        "recalibrate",
        "--no-batch-study",
        "--no-fuse",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "recalibrate (AdaBN)" in proc.stdout and "contrast:" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["command"].startswith("bnkit study --quick")
    assert sorted(data["summary"]["finetune"]["contrast"]) == ["recalibrate", "source"]
    assert (out / "report.md").exists() and (out / "policies.png").exists()


def test_own_model_and_data_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "mynet.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 6 * 6, 3))
    """)
    )
    torch.manual_seed(0)
    x = torch.rand(60, 1, 8, 8)
    y = torch.arange(60) % 3
    torch.save((x, y), tmp_path / "source.pt")
    torch.save({"images": 0.3 * x + 0.6, "labels": y}, tmp_path / "target.pt")
    out = tmp_path / "mine"
    proc = _bnkit(
        "--model",
        "mynet:make",
        "--source-data",
        "source.pt",
        "--target-data",
        "target.pt",
        "--seeds",
        "0",
        "1",
        "--policies",
        "0",
        "5",
        "6",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert list(data["summary"]["finetune"]) == ["target"]
    assert sorted(data["summary"]["finetune"]["target"]) == ["recalibrate", "recalibrate_head", "source"]
    assert data["config"]["finetune"]["head"] == "4"  # the last Linear
    assert data["summary"]["shift"]["target"]["score"]["n"] == 2
    assert data["summary"]["fuse"]["identical_predictions"] == data["summary"]["fuse"]["models"] == 6
    assert (out / "report.md").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-data", "t.pt"], "need --model"),
        (["--model", "torch.nn:Identity"], "--model needs --target-data"),
        (["--model", "torch.nn:Identity", "--target-data", "missing.pt"], "data file 'missing.pt' not found"),
        (["--domains", "fog"], "invalid choice: 'fog'"),
        (["--policies", "freeze", "--no-batch-study"], "unknown policy 'freeze'"),
        (["--seeds", "0", "--batch-sizes", "3", "--norms", "ghost"], "ghost batches need batch sizes dividing"),
    ],
)
def test_errors_are_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["study", *args, "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_load_labelled_formats(tmp_path: Path) -> None:
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((5, 2)), y=np.arange(5))
    assert load_labelled(str(tmp_path / "d.npz")).y.tolist() == [0, 1, 2, 3, 4]
    np.save(tmp_path / "d.npy", np.zeros((5, 2)))
    with pytest.raises(CliError, match="holds no labels"):
        load_labelled(str(tmp_path / "d.npy"))
    torch.save({"x": torch.zeros(3, 2)}, tmp_path / "nolabels.pt")
    with pytest.raises(CliError, match="labels under one of"):
        load_labelled(str(tmp_path / "nolabels.pt"))
    torch.save((torch.zeros(3, 2), torch.zeros(3, 2)), tmp_path / "badlabels.pt")
    with pytest.raises(CliError, match="one class index per sample"):
        load_labelled(str(tmp_path / "badlabels.pt"))
    batches = [(torch.zeros(2, 3), torch.tensor([0, 1])), (torch.ones(1, 3), torch.tensor([2]))]
    torch.save(batches, tmp_path / "batches.pt")
    assert len(load_labelled(str(tmp_path / "batches.pt"))) == 3
