"""bnkit.keras.fold against Keras's own predict(): every layer kind, both positions, the refusals, nesting, .keras."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkit.keras as bk
from bnkit.keras import compat
from bnkit.keras.find import walk
from tests.keras.helpers import snapshot

L = keras.layers


# Kernels start at zero (random initializers compile once per shape on JAX: seconds each) and _randomize draws them.
Z = {"kernel_initializer": "zeros"}
DW = {"depthwise_initializer": "zeros"}
SEP = {**DW, "pointwise_initializer": "zeros"}


def _randomize(model: keras.Model, seed: int = 0) -> None:
    """Random kernels and biases everywhere; non-trivial moving statistics, gamma and beta on every BN."""
    rng = np.random.default_rng(seed)
    bns = {id(bn) for _, bn in bk.named_batchnorms(model)}
    for found in walk(model):
        if id(found.layer) not in bns and not compat.sublayers(found.layer):  # leaves only
            for w in found.layer.weights:
                w.assign(rng.normal(0.0, 0.5, tuple(w.shape)).astype("float32"))
    for _, bn in bk.named_batchnorms(model):
        c = int(bn.moving_mean.shape[0])
        bn.moving_mean.assign(rng.normal(0.5, 1.0, c).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.2, 3.0, c).astype("float32"))
        if bn.scale:
            bn.gamma.assign(rng.normal(1.0, 0.5, c).astype("float32"))
        if bn.center:
            bn.beta.assign(rng.normal(0.0, 1.0, c).astype("float32"))


def _x(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.5, 1.5, (3, *shape)).astype("float32")


def _assert_same_predict(model: keras.Model, folded: keras.Model, x) -> None:
    ref = model.predict(x, verbose=0)
    out = folded.predict(x, verbose=0)
    assert out.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(out - ref).max()) <= 1e-6 * scale, (float(np.abs(out - ref).max()), scale)


def _bn_names(model: keras.Model) -> list[str]:
    return [path for path, _ in bk.named_batchnorms(model)]


# (id, input shape, layer, BN before it too) -- the BN after it is always there.
CASES = [
    ("conv1d", (9, 4), lambda: L.Conv1D(5, 3, strides=2, name="layer", **Z), True),
    ("conv2d", (7, 7, 4), lambda: L.Conv2D(6, 3, dilation_rate=2, name="layer", **Z), True),
    ("conv2d_groups", (6, 6, 4), lambda: L.Conv2D(6, 3, groups=2, use_bias=False, name="layer", **Z), True),
    ("conv3d_groups", (5, 5, 5, 4), lambda: L.Conv3D(4, 2, groups=2, name="layer", **Z), True),
    ("conv2d_same", (6, 6, 3), lambda: L.Conv2D(4, 3, strides=2, padding="same", name="layer", **Z), False),
    ("depthwise1d", (9, 3), lambda: L.DepthwiseConv1D(3, depth_multiplier=2, name="layer", **DW), True),
    (
        "depthwise2d",
        (6, 6, 3),
        lambda: L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, name="layer", **DW),
        True,
    ),
    ("separable1d", (9, 3), lambda: L.SeparableConv1D(4, 3, depth_multiplier=2, name="layer", **SEP), True),
    ("separable2d", (6, 6, 3), lambda: L.SeparableConv2D(5, 3, depth_multiplier=2, name="layer", **SEP), True),
    ("conv1d_transpose", (5, 3), lambda: L.Conv1DTranspose(4, 3, strides=2, name="layer", **Z), False),
    (
        "conv2d_transpose",
        (4, 4, 3),
        lambda: L.Conv2DTranspose(4, 3, strides=2, padding="same", name="layer", **Z),
        False,
    ),
    ("conv3d_transpose", (3, 3, 3, 2), lambda: L.Conv3DTranspose(3, 2, use_bias=False, name="layer", **Z), False),
    ("dense", (6,), lambda: L.Dense(5, name="layer", **Z), True),
    ("dense_3d_input", (4, 6), lambda: L.Dense(5, use_bias=False, name="layer", **Z), True),
]


@pytest.mark.parametrize(("shape", "make", "before"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fold_matches_predict_on_every_layer_kind(shape, make, before) -> None:
    layers = [L.BatchNormalization(name="bn_in")] if before else []
    layers += [make(), L.BatchNormalization(name="bn_out"), L.ReLU(name="relu")]
    model = keras.Sequential([keras.Input(shape), *layers])
    _randomize(model)
    folded, report = bk.fold_with_report(model, check=_x(shape, seed=5))
    expected = ([("bn_in", "layer", "before")] if before else []) + [("bn_out", "layer", "after")]
    assert [(f.bn, f.into, f.position) for f in report.folded] == expected
    assert report.skipped == [] and report.checked
    assert isinstance(folded, keras.Sequential) and _bn_names(folded) == []
    assert [layer.name for layer in folded.layers] == ["layer", "relu"]
    assert folded.get_layer("layer").use_bias
    _assert_same_predict(model, folded, _x(shape))


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="varied shapes run in the main (torch) run only")
@settings(max_examples=12)
@given(
    kind=st.sampled_from(["conv", "depthwise", "separable", "transpose"]),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    strides=st.integers(1, 2),
    dilation=st.integers(1, 2),
    length=st.integers(7, 10),
    seed=st.integers(0, 2**16),
)
def test_varied_1d_layers_fold_both_ways(kind, groups, kernel, strides, dilation, length, seed) -> None:
    strides = 1 if dilation > 1 else strides  # Keras refuses strides > 1 with dilation > 1
    make = {
        "conv": lambda: L.Conv1D(4, kernel, strides, groups=groups, dilation_rate=dilation, name="layer", **Z),
        "depthwise": lambda: L.DepthwiseConv1D(kernel, strides, depth_multiplier=groups, name="layer", **DW),
        "separable": lambda: L.SeparableConv1D(3, kernel, strides, depth_multiplier=groups, name="layer", **SEP),
        "transpose": lambda: L.Conv1DTranspose(3, kernel, strides, name="layer", **Z),
    }[kind]
    before = [] if kind == "transpose" else [L.BatchNormalization(name="bn_in")]
    model = keras.Sequential([keras.Input((length, 4)), *before, make(), L.BatchNormalization(name="bn_out")])
    _randomize(model, seed)
    folded, report = bk.fold_with_report(model)
    assert len(report.folded) == 1 + len(before) and _bn_names(folded) == []
    _assert_same_predict(model, folded, _x((length, 4), seed))


def test_chain_of_bns_and_scale_center_false_fold_into_one_dense() -> None:
    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(3, use_bias=False, name="fc", **Z),
            L.BatchNormalization(center=False, scale=False, epsilon=0.5, name="bn1"),
            L.BatchNormalization(center=False, name="bn2"),
            L.BatchNormalization(scale=False, name="bn3"),
        ]
    )
    _randomize(model)
    folded, report = bk.fold_with_report(model)
    assert [(f.bn, f.into) for f in report.folded] == [("bn1", "fc"), ("bn2", "fc"), ("bn3", "fc")]
    assert [layer.name for layer in folded.layers] == ["fc"]
    _assert_same_predict(model, folded, _x((4,)))


def _functional(body) -> tuple[keras.Model, tuple[int, ...]]:
    inp = keras.Input((6, 6, 3))
    return keras.Model(inp, body(inp)), (6, 6, 3)


def _activation_in_conv(x):
    return L.BatchNormalization(name="bn")(L.Conv2D(4, 3, activation="relu", name="conv", **Z)(x))


def _activation_layer(x):
    return L.BatchNormalization(name="bn")(L.ReLU(name="relu")(L.Conv2D(4, 3, name="conv", **Z)(x)))


def _shared_bn(x):
    bn = L.BatchNormalization(name="bn")
    return L.Add()([bn(L.Conv2D(4, 1, name="c1", **Z)(x)), bn(L.Conv2D(4, 1, name="c2", **Z)(x))])


def _shared_conv(x):
    conv = L.Conv2D(3, 1, name="conv", **Z)
    return L.BatchNormalization(name="bn")(conv(conv(x)))


def _several_consumers(x):
    y = L.Conv2D(4, 3, name="conv", **Z)(x)
    return L.Add(name="add")([L.BatchNormalization(name="bn")(y), y])


def _before_same_padding(x):
    return L.Conv2D(4, 3, padding="same", name="conv", **Z)(L.BatchNormalization(name="bn")(x))


def _training_true(x):
    return L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv", **Z)(x), training=True)


def _bn_feeds_two(x):
    y = L.BatchNormalization(name="bn")(x)
    return L.Add(name="add")([L.Conv2D(2, 1, name="c1", **Z)(y), L.Conv2D(2, 1, name="c2", **Z)(y)])


def _channels_mismatch(x):
    y = L.Conv2D(4, 3, data_format="channels_first", name="conv", **Z)(L.Permute((3, 1, 2))(x))
    return L.BatchNormalization(axis=-1, name="bn")(y)


REFUSALS = [
    ("activation_in_conv", _activation_in_conv, "activation between: conv applies activation='relu'"),
    ("activation_layer", _activation_layer, "activation between: its input comes from relu (ReLU)"),
    ("shared_bn", _shared_bn, "shared layer: bn is called 2 times"),
    ("shared_conv", _shared_conv, "shared layer: conv is called 2 times"),
    ("several_consumers", _several_consumers, "several consumers: conv's output also feeds add"),
    ("before_same_padding", _before_same_padding, "BN before a zero-padded conv: conv uses padding='same'"),
    ("training_true", _training_true, "called with training=True when the model was built"),
    ("bn_feeds_two", _bn_feeds_two, "several consumers: its output feeds c1, c2"),
    ("channels_mismatch", _channels_mismatch, "the BN normalises axis 3, conv's channels are on axis 1"),
]


@pytest.mark.parametrize(("body", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_each_refusal_names_its_reason_and_keeps_the_bn(body, reason) -> None:
    model, shape = _functional(body)
    _randomize(model)
    with pytest.warns(UserWarning, match="could be folded"):
        folded, report = bk.fold_with_report(model)
    assert report.folded == []
    assert [s.bn for s in report.skipped] == ["bn"]
    assert reason in report.skipped[0].reason, report.skipped[0].reason
    assert _bn_names(folded) == ["bn"]
    np.testing.assert_array_equal(model.predict(_x(shape), verbose=0), folded.predict(_x(shape), verbose=0))


def test_training_true_recorded_on_a_container_keeps_its_bns_unless_they_are_frozen() -> None:
    base = keras.Sequential(
        [keras.Input((4,)), L.Dense(3, name="fc", **Z), L.BatchNormalization(name="bn")], name="base"
    )
    inp = keras.Input((4,))
    model = keras.Model(inp, base(inp, training=True))
    _randomize(model)
    with pytest.warns(UserWarning, match="could be folded"):
        report = bk.fold_with_report(model)[1]
    assert [s.bn for s in report.skipped] == ["base/bn"] and "training=True" in report.skipped[0].reason
    base.get_layer("bn").trainable = False  # inference mode whatever training says: folds
    folded, report = bk.fold_with_report(model)
    assert [f.bn for f in report.folded] == ["base/bn"]
    x = _x((4,))
    ref = keras.ops.convert_to_numpy(model(x))  # a plain call, training=True recorded
    assert np.abs(keras.ops.convert_to_numpy(folded(x)) - ref).max() <= 1e-6 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="TensorFlow's CPU conv is channels_last only")
def test_channels_first_conv_folds_with_a_bn_on_axis_1() -> None:
    model = keras.Sequential(
        [
            keras.Input((3, 6, 6)),
            L.BatchNormalization(axis=1, name="bn_in"),
            L.Conv2D(4, 3, data_format="channels_first", name="conv", **Z),
            L.BatchNormalization(axis=1, name="bn_out"),
        ]
    )
    _randomize(model)
    folded, report = bk.fold_with_report(model)
    assert [(f.bn, f.position) for f in report.folded] == [("bn_in", "before"), ("bn_out", "after")]
    _assert_same_predict(model, folded, _x((3, 6, 6)))


def test_compiled_multi_input_model_stays_functional_and_compiled() -> None:
    a, b = keras.Input((4,), name="a"), keras.Input((6, 3), name="b")
    x = L.BatchNormalization(name="bna")(L.Dense(3, name="fa", **Z)(a))
    y = L.GlobalAveragePooling1D()(L.BatchNormalization(name="bnb")(L.Conv1D(3, 2, name="cb", **Z)(b)))
    model = keras.Model([a, b], {"z": L.Concatenate()([x, y]), "x": x})
    _randomize(model)
    model.compile("sgd", "mse")
    folded, report = bk.fold_with_report(model)
    assert sorted(f.bn for f in report.folded) == ["bna", "bnb"] and folded.compiled
    inputs = [_x((4,)), _x((6, 3))]
    ref, out = model.predict(inputs, verbose=0), folded.predict(inputs, verbose=0)
    for key in ("z", "x"):
        assert np.abs(ref[key] - out[key]).max() <= 1e-6 * max(1.0, float(np.abs(ref[key]).max()))


def _nested() -> keras.Model:
    base = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            L.Conv2D(4, 3, use_bias=False, name="conv", **Z),
            L.BatchNormalization(name="bn"),
            L.ReLU(name="relu"),
        ],
        name="base",
    )
    inp = keras.Input((6, 6, 3), name="image")
    y = L.GlobalAveragePooling2D(name="pool")(base(inp))
    y = L.BatchNormalization(name="head_bn")(L.Dense(3, name="head", **Z)(y))
    model = keras.Model(inp, y, name="net")
    _randomize(model)
    return model


def test_nested_models_fold_recursively_and_the_input_model_is_untouched() -> None:
    model = _nested()
    before = snapshot(model)
    layers_before = [(f.path, f.layer) for f in walk(model)]
    folded, report = bk.fold_with_report(model)
    assert [(f.bn, f.into, f.position) for f in report.folded] == [
        ("base/bn", "base/conv", "after"),
        ("head_bn", "head", "after"),
    ]
    assert type(folded) is type(model) and folded.name == "net"
    assert isinstance(folded.get_layer("base"), keras.Sequential)
    assert _bn_names(folded) == [] and _bn_names(model) == ["base/bn", "head_bn"]
    assert all(a is not b for a, b in zip(folded.weights, model.weights, strict=False))
    assert all(np.array_equal(a, b) for a, b in zip(before, snapshot(model), strict=True))
    assert layers_before == [(f.path, f.layer) for f in walk(model)]
    _assert_same_predict(model, folded, _x((6, 6, 3)))


def test_folded_keras_file_loads_without_bnkit(tmp_path) -> None:
    model = _nested()
    bk.freeze(model, layers="base/bn")  # a bnkit layer in the input: folded away, the file stays stock
    folded = bk.fold(model)
    x = _x((6, 6, 3))
    path = tmp_path / "folded.keras"
    folded.save(path)
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
    assert "bnkit" not in config and "BatchNormalization" not in config
    loaded = keras.models.load_model(path)
    assert all(type(f.layer).__module__.startswith("keras.") for f in walk(loaded))
    _assert_same_predict(model, loaded, x)
    if keras.backend.backend() != "torch":
        return  # the process without bnkit runs once, in the main (torch) run of the suite
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    code = (
        "import sys, numpy as np, keras; d = sys.argv[1]; m = keras.models.load_model(d + '/folded.keras');"
        "assert 'bnkit' not in sys.modules; y = m.predict(np.load(d + '/x.npy'), verbose=0);"
        "r = np.load(d + '/y.npy'); assert np.abs(y - r).max() <= 1e-6 * max(1, np.abs(r).max()); print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"KERAS_BACKEND": "torch", "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-1500:]


def test_check_failure_names_the_fold_and_leaves_the_model_alone() -> None:
    model = keras.Sequential([keras.Input((6,)), L.Dense(4, name="fc", **Z), L.BatchNormalization(name="bn")])
    _randomize(model)
    model.get_layer("bn").moving_variance.assign(np.full(4, 1e-3, "float32"))  # large scale: rounding shows
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"differs from .* first after folding bn into fc \(after\); the input"):
        bk.fold(model, check=_x((6,)), atol=0.0, rtol=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(before, snapshot(model), strict=True))
    assert _bn_names(model) == ["bn"]


def test_check_argument() -> None:
    model = keras.Sequential([keras.Input((5,)), L.Dense(4), L.BatchNormalization(name="bn")])
    assert not bk.fold_with_report(model, check=False)[1].checked
    report = bk.fold_with_report(model, check=_x((5,)))[1]
    assert report.checked and report.max_abs_diff is not None and report.max_abs_diff <= report.tolerance
    assert not any("generated" in n for n in report.notes)
    with pytest.raises(ValueError, match="failed on the check inputs"):
        bk.fold(model, check=np.zeros((2, 7), "float32"))
    json.dumps(report.to_dict())


def test_no_batchnorm_warns_and_subclassed_models_are_refused() -> None:
    model = keras.Sequential([keras.Input((3,)), L.Dense(2, name="fc", **Z)])
    with pytest.warns(UserWarning, match="nothing to fold"):
        folded, report = bk.fold_with_report(model)
    assert report.folded == [] and report.skipped == [] and any("nothing to fold" in n for n in report.notes)
    assert folded is not model and [layer.name for layer in folded.layers] == ["fc"]

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = L.Dense(2), L.BatchNormalization()

        def call(self, x):
            return self.bn(self.fc(x))

    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match=r"subclassed model .* fold cannot rebuild"):
        bk.fold(net)
    with pytest.raises(TypeError, match="expected a Sequential or functional"):
        bk.fold(L.BatchNormalization())


class Block(L.Layer):
    """A custom layer holding a conv and a BN: fold copies it as it is."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(3, 1, name="conv", **Z)
        self.bn = L.BatchNormalization(name="bn")

    def call(self, x, training=None):
        return self.bn(self.conv(x), training=training)


