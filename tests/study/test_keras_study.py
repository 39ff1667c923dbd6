"""The Keras study: a quick run on one backend in a fresh process (no torch imported), the own-model path through
the CLI, and the conclusion generator on constructed numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnkit.study.keras_report import COLUMNS, conclude_keras, freeze_verdicts, keras_policy_table
from bnkit.study.report import summarize

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("source", "all_bn_frozen", "all", "recalibrate")


def _run(code: str, backend: str, tmp_path: Path) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT / "src"), "BNKIT_PLAIN": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quick_jax(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("keras_study")
    code = f"""
import json, sys
from bnkit.study.catalog import FinetuneSettings
from bnkit.study.keras_study import KerasStudyConfig, run_keras_study
cfg = KerasStudyConfig.quick_config(domains=("contrast",), policies={POLICIES!r}, source_epochs=4,
                                    finetune=FinetuneSettings(epochs=4))
run_keras_study(cfg, out={str(out)!r})
print(json.dumps({{"torch": "torch" in sys.modules, "backend": __import__("keras").backend.backend()}}))
"""
    info = _run(code, "jax", out)
    return info, out


def test_quick_run_on_jax_never_imports_torch(quick_jax: tuple[dict, Path]) -> None:
    info, _ = quick_jax
    assert info == {"torch": False, "backend": "jax"}


def test_quick_run_writes_results_report_and_both_plots(quick_jax: tuple[dict, Path]) -> None:
    _, out = quick_jax
    for name in ("results.json", "report.md", "policies.png", "policies_exact.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["framework"] == "keras" and results["backend"] == "jax"
    report = (out / "report.md").read_text()
    for title in COLUMNS.values():
        assert f"contrast: {title}" in report


def test_both_columns_present_and_finite_for_every_policy(quick_jax: tuple[dict, Path]) -> None:
    _, out = quick_jax
    summary = json.loads((out / "results.json").read_text())["summary"]
    for column in (summary["finetune"], summary["exact"]["finetune"]):
        assert list(column["contrast"]) == list(POLICIES)
        for s in column["contrast"].values():
            assert s["n"] == 1 and math.isfinite(s["mean"]) and 0.0 <= s["mean"] <= 1.0
    # the source model's settled statistics are exact on the source images: recalibrating it on its own source
    # training images changes nothing, and on the target images it is policy 5 (recalibrate) itself
    exact = summary["exact"]["finetune"]["contrast"]
    assert exact["source"]["mean"] == pytest.approx(exact["recalibrate"]["mean"])
    defaults = summary["finetune"]["contrast"]
    assert defaults["recalibrate"]["mean"] == pytest.approx(exact["recalibrate"]["mean"])


def test_fold_check_folds_every_model_with_identical_predictions(quick_jax: tuple[dict, Path]) -> None:
    _, out = quick_jax
    results = json.loads((out / "results.json").read_text())
    fold = results["summary"]["fold"]
    assert fold["models"] == len(POLICIES) == fold["identical_predictions"]
    assert fold["remaining_batchnorms"] == 0 and fold["max_abs_logit_diff"] < 1e-3
    assert all(r["folded"] == 3 for r in results["rows"]["fold"])
    assert "Fold check (bnkit.keras.fold)" in (out / "report.md").read_text()


def test_cli_own_keras_model_on_tensorflow(tmp_path: Path) -> None:
    out = tmp_path / "own"
    code = f"""
import json, sys
from bnkit.cli.main import main
rc = main(["study", "--framework", "keras", "--backend", "tensorflow", "--quick", "--domains", "invert",
           "--policies", "0", "1", "3", "--epochs", "2", "--seeds", "0", "--model", "tests.study.keras_factory:tiny",
           "--out", {str(out)!r}, "--json"])
