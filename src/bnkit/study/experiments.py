"""The study's experiments: fine-tuning policies per domain, batch size per norm, fusion check, shift scores.

Each experiment takes a :class:`StudyConfig` and returns plain data (lists of dict rows, JSON-ready); the
aggregation into means and spreads and the wording of the conclusion live in :mod:`bnkit.study.report`.
Every random choice (splits, noise, initialisation, shuffling) derives from the run's seed, so a given seed
reproduces its numbers exactly; timings are kept apart from the results because they are not reproducible.

Example:
    >>> cfg = StudyConfig.quick_config()
    >>> cfg.seeds, len(cfg.domains) == len(DOMAINS)
    ((0, 1, 2), True)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bnkit.study.catalog import BATCH_NORMS
from bnkit.study.data import DOMAINS, Dataset, Splits, make_domain, make_splits
from bnkit.study.model import DigitsNet
from bnkit.study.policies import POLICIES, FinetuneSettings, apply_policy, recalibration_batches
from bnkit.study.train import accuracy, train

__all__ = [
    "BATCH_NORMS",
    "StudyConfig",
    "batch_size_seed",
    "count_ticks",
    "finetune_seed",
    "fuse_check",
    "pretrain_source",
    "shift_scores",
    "trained_batch_norms",
]

Tick = Callable[[str], None]


def _no_tick(label: str) -> None:
    return None


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a study run (stored in ``results.json``).

    Attributes:
        seeds: one full repetition per seed; every number is reported as mean and spread over them.
        domains: target domains (keys of :data:`bnkit.study.data.DOMAINS`).
        policies: fine-tuning policies (keys of :data:`bnkit.study.policies.POLICIES`).
        source_epochs: epochs of source pre-training (Adam, batch ``source_batch_size``, lr ``source_lr``).
        source_batch_size: batch size of source pre-training.
        source_lr: Adam learning rate of source pre-training.
        finetune: settings of the gradient-based policies.
        target_per_class: labelled target-training images per class.
        batch_sizes: per-step batch sizes of the batch-size experiment; empty to skip it.
        batch_norms: norms of the batch-size experiment (keys of :data:`BATCH_NORMS`).
        batch_epochs: epochs of each from-scratch run of the batch-size experiment.
        batch_lr: Adam learning rate of the batch-size experiment (the same at every batch size).
        ghost_step_batch: samples per optimisation step for ghost BatchNorm; the batch-size axis is then
            the ghost (normalisation) group size.
        fuse: run the fusion check on every fine-tuned model.
        threads: ``torch.set_num_threads`` for the run (1 makes results independent of the machine's cores).
        quick: a reduced run (fewer epochs) for smoke tests and first looks.

    Example:
        >>> StudyConfig().batch_sizes
        (2, 4, 8, 16, 32)
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    domains: tuple[str, ...] = tuple(DOMAINS)
    policies: tuple[str, ...] = tuple(POLICIES)
    source_epochs: int = 15
    source_batch_size: int = 32
    source_lr: float = 3e-3
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    target_per_class: int = 20
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32)
    batch_norms: tuple[str, ...] = tuple(BATCH_NORMS)
    batch_epochs: int = 10
    batch_lr: float = 3e-3
    ghost_step_batch: int = 32
    fuse: bool = True
    threads: int = 1
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> StudyConfig:
        """The ``--quick`` run: same design, fewer epochs (well under two minutes on two CPU cores).

        Example:
            >>> StudyConfig.quick_config(seeds=(7, 8, 9)).seeds
            (7, 8, 9)
        """
        base = cls(
            source_epochs=10,
            finetune=FinetuneSettings(epochs=15),
            batch_sizes=(2, 8, 32),
            batch_epochs=3,
            quick=True,
        )
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the configuration.

        Example:
            >>> StudyConfig().to_dict()["finetune"]["epochs"]
            30
        """
        return asdict(self)


def pretrain_source(splits: Splits, cfg: StudyConfig, seed: int, norm: str = "batch") -> nn.Module:
    """The source model: a :class:`DigitsNet` trained on the source-training split, in eval mode.

    Example:
        >>> cfg = StudyConfig(source_epochs=1)
        >>> isinstance(pretrain_source(make_splits(0), cfg, seed=0), DigitsNet)
        True
    """
    torch.manual_seed(seed)
    model = DigitsNet(norm=norm)
    return train(
        model,
        splits.source_train,
        epochs=cfg.source_epochs,
        batch_size=cfg.source_batch_size,
        lr=cfg.source_lr,
        seed=seed,
    )


