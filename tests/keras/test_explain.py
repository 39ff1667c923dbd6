"""explain's fit column predicts what one real fit() does to each BN's statistics and gamma (real Keras oracle)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import bnkit.keras as bk
from bnkit.keras.explanation import BATCH
from tests.keras.helpers import data, snapshot, transfer_model


def _moved(before: np.ndarray, layer_var) -> bool:
    return not np.array_equal(before, keras.ops.convert_to_numpy(layer_var))


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
@pytest.mark.parametrize("base_trainable", [True, False])
@pytest.mark.parametrize("training_false", [False, True])
@pytest.mark.parametrize("bn2_frozen", [False, True])
def test_fit_column_predicts_a_real_fit(kind, base_trainable, training_false, bn2_frozen) -> None:
    if kind == "sequential" and training_false:
        pytest.skip("a Sequential model records no construction-time training")
    model, base = transfer_model(kind, training_false)
    base.trainable = base_trainable
    if bn2_frozen:
        base.get_layer("bn2").trainable = False
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x, y = data()
    before_vars = snapshot(model)
    rows = {r.name: r for r in bk.explain(model, x[:8])}
    assert all(np.array_equal(a, b) for a, b in zip(before_vars, snapshot(model), strict=True))
    if kind != "subclassed":
        static = {r.name: (r.fit, r.gamma_beta) for r in bk.explain(model)}
        assert static == {name: (r.fit, r.gamma_beta) for name, r in rows.items()}
    layers = {name: base.get_layer(name.split("/")[-1]) for name in rows}
    stats = {name: keras.ops.convert_to_numpy(layer.moving_mean).copy() for name, layer in layers.items()}
    gammas = {name: keras.ops.convert_to_numpy(layer.gamma).copy() for name, layer in layers.items()}
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for name, layer in layers.items():
        assert _moved(stats[name], layer.moving_mean) == (rows[name].fit == BATCH), name
        assert _moved(gammas[name], layer.gamma) == (rows[name].gamma_beta == "learn"), name
    if kind == "functional" and training_false and base_trainable:
        assert "keras#20285" in " ".join(rows["base/bn1"].reasons)


def test_trainable_changed_since_compile_is_reported_with_this_backends_consequence() -> None:
    model, base = transfer_model("functional", False)
    model.compile("sgd", "mse")
    base.trainable = False
    row = bk.explain(model)[0]
    assert row.fit == "moving statistics"
    assert row.gamma_beta == "learn"  # the compiled step still holds gamma
    backend = {"tensorflow": "TensorFlow", "torch": "torch", "jax": "JAX"}[keras.backend.backend()]
    assert any("compile again" in r and f"on {backend}" in r for r in row.reasons), row.reasons


def test_recursive_setter_hazard_is_named() -> None:
    model, base = transfer_model("functional", False)
    base.get_layer("bn2").trainable = False
    text = " ".join(bk.explain(model)[1].reasons)
    assert "recursive setter" in text and "bnkit.keras.freeze" in text


def test_momentum_in_both_conventions_and_its_memory() -> None:
    bn = keras.layers.BatchNormalization(momentum=0.999, epsilon=1e-5, name="bn")
    model = keras.Sequential([keras.Input((3,)), bn])
    row = bk.explain(model)[0]
    assert (row.momentum, row.momentum_torch, round(row.memory_steps)) == (0.999, 0.001, 693)
    assert (row.epsilon, row.axis, row.center, row.scale) == (1e-5, -1, True, True)
    assert "no BatchNormalization" in str(bk.explain(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])))
