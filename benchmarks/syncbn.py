"""Benchmark: bnkit SyncBN vs PyTorch's SyncBatchNorm algorithm, two gloo CPU processes, ResNet-18-like training step.

Measures, in one run:

- bytes communicated by the BatchNorm layers per layer per training step (forward all_gather, counted as the
  gathered size ``world * payload``, plus backward all_reduce payload), by intercepting the collectives;
- the time of a DDP training step (forward, backward, SGD step) with bnkit ``BatchNorm(sync=True)`` (via
  ``bnkit.convert(model, "bnkit-sync")``) over the same step with PyTorch's algorithm, as the median of paired
  per-round ratios (both variants timed back to back in each round, in rotating order, so a burst of load on
  this shared machine hits both) with a bootstrap 95% interval; plain unsynchronised ``nn.BatchNorm2d`` is
  shown as the floor;
- the same step's computation alone: one process in a world of 2 on PyTorch's fake process group, whose
  collectives return at once, so the ratio is bnkit's work against PyTorch's algorithm's without the gloo
  latency that neither controls (on this 2-core machine a blocking collective costs about 0.5 ms, and the
  40 collectives per step are most of the gap between synchronised and plain BN).

``torch.nn.SyncBatchNorm`` itself refuses CPU tensors and its kernels exist only for CUDA, so the PyTorch side
is ``benchmarks/torch_syncbn_cpu.py``: its autograd function ported line by line with the same collectives
and payloads, the CUDA kernels replaced by the equivalent ATen CPU ops. Targets: bytes ratio <= 1, step-time
ratio <= 1.0.

Run: ``python benchmarks/syncbn.py`` (about a minute) or ``--full`` (more rounds, about three minutes).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnkit

HERE = Path(__file__).resolve().parent


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(width: int) -> nn.Module:
    """The shared ResNet-18-like model (benchmarks/models.py) when present, else a small local one."""
    try:
        models = _load("models")
    except (FileNotFoundError, ImportError):
        models = None
    if models is not None and hasattr(models, "resnet18_like"):
        return models.resnet18_like(nn.BatchNorm2d, num_classes=10, width=width)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    cin = 3
    for cout in (width, width, 2 * width, 2 * width):
        layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


@contextmanager
def count_bytes() -> Iterator[dict[str, int]]:
    """Count the bytes of the collectives issued from Python (BatchNorm layers; DDP's reducer is C++)."""
    counts = {"forward": 0, "backward": 0, "calls": 0}
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}

    def gather(output: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counts["forward"] += sum(t.numel() * t.element_size() for t in output)
        counts["calls"] += 1
        return originals["all_gather"](output, tensor, *args, **kwargs)

    def reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counts["backward"] += tensor.numel() * tensor.element_size()
        counts["calls"] += 1
        return originals["all_reduce"](tensor, *args, **kwargs)

    dist.all_gather, dist.all_reduce = gather, reduce
    try:
        yield counts
    finally:
        dist.all_gather, dist.all_reduce = originals["all_gather"], originals["all_reduce"]


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _variants(width: int) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The base model and its three variants: bnkit SyncBN, PyTorch's algorithm (CPU port), plain BN."""
    port_mod = _load("torch_syncbn_cpu")
    base = make_model(width)
    return base, {
        "bnkit_sync": bnkit.convert(copy.deepcopy(base), "bnkit-sync"),
        "torch_sync": port_mod.convert_to_port(copy.deepcopy(base)),
        "local_bn": copy.deepcopy(base),
    }


def _time_rounds(
    models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any], barrier: Callable[[], None]
) -> dict[str, list[float]]:
    """Per variant, the wall time of one training step in each round (and ``<name>_cpu``: its process time).

    One timed step per variant per round, in rotating order: load changes on a shared machine hit all variants
    of a round alike, so per-round ratios cancel them.
    """
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
    for _ in range(cfg["warmup"]):
        for k in models:
            _step(models[k], opts[k], x, y)
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names} | {f"{k}_cpu": [] for k in names}
    for rep in range(cfg["repeats"]):
        for k in names[rep % len(names) :] + names[: rep % len(names)]:
            barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            _step(models[k], opts[k], x, y)
            times[f"{k}_cpu"].append(time.process_time() - cpu_start)
            barrier()
            times[k].append(time.perf_counter() - start)
    return times


