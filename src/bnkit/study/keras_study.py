"""``bnkit study --framework keras``: the fine-tuning study with Keras 3 on the TensorFlow, JAX or torch backend.

The PyTorch study's design (:mod:`bnkit.study`): a small BatchNorm network pre-trained on scikit-learn's digits
(:mod:`bnkit.study.keras_data`, NumPy only), adapted to four shifted target domains with the six policies
written with Keras's switches (:mod:`bnkit.study.keras_policies`), every number mean and spread over seeds. Each
fine-tuned model is scored twice: "Keras defaults" (the moving statistics ``fit()`` left behind, Keras's default
momentum 0.99) and "with exact statistics" (the same model after ``bnkit.keras.recalibrate`` on the target
training images). The batch-size experiment and the ``bnkit.shift`` scores are PyTorch-only.

The source model is pre-trained with ``fit()`` and then given its exact statistics on the source training images
(``bnkit.keras.recalibrate``): a model pre-trained for long has converged moving averages, and the few hundred
steps of this pre-training at momentum 0.99 have not; both source accuracies are recorded. Nothing here imports
torch unless the Keras backend is torch.

Example:
    >>> cfg = KerasStudyConfig.quick_config(seeds=(0,), domains=("contrast",), policies=("source",),
    ...                                     source_epochs=1)
    >>> run_keras_study(cfg, out=None)["summary"]["finetune"]["contrast"]["source"]["n"]
    1
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bnkit.study.catalog import DOMAIN_NAMES, POLICY_INFO, FinetuneSettings, check_design
from bnkit.study.keras_data import make_domain, make_splits
from bnkit.study.keras_report import conclude_keras, write_keras_outputs
from bnkit.study.report import summarize

__all__ = ["KerasStudyConfig", "fold_check", "keras_finetune_seed", "run_keras_study", "validate_keras_config"]

QUICK_NOTE = (
    "Quick run: one seed and fewer epochs than the default run (no spread, and a single seed's winners can be "
    "within noise); run `bnkit study --framework keras` for the full numbers."
)

ModelFactory = Callable[[], Any]


@dataclass(frozen=True)
class KerasStudyConfig:
    """Everything that defines a Keras study run (stored in ``results.json``).

    Attributes:
        seeds: one full repetition per seed.
        domains: target domains (:data:`bnkit.study.catalog.DOMAIN_NAMES`).
        policies: fine-tuning policies (keys or numbers of :data:`bnkit.study.catalog.POLICY_INFO`).
        source_epochs: epochs of source pre-training (Adam, batch ``source_batch_size``, lr ``source_lr``).
        source_batch_size: batch size of source pre-training.
        source_lr: Adam learning rate of source pre-training.
        finetune: settings of the gradient-based policies (``head`` names a top-level layer; empty: a layer
            named ``"head"``, else the last top-level layer with weights).
        target_per_class: labelled target-training images per class.
        momentum: BatchNormalization momentum of the bundled network (Keras convention; 0.99 is Keras's default).
        fold: check ``bnkit.keras.fold`` on every fine-tuned model (after recalibration, as the exact-statistics
            column scores it): the folded model's predictions must equal the original's.
        quick: a reduced run (one seed, fewer epochs).

    Example:
        >>> KerasStudyConfig().momentum
        0.99
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    domains: tuple[str, ...] = DOMAIN_NAMES
    policies: tuple[str, ...] = tuple(POLICY_INFO)
    source_epochs: int = 15
    source_batch_size: int = 32
    source_lr: float = 3e-3
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    target_per_class: int = 20
    momentum: float = 0.99
    fold: bool = True
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> KerasStudyConfig:
        """The ``--quick`` run: one seed, 10 pre-training and 15 fine-tuning epochs.

        Example:
            >>> KerasStudyConfig.quick_config().seeds
            (0,)
        """
        base = cls(seeds=(0,), source_epochs=10, finetune=FinetuneSettings(epochs=15), quick=True)
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the configuration.

        Example:
            >>> KerasStudyConfig().to_dict()["finetune"]["epochs"]
            30
        """
        return asdict(self)


def validate_keras_config(cfg: KerasStudyConfig) -> KerasStudyConfig:
    """Check names and sizes; policies given by number become keys.

    Raises:
        ValueError: empty seeds or domains, unknown domain or policy, a non-positive size, momentum not in [0, 1).

    Example:
        >>> validate_keras_config(KerasStudyConfig(policies=("3",))).policies
        ('all',)
    """
    sizes = {
        "source_epochs": cfg.source_epochs,
        "target_per_class": cfg.target_per_class,
        "finetune.epochs": cfg.finetune.epochs,
        "finetune.batch_size": cfg.finetune.batch_size,
    }
    policies = check_design(cfg.seeds, cfg.domains, cfg.policies, sizes)
    if not cfg.domains:
        raise ValueError(f"bnkit study: give at least one domain of {', '.join(DOMAIN_NAMES)}")
    if not policies:
        raise ValueError(f"bnkit study: give at least one policy of {', '.join(POLICY_INFO)}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ValueError(f"bnkit study: momentum must be in [0, 1) (Keras convention), got {cfg.momentum}")
    return replace(cfg, policies=policies, seeds=tuple(int(s) for s in cfg.seeds))


def fold_check(model: Any, x: Any) -> dict[str, Any]:
    """Fold every BatchNormalization of ``model`` with ``bnkit.keras.fold`` and compare predictions on ``x``.

    The folded model is built without ``fold``'s own check; the comparison here is the study's (class
    predictions and the largest logit difference, both models in inference mode). ``model`` is left untouched.

    Returns:
        ``identical_predictions``, ``disagreements``, ``max_abs_logit_diff``, ``folded`` (layers folded) and
        ``remaining_batchnorms`` (layers fold left, with its reasons in ``skipped``).

    Example:
        >>> import numpy as np
        >>> from bnkit.study.keras_model import digits_net
        >>> x = np.random.default_rng(0).random((8, 8, 8, 1), dtype=np.float32)
        >>> check = fold_check(digits_net(), x)
        >>> check["identical_predictions"], check["folded"], check["remaining_batchnorms"]
        (True, 3, 0)
    """
    import numpy as np

    import bnkit.keras
    from bnkit.keras.compat import import_keras

    keras = import_keras()
    folded, report = bnkit.keras.fold_with_report(model, check=False)
    ref = keras.ops.convert_to_numpy(model(x, training=False))
    out = keras.ops.convert_to_numpy(folded(x, training=False))
    disagreements = int((ref.argmax(-1) != out.argmax(-1)).sum())
    return {
        "identical_predictions": disagreements == 0,
        "disagreements": disagreements,
        "max_abs_logit_diff": float(np.abs(ref - out).max()),
        "folded": len(report.folded),
        "remaining_batchnorms": len(report.skipped),
        "skipped": [str(s) for s in report.skipped],
    }


def _source_model(cfg: KerasStudyConfig, splits: Any, seed: int, factory: ModelFactory | None) -> Any:
    from bnkit.keras.compat import import_keras
    from bnkit.study.keras_model import digits_net

    keras = import_keras()
    if factory is None:
        return digits_net(seed=seed, momentum=cfg.momentum)
    keras.utils.set_random_seed(seed)
    model = factory()
    if not isinstance(model, keras.Model):
        raise TypeError(f"--model factory returned a {type(model).__name__}, not a keras.Model")
    return model


def keras_finetune_seed(
    cfg: KerasStudyConfig,
    seed: int,
    factory: ModelFactory | None = None,
    tick: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One seed: pre-train, settle the source statistics, then every policy on every domain, scored twice.

    Args:
        cfg: the run's configuration (validated).
        seed: the seed of the splits, the initialisation and the shuffling.
        factory: builds the (untrained) Keras model; None for the bundled network. It must take ``[N, 8, 8, 1]``
            images and return 10 logits.
        tick: called with a label after each step (progress).

    Returns:
        ``{"source": [row], "finetune": [rows], "exact": [rows], "fold": [rows], "timing_s": {...}}``.

    Example:
        >>> cfg = KerasStudyConfig(seeds=(0,), domains=("contrast",), policies=("source",), source_epochs=1)
        >>> [r["policy"] for r in keras_finetune_seed(cfg, 0)["exact"]]
        ['source']
    """
    from bnkit.study.keras_policies import (
        accuracy,
        apply_keras_policy,
        check_head,
        default_head,
        fit,
        recalibrate_exact,
    )

    tick = tick or (lambda label: None)
    out: dict[str, Any] = {"source": [], "source_moving": [], "finetune": [], "exact": [], "fold": []}
    timing = {"pretrain": 0.0, "policies": 0.0, "recalibrate": 0.0, "fold": 0.0}
    splits = make_splits(seed, target_per_class=cfg.target_per_class)
    start = time.perf_counter()
    source = _source_model(cfg, splits, seed, factory)
    settings = cfg.finetune if cfg.finetune.head else replace(cfg.finetune, head=default_head(source))
    check_head(source, settings.head)
    fit(
        source,
        splits.source_train,
        epochs=cfg.source_epochs,
        batch_size=cfg.source_batch_size,
        lr=cfg.source_lr,
        seed=seed,
    )
    out["source_moving"].append({"seed": seed, "accuracy": accuracy(source, splits.source_test)})
    recalibrate_exact(source, splits.source_train, cfg.finetune.recalibration_batch_size)
    out["source"].append({"seed": seed, "accuracy": accuracy(source, splits.source_test)})
    timing["pretrain"] += time.perf_counter() - start
    tick(f"seed {seed}: source model")
    for domain in cfg.domains:
        target_train = make_domain(splits.target_train, domain, seed)
        target_test = make_domain(splits.target_test, domain, seed)
        for policy in cfg.policies:
            start = time.perf_counter()
            model = apply_keras_policy(policy, source, target_train, settings, seed)
            row = {"seed": seed, "domain": domain, "policy": policy}
            out["finetune"].append({**row, "accuracy": accuracy(model, target_test)})
            timing["policies"] += time.perf_counter() - start
            start = time.perf_counter()
            recalibrate_exact(model, target_train, cfg.finetune.recalibration_batch_size)
            out["exact"].append({**row, "accuracy": accuracy(model, target_test)})
            timing["recalibrate"] += time.perf_counter() - start
            if cfg.fold:
                start = time.perf_counter()
                out["fold"].append({**row, **fold_check(model, target_test.x)})
                timing["fold"] += time.perf_counter() - start
            tick(f"seed {seed}: {domain} / {policy}")
    out["timing_s"] = timing
    return out


def run_keras_study(
    config: KerasStudyConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = "bnkit-study",
    factory: ModelFactory | None = None,
    model_spec: str | None = None,
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the Keras study on the current Keras backend (default configuration when ``config`` is None).

    Choose the backend before Keras is imported (``KERAS_BACKEND``; the CLI's ``--backend``).

    Args:
        config: what to run; :meth:`KerasStudyConfig.quick_config` for ``--quick``.
        out: output directory for ``results.json``, ``report.md`` and the plots; None writes nothing.
        factory: builds your own (untrained) Keras model for the digits (``[N, 8, 8, 1]`` in, 10 logits out);
            None for the bundled network.
        model_spec: how the factory was named (quoted in the report).
        progress: called with a label after each step.
        command: the command line to quote in the report.

    Returns:
        The results dict (also ``results.json``): ``config``, ``rows`` (per-seed raw results), ``summary``
        (``finetune``: Keras defaults; ``exact``: with exact statistics), ``conclusion``, ``run`` and ``files``.

    Raises:
        ValueError: an invalid configuration. TypeError: the factory did not return a Keras model.

    Example:
        >>> cfg = KerasStudyConfig(seeds=(0,), domains=("invert",), policies=("source",), source_epochs=1)
        >>> sorted(run_keras_study(cfg, out=None)["summary"]["exact"]["finetune"]["invert"])
        ['source']
    """
    import bnkit
    from bnkit.keras.compat import import_keras

    keras = import_keras()
    cfg = validate_keras_config(config if config is not None else KerasStudyConfig())
    start = time.perf_counter()
    parts = [keras_finetune_seed(cfg, seed, factory, progress) for seed in cfg.seeds]
    wall = time.perf_counter() - start
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in ("source", "source_moving", "finetune", "exact", "fold")}
    timing: dict[str, float] = {}
    for part in parts:
        for key in rows:
            rows[key] += part[key]
        for k, v in part["timing_s"].items():
            timing[k] = timing.get(k, 0.0) + v
    summary = summarize({"source": rows["source"], "finetune": rows["finetune"]}, cfg.domains, cfg.policies)
    summary.pop("shift", None)
    summary.pop("batch_size", None)
    summary["source_accuracy_moving"] = summarize({"source": rows["source_moving"]}, [], [])["source_accuracy"]
    exact = summarize({"finetune": rows["exact"]}, cfg.domains, cfg.policies)
    summary["exact"] = {"finetune": exact["finetune"], "winners": exact["winners"]}
    if rows["fold"]:
        summary["fold"] = {
            "models": len(rows["fold"]),
            "identical_predictions": sum(bool(r["identical_predictions"]) for r in rows["fold"]),
            "disagreements": sum(int(r["disagreements"]) for r in rows["fold"]),
            "max_abs_logit_diff": max(float(r["max_abs_logit_diff"]) for r in rows["fold"]),
            "remaining_batchnorms": sum(int(r["remaining_batchnorms"]) for r in rows["fold"]),
        }
    conclusion = conclude_keras(summary, cfg.momentum if factory is None else None)
    notes: list[str] = []
    if cfg.quick:
        conclusion.insert(0, QUICK_NOTE)
    model_text = (
        f"your model {model_spec or 'from --model'}"
        if factory is not None
        else f"a 3-conv BatchNormalization network (momentum {cfg.momentum:g})"
    )
    results: dict[str, Any] = {
        "framework": "keras",
        "backend": str(keras.backend.backend()),
        "bnkit_version": bnkit.__version__,
        "keras_version": keras.__version__,
        "command": command,
        "description": "Bundled digits (scikit-learn load_digits, 8x8, channels-last) with synthetic domain shifts "
        f"(see bnkit.study.keras_data); {model_text} pre-trained on the source domain with fit(), its statistics "
        "then recomputed on the source training images.",
        "config": cfg.to_dict(),
        "policies": {k: POLICY_INFO[k].description for k in cfg.policies},
        "rows": rows,
        "summary": summary,
        "conclusion": conclusion,
        "notes": notes,
        "run": {"wall_s": wall, "python": sys.version.split()[0], "cpu_s": timing},
    }
    if out is not None:
        results["files"] = {k: str(v) for k, v in write_keras_outputs(results, out).items()}
    return results
