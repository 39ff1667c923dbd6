"""bnkit.keras.Monitor: batch statistics recovered from the moving-statistics update against the true batch
statistics (a Keras sub-model that outputs each BatchNormalization's input, reduced in float64 NumPy), moving
statistics against the layer's own variables, frozen layers, the log read back by read_log, bnkit.plot and
TensorBoard's event reader, steps, layer selection and alerts. Runs on the current backend (and under the other
backends through tests/keras/test_backends.py)."""

from __future__ import annotations

import builtins
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

import bnkit.keras as bk
from bnkit.monitor import JSONL_NAME, QUANTITIES, MonitorWarning, plot, read_log
from tests.keras.helpers import transfer_model

BATCH = 16


def _model(seed: int = 0) -> tuple[keras.Model, keras.Input]:
    """Dense -> BN -> Dense -> BN(renorm) -> Dense -> BN(scale=False): Keras momentum 0.99, the default."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = keras.layers.Dense(5, name="d1")(inp)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.Dense(4, name="d2")(h)
    h = keras.layers.BatchNormalization(name="bn2", renorm=True)(h)
    h = keras.layers.Dense(3, name="d3")(h)
    h = keras.layers.BatchNormalization(name="bn3", scale=False)(h)
    return keras.Model(inp, h), inp


def _data(n: int, seed: int = 1, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(shift, 1.0, (n, 6)).astype("float32"), rng.normal(size=(n, 3)).astype("float32"))


def _numpy(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64)


def _true_batch_stats(model: keras.Model, inp, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and biased variance (float64) of each BN's input for the batch ``x`` in training mode.

    The sub-model shares the model's layers; calling it with training=True moves the moving statistics, so every
    variable is restored afterwards."""
    names = ("bn1", "bn2", "bn3")
    sub = keras.Model(inp, [model.get_layer(n).input for n in names])
    saved = [_numpy(v) for v in model.variables]
    outputs = sub(x, training=True)
    for variable, value in zip(model.variables, saved, strict=True):
        variable.assign(value)
    out = {}
    for name, y in zip(names, outputs, strict=True):
        y = _numpy(y)
        out[name] = (y.mean(axis=0), ((y - y.mean(axis=0)) ** 2).mean(axis=0))
    return out


def _moving(model: keras.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        n: (_numpy(model.get_layer(n).moving_mean), _numpy(model.get_layer(n).moving_variance))
        for n in ("bn1", "bn2", "bn3")
    }


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, monitor, **kwargs) -> None:
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, callbacks=[monitor], verbose=0, **kwargs)


# ---------------------------------------------------------------------------------------------- values


def test_recovered_batch_statistics_match_the_true_batch() -> None:
    model, inp = _model()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    monitor = bk.Monitor(warn=False)
    x, y = _data(3 * BATCH)
    for step in range(3):  # one batch per fit(): the steps continue across fit() calls, weights change between them
        batch = slice(step * BATCH, (step + 1) * BATCH)
        truth, before = _true_batch_stats(model, inp, x[batch]), _moving(model)
        _fit(model, x[batch], y[batch], monitor)
        assert monitor.global_step == step + 1
        for name in ("bn1", "bn2", "bn3"):
            record, channels = monitor.last[name], monitor.last_channels[name]
            assert record["step"] == step and record["uses_batch_stats"] is True
            mean, var = truth[name]
            np.testing.assert_allclose(channels["batch_mean"], mean, rtol=0, atol=1e-6)
            np.testing.assert_allclose(channels["batch_var"], var, rtol=0, atol=1e-4)
            np.testing.assert_allclose(channels["running_mean"], before[name][0], rtol=0, atol=0)
            np.testing.assert_allclose(channels["running_var"], before[name][1], rtol=0, atol=0)
            assert record["batch_mean"] == pytest.approx(mean.mean(), abs=1e-6)
            assert record["batch_var"] == pytest.approx(var.mean(), abs=1e-4)
            assert record["batch_var_min"] == pytest.approx(var.min(), abs=1e-4)
            assert record["running_var_max"] == pytest.approx(before[name][1].max(), abs=0)
            vp, vq, eps = var + 1e-3, before[name][1] + 1e-3, 1e-3
            kl = 0.5 * ((vp - vq) ** 2 + (vp + vq) * (mean - before[name][0]) ** 2) / (vp * vq)
            assert record["drift"] == pytest.approx(kl.mean(), rel=1e-3)
            assert record["dead_fraction"] == float((var < eps).mean())
            layer = model.get_layer(name)
            beta = _numpy(layer.beta)
            assert record["bias_norm"] == pytest.approx(float(np.linalg.norm(beta)), rel=1e-6)
            if name == "bn3":
                assert record["weight_norm"] is None  # scale=False: no gamma
            else:
                assert record["weight_norm"] == pytest.approx(float(np.linalg.norm(_numpy(layer.gamma))), rel=1e-6)
            assert record["count"] is None and record["num_batches_tracked"] is None


