"""Turn the study's raw rows into summaries, a conclusion derived from the numbers, and files.

Nothing here is written in advance: every sentence of the conclusion is generated from the measured means and
spreads with the rules below, so a different run (other seeds, domains, a user's own model) gets its own words.

Rules:
- Spread is the sample standard deviation over seeds (plus min and max in the JSON).
- Two results are *tied* when their means differ by no more than the larger of one percentage point and the sum
  of their standard deviations: a deliberately conservative notion of "within noise" for three seeds.
- Policies are ranked by cost: source model < recalibration (no labels, no gradients) < head only <
  recalibration + head < BN layers only < all layers with BN frozen < all layers. The recommendation for a
  domain is the cheapest policy tied with the best one.
- Recalibration "fixes" a domain when it gains at least 10 points over the source model.

Example:
    >>> s = stats([0.9, 0.92, 0.94])
    >>> round(s["mean"], 2), round(s["std"], 2)
    (0.92, 0.02)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bnkit.study.catalog import NEGATIVE_CONTROLS, policy_title

__all__ = [
    "COST_ORDER",
    "FIX_POINTS",
    "conclude",
    "fmt",
    "latency_summary",
    "markdown_table",
    "plot_batch_sizes",
    "plot_policies",
    "policy_table",
    "render_markdown",
    "stats",
    "summarize",
    "tied",
    "write_atomic_text",
    "write_outputs",
]

#: Policies from cheapest to most expensive (what the recommendation prefers among tied policies).
COST_ORDER: tuple[str, ...] = (
    "source",
    "recalibrate",
    "head",
    "recalibrate_head",
    "bn_only",
    "all_bn_frozen",
    "all",
)

#: Gain (percentage points over the source model) from which recalibration counts as fixing a domain.
FIX_POINTS = 10.0

_TIE_POINTS = 1.0


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max, n and the values themselves.

    Example:
        >>> stats([1.0])["std"]
        0.0
    """
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0, "values": []}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": vals,
    }


