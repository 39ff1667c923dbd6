"""The README's DDP example runs under torchrun on 2 CPU processes and keeps running statistics identical."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_syncbn.py"


def test_ddp_syncbn_example_runs_under_torchrun() -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(EXAMPLE),
        "--epochs",
        "1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "epoch 0: train loss" in done.stdout
    assert "running statistics identical on all 2 ranks: True" in done.stdout, done.stdout
