"""The README's two commands are exactly what CI runs, and its tour runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_commands_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    setup, tests = _bash_blocks(readme)[:2]
    assert setup in ci, f"README set-up command not in .ci/run: {setup}"
    assert tests in ci, f"README test command not in .ci/run: {tests}"
    assert "torch" not in setup or "constraints.txt" in setup  # never a bare torch range in CI


def test_constraints_pin_the_torch_builds_on_this_machines_disk() -> None:
    # Any other torch release would make CI download a multi-GB CUDA build.
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.14.1" in pins
    assert "torchvision==0.29.1" in pins


def test_first_tour_block_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    exec(compile(block, "README.md", "exec"), {})