def _summarise(times: dict[str, list[float]], result: dict[str, Any], prefix: str = "") -> None:
    """Medians per variant and the median paired ratio bnkit/torch with a bootstrap 95% interval."""
    for k, values in times.items():
        result[f"{prefix}{k}_ms"] = 1000 * statistics.median(values)
    for suffix in ("", "_cpu"):
        ratios = [a / b for a, b in zip(times[f"bnkit_sync{suffix}"], times[f"torch_sync{suffix}"], strict=True)]
        rng = random.Random(0)
        medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
        result[f"{prefix}ratio{suffix}"] = statistics.median(ratios)
        result[f"{prefix}ratio{suffix}_ci"] = (medians[50], medians[1949])


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    base, variants = _variants(cfg["width"])
    n_bn = len(bnkit.named_batchnorms(base))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], generator=g)
    y = torch.randint(0, 10, (cfg["batch"],), generator=g)
    result: dict[str, Any] = {"bn_layers": n_bn, "world": world, **cfg}
    channels = [m.num_features for _, m in bnkit.named_batchnorms(base)]
    result["bytes_formula_torch"] = sum(world * (2 * c + 1) * 4 + 2 * c * 4 for c in channels) / n_bn
    for name in ("bnkit_sync", "torch_sync"):
        model = variants[name]
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with count_bytes() as counts:
            _step(model, opt, x, y)
        result[f"{name}_bytes_per_layer"] = (counts["forward"] + counts["backward"]) / n_bn
        result[f"{name}_collectives_per_layer"] = counts["calls"] / n_bn
    ddp = {k: nn.parallel.DistributedDataParallel(m) for k, m in variants.items()}
    _summarise(_time_rounds(ddp, x, y, cfg, dist.barrier), result)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    # DDP holds the process group: release it before tearing the group down (gloo aborts otherwise).
    ddp.clear()
    variants.clear()
    gc.collect()
    dist.destroy_process_group()


def _compute_worker(rank: int, cfg: dict[str, Any], out: str) -> None:
    """Rank 0 of a world of 2 on the fake process group: every collective returns at once."""
    torch.set_num_threads(1)
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:  # an internal module of PyTorch's test suite: absent from some builds
        Path(out).write_text(json.dumps({}))
        return
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    _, variants = _variants(cfg["width"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], generator=g)
    y = torch.randint(0, 10, (cfg["batch"],), generator=g)
    result: dict[str, Any] = {}
    _summarise(_time_rounds(variants, x, y, cfg | {"repeats": 3 * cfg["repeats"]}, lambda: None), result, "compute_")
    dist.destroy_process_group()
    Path(out).write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: dict[str, Any], world: int = 2) -> dict[str, Any]:
    """Spawn ``world`` gloo processes, then one fake-process-group process; return the measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_worker, args=(world, _free_port(), cfg, out), nprocs=world)
        result = json.loads(Path(out).read_text())
        mp.spawn(_compute_worker, args=(cfg, out), nprocs=1)
        return result | json.loads(Path(out).read_text())


#: Two sizes: "small" is bound by per-layer overhead and collective latency (activations of at most 16x16
#: pixels), "medium" has activations large enough for the normalisation kernels to count.
CONFIGS = {
    "small": {"width": 16, "batch": 8, "size": 32},
    "medium": {"width": 32, "batch": 16, "size": 64},
}


def report(r: dict[str, Any], printer: Callable[[str], None] = print) -> None:
    """Print one configuration's measurements."""

    def ratio(key: str) -> str:
        low, high = r[f"{key}_ci"]
        return f"ratio bnkit/torch {r[key]:.3f} (95% interval {low:.3f}-{high:.3f})"

    printer(
        f"[{r['name']}] ResNet-18-like (width {r['width']}), {r['bn_layers']} BN layers, 2 gloo processes, "
        f"batch {r['batch']}/rank of {r['size']}x{r['size']} images, {r['repeats']} rounds"
    )
    printer(
        f"  bytes per BN layer per step: bnkit {r['bnkit_sync_bytes_per_layer']:.0f}, "
        f"torch algorithm {r['torch_sync_bytes_per_layer']:.0f} (torch source formula "
        f"{r['bytes_formula_torch']:.0f}); "
        f"ratio {r['bnkit_sync_bytes_per_layer'] / r['torch_sync_bytes_per_layer']:.3f}; "
        f"collectives per BN layer per step: bnkit {r['bnkit_sync_collectives_per_layer']:.0f}, "
        f"torch {r['torch_sync_collectives_per_layer']:.0f}"
    )
    printer(
        f"  DDP step time (median): bnkit {r['bnkit_sync_ms']:.1f} ms, torch algorithm {r['torch_sync_ms']:.1f} ms, "
        f"unsynchronised BN {r['local_bn_ms']:.1f} ms; {ratio('ratio')}"
    )
    printer(
        f"  CPU time per step (rank 0, all threads, gloo's waiting included): bnkit {r['bnkit_sync_cpu_ms']:.1f} "
        f"ms, torch algorithm {r['torch_sync_cpu_ms']:.1f} ms; {ratio('ratio_cpu')}"
    )
    if "compute_ratio" in r:
        printer(
            f"  computation alone (fake process group, collectives free): bnkit {r['compute_bnkit_sync_ms']:.1f} "
            f"ms, torch algorithm {r['compute_torch_sync_ms']:.1f} ms, unsynchronised BN "
            f"{r['compute_local_bn_ms']:.1f} ms; {ratio('compute_ratio')}"
        )
    else:
        printer("  computation alone: skipped (torch.testing._internal.distributed.fake_pg is not available)")


def main(argv: list[str] | None = None, printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Parse arguments, run both configurations, print a summary; returns the measurements by name.

    Example:
        >>> # python benchmarks/syncbn.py --full
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="more rounds (minutes)")
    args = parser.parse_args(argv)
    rounds = {"small": 100, "medium": 40} if args.full else {"small": 30, "medium": 12}
    results: dict[str, Any] = {}
    for name, sizes in CONFIGS.items():
        r = run({**sizes, "warmup": 3, "repeats": rounds[name]})
        results[name] = r | {"name": name}
        report(results[name], printer)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
