"""Synchronised BatchNorm and distributed statistics on 2 and 3 gloo CPU processes (one spawned group per size)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _spawn import run_checks
from _syncbn_checks import CHECKS, FINAL_CHECK

NAMES = [name for name in CHECKS if name != FINAL_CHECK] + [FINAL_CHECK]


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def results(request: pytest.FixtureRequest) -> dict[str, list[str]]:
    return run_checks(request.param, "_syncbn_checks", NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_check(results: dict[str, list[str]], name: str) -> None:
    failures = [f"rank {r}:\n{out}" for r, out in enumerate(results[name]) if out != "ok"]
    assert not failures, "\n".join(failures)
