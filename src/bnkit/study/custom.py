"""The study on the user's own model and data: the same policies, shift score and fusion check.

The user brings a pretrained model, optional labelled source-domain data (for the source accuracy and the
unshifted reference score of ``bnkit.shift``) and labelled target-domain data. For each seed the target data
is split, stratified by class, into a training part (``target_train_fraction``) and a held-out test part;
every policy adapts a copy of the model on the training part and is scored on the test part. The
batch-size experiment needs training from scratch and is not part of the custom study.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from bnkit.study.data import Dataset
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    >>> target = Dataset(torch.rand(30, 1, 8, 8), torch.arange(30) % 3)
    >>> res = run_custom_study(net, target, seeds=(0,), policies=("source", "recalibrate"), out=None,
    ...                        progress=False, fuse=False)
    >>> sorted(res["summary"]["finetune"]["target"])
    ['recalibrate', 'source']
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from bnkit.study.data import Dataset
from bnkit.study.experiments import fuse_check, shift_scores
from bnkit.study.policies import POLICIES, FinetuneSettings, apply_policy, recalibration_batches, resolve_policy
from bnkit.study.report import conclude, latency_summary, summarize, write_outputs
from bnkit.study.run import _Progress, deterministic
from bnkit.study.train import accuracy

__all__ = ["default_head", "run_custom_study", "split_target"]


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def default_head(model: nn.Module) -> str:
    """Qualified name of the model's classification head: its last ``nn.Linear`` (or last conv if none).

    Raises:
        ValueError: the model has no linear or convolution layer (pass ``head=`` explicitly).

    Example:
        >>> default_head(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
        '2'
    """
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if convs:
        return convs[-1]
    raise ValueError("could not find the model's head (no nn.Linear or convolution): pass --head NAME")


def split_target(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Stratified random split of labelled data into (train, test); ``fraction`` of each class goes to train.

    Every class keeps at least one sample on each side when it has two or more.

    Raises:
        ValueError: ``fraction`` not in (0, 1), or fewer than 2 samples.

    Example:
        >>> ds = Dataset(torch.zeros(10, 3), torch.arange(10) % 2)
        >>> [len(part) for part in split_target(ds, 0.6, seed=0)]
        [6, 4]
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"target train fraction must be between 0 and 1, got {fraction}")
    if len(data) < 2:
        raise ValueError(f"target data has {len(data)} sample(s): at least 2 are needed to split it")
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for cls in torch.unique(data.y).tolist():
        idx = torch.nonzero(data.y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(fraction * len(idx))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        train_idx.append(idx[:k])
        test_idx.append(idx[k:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return Dataset(data.x[tr], data.y[tr]), Dataset(data.x[te], data.y[te])


def run_custom_study(
    model: nn.Module,
    target: Dataset,
    source: Dataset | None = None,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    policies: Sequence[str] = tuple(POLICIES),
    finetune: FinetuneSettings | None = None,
    target_train_fraction: float = 0.5,
    target_name: str = "target",
    fuse: bool = True,
    threads: int = 1,
    out: str | os.PathLike[str] | None = "bnkit-study",
    progress: bool = True,
    console: Any = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the fine-tuning policies on the user's pretrained ``model`` and labelled ``target`` data.

    Args:
        model: the pretrained model (left untouched; every policy adapts a deep copy).
        target: labelled target-domain data (``x`` any shape the model takes, ``y`` class indices).
        source: optional labelled source-domain data: source accuracy and the unshifted ``bnkit.shift``
            reference.
        seeds: one split and training run per seed.
        policies: policy keys or numbers (see :data:`bnkit.study.policies.POLICIES`).
        finetune: settings of the gradient-based policies; an empty ``head``, or one the model does not
            have, becomes :func:`default_head`; a batch size above the adaptation split is lowered to it.
        target_train_fraction: share of each class used for adaptation; the rest is the test set.
        target_name: the domain's name in the report.
        fuse: run the fusion check (a model ``bnkit.fuse`` cannot handle is reported, not fatal).
        threads: torch threads during the run.
        out: output directory (None: write nothing).
        progress: show a progress bar (rich).
        console: a ``rich.console.Console`` for the progress bar.
        command: the command line quoted in the report.

    Returns:
        A results dict shaped like :func:`bnkit.study.run.run_study`'s (no batch-size experiment).

    Raises:
        ValueError: bad policies, fraction or data (labels not 1-D integers, mismatched lengths).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = Dataset(torch.randn(20, 4), torch.arange(20) % 2)
        >>> r = run_custom_study(net, data, seeds=(0,), policies=("5",), out=None, progress=False, fuse=False)
        >>> list(r["summary"]["finetune"]["target"])
        ['recalibrate']
    """
    import bnkit

    for name, ds in (("target", target), ("source", source)):
        if ds is None:
            continue
        if ds.y.ndim != 1 or ds.y.dtype.is_floating_point or len(ds.y) != len(ds.x):
            raise ValueError(
                f"{name} data: labels must be a 1-D integer tensor with one label per sample "
                f"(got shape {list(ds.y.shape)}, dtype {ds.y.dtype}, {len(ds.x)} samples)"
            )
    if not seeds:
        raise ValueError("give at least one seed")
    keys = tuple(dict.fromkeys(resolve_policy(p) for p in policies))
    settings = finetune or FinetuneSettings()
    if not settings.head or not _has_module(model, settings.head):
        settings = replace(settings, head=default_head(model))
    source_model = copy.deepcopy(model).eval()
    rows: dict[str, list[dict[str, Any]]] = {"source": [], "finetune": [], "shift": [], "fuse": []}
    latency: list[dict[str, Any]] = []
    fuse_errors: list[str] = []
    start = time.perf_counter()
    total = len(seeds) * (len(keys) + 1)
    with deterministic(threads), _Progress(total, progress, console) as bar:
        if source is not None:
            rows["source"].append({"seed": 0, "accuracy": accuracy(source_model, source)})
            rows["shift"].append(
                {"seed": 0, "domain": "source", **shift_scores(source_model, recalibration_batches(source, 64))}
            )
        for seed in seeds:
            train_part, test_part = split_target(target, target_train_fraction, seed)
            if len(train_part) < 2:
                raise ValueError(f"target data: only {len(train_part)} sample(s) to adapt on; give more data")
            # small target sets: one full batch per step rather than an error
            seed_settings = replace(settings, batch_size=min(settings.batch_size, len(train_part)))
            scores = shift_scores(source_model, recalibration_batches(test_part, 64))
            rows["shift"].append({"seed": seed, "domain": target_name, **scores})
            bar.advance(f"seed {seed}: shift score")
            for i, key in enumerate(keys):
                torch.manual_seed(seed)
                adapted = apply_policy(key, source_model, train_part, seed_settings, seed)
                acc = accuracy(adapted, test_part)
                rows["finetune"].append({"seed": seed, "domain": target_name, "policy": key, "accuracy": acc})
                if fuse:
                    try:
                        check = fuse_check(adapted, test_part.x, timing=(i == len(keys) - 1))
                    except Exception as exc:  # a model fuse cannot trace is a finding, not a failure
                        fuse_errors.append(f"{key} (seed {seed}): {type(exc).__name__}: {exc}".splitlines()[0])
                    else:
                        if "latency_ms" in check:
                            latency.append(check.pop("latency_ms"))
                        rows["fuse"].append({"seed": seed, "domain": target_name, "policy": key, **check})
                bar.advance(f"seed {seed}: {key}")
    summary = summarize(rows, [target_name], keys)
    if "fuse" in summary and latency:
        summary["fuse"]["latency"] = latency_summary(latency)
    conclusion = conclude(summary)
    if fuse_errors:
        conclusion.append(f"bnkit.fuse failed on {len(fuse_errors)} model(s), first: {fuse_errors[0]}")
    results: dict[str, Any] = {
        "bnkit_version": bnkit.__version__,
        "torch_version": torch.__version__,
        "command": command,
        "description": f"Your model on your data: {len(target)} labelled target samples split "
        f"{target_train_fraction:.0%} adaptation / {1 - target_train_fraction:.0%} test per seed"
        + (f", {len(source)} source samples" if source is not None else "")
        + ".",
        "config": {
            "seeds": [int(s) for s in seeds],
            "policies": list(keys),
            "finetune": dict(settings.__dict__),
            "target_train_fraction": target_train_fraction,
            "threads": threads,
        },
        "policies": {k: POLICIES[k].description for k in keys},
        "rows": rows,
        "summary": summary,
        "conclusion": conclusion,
        "fuse_errors": fuse_errors,
        "run": {"wall_s": time.perf_counter() - start, "jobs": 1, "threads": threads, "latency_ms": latency},
    }
    if out is not None:
        results["files"] = {k: str(v) for k, v in write_outputs(results, out).items()}
    return results
