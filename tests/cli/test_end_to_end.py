"""The installed ``bnkit`` command and ``python -m bnkit`` in subprocesses: exit codes, one-line errors, files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.conftest import FACTORY_MODULE

BNKIT = shutil.which("bnkit")


def _bnkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BNKIT_PLAIN": "1", "OMP_NUM_THREADS": "1"}
    assert BNKIT is not None, "the bnkit entry point is not installed (pip install -e .)"
    return subprocess.run([BNKIT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_help_and_json_output(workdir: Path) -> None:
    done = _bnkit("--help", cwd=workdir)
    assert done.returncode == 0
    for name in ("explain", "summary", "doctor", "shift", "fuse", "recalibrate", "convert", "study", "plot"):
        assert name in done.stdout
    done = _bnkit("summary", f"{FACTORY_MODULE}:net", "--json", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"] == 2626


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "missing.pt"], "bnkit explain: error: model file 'missing.pt' not found"),
        (["doctor", "state.pt"], "bnkit doctor: error: 'state.pt' holds a state dict"),
        (
            ["shift", "whole.pt", "wrong.pt", "--trust-pickle"],
            "bnkit shift: error: the model failed on batch 0 (shape [10, 3, 8, 8])",
        ),
        (["explain", "--no-such-option", "whole.pt"], "bnkit: error: unrecognized arguments: --no-such-option"),
    ],
)
def test_errors_are_one_line_with_exit_2(workdir: Path, args: list[str], message: str) -> None:
    done = _bnkit(*args, cwd=workdir)
    assert done.returncode == 2
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_debug_prints_the_traceback(workdir: Path) -> None:
    done = _bnkit("explain", "missing.pt", "--debug", cwd=workdir)
    assert done.returncode == 2 and "Traceback" in done.stderr


def test_writers_write_new_files_and_never_the_input(workdir: Path) -> None:
    before = (workdir / "whole.pt").read_bytes()
    done = _bnkit("fuse", "whole.pt", "--trust-pickle", "-o", "whole.pt", "--input-size", "1,8,8", cwd=workdir)
    assert done.returncode == 2 and "refusing to overwrite the input file" in done.stderr
    assert (workdir / "whole.pt").read_bytes() == before

    done = _bnkit("recalibrate", "whole.pt", "--trust-pickle", "x.npy", "-o", "out/rec.pt", cwd=workdir)
    assert done.returncode == 2 and "output directory 'out' does not exist" in done.stderr
    (workdir / "out").mkdir()
    done = _bnkit("recalibrate", "whole.pt", "--trust-pickle", "x.npy", "-o", "out/rec.pt", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "wrote out/rec.pt (module)" in done.stdout
    assert sorted(os.listdir(workdir / "out")) == ["rec.pt"]  # no temporary file left behind
    model = torch.load(workdir / "out" / "rec.pt", weights_only=False)
    assert int(model[1].num_batches_tracked) > 0
    assert (workdir / "whole.pt").read_bytes() == before


def test_doctor_fail_on_exit_status(workdir: Path) -> None:
    done = _bnkit("doctor", f"{FACTORY_MODULE}:net", "--fail-on", "error", cwd=workdir)
    assert done.returncode == 1 and "BN001" in done.stdout
    done = _bnkit("doctor", f"{FACTORY_MODULE}:net", cwd=workdir)
    assert done.returncode == 0


def test_python_dash_m(workdir: Path) -> None:
    env = {**os.environ, "BNKIT_PLAIN": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bnkit", "explain", "whole.pt", "--trust-pickle"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "BatchNorm2d" in done.stdout and "batch stats, updates running" in done.stdout