def tied(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two accuracy summaries (fractions) are within noise of each other (see the module rules).

    Example:
        >>> tied(stats([0.90, 0.92]), stats([0.91, 0.915]))
        True
    """
    margin = max(_TIE_POINTS, 100.0 * (a["std"] + b["std"]))
    return abs(100.0 * (a["mean"] - b["mean"])) <= margin


def fmt(s: dict[str, Any], *, percent: bool = True, digits: int = 1) -> str:
    """``"mean ± std"`` of a summary, in percent by default.

    Example:
        >>> fmt(stats([0.5, 0.7]))
        '60.0 ± 14.1'
    """
    if not s or s.get("n", 0) == 0 or not math.isfinite(s["mean"]):
        return "n/a"
    k = 100.0 if percent else 1.0
    if s["n"] == 1:
        return f"{k * s['mean']:.{digits}f}"
    return f"{k * s['mean']:.{digits}f} ± {k * s['std']:.{digits}f}"


def _ordered(keys: Iterable[str], order: Sequence[str]) -> list[str]:
    keys = list(dict.fromkeys(keys))
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), str(k)))


def _mode(values: list[str]) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def summarize(rows: dict[str, list[dict[str, Any]]], domains: Sequence[str], policies: Sequence[str]) -> dict:
    """Aggregate per-seed rows into per-(domain, policy), per-(norm, batch size) and fusion summaries.

    Args:
        rows: ``{"source", "finetune", "shift", "fuse", "batch_size"}`` lists of per-seed rows (any may be empty).
        domains: domain order for the output.
        policies: policy order for the output.

    Returns:
        JSON-ready summary: ``source_accuracy``, ``finetune`` (domain -> policy -> stats), ``winners``,
        ``shift`` (domain -> score stats, recommendation, recalibration gain), ``batch_size`` (norm -> batch
        size -> stats) and ``fuse``.

    Example:
        >>> rows = {"finetune": [{"seed": 0, "domain": "blur", "policy": "source", "accuracy": 0.5}]}
        >>> summarize(rows, ["blur"], ["source"])["finetune"]["blur"]["source"]["mean"]
        0.5
    """
    out: dict[str, Any] = {}
    out["source_accuracy"] = stats([r["accuracy"] for r in rows.get("source", [])])

    finetune: dict[str, dict[str, Any]] = {}
    for domain in domains:
        per_policy = {}
        for policy in policies:
            vals = [r["accuracy"] for r in rows.get("finetune", []) if r["domain"] == domain and r["policy"] == policy]
            if vals:
                per_policy[policy] = stats(vals)
        if per_policy:
            finetune[domain] = per_policy
    out["finetune"] = finetune

    winners: dict[str, Any] = {}
    for domain, per_policy in finetune.items():
        best = max(per_policy, key=lambda p: per_policy[p]["mean"])
        tied_with_best = [p for p in _ordered(per_policy, COST_ORDER) if tied(per_policy[p], per_policy[best])]
        winners[domain] = {"best": best, "tied_with_best": tied_with_best, "recommended": tied_with_best[0]}
    out["winners"] = winners

    shift: dict[str, Any] = {}
    shift_domains = ["source", *domains]
    for domain in shift_domains:
        rs = [r for r in rows.get("shift", []) if r["domain"] == domain]
        if not rs:
            continue
        entry: dict[str, Any] = {
            "score": stats([r["score"] for r in rs]),
            "recommendation": _mode([r["recommendation"] for r in rs]),
        }
        per_policy = finetune.get(domain, {})
        if "source" in per_policy and "recalibrate" in per_policy:
            gains = _paired_gain(rows.get("finetune", []), domain, "recalibrate", "source")
            entry["recalibration_gain_points"] = stats(gains)
        if domain in winners:
            entry["winner"] = winners[domain]["best"]
            entry["recommended"] = winners[domain]["recommended"]
        shift[domain] = entry
    out["shift"] = shift

    batch: dict[str, dict[str, Any]] = {}
    for r in rows.get("batch_size", []):
        batch.setdefault(r["norm"], {}).setdefault(str(r["batch_size"]), []).append(r["accuracy"])
    out["batch_size"] = {
        norm: {b: stats(v) for b, v in sorted(per_b.items(), key=lambda kv: int(kv[0]))}
        for norm, per_b in batch.items()
    }

    fuse_rows = rows.get("fuse", [])
    if fuse_rows:
        out["fuse"] = {
            "models": len(fuse_rows),
            "identical_predictions": sum(bool(r["identical_predictions"]) for r in fuse_rows),
            "disagreements": sum(int(r["disagreements"]) for r in fuse_rows),
            "max_abs_logit_diff": max(float(r["max_abs_logit_diff"]) for r in fuse_rows),
            "remaining_batchnorms": sum(int(r["remaining_batchnorms"]) for r in fuse_rows),
        }
    return out


def _paired_gain(rows: list[dict[str, Any]], domain: str, policy: str, baseline: str) -> list[float]:
    by_seed = {(r["seed"], r["policy"]): r["accuracy"] for r in rows if r["domain"] == domain}
    seeds = sorted({s for s, p in by_seed if p == policy and (s, baseline) in by_seed})
    return [100.0 * (by_seed[s, policy] - by_seed[s, baseline]) for s in seeds]


def latency_summary(latency_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median fused and unfused latency per batch label over seeds, and their ratio (fused / unfused).

    Example:
        >>> latency_summary([{"batch_1": {"unfused": 2.0, "fused": 1.0}}])["batch_1"]["ratio"]
        0.5
    """
    out: dict[str, Any] = {}
    for label in _ordered({k for r in latency_rows for k in r}, ["batch_1"]):
        unfused = statistics.median(r[label]["unfused"] for r in latency_rows if label in r)
        fused = statistics.median(r[label]["fused"] for r in latency_rows if label in r)
        out[label] = {"unfused_ms": unfused, "fused_ms": fused, "ratio": fused / unfused if unfused else math.nan}
    return out


def _title(policy: str) -> str:
    return policy_title(policy)


def _points(a: dict[str, Any], b: dict[str, Any]) -> float:
    return 100.0 * (a["mean"] - b["mean"])


def conclude(summary: dict[str, Any], batch_norm_titles: dict[str, str] | None = None) -> list[str]:
    """Plain-language conclusions derived from a :func:`summarize` result (one sentence or short paragraph each).

    Example:
        >>> rows = {"finetune": [
        ...     {"seed": s, "domain": "contrast", "policy": p, "accuracy": a}
        ...     for s in range(3) for p, a in [("source", 0.1), ("recalibrate", 0.99)]]}
        >>> conclude(summarize(rows, ["contrast"], ["source", "recalibrate"]))[0].startswith("contrast:")
        True
    """
    lines: list[str] = []
    finetune = summary.get("finetune", {})
    winners = summary.get("winners", {})
    for domain, per_policy in finetune.items():
        win = winners[domain]
        best, rec = win["best"], win["recommended"]
        parts = [f"{domain}:"]
        if "source" in per_policy:
            parts.append(f"the untouched source model scores {fmt(per_policy['source'])}%;")
        parts.append(f"best is {_title(best)} at {fmt(per_policy[best])}%.")
        if rec != best:
            parts.append(
                f"The cheaper {_title(rec)} ({fmt(per_policy[rec])}%) is within noise of it, so it is the "
                "recommendation."
            )
        others = [p for p in win["tied_with_best"] if p not in (best, rec)]
        if others:
            parts.append(f"Also within noise: {', '.join(_title(p) for p in others)}.")
        lines.append(" ".join(parts))

    # the question of the study: freeze BN (inference mode) or not when fine-tuning everything
    if any("all" in pp and "all_bn_frozen" in pp for pp in finetune.values()):
        better, worse, same = [], [], []
        for domain, pp in finetune.items():
            if "all" not in pp or "all_bn_frozen" not in pp:
                continue
            diff = _points(pp["all_bn_frozen"], pp["all"])
            if tied(pp["all_bn_frozen"], pp["all"]):
                same.append(f"{domain} ({diff:+.1f})")
            elif diff > 0:
                better.append(f"{domain} ({diff:+.1f})")
            else:
                worse.append(f"{domain} ({diff:+.1f})")
        text = (
            "Freeze BN when fine-tuning all layers? Keeping BN in inference mode (Keras's advice) vs letting it train,"
        )
        text += " in points:"
        if better:
            text += f" freezing helped on {', '.join(better)};"
        if worse:
            text += f" freezing hurt on {', '.join(worse)};"
        if same:
            text += f" no difference beyond noise on {', '.join(same)};"
        lines.append(text.rstrip(";") + ".")

    if any("bn_only" in pp and "head" in pp for pp in finetune.values()):
        diffs = [
            f"{d} {_points(pp['bn_only'], pp['head']):+.1f}"
            for d, pp in finetune.items()
            if "bn_only" in pp and "head" in pp
        ]
        lines.append(
            "Training only the BN layers (statistics, gamma, beta) instead of only the head, in points: "
            + ", ".join(diffs)
            + "."
        )

    fixed, not_fixed = [], []
    for domain, pp in finetune.items():
        if "recalibrate" in pp and "source" in pp:
            gain = _points(pp["recalibrate"], pp["source"])
            item = f"{domain} ({fmt(pp['source'])}% -> {fmt(pp['recalibrate'])}%)"
            (fixed if gain >= FIX_POINTS else not_fixed).append((domain, item))
    if fixed or not_fixed:
        text = "Recalibration alone (AdaBN, no labels, no gradient step)"
        if fixed:
            text += f" gained at least {FIX_POINTS:.0f} points on {', '.join(i for _, i in fixed)}"
        if not_fixed:
            text += ("; it did not" if fixed else " did not gain") + f" on {', '.join(i for _, i in not_fixed)}"
        lines.append(text + ".")
        for domain, _ in not_fixed:
            if domain in NEGATIVE_CONTROLS:
                best = winners[domain]["best"]
                lines.append(
                    f"As expected for the negative control {domain}: an inversion flips the sign of every "
                    "first-layer feature, which new statistics cannot undo; it needs gradient training "
                    f"(best: {_title(best)}, {fmt(finetune[domain][best])}%)."
                )
        for domain, _ in fixed:
            if domain in NEGATIVE_CONTROLS:
                lines.append(f"Unexpected: recalibration fixed the negative control {domain}; check the setup.")

    shift = summary.get("shift", {})
    scored = [(d, e) for d, e in shift.items() if d != "source"]
    if scored:
        ref = shift.get("source")
        items = [
            f"{d} {e['score']['mean']:.3g} ({e['recommendation']})"
            for d, e in sorted(scored, key=lambda de: de[1]["score"]["mean"])
        ]
        text = "bnkit.shift scores of the source model, lowest first: " + ", ".join(items)
        if ref is not None:
            text += f"; unshifted held-out images score {ref['score']['mean']:.3g} ({ref['recommendation']})"
        lines.append(text + ".")
        helped = [
            e["score"]["min"] for d, e in scored if e.get("recalibration_gain_points", {}).get("mean", 0) >= FIX_POINTS
        ]
        if helped and ref is not None:
            lines.append(
                f"Every domain where recalibration gained {FIX_POINTS:.0f}+ points scored at least "
                f"{min(helped):.3g}, {min(helped) / max(ref['score']['max'], 1e-12):.0f}x the unshifted score "
                f"({ref['score']['max']:.3g}); a keep-frozen threshold between the two is supported by this run."
            )

    checks = [_check_shift_advice(d, e, finetune.get(d, {})) for d, e in scored]
    checks = [c for c in checks if c]
    if checks:
        lines.append("Checking bnkit.shift's advice against the measured winners: " + "; ".join(checks) + ".")

    batch = summary.get("batch_size", {})
    titles = batch_norm_titles or {}
    if batch:
        sizes = sorted({int(b) for per_b in batch.values() for b in per_b})
        small, large = str(sizes[0]), str(sizes[-1])
        parts = []
        for norm, per_b in batch.items():
            if small in per_b and large in per_b:
                diff = _points(per_b[small], per_b[large])
                parts.append(
                    f"{titles.get(norm, norm)} {fmt(per_b[large])}% at batch {large} -> {fmt(per_b[small])}% at "
                    f"batch {small} ({diff:+.1f})"
                )
        if parts:
            lines.append("Batch size (trained from scratch, held-out accuracy): " + "; ".join(parts) + ".")
        at_small = {n: pb[small] for n, pb in batch.items() if small in pb}
        if at_small:
            best = max(at_small, key=lambda n: at_small[n]["mean"])
            ties = [n for n in at_small if n != best and tied(at_small[n], at_small[best])]
            text = f"At batch {small} the best is {titles.get(best, best)} ({fmt(at_small[best])}%)"
            if ties:
                text += ", tied within noise with " + ", ".join(titles.get(n, n) for n in ties)
            lines.append(text + ".")

    fuse = summary.get("fuse")
    if fuse:
        text = (
            f"Fusion: {fuse['identical_predictions']} of {fuse['models']} fine-tuned models give identical "
            f"predictions after bnkit.fuse (largest logit difference {fuse['max_abs_logit_diff']:.1e})"
        )
        lat = fuse.get("latency")
        if lat:
            text += "; fused / unfused inference time " + ", ".join(
                f"{v['ratio']:.2f}x at {k.replace('_', ' ')}" for k, v in lat.items()
            )
        lines.append(text + ".")
    return lines


def _check_shift_advice(domain: str, entry: dict[str, Any], per_policy: dict[str, Any]) -> str:
    """One clause judging bnkit.shift's recommendation for ``domain`` by the measured accuracies."""
    if not per_policy:
        return ""
    best = max(per_policy, key=lambda p: per_policy[p]["mean"])
    advice = entry["recommendation"]
    if advice == "keep-frozen" and "source" in per_policy:
        if tied(per_policy["source"], per_policy[best]):
            return f"{domain}: keep-frozen, and the untouched model is within noise of the best (matches)"
        return (
            f"{domain}: keep-frozen advised, but {_title(best)} beat the untouched model by "
            f"{_points(per_policy[best], per_policy['source']):.1f} points (missed)"
        )
    if advice in ("recalibrate", "fine-tune-bn") and "recalibrate" in per_policy and "source" in per_policy:
        gain = _points(per_policy["recalibrate"], per_policy["source"])
        if gain < FIX_POINTS:
            return (
                f"{domain}: {advice} advised, but recalibration gained only {gain:.1f} points (the score "
                "measures how far the statistics moved, not whether new statistics can undo the shift)"
            )
        if tied(per_policy["recalibrate"], per_policy[best]):
            verdict = "matches" if advice == "recalibrate" else "recalibration alone was enough"
            return f"{domain}: {advice}, and recalibration alone is within noise of the best ({verdict})"
        extra = _points(per_policy[best], per_policy["recalibrate"])
        return (
            f"{domain}: {advice}; recalibration gained {gain:.1f} points and labelled training "
            f"({_title(best)}) {extra:.1f} more"
        )
    return ""


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of ``header`` and ``rows`` (cells already formatted).

    Example:
        >>> print(markdown_table(["a", "b"], [["1", "2"]]))
        | a | b |
        |---|---|
        | 1 | 2 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def policy_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the accuracy table (rows: policies; columns: domains; cells: mean ± std %).

    The winner of each column is marked with ``*``.

    Example:
        >>> rows = {"finetune": [{"seed": 0, "domain": "blur", "policy": "source", "accuracy": 0.5}]}
        >>> policy_table(summarize(rows, ["blur"], ["source"]))[1]
        [['source model', '50.0 *']]
    """
    finetune = summary.get("finetune", {})
    domains = list(finetune)
    policies = list(dict.fromkeys(p for pp in finetune.values() for p in pp))
    header = ["policy", *domains]
    rows = []
    for p in policies:
        row = [_title(p)]
        for d in domains:
            cell = fmt(finetune[d][p]) if p in finetune[d] else "n/a"
            if summary["winners"][d]["best"] == p:
                cell += " *"
            row.append(cell)
        rows.append(row)
    return header, rows


def batch_table(summary: dict[str, Any], titles: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the batch-size table (rows: norms; columns: batch sizes; cells: mean ± std %).

    Example:
        >>> s = {"batch_size": {"group": {"2": stats([0.9, 0.92])}}}
        >>> batch_table(s)
        (['norm', 'batch 2'], [['group', '91.0 ± 1.4']])
    """
    batch = summary.get("batch_size", {})
    sizes = sorted({int(b) for per_b in batch.values() for b in per_b})
    header = ["norm", *[f"batch {b}" for b in sizes]]
    rows = [
        [(titles or {}).get(norm, norm), *[fmt(per_b.get(str(b), {})) for b in sizes]] for norm, per_b in batch.items()
    ]
    return header, rows


def shift_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the shift table: score, bnkit.shift's recommendation, recalibration gain, winner.

    Example:
        >>> shift_table({"shift": {}, "finetune": {}})[0][0]
        'domain'
    """
    header = [
        "domain",
        "bnkit.shift score",
        "shift recommends",
        "recalibration gain (points)",
        "best policy",
        "cheapest within noise",
    ]
    rows = []
    for domain, e in summary.get("shift", {}).items():
        gain = e.get("recalibration_gain_points")
        rows.append(
            [
                domain if domain != "source" else "unshifted (reference)",
                f"{e['score']['mean']:.3g} ({e['score']['min']:.3g}-{e['score']['max']:.3g})",
                e["recommendation"],
                fmt(gain, percent=False) if gain else "-",
                _title(e["winner"]) if "winner" in e else "-",
                _title(e["recommended"]) if "recommended" in e else "-",
            ]
        )
    return header, rows


def render_markdown(results: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The text of ``report.md`` for a results dict (see :func:`bnkit.study.run.run_study`).

    Example:
        >>> text = render_markdown({"config": {}, "summary": {"finetune": {}, "winners": {}}, "conclusion": []})
        >>> text.startswith("# bnkit study")
        True
    """
    summary = results.get("summary", {})
    cfg = results.get("config", {})
    titles = results.get("batch_norm_titles", {})
    out = ["# bnkit study: should I freeze BatchNorm when fine-tuning?", ""]
    seeds = cfg.get("seeds", [])
    command = results.get("command")
    if command:
        out += [f"Command: `{command}`", ""]
    out += [
        f"{results.get('description', 'Bundled digits (scikit-learn load_digits) with synthetic domain shifts.')}"
        f" Seeds: {', '.join(str(s) for s in seeds)}; every number is mean ± sample standard deviation over"
        " the seeds (accuracy in %, on held-out target images).",
        "",
        "## Conclusion",
        "",
    ]
    out += [f"- {line}" for line in results.get("conclusion", [])]
    if summary.get("finetune"):
        header, rows = policy_table(summary)
        out += ["", "## Fine-tuning policies per target domain", "", "`*` marks the best mean of each domain.", ""]
        if "source_accuracy" in summary and summary["source_accuracy"]["n"]:
            out += [f"Source model on source test images: {fmt(summary['source_accuracy'])}%.", ""]
        out += [markdown_table(header, rows)]
    if summary.get("shift"):
        header, rows = shift_table(summary)
        out += ["", "## Domain-shift score (bnkit.shift on the source model) next to the winner", ""]
        out += [markdown_table(header, rows)]
    if summary.get("batch_size"):
        header, rows = batch_table(summary, titles)
        out += ["", "## Accuracy vs per-step batch size (trained from scratch)", ""]
        if results.get("batch_protocol"):
            out += [results["batch_protocol"], ""]
        out += [markdown_table(header, rows)]
    fuse = summary.get("fuse")
    if fuse:
        out += ["", "## Fusion check (bnkit.fuse)", ""]
        out += [
            f"- Models fused: {fuse['models']}; identical predictions: {fuse['identical_predictions']}; "
            f"largest logit difference: {fuse['max_abs_logit_diff']:.2e}; BatchNorm layers left: "
            f"{fuse['remaining_batchnorms']}.",
        ]
        for label, v in fuse.get("latency", {}).items():
            out.append(
                f"- Inference at {label.replace('_', ' ')}: unfused {v['unfused_ms']:.3f} ms, fused "
                f"{v['fused_ms']:.3f} ms, ratio {v['ratio']:.2f} (median over seeds; timings are noisy)."
            )
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    run = results.get("run", {})
    if run:
        out += [
            "",
            "## Run",
            "",
            f"- Wall time {run.get('wall_s', 0):.0f} s with {run.get('jobs', 1)} worker process(es) of "
            f"{run.get('threads', 1)} thread(s); bnkit {results.get('bnkit_version', '?')}, torch "
            f"{results.get('torch_version', '?')}.",
        ]
    return "\n".join(out) + "\n"


def plot_policies(
    summary: dict[str, Any],
    path: Path,
    title: str = "Fine-tuning policy per target domain (mean ± std over seeds)",
) -> Path:
    """Grouped bars: accuracy per policy per domain, with standard-deviation error bars. Returns ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> rows = {"finetune": [{"seed": 0, "domain": "blur", "policy": "source", "accuracy": 0.5}]}
        >>> p = plot_policies(summarize(rows, ["blur"], ["source"]), pathlib.Path(tempfile.mkdtemp()) / "p.png")
        >>> p.exists()
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finetune = summary["finetune"]
    domains = list(finetune)
    policies = list(dict.fromkeys(p for pp in finetune.values() for p in pp))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.9 * len(domains) + 2), 4.8), dpi=120)
    width = 0.8 / max(1, len(policies))
    cmap = plt.get_cmap("tab10")
    for i, p in enumerate(policies):
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(domains))]
        means = [100 * finetune[d][p]["mean"] if p in finetune[d] else math.nan for d in domains]
        errs = [100 * finetune[d][p]["std"] if p in finetune[d] else 0.0 for d in domains]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=_title(p), color=cmap(i % 10))
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("held-out target accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    # below the axes: inside, it would hide the low bars of the domains nothing fixes
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.09), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_batch_sizes(summary: dict[str, Any], path: Path, titles: dict[str, str] | None = None) -> Path:
    """Lines: held-out accuracy vs per-step batch size, one per norm, with a standard-deviation band.

    Example:
        >>> import tempfile, pathlib
        >>> s = {"batch_size": {"group": {"2": stats([0.9, 0.92]), "8": stats([0.93, 0.95])}}}
        >>> plot_batch_sizes(s, pathlib.Path(tempfile.mkdtemp()) / "b.png").exists()
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for norm, per_b in summary["batch_size"].items():
        sizes = sorted(int(b) for b in per_b)
        means = [100 * per_b[str(b)]["mean"] for b in sizes]
        stds = [100 * per_b[str(b)]["std"] for b in sizes]
        ax.plot(sizes, means, marker="o", label=(titles or {}).get(norm, norm))
        ax.fill_between(
            sizes,
            [m - s for m, s in zip(means, stds, strict=True)],
            [m + s for m, s in zip(means, stds, strict=True)],
            alpha=0.15,
        )
    ax.set_xscale("log", base=2)
    all_sizes = sorted({int(b) for per_b in summary["batch_size"].values() for b in per_b})
    ax.set_xticks(all_sizes, [str(b) for b in all_sizes])
    ax.set_xlabel("per-step batch size (ghost: normalisation group size)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy vs batch size per normalisation (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _umask_mode(path: str) -> None:
    # mkstemp creates 0600 files; results are meant to be shared like any file the user writes
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    _umask_mode(tmp)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, then an atomic rename.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> write_atomic_text(p, "hi"); p.read_text()
        'hi'
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    _umask_mode(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(results: dict[str, Any], out: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
    """Write ``results.json``, the PNG plots (matplotlib, Agg) and ``report.md`` into ``out``, atomically.

    Plots are skipped with a note in the report when matplotlib is not installed.

    Returns:
        ``{"results": path, "report": path, "policies_plot": path, "batch_size_plot": path}`` (plots only when
        written).

    Example:
        >>> import tempfile
        >>> paths = write_outputs({"summary": {}, "conclusion": []}, tempfile.mkdtemp(), plots=False)
        >>> sorted(paths)
        ['report', 'results']
    """
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    summary = results.get("summary", {})
    plot_paths: list[str] = []
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            results.setdefault("notes", []).append(
                'plots skipped: matplotlib is not installed (pip install "bnkit[study]")'
            )
        else:
            if summary.get("finetune"):
                paths["policies_plot"] = plot_policies(summary, out_dir / "policies.png")
                plot_paths.append(str(paths["policies_plot"]))
            if summary.get("batch_size"):
                paths["batch_size_plot"] = plot_batch_sizes(
                    summary, out_dir / "batch_size.png", results.get("batch_norm_titles")
                )
                plot_paths.append(str(paths["batch_size_plot"]))
    paths["results"] = out_dir / "results.json"
    write_atomic_text(paths["results"], json.dumps(results, indent=2, allow_nan=True) + "\n")
    paths["report"] = out_dir / "report.md"
    write_atomic_text(paths["report"], render_markdown(results, plot_paths))
    return paths