print(json.dumps({{"rc": rc}}))
"""
    env_code = code
    info = _run(env_code, "tensorflow", tmp_path)
    assert info["rc"] == 0
    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "tensorflow"
    assert "tests.study.keras_factory:tiny" in results["description"]
    assert list(results["summary"]["exact"]["finetune"]["invert"]) == ["source", "head", "all"]


def test_the_real_quick_run_on_torch_shows_stale_statistics_and_folds_every_model(tmp_path: Path) -> None:
    """``bnkit study --framework keras --backend torch --quick`` exactly as a user types it (about 70 s idle)."""
    out = tmp_path / "quick"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BNKIT_PLAIN": "1"}
    env.pop("KERAS_BACKEND", None)  # --backend must choose it
    command = [sys.executable, "-m", "bnkit.cli.main", "study", "--framework", "keras", "--backend", "torch"]
    proc = subprocess.run(
        [*command, "--quick", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "torch" and results["config"]["quick"] and results["config"]["seeds"] == [0]
    summary = results["summary"]
    domains = ("contrast", "blur", "noise", "invert")
    for column in (summary["finetune"], summary["exact"]["finetune"]):
        assert tuple(column) == domains
        assert all(len(column[d]) == 7 for d in domains)
    # the study's finding for Keras users: with momentum 0.99, "all layers, BN training" is scored with stale
    # moving statistics; recalibrating the same fine-tuned weights recovers the PyTorch study's accuracy
    defaults, exact = summary["finetune"]["contrast"]["all"]["mean"], summary["exact"]["finetune"]["contrast"]["all"]
    assert exact["mean"] > 0.95 and exact["mean"] - defaults > 0.5
    assert any("depends on stale statistics" in line for line in results["conclusion"])
    fold = summary["fold"]
    assert fold["models"] == fold["identical_predictions"] == 28 and fold["remaining_batchnorms"] == 0
    assert fold["max_abs_logit_diff"] < 1e-4


def _summary(frozen: tuple[float, float], train: tuple[float, float]) -> dict:
    def column(values: tuple[float, float]) -> dict:
        rows = [
            {"seed": s, "domain": "contrast", "policy": p, "accuracy": a + 0.002 * s}
            for s in range(3)
            for p, a in zip(("all_bn_frozen", "all"), values, strict=True)
        ]
        return summarize({"finetune": rows}, ["contrast"], ["all_bn_frozen", "all"])

    defaults = column((frozen[0], train[0]))
    exact = column((frozen[1], train[1]))
    return {**defaults, "exact": {"finetune": exact["finetune"], "winners": exact["winners"]}}


def test_conclusion_names_stale_statistics_when_the_columns_disagree() -> None:
    summary = _summary(frozen=(0.92, 0.92), train=(0.15, 0.99))
    assert freeze_verdicts(summary["finetune"]) == {"contrast": "freeze"}
    assert freeze_verdicts(summary["exact"]["finetune"]) == {"contrast": "train"}
    lines = conclude_keras(summary)
    stale = [line for line in lines if "depends on stale statistics" in line]
    assert len(stale) == 1 and "contrast (freeze with Keras defaults, train with exact statistics" in stale[0]
    assert not any("does not depend" in line for line in lines)


def test_conclusion_says_the_answer_holds_when_the_columns_agree() -> None:
    lines = conclude_keras(_summary(frozen=(0.95, 0.95), train=(0.80, 0.82)))
    assert not any("depends on stale statistics" in line for line in lines)
    assert any("does not depend on stale statistics" in line for line in lines)


def test_table_puts_the_two_columns_side_by_side() -> None:
    header, rows = keras_policy_table(_summary(frozen=(0.92, 0.92), train=(0.15, 0.99)))
    assert header == ["policy", "contrast: Keras defaults", "contrast: with exact statistics"]
    assert rows[1][0] == "[3] all layers, BN training"
    assert rows[1][1].startswith("15.2") and rows[1][2].startswith("99.2 ± 0.2 *")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "jax"], "--backend chooses Keras's backend: it needs --framework keras"),
        (["--framework", "keras", "--norms", "group"], "--norms: not part of the Keras study"),
        (["--framework", "keras", "--target-data", "t.npz"], "--target-data: not part of the Keras study"),
        (["--framework", "keras", "--model", "m.keras"], "give package.module:factory returning a new Keras model"),
        (["--framework", "keras", "--model", "os.path:sep"], "is not callable"),
    ],
)
def test_keras_cli_errors_are_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from bnkit.cli.main import main

    assert main(["study", *args, "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o").exists()
