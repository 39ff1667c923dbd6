"""The Keras study's report: every policy's "Keras defaults" column beside its "with exact statistics" column.

Built on :mod:`bnkit.study.report` (the same statistics, tie rule, tables and plots as the PyTorch study). What
the Keras report adds is the comparison of the two columns: "Keras defaults" scores each fine-tuned model with
the moving statistics that ``fit()`` left behind (Keras's default momentum 0.99: an exponential average that
lags the weights), "with exact statistics" scores the same model after ``bnkit.keras.recalibrate`` on the
target training images. When the answer to "freeze BN when fine-tuning all layers?" differs between the two
columns on a domain, the conclusion says that the answer depends on stale statistics there.

Example:
    >>> from bnkit.study.report import stats
    >>> defaults = {"contrast": {"all_bn_frozen": stats([0.92, 0.93]), "all": stats([0.15, 0.16])}}
    >>> exact = {"contrast": {"all_bn_frozen": stats([0.92, 0.93]), "all": stats([0.99, 0.98])}}
    >>> freeze_verdicts(defaults)["contrast"], freeze_verdicts(exact)["contrast"]
    ('freeze', 'train')
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnkit.study.report import (
    conclude,
    fmt,
    markdown_table,
    plot_policies,
    policy_table,
    tied,
    write_atomic_text,
)

__all__ = [
    "COLUMNS",
    "conclude_keras",
    "freeze_verdicts",
    "keras_policy_table",
    "render_keras_markdown",
    "write_keras_outputs",
]

#: The two accuracy columns of every policy: summary key -> column title.
COLUMNS: dict[str, str] = {"finetune": "Keras defaults", "exact": "with exact statistics"}


def freeze_verdicts(finetune: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per domain: ``"freeze"`` (all layers with BN frozen beats BN training), ``"train"`` or ``"tie"``.

    Domains without both ``all_bn_frozen`` and ``all`` are left out. Ties use :func:`bnkit.study.report.tied`.

    Example:
        >>> from bnkit.study.report import stats
        >>> freeze_verdicts({"blur": {"all_bn_frozen": stats([0.9]), "all": stats([0.905])}})
        {'blur': 'tie'}
    """
    out: dict[str, str] = {}
    for domain, pp in finetune.items():
        if "all" not in pp or "all_bn_frozen" not in pp:
            continue
        if tied(pp["all_bn_frozen"], pp["all"]):
            out[domain] = "tie"
        else:
            out[domain] = "freeze" if pp["all_bn_frozen"]["mean"] > pp["all"]["mean"] else "train"
    return out


def _freeze_sentence(label: str, finetune: dict[str, dict[str, Any]], verdicts: dict[str, str]) -> str:
    words = {"freeze": "freezing wins", "train": "BN training wins", "tie": "no difference beyond noise"}
    items = [
        f"{d}: {words[v]} ({fmt(finetune[d]['all_bn_frozen'])}% frozen vs {fmt(finetune[d]['all'])}% training)"
        for d, v in verdicts.items()
    ]
    return f"Freeze BN when fine-tuning all layers? {label}: " + "; ".join(items) + "."


