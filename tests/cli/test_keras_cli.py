"""``bnkit explain|summary|doctor|recalibrate|fold MODEL.keras``: the Keras commands against bnkit.keras's own
results, on a real saved Keras model (Conv-BN-ReLU-Dense), plus ``--backend``, the one-line errors and a few
end-to-end runs in fresh processes (the only place a backend can be chosen, and where torch must stay unloaded).

In-process tests run on the test session's Keras backend (tests/conftest.py: torch unless KERAS_BACKEND says
otherwise); the subprocess tests pick jax and tensorflow with ``--backend``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import bnkit.keras  # noqa: E402
from bnkit.cli.commands.doctor import render as render_doctor  # noqa: E402
from bnkit.cli.keras_io import select_backend  # noqa: E402
from bnkit.cli.main import main  # noqa: E402
from bnkit.keras import compat  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"


def _conv_bn_relu_dense() -> keras.Model:
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv"),
            keras.layers.BatchNormalization(momentum=0.9, name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(3, name="dense"),
        ],
        name="small",
    )


@pytest.fixture(scope="module")
def kdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.keras (statistics moved once by a training call), fresh.keras (statistics never updated), data
    files, a Lambda model and a file that is not a Keras archive."""
    root = tmp_path_factory.mktemp("keras_cli")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((24, 6, 6, 2)) * 2 + 1).astype("float64")
    np.save(root / "x.npy", x)
    np.savez(root / "xy.npz", x=x.astype("float32"), y=np.arange(24) % 3)
    model = _conv_bn_relu_dense()
    model.save(root / "fresh.keras")
    model(x[:8].astype("float32"), training=True)
    model.save(root / "model.keras")
    lam = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda t: t * 2), keras.layers.Dense(2)])
    lam.save(root / "lambda.keras")
    (root / "bad.keras").write_bytes(b"not a zip archive")
    return root


def _load(path: Path) -> keras.Model:
    return keras.saving.load_model(str(path))


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    code, out, err = _cli(capsys, *argv, "--json")
    assert code in (0, 1), err
    return json.loads(out)


