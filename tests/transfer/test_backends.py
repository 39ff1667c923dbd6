"""The transfer reads Keras through keras.ops only: the same port verifies with Keras on the JAX backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import warnings; warnings.simplefilter("ignore")
from tests.transfer.models import keras_model, Twin, inputs
import keras, bnkit
assert keras.backend.backend() == "jax"
k, t = keras_model(calibrate=False), Twin(bnkit_bn=True)
r = bnkit.transfer_weights(k, t, inputs(16))
assert r.ok and r.output_error["inference"] < 1e-6 and r.output_error["training"] < 1e-6, str(r)
print("ok")
"""


def test_keras_on_jax_ports_and_verifies() -> None:
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
