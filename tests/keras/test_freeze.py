"""freeze/unfreeze survive trainable changes + compile() + fit() and round-trip through .keras (real Keras oracle)."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest

import bnkit.keras as bk
from tests.keras.helpers import data, transfer_model


def _np(v) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(v), copy=True)


@pytest.mark.parametrize(("stats", "affine"), [(True, True), (True, False), (False, True)])
def test_freeze_survives_base_trainable_compile_and_fit(stats, affine) -> None:
    model, base = transfer_model("functional", False)
    report = bk.freeze(model, stats=stats, affine=affine, layers="base/bn*")
    assert report.changed == ["base/bn1", "base/bn2"]
    base.trainable = True  # the recursive setter that re-enables stock layers
    model.trainable = True
    model.compile(keras.optimizers.SGD(0.1), "mse")
    bns = [base.get_layer("bn1"), base.get_layer("bn2")]
    before = [(_np(bn.moving_mean), _np(bn.moving_variance), _np(bn.gamma), _np(bn.beta)) for bn in bns]
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for bn, (mean, var, gamma, beta) in zip(bns, before, strict=True):
        assert np.array_equal(mean, _np(bn.moving_mean)) == stats
        assert np.array_equal(var, _np(bn.moving_variance)) == stats
        assert np.array_equal(gamma, _np(bn.gamma)) == affine
        assert np.array_equal(beta, _np(bn.beta)) == affine
    rows = {r.name: r for r in bk.explain(model)}
    assert (rows["base/bn1"].fit == "moving statistics") == stats
    assert (rows["base/bn1"].gamma_beta == "frozen") == affine


def test_freeze_keeps_objects_and_reminds_to_compile() -> None:
    model, base = transfer_model("functional", False)
    bn = base.get_layer("bn1")
    model.compile("sgd", "mse")
    report = bk.freeze(model, layers=["base/bn1"])
    assert base.get_layer("bn1") is bn and isinstance(bn, bk.BatchNormalization)
    assert any("compile" in n and "on " in n for n in report.notes), report.notes
    assert bk.freeze(model, layers="base/bn1").unchanged == ["base/bn1"]
    with pytest.raises(ValueError, match="matched no BatchNormalization"):
        bk.freeze(model, layers="nope")
    with pytest.raises(TypeError, match="layers must be"):
        bk.freeze(model, layers=True)


def test_keras_round_trip_and_unfreeze_gives_stock_layers(tmp_path) -> None:
    model, _ = transfer_model("functional", False)
    x, _ = data()
    bk.freeze(model, stats=True, affine=False)
    path = tmp_path / "frozen.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    bn = loaded.get_layer("base").get_layer("bn2")
    assert isinstance(bn, bk.BatchNormalization) and bn.freeze_stats and not bn.freeze_affine
    np.testing.assert_allclose(_np(loaded(x, training=True)), _np(model(x, training=True)), atol=1e-6)

    report = bk.unfreeze(loaded)
    assert report.changed == ["base/bn1", "base/bn2"]
    assert type(loaded.get_layer("base").get_layer("bn1")) is keras.layers.BatchNormalization
    plain = tmp_path / "plain.keras"
    loaded.save(plain)
    code = (
        "import keras, sys; m = keras.saving.load_model(sys.argv[1]);"
        "assert 'bnkit' not in sys.modules; print(type(m.get_layer('base').get_layer('bn1')).__module__)"
    )
    env_backend = keras.backend.backend()
    result = subprocess.run(
        [sys.executable, "-c", code, str(plain)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"KERAS_BACKEND": env_backend, "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-1500:]
    assert result.stdout.strip().startswith("keras.")