def conclude_keras(summary: dict[str, Any], momentum: float | None = 0.99) -> list[str]:
    """The Keras study's conclusion: the freeze answer in both columns, whether it depends on stale statistics,
    then the PyTorch study's per-column sentences (:func:`bnkit.study.report.conclude`).

    Args:
        summary: ``{"finetune": ..., "winners": ..., "exact": {"finetune": ..., "winners": ...}}``.
        momentum: the BatchNormalization momentum of the model (Keras convention), quoted in the text.

    Example:
        >>> from bnkit.study.report import stats, summarize
        >>> def col(frozen, train):
        ...     rows = [{"seed": s, "domain": "contrast", "policy": p, "accuracy": a}
        ...             for s in range(3) for p, a in [("all_bn_frozen", frozen), ("all", train)]]
        ...     return summarize({"finetune": rows}, ["contrast"], ["all_bn_frozen", "all"])
        >>> summary = {**col(0.92, 0.15), "exact": col(0.92, 0.99)}
        >>> any("depends on stale" in line for line in conclude_keras(summary))
        True
    """
    lines: list[str] = []
    defaults = summary.get("finetune", {})
    exact = summary.get("exact", {}).get("finetune", {})
    v_def, v_exact = freeze_verdicts(defaults), freeze_verdicts(exact)
    mom = f"momentum {momentum:g}" if momentum is not None else "the model's momentum"
    if v_def:
        lines.append(
            _freeze_sentence(f"With Keras defaults ({mom}, moving statistics as fit() left them)", defaults, v_def)
        )
    if v_exact:
        lines.append(
            _freeze_sentence("With exact statistics (bnkit.keras.recalibrate after fine-tuning)", exact, v_exact)
        )
    flipped = [d for d in v_def if d in v_exact and v_def[d] != v_exact[d]]
    if flipped:
        items = [
            f"{d} ({v_def[d]} with Keras defaults, {v_exact[d]} with exact statistics; BN training "
            f"{fmt(defaults[d]['all'])}% -> {fmt(exact[d]['all'])}%)"
            for d in flipped
        ]
        lines.append(
            "The freeze answer depends on stale statistics on "
            + ", ".join(items)
            + f": with {mom} the moving averages lag the weights that fit() just changed, so the BN-training "
            "policies are scored with statistics of a network that no longer exists. Keep BN frozen, or let it "
            "train and recalibrate after fine-tuning (bnkit.keras.recalibrate)."
        )
    elif v_def and v_exact:
        lines.append(
            "The freeze answer is the same with Keras defaults and with exact statistics on every domain: it does "
            "not depend on stale statistics in this run."
        )
    bn_train = [
        (d, p)
        for d, pp in defaults.items()
        for p in ("all", "bn_only")
        if p in pp and p in exact.get(d, {}) and 100.0 * (exact[d][p]["mean"] - pp[p]["mean"]) >= 10.0
    ]
    if bn_train:
        lines.append(
            "Recalibrating after fine-tuning gained 10+ points for "
            + ", ".join(f"{d} / {p} ({fmt(defaults[d][p])}% -> {fmt(exact[d][p])}%)" for d, p in bn_train)
            + "."
        )
    fold = summary.get("fold")
    if fold:
        lines.append(
            f"Fold: {fold['identical_predictions']} of {fold['models']} fine-tuned models give identical predictions "
            f"after bnkit.keras.fold (largest logit difference {fold['max_abs_logit_diff']:.1e})."
        )
    if defaults:
        # the PyTorch study's sentences, less its own freeze sentence (the two-column one above replaces it)
        torch_lines = conclude({k: v for k, v in summary.items() if k != "exact"})
        lines += [f"Keras defaults: {line}" for line in torch_lines if not line.startswith("Freeze BN")]
    if exact:
        lines += [f"With exact statistics: {line}" for line in conclude(summary["exact"])][: len(exact)]
    return lines


