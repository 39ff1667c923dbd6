"""Re-run a small, fast subset of tests/keras under the Keras backends this process is not using.

Keras reads ``KERAS_BACKEND`` once, at import, so the other backends need their own processes. The subset covers
the behaviour that differs between backends (fit() modes, recompiling, variable restore on JAX, the variance
probe, the .keras round trip, folding against predict() and TFLite, the monitor reading variables during fit()); each
backend's process is bounded at 280 s (about 40-130 s on an idle 2-core machine).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[2]

SUBSET = [
    "tests/keras/test_explain.py",
    "tests/keras/test_doctor.py",
    "tests/keras/test_freeze.py",
    "tests/keras/test_summary.py::test_seed_network_matches_keras_and_the_documented_figures",
    "tests/keras/test_recalibrate.py",
    # fold: the numerics and the copies per backend (the refusal rules read the graph the same way everywhere)
    "tests/keras/test_fold.py::test_fold_matches_predict_on_every_layer_kind",
    "tests/keras/test_fold.py::test_nested_models_fold_recursively_and_the_input_model_is_untouched",
    "tests/keras/test_fold.py::test_compiled_multi_input_model_stays_functional_and_compiled",
    "tests/keras/test_fold.py::test_folded_keras_file_loads_without_bnkit",
    "tests/keras/test_fold.py::test_tflite_counts_what_the_converter_leaves",
    # Monitor: reading the variables during fit() (JAX keeps them in the trainer's state), inference-mode layers,
    # steps_per_execution (refused on torch).
    "tests/keras/test_monitor.py::test_every_reads_the_step_before_the_recorded_one",
    "tests/keras/test_monitor.py::test_layers_in_inference_mode_are_marked_and_have_no_batch_statistics",
    "tests/keras/test_monitor.py::test_bad_arguments_and_steps_per_execution",
]

BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


@pytest.mark.parametrize("backend", sorted(BACKEND_MODULES))
def test_subset_passes_under_the_other_backends(backend) -> None:
    if backend == keras.backend.backend():
        pytest.skip(f"this process already runs tests/keras on {backend}")
    if importlib.util.find_spec(BACKEND_MODULES[backend]) is None:
        pytest.skip(f"{backend} is not installed")
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    subset = [s for s in SUBSET if (ROOT / s.split("::")[0]).exists()]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *subset],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, f"KERAS_BACKEND={backend}:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
