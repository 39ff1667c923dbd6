"""Orchestration of ``bnkit study``: validate, run the experiments (in parallel worker processes), report.

The work is cut into independent tasks: one per seed for the fine-tuning experiment and one per (seed, norm)
for the batch-size experiment. Each task seeds itself, uses ``StudyConfig.threads`` threads and deterministic
algorithms, so the numbers do not depend on how many workers run them or in which order they finish; results
are sorted back into a fixed order before they are aggregated.

Example:
    >>> from bnkit.study.experiments import StudyConfig
    >>> cfg = StudyConfig(seeds=(0,), domains=("contrast",), policies=("source", "recalibrate"),
    ...                   source_epochs=1, batch_sizes=(), fuse=False)
    >>> results = run_study(cfg, out=None, progress=False, jobs=1)
    >>> sorted(results["summary"]["finetune"]["contrast"])
    ['recalibrate', 'source']
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_module
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import torch

from bnkit.study.catalog import check_design
from bnkit.study.experiments import (
    BATCH_NORMS,
    StudyConfig,
    batch_size_seed,
    count_ticks,
    finetune_seed,
    trained_batch_norms,
)
from bnkit.study.policies import POLICIES
from bnkit.study.report import conclude, latency_summary, summarize, write_outputs

__all__ = ["deterministic", "run_study", "validate_config"]

BATCH_PROTOCOL = (
    "Each model is trained from scratch on the source training split with the pre-training recipe (Adam) for "
    "the same number of epochs at every batch size. Ghost BatchNorm steps on {ghost} samples and normalises "
    "groups of the given size (it isolates noisy statistics from a small gradient batch). BatchNorm + precise "
    "statistics is the BatchNorm model after bnkit.recalibrate on its training images. Accuracy on about 800 "
    "unshifted held-out images."
)


QUICK_NOTE = (
    "Quick run: fewer epochs and batch sizes than the default run. Small batches take more steps per epoch, "
    "so the large-batch runs of the batch-size experiment are the least trained; run `bnkit study` for the "
    "full numbers."
)


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Run the body with ``threads`` intra-op threads and deterministic algorithms; restore both afterwards.

    Example:
        >>> with deterministic(1):
        ...     torch.get_num_threads()
        1
    """
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def validate_config(cfg: StudyConfig) -> StudyConfig:
    """Check names and sizes in ``cfg``; policies given by number become keys.

    Raises:
        ValueError: empty seeds, unknown domain, policy or norm, or a non-positive size.

    Example:
        >>> validate_config(StudyConfig(policies=("5",))).policies
        ('recalibrate',)
    """
    from dataclasses import replace

    sizes = {
        "source_epochs": cfg.source_epochs,
        "batch_epochs": cfg.batch_epochs,
        "threads": cfg.threads,
        "target_per_class": cfg.target_per_class,
        "finetune.epochs": cfg.finetune.epochs,
        "finetune.batch_size": cfg.finetune.batch_size,
    }
    policies = check_design(cfg.seeds, cfg.domains, cfg.policies, sizes)
    norms = [n for n in cfg.batch_norms if n not in BATCH_NORMS]
    if norms:
        raise ValueError(f"bnkit study: unknown norm(s) {', '.join(norms)}; choose from {', '.join(BATCH_NORMS)}")
    bad_sizes = [b for b in cfg.batch_sizes if b < 2]
    if bad_sizes:
        raise ValueError(f"bnkit study: batch sizes must be >= 2 (BatchNorm needs 2 samples), got {bad_sizes}")
    if "ghost" in cfg.batch_norms:
        bad = [b for b in cfg.batch_sizes if cfg.ghost_step_batch % b]
        if bad:
            raise ValueError(f"bnkit study: ghost batches need batch sizes dividing {cfg.ghost_step_batch}; got {bad}")
    return replace(cfg, policies=policies, seeds=tuple(int(s) for s in cfg.seeds))


