"""Benchmark: ``bnkit.recalibrate(method="precise")`` over K batches vs K plain eval forward passes.

The ratio is the cost of recalibration over the floor (inference on the same batches). Target: <= 1.25.
The model is a small ResNet-style CNN with random weights (BatchNorm after every convolution, residual
additions), on CPU. Timings are the median of several repeats; on a shared machine expect +-10% noise.

Run: ``python benchmarks/recalibrate.py`` (quick, well under a minute) or ``--full`` for a larger setting.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import bnkit


class Block(nn.Module):
    """A basic residual block: conv-BN-ReLU-conv-BN plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def make_model(width: int) -> nn.Module:
    """A ResNet-style network for 32x32 inputs: stem, 4 stages of 2 blocks, pooling and a linear head."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        layers += [Block(cin, cout, 1 if stage == 0 else 2), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def _time(fns: list, repeats: int) -> list[float]:
    """Median seconds of each function; runs are interleaved so background load hits all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


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

    t_eval, t_precise, t_seq = _time([eval_passes, precise, sequential_first_two], repeats)
    layers = len(bnkit.named_batchnorms(model))
    print(
        f"model: ResNet-style, width {width}, {layers} BatchNorm2d layers; {k} batches of {batch}x3x32x32; CPU, "
        f"{args.threads} thread(s); median of {repeats}"
    )
    print(f"{k} eval forwards:            {t_eval * 1e3:8.1f} ms")
    print(f"recalibrate(precise):        {t_precise * 1e3:8.1f} ms   ratio {t_precise / t_eval:.3f} (target <= 1.25)")
    print(f"sequential, 2 early layers:  {t_seq * 1e3:8.1f} ms   ratio {t_seq / t_eval:.3f} (early stop per pass)")


if __name__ == "__main__":
    main()
