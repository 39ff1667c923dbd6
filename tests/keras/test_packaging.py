"""Packaging: torch is an extra, ``import bnkit.keras`` never imports torch, torch tools refuse Keras models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import bnkit

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def _run(code: str, backend: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(SRC), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_core_dependencies_are_numpy_only_and_extras_name_the_frameworks() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["numpy"]
    extras = project["optional-dependencies"]
    assert any(d.startswith("torch") for d in extras["torch"])
    assert any(d.startswith("keras") for d in extras["keras"])
    everything = extras["all"][0]
    for extra in ("torch", "keras", "tensorflow", "jax", "vision"):
        assert extra in everything


def test_import_bnkit_keras_never_imports_torch_or_keras_early() -> None:
    code = (
        "import sys\n"
        "import bnkit, bnkit.keras\n"
        "assert 'keras' not in sys.modules, 'bnkit.keras imported keras at import time'\n"
        "import keras\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name='bn')])\n"
        "bnkit.keras.summary(m); bnkit.keras.explain(m); bnkit.keras.doctor(m)\n"
        "bnkit.keras.freeze(m); bnkit.keras.unfreeze(m)\n"
        "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if k.startswith('torch'))[:5]\n"
        "print('ok')\n"
    )
    result = _run(code, "jax")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_missing_torch_is_one_line_naming_the_extra() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import bnkit\n"
        "try:\n"
        "    bnkit.freeze\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e)\n"
    )
    result = _run(code, "jax")
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip()
    assert line == "bnkit.freeze needs torch, which is not installed: pip install 'bnkit[torch]'"


def test_missing_keras_is_one_line_naming_the_extra() -> None:
    code = (
        "import sys; sys.modules['keras'] = None\n"
        "import bnkit.keras\n"
        "try:\n"
        "    bnkit.keras.freeze\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e)\n"
    )
    result = _run(code, "jax")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "bnkit.keras.freeze needs keras, which is not installed: pip install 'bnkit[keras]'"


def _keras_model() -> keras.Model:
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(name="bn")])


@pytest.mark.parametrize(
    ("tool", "call", "keras_name"),
    [
        ("freeze", lambda m: bnkit.freeze(m), "freeze"),
        ("unfreeze", lambda m: bnkit.unfreeze(m), "unfreeze"),
        ("explain", lambda m: bnkit.explain(m), "explain"),
        ("summary", lambda m: bnkit.summary(m), "summary"),
        ("doctor", lambda m: bnkit.doctor(m), "doctor"),
        ("recalibrate", lambda m: bnkit.recalibrate(m, [np.ones((2, 4), "float32")]), "recalibrate"),
        ("fuse", lambda m: bnkit.fuse(m), "fold"),
        ("Monitor", lambda m: bnkit.Monitor(m, "unused-log-dir"), "Monitor"),
    ],
)
def test_torch_tools_refuse_a_keras_model_in_one_line(tool, call, keras_name) -> None:
    pytest.importorskip("torch")  # the PyTorch tools need torch; the Keras model may be on any backend
    with pytest.raises(TypeError) as info:
        call(_keras_model())
    message = str(info.value)
    assert "\n" not in message
    assert f"bnkit.keras.{keras_name}(model)" in message and message.startswith(f"bnkit.{tool}:")