def _tasks(cfg: StudyConfig) -> list[tuple[Any, ...]]:
    tasks: list[tuple[Any, ...]] = []
    if cfg.domains and cfg.policies:
        tasks += [("finetune", seed) for seed in cfg.seeds]
    if cfg.batch_sizes and cfg.batch_norms:
        # the slowest norms first so two workers finish together
        order = sorted(
            trained_batch_norms(cfg),
            key=lambda n: (
                ["renorm", "ghost", "batch", "group"].index(n) if n in ("renorm", "ghost", "batch", "group") else 9
            ),
        )
        tasks += [("batch", seed, norm) for norm in order for seed in cfg.seeds]
    return tasks


_TICKS: Any = None


def _init_worker(ticks: Any) -> None:
    global _TICKS
    _TICKS = ticks


def _worker_tick(label: str) -> None:
    if _TICKS is not None:
        _TICKS.put(label)


def _run_task(cfg: StudyConfig, task: tuple[Any, ...], tick: Callable[[str], None] | None = None) -> dict[str, Any]:
    tick = tick or _worker_tick
    with deterministic(cfg.threads):
        if task[0] == "finetune":
            return finetune_seed(cfg, task[1], tick)
        return batch_size_seed(cfg, task[1], task[2], tick)


def _default_jobs(n_tasks: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_tasks, cpus))


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)  # stdout stays clean for --json and pipes


class _Progress:
    """A rich progress bar when rich is installed and enabled; otherwise nothing."""

    def __init__(self, total: int, enabled: bool, console: Any = None) -> None:
        self._bar: Any = None
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self._bar = Progress(
            TextColumn("[bold]bnkit study"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console if console is not None else _stderr_console(),
            transient=False,
        )
        self._task = self._bar.add_task("starting", total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, label: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=label)


def _can_fork() -> bool:
    # fork, as torch's DataLoader workers do (each task then runs single-threaded); spawn and forkserver would
    # re-import the caller's __main__, which breaks `python -m bnkit` and scripts without a main guard
    if not (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()):
        return False
    return _autograd_survives_fork()


def _autograd_survives_fork() -> bool:
    """False when this process already started autograd's worker threads (a torch.compile'd backward does), after
    which a forked child cannot run backward ("Unable to handle autograd's threading in combination with
    fork-based multiprocessing"); a tiny forked probe (milliseconds) tells."""
    pid = os.fork()
    if pid == 0:  # the child: one backward, then leave without running any cleanup of the parent's state
        try:
            x = torch.ones(1, requires_grad=True)
            (x * 2).sum().backward()
            code = 0
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _execute(cfg: StudyConfig, tasks: list[tuple[Any, ...]], jobs: int, bar: _Progress) -> list[dict[str, Any]]:
    if jobs <= 1 or len(tasks) <= 1 or not _can_fork():
        return [_run_task(cfg, task, bar.advance) for task in tasks]
    ctx = multiprocessing.get_context("fork")
    ticks = ctx.Queue()
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(ticks,)) as pool:
        futures: dict[Future, int] = {pool.submit(_run_task, cfg, task): i for i, task in enumerate(tasks)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(ticks, bar)
                for fut in done:
                    results[futures[fut]] = fut.result()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        _drain(ticks, bar)
    return [r for r in results if r is not None]


def _drain(ticks: Any, bar: _Progress) -> None:
    while True:
        try:
            label = ticks.get_nowait()
        except queue_module.Empty:
            return
        bar.advance(label)


def _merge(cfg: StudyConfig, parts: list[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]], dict]:
    rows: dict[str, list[dict[str, Any]]] = {"source": [], "finetune": [], "shift": [], "fuse": [], "batch_size": []}
    timing: dict[str, float] = {}
    latency: list[dict[str, Any]] = []
    for part in parts:
        for key in rows:
            for row in part.get(key, []):
                row = dict(row)
                if "latency_ms" in row:
                    latency.append(row.pop("latency_ms"))
                rows[key].append(row)
        for k, v in part.get("timing_s", {}).items():
            timing[k] = timing.get(k, 0.0) + v
    domain_order = ["source", *cfg.domains]
    norm_order = list(BATCH_NORMS)

    def key(row: dict[str, Any]) -> tuple:
        return (
            row["seed"],
            domain_order.index(row["domain"]) if "domain" in row else -1,
            cfg.policies.index(row["policy"]) if "policy" in row else -1,
            norm_order.index(row["norm"]) if "norm" in row else -1,
            row.get("batch_size", 0),
        )

    for key_name in rows:
        rows[key_name].sort(key=key)
    return rows, {"cpu_s": timing, "latency_ms": latency}


