"""A seed reproduces its numbers exactly, whatever the number of worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bnkit.study import run as study_run
from bnkit.study.experiments import StudyConfig
from bnkit.study.policies import FinetuneSettings
from bnkit.study.run import run_study

ROOT = Path(__file__).resolve().parents[2]

TINY = StudyConfig(
    seeds=(0, 1),
    domains=("contrast", "noise"),
    policies=("source", "all", "bn_only", "recalibrate"),
    source_epochs=2,
    finetune=FinetuneSettings(epochs=2),
    batch_sizes=(4, 32),
    batch_norms=("batch", "batch_precise", "ghost"),
    batch_epochs=1,
)


def _numbers(results: dict[str, Any]) -> dict[str, Any]:
    summary = {k: v for k, v in results["summary"].items() if k != "fuse"}
    words = [line for line in results["conclusion"] if not line.startswith("Fusion")]
    return {"rows": results["rows"], "summary": summary, "conclusion": words}


@pytest.fixture(scope="module")
def sequential() -> dict[str, Any]:
    return run_study(TINY, out=None, progress=False, jobs=1)


def test_same_seed_same_numbers_in_process_and_in_workers(sequential: dict[str, Any]) -> None:
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if not study_run._autograd_survives_fork():
        # an earlier test in this process ran a compiled backward, after which forked workers cannot run
        # autograd (the study then runs in process); check the workers from a fresh process instead
        _in_fresh_process(sequential)
        return
    parallel = run_study(TINY, out=None, progress=False, jobs=2)
    assert _numbers(sequential) == _numbers(parallel)
    assert parallel["run"]["jobs"] == 2
    # global torch settings are restored
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det


def _in_fresh_process(sequential: dict[str, Any]) -> None:
    code = (
        "import json; from tests.study.test_determinism import TINY, _numbers; from bnkit.study.run import run_study; "
        "r = run_study(TINY, out=None, progress=False, jobs=2); "
        "print(json.dumps({'numbers': _numbers(r), 'jobs': r['run']['jobs']}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    parallel = json.loads(done.stdout.strip().splitlines()[-1])
    assert parallel["jobs"] == 2
    assert parallel["numbers"] == json.loads(json.dumps(_numbers(sequential)))


def test_different_seeds_give_different_numbers(sequential: dict[str, Any]) -> None:
    rows = sequential["rows"]["finetune"]
    by_seed = {s: [r["accuracy"] for r in rows if r["seed"] == s] for s in (0, 1)}
    assert by_seed[0] != by_seed[1]
    batch = sequential["rows"]["batch_size"]
    assert [r["norm"] for r in batch if r["seed"] == 0] == [
        "batch",
        "batch",
        "batch_precise",
        "batch_precise",
        "ghost",
        "ghost",
    ]
