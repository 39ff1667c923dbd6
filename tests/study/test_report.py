"""The conclusion follows the numbers: ties, the cheapest tied policy, the negative control, freezing."""

from __future__ import annotations

import math

import pytest

from bnkit.study.report import conclude, render_markdown, stats, summarize, tied


def _rows(table: dict[tuple[str, str], list[float]]) -> dict[str, list]:
    return {
        "finetune": [
            {"seed": i, "domain": d, "policy": p, "accuracy": a}
            for (d, p), accs in table.items()
            for i, a in enumerate(accs)
        ]
    }


def test_stats_and_ties() -> None:
    s = stats([0.9, 0.92, 0.94])
    assert s["mean"] == pytest.approx(0.92) and s["std"] == pytest.approx(0.02) and s["n"] == 3
    assert math.isnan(stats([])["mean"])
    assert tied(stats([0.90, 0.90]), stats([0.905, 0.905]))  # within 1 point
    assert not tied(stats([0.90, 0.90]), stats([0.95, 0.95]))
    assert tied(stats([0.75, 0.95]), stats([0.95, 0.95]))  # 10 points apart, std 14 points


def test_recommends_the_cheapest_tied_policy_and_words_the_gap() -> None:
    rows = _rows(
        {
            ("blur", "source"): [0.40, 0.42, 0.44],
            ("blur", "recalibrate"): [0.89, 0.90, 0.91],
            ("blur", "all"): [0.895, 0.905, 0.915],
            ("blur", "all_bn_frozen"): [0.70, 0.71, 0.72],
        }
    )
    summary = summarize(rows, ["blur"], ["source", "recalibrate", "all_bn_frozen", "all"])
    assert summary["winners"]["blur"]["best"] == "all"
    assert summary["winners"]["blur"]["recommended"] == "recalibrate"
    text = "\n".join(conclude(summary))
    assert "The cheaper [5] recalibrate (AdaBN) (90.0 ± 1.0%) is within noise" in text
    assert "freezing hurt on blur (-19.5)" in text
    assert "gained at least 10 points on blur" in text


def test_negative_control_and_unexpected_fix() -> None:
    fail = _rows(
        {("invert", "source"): [0.15, 0.16], ("invert", "recalibrate"): [0.18, 0.20], ("invert", "all"): [0.9, 0.92]}
    )
    text = "\n".join(conclude(summarize(fail, ["invert"], ["source", "recalibrate", "all"])))
    assert "did not gain on invert" in text and "As expected for the negative control invert" in text
    fixed = _rows({("invert", "source"): [0.15, 0.16], ("invert", "recalibrate"): [0.9, 0.92]})
    text = "\n".join(conclude(summarize(fixed, ["invert"], ["source", "recalibrate"])))
    assert "Unexpected: recalibration fixed the negative control invert" in text


def test_markdown_has_tables_and_conclusion() -> None:
    rows = _rows({("noise", "source"): [0.5, 0.6], ("noise", "all"): [0.8, 0.82]})
    rows["batch_size"] = [
        {"seed": s, "norm": "group", "batch_size": b, "accuracy": 0.9} for s in (0, 1) for b in (2, 32)
    ]
    summary = summarize(rows, ["noise"], ["source", "all"])
    text = render_markdown({"config": {"seeds": [0, 1]}, "summary": summary, "conclusion": conclude(summary)})
    assert "| [3] all layers, BN training | 81.0 ± 1.4 * |" in text
    assert "| GroupNorm | 90.0 ± 0.0 | 90.0 ± 0.0 |" not in text  # titles come from the results, not guessed
    assert "| group | 90.0 ± 0.0 | 90.0 ± 0.0 |" in text
    assert "- noise: the untouched source model scores 55.0 ± 7.1%" in text