def run_study(
    config: StudyConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = "bnkit-study",
    jobs: int | None = None,
    progress: bool = True,
    console: Any = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the study (default configuration when ``config`` is None) and write its report.

    Args:
        config: what to run; :meth:`StudyConfig.quick_config` for the ``--quick`` run.
        out: output directory for ``results.json``, ``report.md`` and the PNG plots; None writes nothing.
        jobs: worker processes (default: one per CPU core, at most one per task); 1 runs in this process.
            Workers are forked (Linux); elsewhere the study runs in this process.
        progress: show a rich progress bar (when rich is installed).
        console: a ``rich.console.Console`` for the progress bar.
        command: the command line to quote in the report.

    Returns:
        The results dict (also ``results.json``): ``config``, ``rows`` (per-seed raw results), ``summary``,
        ``conclusion`` (list of sentences), ``run`` (timings; the only part that is not reproducible) and,
        when written, ``files``.

    Raises:
        ValueError: an invalid configuration.

    Example:
        >>> cfg = StudyConfig(seeds=(0,), domains=("invert",), policies=("source",), source_epochs=1,
        ...                   batch_sizes=(), fuse=False)
        >>> run_study(cfg, out=None, progress=False)["summary"]["winners"]["invert"]["best"]
        'source'
    """
    import bnkit

    cfg = validate_config(config if config is not None else StudyConfig())
    tasks = _tasks(cfg)
    jobs = _default_jobs(len(tasks)) if jobs is None else max(1, int(jobs))
    if not _can_fork():
        jobs = 1
    start = time.perf_counter()
    with _Progress(count_ticks(cfg), progress, console) as bar:
        parts = _execute(cfg, tasks, jobs, bar)
    wall = time.perf_counter() - start
    rows, timing = _merge(cfg, parts)
    summary = summarize(rows, cfg.domains, cfg.policies)
    if "fuse" in summary and timing["latency_ms"]:
        summary["fuse"]["latency"] = latency_summary(timing["latency_ms"])
    titles = {k: v for k, v in BATCH_NORMS.items() if k in cfg.batch_norms}
    conclusion = conclude(summary, titles)
    if cfg.quick:
        conclusion.insert(0, QUICK_NOTE)
    results: dict[str, Any] = {
        "bnkit_version": bnkit.__version__,
        "torch_version": torch.__version__,
        "command": command,
        "description": "Bundled digits (scikit-learn load_digits, 8x8) with synthetic domain shifts "
        "(see bnkit.study.data); a 3-conv BatchNorm network pre-trained on the source domain.",
        "config": cfg.to_dict(),
        "policies": {k: POLICIES[k].description for k in cfg.policies},
        "batch_norm_titles": titles,
        "batch_protocol": BATCH_PROTOCOL.format(ghost=cfg.ghost_step_batch) if rows["batch_size"] else None,
        "rows": rows,
        "summary": summary,
        "conclusion": conclusion,
        "run": {"wall_s": wall, "jobs": jobs, "threads": cfg.threads, "python": sys.version.split()[0], **timing},
    }
    if out is not None:
        results["files"] = {k: str(v) for k, v in write_outputs(results, out).items()}
    return results