def test_bn_inside_a_custom_layer_is_reported_and_copied() -> None:
    inp = keras.Input((4, 4, 3))
    model = keras.Model(
        inp, L.BatchNormalization(name="bn_out")(L.Conv2D(3, 1, name="c", **Z)(Block(name="block")(inp)))
    )
    _randomize(model)
    folded, report = bk.fold_with_report(model)
    assert [f.bn for f in report.folded] == ["bn_out"]
    assert [s.bn for s in report.skipped] == ["block/bn"]
    assert "inside block (Block)" in report.skipped[0].reason
    assert folded.get_layer("block") is not model.get_layer("block")
    _assert_same_predict(model, folded, _x((4, 4, 3)))


def test_tflite_counts_what_the_converter_leaves() -> None:
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), L.BatchNormalization(name="bn0"), L.Conv2D(4, 3, name="conv", **Z), L.ReLU()]
    )
    _randomize(model)
    _, report = bk.fold_with_report(model, tflite=True)
    if keras.backend.backend() != "tensorflow":
        assert report.tflite_before is None and any("TFLite counts skipped" in n for n in report.notes)
        return
    assert report.tflite_before is not None and report.tflite_after is not None, report.notes
    assert report.tflite_before["MUL"] + report.tflite_before["ADD"] >= 1  # TFLite leaves BN before a conv
    assert report.tflite_after == {"MUL": 0, "ADD": 0}
    assert "TFLite MUL/ADD ops left" in str(report)
