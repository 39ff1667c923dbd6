"""The quick study end to end (run once per module): completeness, the anchored effects, fusion, files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bnkit.study.data import DOMAINS
from bnkit.study.experiments import BATCH_NORMS, StudyConfig
from bnkit.study.policies import POLICIES
from bnkit.study.report import fmt
from bnkit.study.run import run_study


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("study")
    results = run_study(StudyConfig.quick_config(), out=out, progress=False, jobs=2)
    return results, out


def _accs(results: dict[str, Any], domain: str, policy: str) -> list[float]:
    return [r["accuracy"] for r in results["rows"]["finetune"] if r["domain"] == domain and r["policy"] == policy]


def test_every_policy_and_domain_has_finite_accuracy_over_three_seeds(quick: tuple[dict, Path]) -> None:
    results, _ = quick
    summary = results["summary"]["finetune"]
    assert list(summary) == list(DOMAINS)
    for domain in DOMAINS:
        assert list(summary[domain]) == list(POLICIES)
        for policy in POLICIES:
            s = summary[domain][policy]
            assert s["n"] == 3
            assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in s["values"])
    assert len(results["rows"]["finetune"]) == 3 * len(DOMAINS) * len(POLICIES)


def test_source_model_learned_the_source_domain(quick: tuple[dict, Path]) -> None:
    results, _ = quick
    assert min(results["summary"]["source_accuracy"]["values"]) >= 0.9


def test_recalibration_fixes_the_contrast_shift(quick: tuple[dict, Path]) -> None:
    # anchors.md: about 10-16% -> 99%; assert a conservative margin on every seed
    results, _ = quick
    source, recal = _accs(results, "contrast", "source"), _accs(results, "contrast", "recalibrate")
    for s, r in zip(source, recal, strict=True):
        assert s <= 0.5
        assert r >= 0.9
        assert r - s >= 0.5


def test_recalibration_does_not_fix_inversion(quick: tuple[dict, Path]) -> None:
    # negative control: a sign flip of every first-layer feature cannot be undone by new statistics
    results, _ = quick
    source, recal = _accs(results, "invert", "source"), _accs(results, "invert", "recalibrate")
    best_trained = max(results["summary"]["finetune"]["invert"][p]["mean"] for p in ("all", "all_bn_frozen"))
    for s, r in zip(source, recal, strict=True):
        assert r <= 0.5
        assert r - s <= 0.2
    # ... while gradient training does fix it, so the control is not just a broken domain
    assert best_trained - max(recal) >= 0.3


def test_fused_and_unfused_models_predict_identically(quick: tuple[dict, Path]) -> None:
    results, _ = quick
    fuse_rows = results["rows"]["fuse"]
    assert len(fuse_rows) == len(results["rows"]["finetune"])
    for row in fuse_rows:
        assert row["identical_predictions"], row
        assert row["disagreements"] == 0
        assert row["folded"] == 3 and row["remaining_batchnorms"] == 0
        assert row["max_abs_logit_diff"] < 1e-3
    latency = results["summary"]["fuse"]["latency"]
    assert set(latency) == {"batch_1", "batch_64"}
    assert all(v["fused_ms"] > 0 and v["unfused_ms"] > 0 for v in latency.values())


def test_batch_size_experiment_covers_every_norm_and_size(quick: tuple[dict, Path]) -> None:
    results, _ = quick
    batch = results["summary"]["batch_size"]
    assert list(batch) == list(BATCH_NORMS)
    for per_b in batch.values():
        assert sorted(int(b) for b in per_b) == [2, 8, 32]
        assert all(s["n"] == 3 and 0.0 <= s["mean"] <= 1.0 for s in per_b.values())
    # the network learns at every batch size with BatchNorm (far above chance, 10%)
    assert min(s["mean"] for s in batch["batch"].values()) >= 0.8


def test_shift_score_ranks_contrast_far_above_unshifted_images(quick: tuple[dict, Path]) -> None:
    results, _ = quick
    shift = results["summary"]["shift"]
    assert shift["source"]["recommendation"] == "keep-frozen"
    assert shift["contrast"]["score"]["min"] > 100 * shift["source"]["score"]["max"]
    assert shift["contrast"]["winner"] in POLICIES
    assert shift["contrast"]["recalibration_gain_points"]["mean"] >= 50


def test_conclusion_is_derived_from_the_numbers(quick: tuple[dict, Path]) -> None:
    results, _ = quick
    text = "\n".join(results["conclusion"])
    contrast = results["summary"]["finetune"]["contrast"]
    assert f"{fmt(contrast['recalibrate'])}%" in text
    best = results["summary"]["winners"]["contrast"]["best"]
    assert f"at {fmt(contrast[best])}%" in text
    assert "negative control invert" in text
    assert "Freeze BN when fine-tuning all layers?" in text
    assert "Checking bnkit.shift's advice against the measured winners: contrast:" in text


def test_output_files(quick: tuple[dict, Path]) -> None:
    import matplotlib.image

    results, out = quick
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"]["finetune"]["contrast"]["source"]["values"] == pytest.approx(
        results["summary"]["finetune"]["contrast"]["source"]["values"]
    )
    assert on_disk["config"]["quick"] is True
    report = (out / "report.md").read_text()
    assert "## Conclusion" in report and "| policy |" in report and "![policies](policies.png)" in report
    for name in ("policies.png", "batch_size.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500
    assert not list(out.glob(".*")), "temporary files left behind"