def keras_policy_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per policy, two columns per domain ("Keras defaults", "with exact statistics").

    ``*`` marks the best mean of each column.

    Example:
        >>> from bnkit.study.report import stats
        >>> s = {"finetune": {"blur": {"all": stats([0.5])}}, "winners": {"blur": {"best": "all"}},
        ...      "exact": {"finetune": {"blur": {"all": stats([0.9])}}, "winners": {"blur": {"best": "all"}}}}
        >>> header, rows = keras_policy_table(s)
        >>> header
        ['policy', 'blur: Keras defaults', 'blur: with exact statistics']
        >>> rows
        [['[3] all layers, BN training', '50.0 *', '90.0 *']]
    """
    header_d, rows_d = policy_table(summary)
    exact = summary.get("exact")
    if not exact or not exact.get("finetune"):
        return header_d, rows_d
    _, rows_e = policy_table(exact)
    domains = header_d[1:]
    header = ["policy"] + [f"{d}: {title}" for d in domains for title in COLUMNS.values()]
    by_policy = {r[0]: r[1:] for r in rows_e}
    rows = []
    for r in rows_d:
        ex = by_policy.get(r[0], ["n/a"] * len(domains))
        rows.append([r[0]] + [cell for pair in zip(r[1:], ex, strict=True) for cell in pair])
    return header, rows


def render_keras_markdown(results: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The text of the Keras study's ``report.md``.

    Example:
        >>> render_keras_markdown({"config": {}, "summary": {}, "conclusion": []}).startswith("# bnkit study (Keras)")
        True
    """
    summary = results.get("summary", {})
    cfg = results.get("config", {})
    out = ["# bnkit study (Keras): should I freeze BatchNormalization when fine-tuning?", ""]
    if results.get("command"):
        out += [f"Command: `{results['command']}`", ""]
    seeds = cfg.get("seeds", [])
    out += [
        f"{results.get('description', '')} Backend: {results.get('backend', '?')}. Seeds: "
        f"{', '.join(str(s) for s in seeds)}; every number is mean ± sample standard deviation over the seeds "
        "(accuracy in %, on held-out target images). Keras defaults: the fine-tuned model as fit() left it. "
        "With exact statistics: the same model after bnkit.keras.recalibrate on the target training images.",
        "",
        "## Conclusion",
        "",
    ]
    out += [f"- {line}" for line in results.get("conclusion", [])]
    if summary.get("finetune"):
        header, rows = keras_policy_table(summary)
        out += ["", "## Fine-tuning policies per target domain", "", "`*` marks the best mean of each column.", ""]
        for key, label in (("source_accuracy", "settled"), ("source_accuracy_moving", "fit()'s moving")):
            if summary.get(key, {}).get("n"):
                out += [f"Source model on source test images ({label} statistics): {fmt(summary[key])}%.", ""]
        out += [markdown_table(header, rows)]
    fold = summary.get("fold")
    if fold:
        out += ["", "## Fold check (bnkit.keras.fold)", ""]
        out += [
            f"- Models folded: {fold['models']}; identical predictions: {fold['identical_predictions']}; "
            f"largest logit difference: {fold['max_abs_logit_diff']:.2e}; BatchNormalization layers left: "
            f"{fold.get('remaining_batchnorms', 0)}."
        ]
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    run = results.get("run", {})
    if run:
        out += [
            "",
            "## Run",
            "",
            f"- Wall time {run.get('wall_s', 0):.0f} s on the {results.get('backend', '?')} backend; bnkit "
            f"{results.get('bnkit_version', '?')}, Keras {results.get('keras_version', '?')}.",
        ]
    return "\n".join(out) + "\n"


def write_keras_outputs(results: dict[str, Any], out: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``policies.png`` (Keras defaults), ``policies_exact.png`` and ``report.md``.

    Every file is written atomically; plots are skipped with a note when matplotlib is missing.

    Example:
        >>> import tempfile
        >>> sorted(write_keras_outputs({"summary": {}, "conclusion": []}, tempfile.mkdtemp(), plots=False))
        ['report', 'results']
    """
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = results.get("summary", {})
    paths: dict[str, Path] = {}
    plot_paths: list[str] = []
    if plots and summary.get("finetune"):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            results.setdefault("notes", []).append(
                'plots skipped: matplotlib is not installed (pip install "bnkit[study]")',
            )
        else:
            paths["policies_plot"] = plot_policies(
                summary, out_dir / "policies.png", "Keras defaults (moving statistics as fit() left them)"
            )
            plot_paths.append(str(paths["policies_plot"]))
            if summary.get("exact", {}).get("finetune"):
                paths["policies_exact_plot"] = plot_policies(
                    summary["exact"],
                    out_dir / "policies_exact.png",
                    "With exact statistics (recalibrated after fine-tuning)",
                )
                plot_paths.append(str(paths["policies_exact_plot"]))
    paths["results"] = out_dir / "results.json"
    write_atomic_text(paths["results"], json.dumps(results, indent=2, allow_nan=True) + "\n")
    paths["report"] = out_dir / "report.md"
    write_atomic_text(paths["report"], render_keras_markdown(results, plot_paths))
    return paths