def shift_scores(model: nn.Module, data: Iterable[Any]) -> dict[str, Any]:
    """``bnkit.shift`` of ``model`` on ``data`` (batches of images) as JSON-ready data.

    Returns:
        ``{"score": float, "recommendation": str, "layers": {name: distance}}``.

    Example:
        >>> sorted(shift_scores(DigitsNet().eval(), [torch.rand(16, 1, 8, 8)]))
        ['layers', 'recommendation', 'score']
    """
    import bnkit

    report = bnkit.shift(model, data)
    return {
        "score": float(report.score),
        "recommendation": str(report.recommendation),
        "layers": {layer.name: float(layer.distance) for layer in report.layers},
    }


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: the first calls allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000.0 * times[len(times) // 2]


def fuse_check(model: nn.Module, x: torch.Tensor, *, timing: bool = False, repeats: int = 30) -> dict[str, Any]:
    """Fold every BatchNorm of ``model`` with ``bnkit.fuse`` and compare predictions on ``x``.

    Layers frozen with :func:`bnkit.freeze` are folded as well (in eval mode the freeze changes nothing).

    Args:
        model: the model (left untouched).
        x: inputs to compare on.
        timing: also measure the median inference latency, fused and unfused, at batch 1 and at batch 64
            (or ``len(x)`` when smaller).
        repeats: timed calls per measurement.

    Returns:
        ``identical_predictions``, ``disagreements``, ``max_abs_logit_diff``, ``folded``,
        ``remaining_batchnorms`` and, with ``timing``, ``latency_ms``: ``{"batch_1": {"unfused", "fused"},
        "batch_64": {...}}``.

    Example:
        >>> fuse_check(DigitsNet().eval(), torch.rand(8, 1, 8, 8))["identical_predictions"]
        True
    """
    import bnkit

    model = copy.deepcopy(model).eval()
    fused = bnkit.fuse(model, x[:16])
    with torch.no_grad():
        ref, out = model(x), fused(x)
    disagreements = int((ref.argmax(1) != out.argmax(1)).sum())
    result: dict[str, Any] = {
        "identical_predictions": disagreements == 0,
        "disagreements": disagreements,
        "max_abs_logit_diff": float((ref - out).abs().max()),
        "folded": len(fused.bnkit_fuse_report.folded),
        "remaining_batchnorms": len(bnkit.named_batchnorms(fused)),
    }
    if timing:
        latency: dict[str, dict[str, float]] = {}
        with torch.no_grad():
            big = x[:64]
            for label, inputs in (("batch_1", x[:1]), (f"batch_{len(big)}", big)):
                latency[label] = {
                    "unfused": _median_ms(lambda inputs=inputs: model(inputs), repeats),
                    "fused": _median_ms(lambda inputs=inputs: fused(inputs), repeats),
                }
        result["latency_ms"] = latency
    return result


def finetune_seed(cfg: StudyConfig, seed: int, tick: Tick = _no_tick) -> dict[str, Any]:
    """One seed of the fine-tuning experiment: pre-train, then adapt to every domain with every policy.

    Records the source model's accuracy on source test images, ``bnkit.shift`` of the source model on every
    domain's target test images (and on the same images unshifted, ``domain="source"``, as the reference),
    every policy's accuracy on the domain's held-out target test images, and (``cfg.fuse``) the fusion check
    of every adapted model (latency measured once per seed).

    Returns:
        ``{"source": [row], "finetune": [rows], "shift": [rows], "fuse": [rows], "timing_s": {...}}``.

    Example:
        >>> cfg = StudyConfig(seeds=(0,), domains=("contrast",), policies=("source", "recalibrate"),
        ...                   source_epochs=1, fuse=False)
        >>> [r["policy"] for r in finetune_seed(cfg, 0)["finetune"]]
        ['source', 'recalibrate']
    """
    out: dict[str, Any] = {"source": [], "finetune": [], "shift": [], "fuse": []}
    timing = {"pretrain": 0.0, "policies": 0.0, "shift": 0.0, "fuse": 0.0}
    splits = make_splits(seed, target_per_class=cfg.target_per_class)
    start = time.perf_counter()
    source_model = pretrain_source(splits, cfg, seed)
    timing["pretrain"] += time.perf_counter() - start
    out["source"].append({"seed": seed, "accuracy": accuracy(source_model, splits.source_test)})
    tick(f"seed {seed}: source model")

    start = time.perf_counter()
    unshifted = recalibration_batches(splits.target_test, 64)
    out["shift"].append({"seed": seed, "domain": "source", **shift_scores(source_model, unshifted)})
    timing["shift"] += time.perf_counter() - start
    for domain in cfg.domains:
        target_train = make_domain(splits.target_train, domain, seed)
        target_test = make_domain(splits.target_test, domain, seed)
        start = time.perf_counter()
        scores = shift_scores(source_model, recalibration_batches(target_test, 64))
        out["shift"].append({"seed": seed, "domain": domain, **scores})
        timing["shift"] += time.perf_counter() - start
        for policy in cfg.policies:
            start = time.perf_counter()
            torch.manual_seed(seed)  # the same seed for every policy: they differ only in what they train
            model = apply_policy(policy, source_model, target_train, cfg.finetune, seed)
            acc = accuracy(model, target_test)
            out["finetune"].append({"seed": seed, "domain": domain, "policy": policy, "accuracy": acc})
            timing["policies"] += time.perf_counter() - start
            if cfg.fuse:
                start = time.perf_counter()
                # one latency measurement per seed: every adapted model has the same architecture
                timed = domain == cfg.domains[0] and policy == cfg.policies[-1]
                check = fuse_check(model, target_test.x, timing=timed)
                out["fuse"].append({"seed": seed, "domain": domain, "policy": policy, **check})
                timing["fuse"] += time.perf_counter() - start
            tick(f"seed {seed}: {domain} / {policy}")
    out["timing_s"] = timing
    return out


def _held_out(splits: Splits) -> Dataset:
    return Dataset(
        torch.cat([splits.source_test.x, splits.target_test.x]),
        torch.cat([splits.source_test.y, splits.target_test.y]),
    )


def trained_batch_norms(cfg: StudyConfig) -> list[str]:
    """The norms the batch-size experiment trains (``batch_precise`` reuses the ``batch`` models).

    Example:
        >>> trained_batch_norms(StudyConfig(batch_norms=("batch_precise", "group")))
        ['batch', 'group']
    """
    trained = [n for n in cfg.batch_norms if n != "batch_precise"]
    if "batch_precise" in cfg.batch_norms and "batch" not in trained:
        trained.insert(0, "batch")
    return trained


def batch_size_seed(cfg: StudyConfig, seed: int, norm: str, tick: Tick = _no_tick) -> dict[str, Any]:
    """One seed and one norm of the batch-size experiment: train from scratch at every batch size.

    Protocol: the source pre-training recipe (Adam, learning rate ``cfg.batch_lr``) for ``cfg.batch_epochs``
    epochs at every batch size, so smaller batches take proportionally more steps. Ghost BatchNorm always
    steps on ``cfg.ghost_step_batch`` samples and normalises groups of ``B`` of them: it separates the
    effect of noisy normalisation statistics from that of a small gradient batch. Batch Renormalization runs
    plain BN for the first 5% of its steps, then ramps rmax to 3 and dmax to 5 over the next 30% (the
    paper's schedule rescaled). With ``norm="batch"`` and ``"batch_precise"`` in ``cfg.batch_norms``, each
    trained BN model is also evaluated after ``bnkit.recalibrate`` on its training images (precise
    statistics instead of the running averages). Accuracy is on every unshifted image not used for training
    (source test and target test images, about 800).

    Returns:
        ``{"batch_size": [rows], "timing_s": {norm: seconds}}``; rows with seed, norm, batch_size, accuracy
        and the number of optimisation steps.

    Raises:
        ValueError: a ghost group size that does not divide ``cfg.ghost_step_batch``.

    Example:
        >>> cfg = StudyConfig(batch_sizes=(32,), batch_epochs=1)
        >>> [r["norm"] for r in batch_size_seed(cfg, 0, "group")["batch_size"]]
        ['group']
    """
    import bnkit

    rows: list[dict[str, Any]] = []
    splits = make_splits(seed, target_per_class=cfg.target_per_class)
    held_out = _held_out(splits)
    n_train = len(splits.source_train)
    start = time.perf_counter()
    for b in cfg.batch_sizes:
        step_batch = cfg.ghost_step_batch if norm == "ghost" else b
        steps = cfg.batch_epochs * (n_train // step_batch)
        kwargs: dict[str, int] = {}
        if norm == "ghost":
            if step_batch % b:
                raise ValueError(
                    f"ghost batches: batch size {b} does not divide ghost_step_batch={step_batch}; "
                    "choose batch sizes that divide it"
                )
            kwargs["virtual_batch_size"] = b
        elif norm == "renorm":
            kwargs["renorm_warmup"] = max(1, steps // 20)
            kwargs["renorm_ramp"] = max(1, (3 * steps) // 10)
        torch.manual_seed(seed)
        model = DigitsNet(norm=norm, **kwargs)
        train(model, splits.source_train, epochs=cfg.batch_epochs, batch_size=step_batch, lr=cfg.batch_lr, seed=seed)
        base = {"seed": seed, "batch_size": b, "steps": steps}
        if norm in cfg.batch_norms:
            rows.append({**base, "norm": norm, "accuracy": accuracy(model, held_out)})
        if norm == "batch" and "batch_precise" in cfg.batch_norms:
            bnkit.recalibrate(model, recalibration_batches(splits.source_train, 64), progress=False)
            rows.append({**base, "norm": "batch_precise", "accuracy": accuracy(model, held_out)})
        tick(f"seed {seed}: {norm} at batch {b}")
    return {"batch_size": rows, "timing_s": {norm: time.perf_counter() - start}}


def count_ticks(cfg: StudyConfig) -> int:
    """How many progress ticks a run of ``cfg`` makes (for a progress bar's total).

    Example:
        >>> count_ticks(StudyConfig(seeds=(0,), domains=("blur",), policies=("source",), batch_sizes=()))
        2
    """
    finetune = 1 + len(cfg.domains) * len(cfg.policies) if cfg.domains and cfg.policies else 0
    per_seed = finetune + len(trained_batch_norms(cfg)) * len(cfg.batch_sizes)
    return per_seed * len(cfg.seeds)
