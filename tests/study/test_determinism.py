"""A seed reproduces its numbers exactly, whatever the number of worker processes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bnkit.study.experiments import StudyConfig
from bnkit.study.policies import FinetuneSettings
from bnkit.study.run import run_study

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
    parallel = run_study(TINY, out=None, progress=False, jobs=2)
    assert _numbers(sequential) == _numbers(parallel)
    assert parallel["run"]["jobs"] == 2
    # global torch settings are restored
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det


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