def test_explain_text_and_json_are_bnkit_keras_explain(kdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = kdir / "model.keras"
    expected = bnkit.keras.explain(_load(model))
    assert _json(capsys, "explain", str(model)) == json.loads(expected.to_json())
    code, out, err = _cli(capsys, "explain", str(model))
    assert (code, err) == (0, "")
    assert out == str(expected) + "\n"
    assert "bn" in out and "batch statistics, updates moving" in out


def test_summary_text_and_json_are_bnkit_keras_summary(kdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = kdir / "model.keras"
    expected = bnkit.keras.summary(_load(model))
    data = _json(capsys, "summary", str(model))
    assert data == json.loads(expected.to_json())
    assert data["total"] == _load(model).count_params() == 72 + 16 + 435
    code, out, _ = _cli(capsys, "summary", str(model))
    assert code == 0 and out == str(expected) + "\n"


def test_doctor_matches_bnkit_keras_doctor_and_fail_on(kdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fresh = kdir / "fresh.keras"
    x = np.load(kdir / "x.npy")[:4].astype("float32")
    expected = bnkit.keras.doctor(_load(fresh), x, intent="inference")
    assert "KBN005" in expected.codes()  # statistics never updated: an error for a model used to predict
    argv = ("doctor", str(fresh), "--data", str(kdir / "x.npy"), "--batch-size", "4", "--intent", "inference")
    assert _json(capsys, *argv) == expected.to_dicts()
    code, out, _ = _cli(capsys, *argv)
    assert code == 0 and out == f"{expected}\n\n{render_doctor(expected.to_dicts())[-1]}\n"
    assert _cli(capsys, *argv, "--fail-on", "error")[0] == 1
    # an --input-size example (channels last) enables the batch-size rule: a batch of 2 is too small to train on
    small = bnkit.keras.doctor(_load(kdir / "model.keras"), np.zeros((2, 6, 6, 2), "float32"))
    assert "KBN006" in small.codes()
    data = _json(capsys, "doctor", str(kdir / "model.keras"), "--input-size", "6", "6", "2", "--batch-size", "2")
    assert [f["code"] for f in data] == small.codes()


def test_recalibrate_writes_a_plain_keras_file_with_the_api_statistics(
    kdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_path, data_path = kdir / "fresh.keras", kdir / "x.npy"
    before = model_path.read_bytes()
    out = tmp_path / "adapted.keras"
    data = _json(capsys, "recalibrate", str(model_path), str(data_path), "-o", str(out), "--batch-size", "10")
    reference = _load(model_path)
    report = bnkit.keras.recalibrate(reference, np.load(data_path).astype("float32"), batch_size=10)
    assert data == {"output": str(out), "format": "keras", "backend": compat.backend(), **asdict(report)}
    assert data["batches"] == 3 and data["samples"] == 24 and data["layers"] == ["bn"]
    written = keras.saving.load_model(str(out))  # plain Keras, no bnkit needed to read it
    np.testing.assert_array_equal(
        compat.to_numpy(written.get_layer("bn").moving_mean), compat.to_numpy(reference.get_layer("bn").moving_mean)
    )
    np.testing.assert_array_equal(
        compat.to_numpy(written.get_layer("bn").moving_variance),
        compat.to_numpy(reference.get_layer("bn").moving_variance),
    )
    assert model_path.read_bytes() == before  # the input is never changed
    code, text, _ = _cli(capsys, "recalibrate", str(model_path), str(kdir / "xy.npz"), "-o", str(out))
    assert code == 0 and text.rstrip().endswith(
        "1 layers recalibrated (precise) from 24 samples in 1 batches in 1 pass(es)"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "{model}"], "refusing to overwrite the input file"),
        (["-o", "{tmp}/out.h5"], "give -o NAME.keras"),
        (["-o", "{tmp}/out.keras", "--format", "module"], "--format module is for PyTorch models"),
        (["-o", "{tmp}/out.keras", "--method", "ema"], "precise statistics only"),
        (["-o", "{tmp}/missing_dir/out.keras"], "output directory"),
        (["-o", "{tmp}/out.keras", "--weights", "{model}"], "--weights does not apply to the Keras model"),
    ],
)
def test_recalibrate_refuses_bad_outputs_in_one_line_writing_nothing(
    kdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    model = kdir / "fresh.keras"
    before = model.read_bytes()
    argv = [a.format(model=model, tmp=tmp_path) for a in extra]
    code, out, err = _cli(capsys, "recalibrate", str(model), str(kdir / "x.npy"), *argv)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("bnkit recalibrate: error: ") and message in err
    assert model.read_bytes() == before and not list(tmp_path.iterdir())


def test_recalibrate_data_errors_are_one_line(kdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "flat.npy", np.zeros(5))
    (tmp_path / "d.csv").write_text("1,2\n")
    for data, message in [
        ("objects.npy", "cannot load data file"),
        ("flat.npy", "expected [samples, ...]"),
        ("d.csv", "unknown data format '.csv'"),
        ("missing.npy", "not found"),
    ]:
        code, _, err = _cli(
            capsys, "recalibrate", str(kdir / "fresh.keras"), str(tmp_path / data), "-o", str(tmp_path / "o.keras")
        )
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.keras").exists()


def test_fold_writes_a_model_that_gives_the_same_outputs(
    kdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not hasattr(bnkit.keras, "fold_with_report"):
        pytest.skip("bnkit.keras.fold_with_report is not in this tree yet")
    model_path = kdir / "model.keras"
    out = tmp_path / "folded.keras"
    data = _json(capsys, "fold", str(model_path), "-o", str(out))
    _, report = bnkit.keras.fold_with_report(_load(model_path))
    expected = {**json.loads(json.dumps(report.to_dict())), "output": str(out), "format": "keras"}
    assert set(data) == {*expected, "backend"} and data["backend"] == compat.backend()
    for key, value in expected.items():  # the check's differences are floats: equal up to rounding
        assert data[key] == (pytest.approx(value, rel=1e-3, abs=1e-6) if isinstance(value, float) else value), key
    folded = keras.saving.load_model(str(out))  # plain Keras
    assert not any(compat.is_batchnorm(layer) for layer in folded.layers)
    x = np.load(kdir / "x.npy").astype("float32")
    original = _load(model_path)
    np.testing.assert_allclose(
        compat.to_numpy(folded(x, training=False)), compat.to_numpy(original(x, training=False)), atol=1e-4
    )
    code, text, _ = _cli(capsys, "fold", str(model_path), "-o", str(out), "--input-size", "6,6,2")
    assert code == 0 and text.endswith(f"\nwrote {out} (keras, {compat.backend()} backend)\n")


def test_fold_is_for_keras_models(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _cli(capsys, "fold", "torch.nn:Identity", "-o", str(tmp_path / "o.keras"))
    assert code == 2 and err.count("\n") == 1 and "use bnkit fuse" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "{d}/missing.keras"], "model file '{d}/missing.keras' not found"),
        (["summary", "{d}/bad.keras"], "is not a Keras archive"),
        (["explain", "{d}/lambda.keras"], "pass --trust-pickle"),
        (["explain", "{d}/model.keras", "--backend", "numpy"], "argument --backend: invalid choice"),
        (["explain", "torch.nn:Identity", "--backend", "jax"], "--backend jax applies to Keras models"),
        (["summary", "{d}/model.keras", "--input-size", "6,6,2"], "--input-size is for PyTorch models"),
        (["shift", "{d}/model.keras", "{d}/x.npy"], "is a Keras model: this command takes PyTorch models"),
    ],
)
def test_errors_are_one_line(kdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = _cli(capsys, *[a.format(d=kdir) for a in argv])
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert message.format(d=kdir) in err


def test_trust_pickle_loads_a_lambda_model_in_unsafe_mode(kdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "summary", str(kdir / "lambda.keras"), "--trust-pickle", "--json")
    assert code == 0, err
    assert json.loads(out)["total"] == 3 * 2 + 2


def test_backend_is_refused_once_keras_runs_another(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnkit.cli.files import CliError

    current = compat.backend()
    other = "jax" if current != "jax" else "tensorflow"
    with pytest.raises(CliError, match=f"already imported with the {current} backend"):
        select_backend(other)
    assert select_backend(current) == current


def test_backend_not_installed_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnkit.cli import keras_io
    from bnkit.cli.files import CliError

    monkeypatch.delitem(sys.modules, "keras")  # as in a fresh process, before Keras is imported
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    real = keras_io.importlib.util.find_spec
    monkeypatch.setattr(keras_io.importlib.util, "find_spec", lambda name: None if name == "jax" else real(name))
    with pytest.raises(CliError, match=r"--backend jax: jax is not installed: pip install jax"):
        select_backend("jax")
    assert os.environ["KERAS_BACKEND"] == "torch"  # nothing set on failure


# ---- fresh processes: the backend is chosen before Keras is imported, and torch is never imported --------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["BNKIT_PLAIN"] = "1"
    return env


def test_jax_backend_runs_every_command_without_importing_torch(kdir: Path, tmp_path: Path) -> None:
    pytest.importorskip("jax")
    script = textwrap.dedent(
        f"""
        import json, sys
        from bnkit.cli.main import main
        d = {str(kdir)!r}
        out = {str(tmp_path / "r.keras")!r}
        codes = [
            main(["explain", d + "/model.keras", "--backend", "jax", "--json"]),
            main(["summary", d + "/model.keras", "--backend", "jax"]),
            main(["doctor", d + "/model.keras", "--backend", "jax", "--input-size", "6", "6", "2"]),
            main(["recalibrate", d + "/fresh.keras", d + "/x.npy", "-o", out, "--backend", "jax", "--json"]),
        ]
        if hasattr(__import__("bnkit.keras").keras, "fold_with_report"):
            codes.append(main(["fold", d + "/model.keras", "-o", out[:-6] + "_f.keras", "--backend", "jax"]))
        import keras
        print("RESULT", json.dumps({{"codes": codes, "torch": "torch" in sys.modules,
                                     "backend": keras.backend.backend()}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result == {"codes": [0] * len(result["codes"]), "torch": False, "backend": "jax"}, proc.stderr[-2000:]
    explained = json.loads(proc.stdout[: proc.stdout.index("\n]\n") + 2])
    assert explained == bnkit.keras.explain(_load(kdir / "model.keras")).to_dicts()
    reference = _load(kdir / "fresh.keras")
    bnkit.keras.recalibrate(reference, np.load(kdir / "x.npy").astype("float32"), batch_size=64)
    written = keras.saving.load_model(str(tmp_path / "r.keras"))  # written on jax, read here by plain Keras
    np.testing.assert_allclose(
        compat.to_numpy(written.get_layer("bn").moving_variance),
        compat.to_numpy(reference.get_layer("bn").moving_variance),
        rtol=1e-6,
    )


def test_console_script_on_tensorflow(kdir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    script = shutil.which("bnkit")
    if script is None:
        pytest.skip("the bnkit console script is not installed")
    proc = subprocess.run(
        [script, "summary", str(kdir / "model.keras"), "--backend", "tensorflow", "--json"],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == json.loads(bnkit.keras.summary(_load(kdir / "model.keras")).to_json())
    bad = subprocess.run(  # refused before Keras is imported
        [script, "explain", str(kdir / "bad.keras"), "--backend", "tensorflow"],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in bad.stderr.splitlines() if line.startswith("bnkit ")]
    assert bad.returncode == 2 and bad.stdout == "" and len(errors) == 1 and "not a Keras archive" in errors[0]
