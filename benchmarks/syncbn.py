"""Benchmark: bnkit SyncBN vs PyTorch's SyncBatchNorm algorithm, two gloo CPU processes, ResNet-18-like training step.

Measures, in one run:

- bytes communicated by the BatchNorm layers per layer per training step (forward all_gather, counted as the
  gathered size ``world * payload``, plus backward all_reduce payload), by intercepting the collectives;
- the time of a DDP training step (forward, backward, SGD step) with bnkit ``BatchNorm(sync=True)`` (via
  ``bnkit.convert(model, "bnkit-sync")``) over the same step with PyTorch's algorithm; plain unsynchronised
  ``nn.BatchNorm2d`` is shown as the floor.

``torch.nn.SyncBatchNorm`` itself refuses CPU tensors and its kernels exist only for CUDA, so the PyTorch side
is ``benchmarks/torch_syncbn_cpu.py``: its autograd function ported line by line with the same collectives
and payloads, the CUDA kernels replaced by the equivalent ATen CPU ops. Targets: bytes ratio <= 1, step-time
ratio <= 1.0. Timings are medians over rounds of one step per variant in rotating order; on a shared 2-core
machine expect +-10% noise.

Run: ``python benchmarks/syncbn.py`` (quick, about 30 s) or ``--full`` (wider model, more repeats).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import json
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


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    port_mod = _load("torch_syncbn_cpu")
    base = make_model(cfg["width"])
    variants: dict[str, nn.Module] = {
        "bnkit_sync": bnkit.convert(copy.deepcopy(base), "bnkit-sync"),
        "torch_sync": port_mod.convert_to_port(copy.deepcopy(base)),
        "local_bn": copy.deepcopy(base),
    }
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
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in ddp.items()}
    times: dict[str, list[float]] = {k: [] for k in ddp}
    cpu: dict[str, list[float]] = {k: [] for k in ddp}
    for _ in range(cfg["warmup"]):
        for k in ddp:
            _step(ddp[k], opts[k], x, y)
    # One timed step per variant per round, in rotating order: load changes on a shared machine hit all
    # variants alike, and the median over rounds discards the rounds that a burst of load spoiled.
    names = list(ddp)
    for rep in range(cfg["repeats"]):
        for k in names[rep % len(names) :] + names[: rep % len(names)]:
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            _step(ddp[k], opts[k], x, y)
            cpu[k].append(time.process_time() - cpu_start)
            dist.barrier()
            times[k].append(time.perf_counter() - start)
    for k, values in times.items():
        result[f"{k}_step_ms"] = 1000 * statistics.median(values)
        result[f"{k}_cpu_ms"] = 1000 * statistics.median(cpu[k])
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    # DDP holds the process group: release it before tearing the group down (gloo aborts otherwise).
    ddp.clear()
    variants.clear()
    opts.clear()
    gc.collect()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: dict[str, Any], world: int = 2) -> dict[str, Any]:
    """Spawn ``world`` gloo processes, run the benchmark, return rank 0's measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_worker, args=(world, _free_port(), cfg, out), nprocs=world)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None, printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Parse arguments, run, print a summary; returns the measurements.

    Example:
        >>> # python benchmarks/syncbn.py --full
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="wider model and more repeats (minutes)")
    args = parser.parse_args(argv)
    if args.full:
        cfg = {"width": 32, "batch": 16, "size": 32, "warmup": 2, "repeats": 40}
    else:
        cfg = {"width": 16, "batch": 8, "size": 32, "warmup": 2, "repeats": 15}
    r = run(cfg)
    printer(
        f"ResNet-18-like (width {r['width']}), {r['bn_layers']} BN layers, 2 gloo processes, "
        f"batch {r['batch']}/rank"
    )
    printer(
        f"bytes per BN layer per step: bnkit {r['bnkit_sync_bytes_per_layer']:.0f}, "
        f"torch algorithm {r['torch_sync_bytes_per_layer']:.0f} (torch source formula "
        f"{r['bytes_formula_torch']:.0f}); "
        f"ratio {r['bnkit_sync_bytes_per_layer'] / r['torch_sync_bytes_per_layer']:.3f}"
    )
    printer(
        f"collectives per BN layer per step: bnkit {r['bnkit_sync_collectives_per_layer']:.0f}, "
        f"torch {r['torch_sync_collectives_per_layer']:.0f}"
    )
    printer(
        f"DDP step time: bnkit {r['bnkit_sync_step_ms']:.1f} ms, torch algorithm {r['torch_sync_step_ms']:.1f} ms, "
        f"unsynchronised BN {r['local_bn_step_ms']:.1f} ms; ratio bnkit/torch "
        f"{r['bnkit_sync_step_ms'] / r['torch_sync_step_ms']:.3f}"
    )
    printer(
        f"CPU time per step (rank 0, all threads; robust to waiting on a loaded machine): bnkit "
        f"{r['bnkit_sync_cpu_ms']:.1f} ms, torch algorithm {r['torch_sync_cpu_ms']:.1f} ms, unsynchronised BN "
        f"{r['local_bn_cpu_ms']:.1f} ms; ratio bnkit/torch {r['bnkit_sync_cpu_ms'] / r['torch_sync_cpu_ms']:.3f}"
    )
    return r


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
