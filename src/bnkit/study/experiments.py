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

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bnkit.study.data import DOMAINS, Dataset, Splits, make_domain, make_splits
from bnkit.study.model import DigitsNet
from bnkit.study.policies import POLICIES, FinetuneSettings, apply_policy, recalibration_batches
from bnkit.study.train import accuracy, train

__all__ = [
    "BATCH_NORMS",
    "StudyConfig",
    "batch_size_study",
    "count_ticks",
    "finetune_study",
    "fuse_check",
    "pretrain_source",
    "shift_scores",
]

#: Norms of the batch-size experiment. ``batch_precise`` is not trained separately: it is the ``batch`` model
#: with its running statistics recomputed over the training set by ``bnkit.recalibrate`` (precise BN).
BATCH_NORMS: dict[str, str] = {
    "batch": "BatchNorm",
    "batch_precise": "BatchNorm + precise statistics",
    "group": "GroupNorm",
    "renorm": "Batch Renorm",
    "ghost": "Ghost BatchNorm",
}

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
        batch_lr: SGD learning rate at batch 32, scaled linearly with the batch size (Goyal et al. 2017;
            the GroupNorm paper's protocol).
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
    batch_epochs: int = 8
    batch_lr: float = 0.1
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
            batch_epochs=1,
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
        ``{"score": float, "recommendation": str, "layers": {name: float}}``.

    Example:
        >>> from bnkit.study.model import DigitsNet
        >>> sorted(shift_scores(DigitsNet().eval(), [torch.rand(16, 1, 8, 8)]))
        ['layers', 'recommendation', 'score']
    """
    import bnkit

    result = bnkit.shift(model, data)
    return {
        "score": float(result.score),
        "recommendation": str(result.recommendation),
        "layers": {layer.name: float(layer.score) for layer in result.layers},
    }


def _mean_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first calls allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000.0 * times[len(times) // 2]


def fuse_check(model: nn.Module, x: torch.Tensor, *, timing: bool = False, repeats: int = 50) -> dict[str, Any]:
    """Fold every BatchNorm of ``model`` with ``bnkit.fuse`` and compare predictions on ``x``.

    Args:
        model: an eval-mode model (left untouched).
        x: inputs to compare on.
        timing: also measure median inference latency, fused and unfused, at batch 1 and at ``len(x)``.
        repeats: timed calls per measurement.

    Returns:
        ``{"identical_predictions", "disagreements", "max_abs_logit_diff", "remaining_batchnorms"}`` and,
        with ``timing``, ``"latency_ms"``: ``{"batch_1": {"unfused", "fused"}, "batch_<n>": {...}}``.

    Example:
        >>> from bnkit.study.model import DigitsNet
        >>> fuse_check(DigitsNet().eval(), torch.rand(8, 1, 8, 8))["identical_predictions"]
        True
    """
    import bnkit

    model = model.eval()
    fused = bnkit.fuse(model, example_inputs=(x[:16],))
    fused.eval()
    with torch.no_grad():
        ref, out = model(x), fused(x)
    pred_ref, pred_out = ref.argmax(1), out.argmax(1)
    disagreements = int((pred_ref != pred_out).sum())
    result: dict[str, Any] = {
        "identical_predictions": disagreements == 0,
        "disagreements": disagreements,
        "max_abs_logit_diff": float((ref - out).abs().max()),
        "remaining_batchnorms": len(bnkit.named_batchnorms(fused)),
    }
    if timing:
        latency: dict[str, dict[str, float]] = {}
        with torch.no_grad():
            for label, inputs in (("batch_1", x[:1]), (f"batch_{len(x)}", x)):
                latency[label] = {
                    "unfused": _mean_ms(lambda inputs=inputs: model(inputs), repeats),
                    "fused": _mean_ms(lambda inputs=inputs: fused(inputs), repeats),
                }
        result["latency_ms"] = latency
    return result


def finetune_study(cfg: StudyConfig, tick: Tick = _no_tick) -> dict[str, Any]:
    """Pre-train per seed, then adapt to every domain with every policy; accuracy on held-out target images.

    Also records, per seed: the source model's accuracy on source test images, ``bnkit.shift`` scores of the
    source model on every domain's target test images (and on unshifted held-out images as the reference),
    and (``cfg.fuse``) the fusion check of every adapted model.

    Returns:
        ``{"source": [rows], "finetune": [rows], "shift": [rows], "fuse": [rows], "timing_s": {...}}``; each
        row a dict with ``seed`` and the measured values.

    Example:
        >>> cfg = StudyConfig(seeds=(0,), domains=("contrast",), policies=("source", "recalibrate"),
        ...                   source_epochs=1, fuse=False)
        >>> [r["policy"] for r in finetune_study(cfg)["finetune"]]
        ['source', 'recalibrate']
    """
    out: dict[str, Any] = {"source": [], "finetune": [], "shift": [], "fuse": []}
    timing: dict[str, float] = {"pretrain": 0.0, "policies": 0.0, "shift": 0.0, "fuse": 0.0}
    for seed in cfg.seeds:
        splits = make_splits(seed, target_per_class=cfg.target_per_class)
        start = time.perf_counter()
        source_model = pretrain_source(splits, cfg, seed)
        timing["pretrain"] += time.perf_counter() - start
        out["source"].append({"seed": seed, "accuracy": accuracy(source_model, splits.source_test)})
        tick(f"seed {seed}: source model")

        start = time.perf_counter()
        reference = recalibration_batches(splits.target_test, 64)
        out["shift"].append({"seed": seed, "domain": "source", **shift_scores(source_model, reference)})
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
                # the same seed for every policy: they differ only in what they train
                torch.manual_seed(seed)
                model = apply_policy(policy, source_model, target_train, cfg.finetune, seed)
                out["finetune"].append(
                    {
                        "seed": seed,
                        "domain": domain,
                        "policy": policy,
                        "accuracy": accuracy(model, target_test),
                    }
                )
                timing["policies"] += time.perf_counter() - start
                if cfg.fuse:
                    start = time.perf_counter()
                    # latency once per seed (one model is enough: every model has the same architecture)
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


def batch_size_study(cfg: StudyConfig, tick: Tick = _no_tick) -> dict[str, Any]:
    """Train from scratch on the source domain at every batch size with every norm; held-out accuracy.

    Protocol: SGD with momentum 0.9 for ``cfg.batch_epochs`` epochs at learning rate ``cfg.batch_lr * B /
    32`` (linear scaling, as in the GroupNorm paper), the same epochs for every batch size. Ghost BatchNorm
    always steps on ``cfg.ghost_step_batch`` samples and normalises groups of ``B`` of them: it separates the
    effect of noisy normalisation statistics from that of a small gradient batch. ``batch_precise`` is the
    ``batch`` model after ``bnkit.recalibrate`` on the training images. Accuracy is on every unshifted
    image not used for training (source test plus target test images, about 800).

    Returns:
        ``{"batch_size": [rows], "timing_s": {...}}``, rows with seed, norm, batch_size, accuracy, steps.

    Example:
        >>> cfg = StudyConfig(seeds=(0,), batch_sizes=(32,), batch_norms=("group",), batch_epochs=1)
        >>> [r["norm"] for r in batch_size_study(cfg)["batch_size"]]
        ['group']
    """
    import bnkit

    rows: list[dict[str, Any]] = []
    timing: dict[str, float] = {}
    trained = [n for n in cfg.batch_norms if n != "batch_precise"]
    if "batch_precise" in cfg.batch_norms and "batch" not in trained:
        trained.insert(0, "batch")
    for seed in cfg.seeds:
        splits = make_splits(seed, target_per_class=cfg.target_per_class)
        held_out = _held_out(splits)
        n_train = len(splits.source_train)
        for norm in trained:
            for b in cfg.batch_sizes:
                start = time.perf_counter()
                step_batch = cfg.ghost_step_batch if norm == "ghost" else b
                steps = cfg.batch_epochs * (n_train // step_batch)
                kwargs: dict[str, int] = {}
                if norm == "ghost":
                    if step_batch % b:
                        raise ValueError(
                            f"ghost_step_batch={step_batch} is not a multiple of batch size {b}; "
                            "choose batch sizes that divide it"
                        )
                    kwargs["virtual_batch_size"] = b
                elif norm == "renorm":
                    # plain BN first, then ramp the clipping up: the paper's 5k/40k of ~130k steps, rescaled
                    kwargs["renorm_warmup"] = max(1, steps // 20)
                    kwargs["renorm_ramp"] = max(1, (3 * steps) // 10)
                torch.manual_seed(seed)
                model = DigitsNet(norm=norm, **kwargs)
                train(
                    model,
                    splits.source_train,
                    epochs=cfg.batch_epochs,
                    batch_size=step_batch,
                    lr=cfg.batch_lr * step_batch / 32,
                    optimizer="sgd",
                    seed=seed,
                )
                if norm in cfg.batch_norms:
                    acc = accuracy(model, held_out)
                    rows.append({"seed": seed, "norm": norm, "batch_size": b, "accuracy": acc, "steps": steps})
                if norm == "batch" and "batch_precise" in cfg.batch_norms:
                    bnkit.recalibrate(model, recalibration_batches(splits.source_train, 64), progress=False)
                    rows.append(
                        {
                            "seed": seed,
                            "norm": "batch_precise",
                            "batch_size": b,
                            "accuracy": accuracy(model, held_out),
                            "steps": steps,
                        }
                    )
                timing[norm] = timing.get(norm, 0.0) + time.perf_counter() - start
                tick(f"seed {seed}: {norm} at batch {b}")
    return {"batch_size": rows, "timing_s": timing}


def count_ticks(cfg: StudyConfig) -> int:
    """How many progress ticks a run of ``cfg`` makes (for a progress bar's total).

    Example:
        >>> count_ticks(StudyConfig(seeds=(0,), domains=("blur",), policies=("source",), batch_sizes=()))
        2
    """
    trained = [n for n in cfg.batch_norms if n != "batch_precise"]
    if "batch_precise" in cfg.batch_norms and "batch" not in trained:
        trained.append("batch")
    per_seed = 1 + len(cfg.domains) * len(cfg.policies) + len(trained) * len(cfg.batch_sizes)
    return per_seed * len(cfg.seeds)