def test_every_reads_the_step_before_the_recorded_one() -> None:
    model, inp = _model(seed=2)
    model.compile(keras.optimizers.SGD(0.0), "mse")  # fixed weights: every batch's true statistics known up front
    x, y = _data(5 * BATCH, seed=3)
    truth = [_true_batch_stats(model, inp, x[k * BATCH : (k + 1) * BATCH]) for k in range(5)]
    seen: list[dict[str, dict[str, np.ndarray]]] = []

    class Copy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append({k: dict(v) for k, v in monitor.last_channels.items()})

    monitor = bk.Monitor(every=2, warn=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, callbacks=[monitor, Copy()], verbose=0)
    assert sorted({r["step"] for r in monitor.history}) == [0, 2, 4]
    for step in (0, 2, 4):
        # bn3's input depends on bn2's renorm statistics, which move every step: only bn1 and bn2 see inputs
        # that the fixed weights determine.
        for name in ("bn1", "bn2"):
            np.testing.assert_allclose(seen[step][name]["batch_mean"], truth[step][name][0], rtol=0, atol=1e-6)
            np.testing.assert_allclose(seen[step][name]["batch_var"], truth[step][name][1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_layers_in_inference_mode_are_marked_and_have_no_batch_statistics(kind: str) -> None:
    model, base = transfer_model(kind, training_false=True)
    if kind == "functional":
        base.get_layer("bn2").trainable = False  # the functional recipe trains the base (keras#20285) but not bn2
    model.compile(keras.optimizers.SGD(0.01), "mse")
    monitor = bk.Monitor(warn=False)
    x = np.random.default_rng(0).normal(2.0, 3.0, (2 * BATCH, 4)).astype("float32")
    model.fit(x, np.zeros((2 * BATCH, 2), "float32"), batch_size=BATCH, epochs=1, callbacks=[monitor], verbose=0)
    frozen = {"functional": {"base/bn2"}, "subclassed": {"base/bn1", "base/bn2"}}[kind]
    assert set(monitor.layers) == {"base/bn1", "base/bn2"}
    for record in monitor.history:
        assert record["uses_batch_stats"] is (record["layer"] not in frozen), record["layer"]
        if record["layer"] in frozen:
            assert all(record[k] is None for k in ("batch_mean", "batch_var", "drift", "dead_fraction"))
            moving = _numpy(base.get_layer(record["layer"].split("/")[1]).moving_variance)
            assert record["running_var"] == pytest.approx(moving.mean(), abs=0)
        else:
            assert record["batch_var"] > 0 and record["drift"] > 0


# ---------------------------------------------------------------------------------------------- outputs


def test_log_reads_back_plots_and_tensorboard_has_the_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, _ = _model()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x, y = _data(3 * BATCH)
    monitor = bk.Monitor(tmp_path, histogram_every=2, keep_history=True, warn=False)
    _fit(model, x, y, monitor)
    _fit(model, x[:BATCH], y[:BATCH], monitor)  # a second fit() appends
    log = read_log(tmp_path)
    assert len(log["meta"]) == 2
    assert [layer["name"] for layer in log["meta"][0]["layers"]] == ["bn1", "bn2", "bn3"]
    assert log["meta"][0]["layers"][0]["momentum"] == pytest.approx(0.99)
    assert [(r["step"], r["layer"]) for r in log["stats"]] == [(s, n) for s in range(4) for n in ("bn1", "bn2", "bn3")]
    for written, kept in zip(log["stats"], monitor.history, strict=True):
        assert set(QUANTITIES) <= set(written)
        assert written == {k: v for k, v in kept.items()}
    png = plot(tmp_path, tmp_path / "bn.png", size=(6, 4), dpi=40)
    assert png.stat().st_size > 1000
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    for name in ("bn1", "bn2", "bn3"):
        for quantity in ("batch_mean", "batch_var", "running_var", "drift", "bias_norm"):
            values = events.Scalars(f"bn_{quantity}/{name}")
            assert [v.step for v in values] == [0, 1, 2, 3]
            expected = [r[quantity] for r in log["stats"] if r["layer"] == name]
            np.testing.assert_allclose([v.value for v in values], expected, rtol=1e-6, atol=1e-7)  # float32
        assert [v.value for v in events.Scalars(f"bn_uses_batch_stats/{name}")] == [1.0] * 4
    hist = events.Histograms("bn_hist_batch_var/bn1")
    assert [h.step for h in hist] == [0, 2]
    assert hist[0].histogram_value.num == 5 and sum(hist[0].histogram_value.bucket) == 5
    assert "bn_hist_weight/bn3" not in events.Tags()["histograms"]  # scale=False


def test_tensorboard_false_and_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _model()
    model.compile("sgd", "mse")
    x, y = _data(BATCH)
    _fit(model, x, y, bk.Monitor(tmp_path / "jsonl", tensorboard=False, warn=False))
    assert sorted(p.name for p in (tmp_path / "jsonl").iterdir()) == [JSONL_NAME]

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"pip install 'bnkit\[monitor\]'"):
        _fit(model, x, y, bk.Monitor(tmp_path / "a", tensorboard=True, warn=False))
    with pytest.warns(MonitorWarning, match="tensorboard is not installed"):
        _fit(model, x, y, bk.Monitor(tmp_path / "b", warn=False))
    assert len(read_log(tmp_path / "b")["stats"]) == 3


# ---------------------------------------------------------------------------------------------- selection, alerts


def test_nested_layers_selection_and_every() -> None:
    model, _ = transfer_model("sequential", training_false=False)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    monitor = bk.Monitor(every=3, layers="base/bn2", warn=False)
    x = np.random.default_rng(0).normal(size=(7 * 4, 4)).astype("float32")
    model.fit(x, np.zeros((28, 2), "float32"), batch_size=4, epochs=1, callbacks=[monitor], verbose=0)
    assert monitor.layers == ["base/bn2"]
    assert [(r["step"], r["layer"]) for r in monitor.history] == [(0, "base/bn2"), (3, "base/bn2"), (6, "base/bn2")]
    with pytest.raises(ValueError, match="matched no BatchNormalization layer"):
        model.fit(x, np.zeros((28, 2), "float32"), callbacks=[bk.Monitor(layers="nope")], verbose=0)


def test_drift_alert_fires_once_and_is_logged(tmp_path: Path) -> None:
    model, _ = _model()
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = _data(3 * BATCH, shift=4.0)  # far from the fresh moving statistics (0, 1)
    monitor = bk.Monitor(tmp_path, thresholds={"drift": 1.0, "drift_warmup": 0}, tensorboard=False)
    with pytest.warns(MonitorWarning, match="bn1: drift"):
        _fit(model, x, y, monitor)
    drift = [a for a in monitor.alerts if a.kind == "drift"]
    assert [a.layer for a in drift if a.layer == "bn1"] == ["bn1"]  # fired at step 0, not again while failing
    assert drift[0].step == 0 and drift[0].value > 1.0
    logged = read_log(tmp_path)["alerts"]
    assert [(a["alert"], a["layer"], a["step"]) for a in logged] == [(a.kind, a.layer, a.step) for a in monitor.alerts]


def test_bad_arguments_and_steps_per_execution() -> None:
    with pytest.raises(ValueError, match="every must be a positive int"):
        bk.Monitor(every=0)
    with pytest.raises(TypeError, match="layers must be"):
        bk.Monitor(layers=3)
    with pytest.raises(ValueError, match="unknown threshold"):
        bk.Monitor(thresholds={"drfit": 1.0})
    plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    plain.compile("sgd", "mse")
    with pytest.raises(ValueError, match="has no BatchNormalization layer"):
        plain.fit(np.zeros((4, 2)), np.zeros((4, 1)), callbacks=[bk.Monitor()], verbose=0)
    if keras.backend.backend() == "torch":
        return  # Keras refuses steps_per_execution > 1 on torch; checked under the other backends (test_backends)
    model, _ = _model()
    model.compile("sgd", "mse", steps_per_execution=2)
    x, y = _data(4 * BATCH)
    monitor = bk.Monitor(warn=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, x, y, monitor)
    assert any("steps_per_execution=2" in str(w.message) for w in caught)
    assert monitor.history and all(r["batch_mean"] is None and r["running_var"] is not None for r in monitor.history)


def test_jax_run_writes_tensorboard_and_plots_without_tensorflow_or_torch(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import numpy as np, keras\n"
        "import bnkit.keras as bk\n"
        "from bnkit.monitor import plot\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name='bn')])\n"
        "m.compile('sgd', 'mse')\n"
        f"mon = bk.Monitor({str(tmp_path)!r}, tensorboard=True, warn=False)\n"
        "m.fit(np.ones((8, 3), 'float32'), np.zeros((8, 4), 'float32'), batch_size=4, callbacks=[mon], verbose=0)\n"
        f"plot({str(tmp_path)!r}, {str(tmp_path / 'bn.png')!r}, size=(4, 3), dpi=30)\n"
        "loaded = sorted(k for k in ('torch', 'tensorflow') if k in sys.modules)\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(root / "src"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
    assert any(p.name.startswith("events.out.tfevents.") for p in tmp_path.iterdir())
    assert (tmp_path / "bn.png").is_file()
