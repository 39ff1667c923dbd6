"""Benchmark BatchNorm folding on a ResNet-18-like network (CPU, eval, random weights).

Variants, timed interleaved in one run (each repetition times every variant once, in rotating order), medians:

- ``unfused``: the model with its BatchNorm layers;
- ``bnkit``: ``bnkit.fuse(model)``;
- ``no-BN``: the same network built without any norm layer (convs with bias): the physical limit of folding;
- ``fx.fuse``: ``torch.fx.experimental.optimization.fuse``;
- ``jit.freeze``: ``torch.jit.freeze(torch.jit.script(model))`` (folds conv+BN and removes Python overhead).

Targets: bnkit / no-BN <= 1.03, bnkit <= fx.fuse and bnkit <= jit.freeze. Timings on a shared machine are
noisy; read the ratios of one run together.

Usage: ``python benchmarks/fuse.py [--quick] [--size 224] [--threads 1]``

Example:
    $ python benchmarks/fuse.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

try:
    from benchmarks.models import resnet18_like, resnet18_like_no_bn
except ImportError:  # run as a script from inside benchmarks/
    from models import resnet18_like, resnet18_like_no_bn

import bnkit


def _variants(size: int) -> dict[str, nn.Module | Callable[..., torch.Tensor]]:
    model = resnet18_like().eval()
    example = torch.randn(2, 3, size, size)
    variants: dict[str, nn.Module | Callable[..., torch.Tensor]] = {
        "unfused": model,
        "bnkit": bnkit.fuse(model, example),
        "no-BN": resnet18_like_no_bn().eval(),
    }
    from torch.fx.experimental.optimization import fuse as fx_fuse

    variants["fx.fuse"] = fx_fuse(model)
    variants["jit.freeze"] = torch.jit.freeze(torch.jit.script(resnet18_like().eval()))
    with torch.no_grad():
        reference = model(example)
        for name in ("bnkit", "fx.fuse", "jit.freeze"):
            error = (variants[name](example) - reference).abs().max() / reference.abs().max()
            if error > 1e-4:
                raise SystemExit(f"{name} output differs from the unfused model by {float(error):.2e} (relative)")
    return variants


def _time(variants: dict[str, Callable[..., torch.Tensor]], x: torch.Tensor, reps: int) -> dict[str, float]:
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:  # warm-up: allocator, oneDNN primitives, TorchScript profiling runs
            for _ in range(3):
                variants[name](x)
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                start = time.perf_counter()
                variants[name](x)
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print medians and ratios.

    Example:
        >>> main(["--quick", "--size", "64"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 10], help="batch sizes (default 1 10)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = _variants(args.size)
    print(
        f"ResNet-18-like, {args.size}x{args.size}, CPU, eval, fp32, {args.threads} thread(s), torch {torch.__version__}"
    )
    for batch in args.batches:
        reps = (3 if args.quick else 15) if batch == 1 else (2 if args.quick else 6)
        x = torch.randn(batch, 3, args.size, args.size)
        medians = _time(variants, x, reps)
        print(f"\nbatch {batch} ({reps} interleaved repetitions, median ms)")
        for name, seconds in medians.items():
            print(f"  {name:<11} {seconds * 1e3:9.2f}")
        ours = medians["bnkit"]
        print(f"  unfused / bnkit       {medians['unfused'] / ours:6.3f}  (speed-up from folding)")
        print(f"  bnkit / no-BN         {ours / medians['no-BN']:6.3f}  (target <= 1.03)")
        print(f"  bnkit / fx.fuse       {ours / medians['fx.fuse']:6.3f}  (target <= 1)")
        print(f"  bnkit / jit.freeze    {ours / medians['jit.freeze']:6.3f}  (target <= 1)")


if __name__ == "__main__":
    main()
