"""Each Keras doctor rule fires on a minimal model and stays quiet on its fixed twin (real Keras models)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import bnkit.keras as bk
from bnkit.keras import compat
from bnkit.keras.diagnosis import KERAS_RULES

L = keras.layers


def _seq(*layers, features: int = 3) -> keras.Model:
    return keras.Sequential([keras.Input((features,)), *layers])


def _x(n: int = 16, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    return (mean + std * np.random.default_rng(0).standard_normal((n, 3))).astype("float32")


def construction_training(fixed: bool):
    inp = keras.Input((3,))
    base = _seq(L.Dense(3, use_bias=False), L.BatchNormalization(name="bn"))
    base.trainable = not fixed
    return keras.Model(inp, base(inp, training=False)), {}


def changed_since_compile(fixed: bool):
    model = _seq(L.Dense(3, use_bias=False), L.BatchNormalization(name="bn"))
    model.compile("sgd", "mse")
    model.trainable = False
    if fixed:
        model.compile("sgd", "mse")
    return model, {}


def per_bn_freeze(fixed: bool):
    model = _seq(L.Dense(3, use_bias=False), L.BatchNormalization(name="bn"))
    if fixed:
        bk.freeze(model, layers="bn")
    else:
        model.get_layer("bn").trainable = False
    return model, {}


def _trained(momentum: float, steps: int):
    model = _seq(L.Dense(3, use_bias=False), L.BatchNormalization(momentum=momentum, name="bn"))
    model.compile("sgd", "mse")
    model.fit(_x(4 * steps), _x(4 * steps), batch_size=4, verbose=0)
    return model


def stale_statistics(fixed: bool):
    return _trained(0.1 if fixed else 0.99, 3), {}


def never_updated(fixed: bool):
    model = _seq(L.Dense(3, use_bias=False), L.BatchNormalization(momentum=0.1, name="bn"))
    if fixed:
        model(_x(), training=True)
    return model, {"intent": "inference"}


def small_batch(fixed: bool):
    model = _seq(L.Dense(3, use_bias=False), L.BatchNormalization(name="bn"))
    return model, {"x": _x(16 if fixed else 4), "intent": "training"}


def batch_of_one(fixed: bool):
    model = _seq(L.Dense(3, use_bias=False), L.BatchNormalization(name="bn"))
    return model, {"x": _x(16 if fixed else 1), "intent": "training"}


def large_mean(fixed: bool):
    model = _seq(L.BatchNormalization(name="bn"))
    return model, {"x": _x(64, 0.0 if fixed else 1000.0, 0.05)}


def after_activation(fixed: bool):
    if fixed:
        return _seq(L.Dense(3, use_bias=False), L.BatchNormalization(name="bn"), L.ReLU()), {}
    return _seq(L.Dense(3, use_bias=False), L.ReLU(), L.BatchNormalization(name="bn")), {}


def bias_before_bn(fixed: bool):
    return _seq(L.Dense(3, use_bias=not fixed), L.BatchNormalization(name="bn")), {}


def synchronized(fixed: bool):
    return _seq(L.Dense(3, use_bias=False), L.BatchNormalization(synchronized=not fixed, name="bn")), {}


CASES = {
    "KBN001": construction_training,
    "KBN002": changed_since_compile,
    "KBN003": per_bn_freeze,
    "KBN004": stale_statistics,
    "KBN005": never_updated,
    "KBN006": small_batch,
    "KBN007": large_mean,
    "KBN008": after_activation,
    "KBN009": bias_before_bn,
    "KBN010": synchronized,
}


def _fires_here(code: str) -> bool:
    if code == "KBN007":
        return compat.variance_is_one_pass()  # the torch backend; TF and JAX compute the variance in two passes
    if code == "KBN010":
        return keras.backend.backend() != "tensorflow"
    return True


def test_every_rule_has_a_case() -> None:
    codes = [rule.__doc__.split(":")[0] for rule in KERAS_RULES]
    assert codes == sorted(CASES)


@pytest.mark.parametrize("code", sorted(CASES))
def test_rule_fires_on_minimal_model_and_is_quiet_on_its_fixed_twin(code) -> None:
    try:
        broken, kwargs = CASES[code](False)
    except ValueError as error:
        if code == "KBN010" and "only supported with the TensorFlow backend" in str(error):
            pytest.skip("this Keras refuses synchronized=True off TensorFlow itself (3.15: at construction)")
        raise
    diagnosis = bk.doctor(broken, **kwargs)
    assert (code in diagnosis.codes()) == _fires_here(code), str(diagnosis)
    finding = next((f for f in diagnosis if f.code == code), None)
    if finding is not None:
        assert finding.layer.endswith("bn") and finding.fix
    fixed, kwargs = CASES[code](True)
    assert bk.doctor(fixed, **kwargs).codes() == [], str(bk.doctor(fixed, **kwargs))


def test_batch_of_one_is_an_error_naming_beta() -> None:
    model, kwargs = batch_of_one(False)
    finding = bk.doctor(model, **kwargs)[0]
    assert (finding.code, finding.severity) == ("KBN006", "error") and "beta" in finding.message


def test_doctor_changes_no_variable_and_rejects_bad_intent() -> None:
    model, kwargs = large_mean(False)
    before = [keras.ops.convert_to_numpy(v).copy() for v in model.variables]
    bk.doctor(model, **kwargs)
    assert all(np.array_equal(a, keras.ops.convert_to_numpy(b)) for a, b in zip(before, model.variables, strict=True))
    with pytest.raises(ValueError, match="intent must be"):
        bk.doctor(model, intent="deploy")
