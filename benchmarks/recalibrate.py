"""Benchmark: ``bnkit.recalibrate(method="precise")`` over K batches vs K plain eval forward passes.

The ratio is the cost of recalibration over the floor (inference on the same batches). Target: <= 1.25.
The model is a small ResNet-style CNN with random weights (BatchNorm after every convolution, residual
additions), on CPU with one thread. Both wall-clock and process CPU time are reported (medians of interleaved
repeats); on a loaded, shared machine the CPU-time ratio is the steadier of the two.

Run: ``python benchmarks/recalibrate.py`` (quick, well under a minute) or ``--full`` for a larger setting.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

try:
    from benchmarks.models import BasicBlock
except ImportError:  # run as a script from inside benchmarks/
    from models import BasicBlock

import bnkit


def make_model(width: int) -> nn.Module:
    """A ResNet-style network for 32x32 inputs: stem, 4 stages of 2 basic blocks, pooling and a linear head."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        layers += [
            BasicBlock(cin, cout, 1 if stage == 0 else 2, nn.BatchNorm2d),
            BasicBlock(cout, cout, 1, nn.BatchNorm2d),
        ]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def _time(fns: list, repeats: int) -> tuple[list[float], list[float]]:
    """Median wall and CPU seconds of each function; runs are interleaved so background load hits all alike."""
    for fn in fns:
        fn()  # warm-up
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[index].append(time.perf_counter() - start)
            cpu[index].append(time.process_time() - start_cpu)
    return [statistics.median(b) for b in wall], [statistics.median(b) for b in cpu]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="larger model and more batches (slower)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1 for stable timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    width, batch, k, repeats = (32, 64, 16, 7) if args.full else (16, 32, 8, 7)
    model = make_model(width)
    data = [torch.randn(batch, 3, 32, 32) for _ in range(k)]
    model.eval()

    def eval_passes() -> None:
        with torch.no_grad():
            for x in data:
                model(x)

    def precise() -> None:
        bnkit.recalibrate(model, data, method="precise", progress=False)

    def sequential_first_two() -> None:
        bnkit.recalibrate(model, data, method="precise", progress=False, layers=["1", "3.bn1"], sequential=True)

    wall, cpu = _time([eval_passes, precise, sequential_first_two], repeats)
    layers = len(bnkit.named_batchnorms(model))
    print(
        f"model: ResNet-style, width {width}, {layers} BatchNorm2d layers; {k} batches of {batch}x3x32x32; CPU, "
        f"{args.threads} thread(s); median of {repeats}"
    )
    print(f"{'':32s}{'wall ms':>10s}{'ratio':>8s}{'cpu ms':>10s}{'ratio':>8s}")
    rows = [(f"{k} eval forwards", 0), ("recalibrate(precise)", 1), ("sequential, 2 early layers", 2)]
    for label, i in rows:
        print(f"{label:32s}{wall[i] * 1e3:10.1f}{wall[i] / wall[0]:8.3f}{cpu[i] * 1e3:10.1f}{cpu[i] / cpu[0]:8.3f}")
    print("target: recalibrate(precise) / eval forwards <= 1.25")


if __name__ == "__main__":
    main()
