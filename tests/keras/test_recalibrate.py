"""recalibrate gives the float64 population statistics of the real BN inputs (real Keras layers as oracle)."""

from __future__ import annotations

import importlib.util

import keras
import numpy as np
import pytest

import bnkit.keras as bk

L = keras.layers


def _np(v) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(v), dtype=np.float64)


def _model() -> keras.Model:
    inp = keras.Input((4,))
    x = L.Dense(5, name="d1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Dense(3, name="d2")(x)
    x = L.Dropout(0.5)(x)
    x = L.BatchNormalization(name="bn2")(x)
    return keras.Model(inp, x)


def _data(n: int = 16) -> np.ndarray:
    return (5.0 + 3.0 * np.random.default_rng(1).standard_normal((n, 4))).astype("float32")


def _uneven(x: np.ndarray) -> list[np.ndarray]:
    return [x[:7], x[7:12], x[12:]]


def _population(values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    flat = np.concatenate([v.reshape(-1, v.shape[-1]) for v in values]).astype(np.float64)
    return flat.mean(axis=0), flat.var(axis=0)


def _bn_inputs(model: keras.Model, name: str, batches: list[np.ndarray]) -> list[np.ndarray]:
    probe = keras.Model(model.inputs[0], model.get_layer(name).input)
    return [_np(probe(b, training=False)) for b in batches]


def test_sequential_matches_a_float64_reduction_of_the_real_inputs_with_uneven_batches() -> None:
    model, x = _model(), _data()
    report = bk.recalibrate(model, _uneven(x), sequential=True)
    assert report.layers == ["bn1", "bn2"] and report.passes == 2 and report.samples == 16
    for name in ("bn1", "bn2"):
        mean, var = _population(_bn_inputs(model, name, _uneven(x)))
        bn = model.get_layer(name)
        np.testing.assert_allclose(_np(bn.moving_mean), mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(_np(bn.moving_variance), var, rtol=1e-6, atol=1e-6)


def test_precise_normalises_selected_layers_with_batch_statistics_during_the_pass() -> None:
    model, x = _model(), _data()
    bk.recalibrate(model, _uneven(x))
    d1, d2, bn1 = model.get_layer("d1"), model.get_layer("d2"), model.get_layer("bn1")
    outs = []
    for b in _uneven(x):  # float64 forward with bn1 on its batch statistics, dropout off
        h = b.astype(np.float64) @ _np(d1.kernel) + _np(d1.bias)
        h = (h - h.mean(0)) / np.sqrt(h.var(0) + bn1.epsilon) * _np(bn1.gamma) + _np(bn1.beta)
        outs.append(h @ _np(d2.kernel) + _np(d2.bias))
    mean1, var1 = _population(_bn_inputs(model, "bn1", _uneven(x)))
    np.testing.assert_allclose(_np(bn1.moving_variance), var1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(bn1.moving_mean), mean1, rtol=1e-6, atol=1e-6)
    mean2, var2 = _population(outs)
    bn2 = model.get_layer("bn2")
    np.testing.assert_allclose(_np(bn2.moving_mean), mean2, rtol=1e-5, atol=1e-5)  # float32 forward vs float64
    np.testing.assert_allclose(_np(bn2.moving_variance), var2, rtol=1e-5, atol=1e-5)


def test_masked_positions_are_left_out() -> None:
    tokens = np.array([[1, 2, 0, 0], [3, 0, 0, 0], [4, 5, 6, 7]], "int32")
    inp = keras.Input((4,), dtype="int32")
    emb = L.Embedding(8, 3, mask_zero=True, name="emb")
    bn = L.BatchNormalization(name="bn")
    model = keras.Model(inp, bn(emb(inp)))
    bk.recalibrate(model, [tokens[:2], tokens[2:]])
    table = _np(emb.embeddings)
    kept = table[tokens[tokens != 0]]
    np.testing.assert_allclose(_np(bn.moving_mean), kept.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(bn.moving_variance), kept.var(0), rtol=1e-6, atol=1e-6)


def test_renorm_gets_moving_stddev() -> None:
    bn = L.BatchNormalization(renorm=True, name="bn")
    model = keras.Sequential([keras.Input((4,)), bn])
    x = _data()
    bk.recalibrate(model, [x])
    var = x.astype(np.float64).var(0)
    np.testing.assert_allclose(_np(bn.moving_stddev), np.sqrt(var + bn.epsilon), rtol=1e-6)
    np.testing.assert_allclose(_np(bn.moving_variance), var, rtol=1e-6)


class _Batches(keras.utils.PyDataset):
    def __init__(self, x):
        super().__init__()
        self.x = x

    def __len__(self):
        return 3

    def __getitem__(self, i):
        b = _uneven(self.x)[i]
        return b, np.zeros((len(b), 3), "float32")


def _formats(x: np.ndarray) -> dict[str, object]:
    y = np.zeros((len(x), 3), "float32")
    formats = {
        "array": x,
        "xy arrays": (x, y),
        "list of (x, y)": [(b, None) for b in _uneven(x)],
        "generator": (b for b in _uneven(x)),
        "PyDataset": _Batches(x),
    }
    if importlib.util.find_spec("tensorflow") is not None:
        import tensorflow as tf

        formats["tf.data"] = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    return formats


def test_every_data_format_gives_the_same_statistics() -> None:
    x = _data()
    results = {}
    model = keras.Sequential([keras.Input((4,)), L.BatchNormalization(name="bn")])  # one model: one cached step
    for label, data in _formats(x).items():
        model.layers[0].moving_mean.assign(np.zeros(4, "float32"))
        bk.recalibrate(model, data, batch_size=6)
        results[label] = (_np(model.layers[0].moving_mean), _np(model.layers[0].moving_variance))
    mean, var = x.astype(np.float64).mean(0), x.astype(np.float64).var(0)
    for label, (m, v) in results.items():
        np.testing.assert_allclose(m, mean, rtol=1e-6, err_msg=label)
        np.testing.assert_allclose(v, var, rtol=1e-6, err_msg=label)


def test_an_exception_restores_every_variable_and_the_layers() -> None:
    model, x = _model(), _data()
    model(x, training=True)  # move the statistics away from their initial values
    before = [_np(v) for v in model.variables]

    def failing():
        yield x[:8]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bk.recalibrate(model, failing())
    assert all(np.array_equal(a, _np(b)) for a, b in zip(before, model.variables, strict=True))
    assert "call" not in model.get_layer("bn1").__dict__
    with pytest.raises(TypeError, match="generator can be read once"):
        bk.recalibrate(model, (b for b in _uneven(x)), sequential=True)
    assert all(np.array_equal(a, _np(b)) for a, b in zip(before, model.variables, strict=True))
    with pytest.raises(ValueError, match="no batch"):
        bk.recalibrate(model, [])
    with pytest.raises(ValueError, match="matched no BatchNormalization"):
        bk.recalibrate(model, [x], layers="nope")


def test_recalibration_fixes_stale_statistics_without_touching_a_weight() -> None:
    model, x = _model(), _data(64)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(x, np.zeros((64, 3), "float32"), batch_size=16, verbose=0)
    weights = [_np(w) for w in model.trainable_weights]
    stale = bk.doctor(model).codes()
    assert "KBN004" in stale
    bk.recalibrate(model, x, sequential=True)
    assert all(np.array_equal(a, _np(b)) for a, b in zip(weights, model.trainable_weights, strict=True))
    mean, var = _population(_bn_inputs(model, "bn2", [x]))
    np.testing.assert_allclose(_np(model.get_layer("bn2").moving_mean), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(model.get_layer("bn2").moving_variance), var, rtol=1e-6, atol=1e-6)


def _masked_model() -> keras.Model:
    inp = keras.Input((5,), dtype="int32")
    x = L.Embedding(9, 3, mask_zero=True, name="emb")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Dense(4, name="d")(x)
    x = L.Dropout(0.5)(x)
    x = L.BatchNormalization(name="bn2")(x)
    return keras.Model(inp, x)


def _token_batches() -> list[np.ndarray]:
    tokens = np.random.default_rng(2).integers(0, 9, size=(11, 5)).astype("int32")
    tokens[:, 0] = np.maximum(tokens[:, 0], 1)  # no all-masked row
    return [tokens[:4], tokens[4:9], tokens[9:]]


def _statistics(model: keras.Model) -> list[np.ndarray]:
    return [_np(v) for v in model.non_trainable_variables if "moving" in v.path]


@pytest.mark.parametrize("sequential", [False, True])
def test_the_compiled_step_and_eager_calls_agree_with_masks_and_uneven_batches(sequential) -> None:
    model, batches = _masked_model(), _token_batches()
    first = bk.recalibrate(model, batches, sequential=sequential)
    dense, bn1 = model.get_layer("d"), model.get_layer("bn1")
    dense.kernel.assign(_np(dense.kernel) * 2.0 + 0.5)  # the cached step must read the new values, not old ones
    bn1.gamma.assign(_np(bn1.gamma) + 1.0)
    compiled = bk.recalibrate(model, batches, sequential=sequential)
    fast = _statistics(model)
    eager = bk.recalibrate(model, batches, sequential=sequential, compiled=False)
    slow = _statistics(model)
    assert first.compiled and compiled.compiled and not compiled.fallback
    assert not eager.compiled and not eager.fallback
    assert compiled.layers == eager.layers == ["bn1", "bn2"] and compiled.samples == eager.samples == 11
    assert compiled.passes == eager.passes == (2 if sequential else 1)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    table = _np(model.get_layer("emb").embeddings)
    tokens = np.concatenate(batches)
    kept = table[tokens[tokens != 0]]
    np.testing.assert_allclose(_np(bn1.moving_mean), kept.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(bn1.moving_variance), kept.var(0), rtol=1e-6, atol=1e-6)
    if sequential:  # bn2 against a float64 reduction of its real inputs, masked positions left out
        probe = keras.Model(model.inputs[0], model.get_layer("bn2").input[0])  # the node's inputs: [x, mask]
        values = [_np(probe(b, training=False)) for b in batches]
        rows = np.concatenate([v[b != 0] for v, b in zip(values, batches, strict=True)])
        np.testing.assert_allclose(_np(model.get_layer("bn2").moving_mean), rows.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(_np(model.get_layer("bn2").moving_variance), rows.var(0), rtol=1e-6, atol=1e-6)


class _Untraceable(keras.Model):
    """Reads a concrete value in ``call``: ``tf.function`` and ``jax.jit`` cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = L.BatchNormalization(name="bn")

    def call(self, x, training=None):
        scale = float(keras.ops.convert_to_numpy(keras.ops.max(x)))
        return self.bn(x / scale, training=training)


def test_a_model_that_cannot_be_traced_falls_back_to_eager_calls() -> None:
    model, x = _Untraceable(), _data()
    model(x[:2])
    report = bk.recalibrate(model, _uneven(x))
    traced = keras.backend.backend() != "torch"  # torch's predict step runs eagerly: nothing to fall back from
    assert report.compiled is not traced and bool(report.fallback) is traced
    if traced:
        assert "eager calls used" in str(report)
        again = bk.recalibrate(model, _uneven(x))  # the failed trace is remembered: straight to eager calls
        assert not again.compiled and again.fallback == report.fallback
    scaled = [b.astype(np.float64) / b.max() for b in _uneven(x)]
    mean, var = _population(scaled)
    np.testing.assert_allclose(_np(model.bn.moving_mean), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(model.bn.moving_variance), var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compiled", [True, False])
def test_large_means_keep_their_variance(compiled) -> None:
    # mean 1000, std 0.05: a one-pass E[x^2] - E[x]^2 in float32 loses the variance entirely
    x = (1000.0 + 0.05 * np.random.default_rng(3).standard_normal((64, 4))).astype("float32")
    model = keras.Sequential([keras.Input((4,)), L.BatchNormalization(name="bn")])
    bk.recalibrate(model, [x[:40], x[40:]], compiled=compiled)
    exact = x.astype(np.float64)
    np.testing.assert_allclose(_np(model.layers[0].moving_mean), exact.mean(0), rtol=1e-6)
    np.testing.assert_allclose(_np(model.layers[0].moving_variance), exact.var(0), rtol=1e-3)


class _FailsOnSecondPass:
    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        for i, b in enumerate(self.batches):
            if self.passes == 3 and i == 1:  # pass 1 finds the call order; bn1 is assigned after pass 2
                raise RuntimeError("data source failed")
            yield b


def test_an_exception_after_a_layer_was_assigned_restores_it() -> None:
    model, x = _model(), _data()
    model(x, training=True)
    before = [_np(v) for v in model.variables]
    with pytest.raises(RuntimeError, match="data source failed"):
        bk.recalibrate(model, _FailsOnSecondPass(_uneven(x)), sequential=True)
    assert all(np.array_equal(a, _np(b)) for a, b in zip(before, model.variables, strict=True))
    report = bk.recalibrate(model, _FailsOnSecondPass(_uneven(x)), sequential=True, num_batches=1)
    assert report.layers == ["bn1", "bn2"]


def test_the_compiled_step_leaves_the_model_as_it_was(tmp_path) -> None:
    model, x = _model(), _data()
    layers, paths = [layer.name for layer in model.layers], [v.path for v in model.variables]
    assert bk.recalibrate(model, x).compiled
    assert [layer.name for layer in model.layers] == layers and [v.path for v in model.variables] == paths
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    for a, b in zip(model.variables, loaded.variables, strict=True):
        if "seed_generator" not in a.path:  # dropout's seed state is drawn afresh on load
            np.testing.assert_array_equal(_np(a), _np(b))
