"""bnkit.BatchNorm vs torch.nn.BatchNorm2d on the default path: time ratios measured in one run.

Training forward+backward and eval forward on [32, 64, 56, 56] float32, contiguous and channels_last.
Repetitions of the two layers are interleaved and the median of each is compared, so machine noise hits both.
By default torch runs on one thread and the clock is that thread's CPU time, which other processes on a shared
machine barely disturb; ``--wall --threads N`` measures wall-clock time on N threads instead.
Target (issue 2): every ratio <= 1.05.

    python benchmarks/layer.py [--repeats 15] [--shape 32 64 56 56] [--wall] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from bnkit import BatchNorm

CLOCK = time.thread_time


def _timer(fn: Callable[[], None]) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def measure(shape: tuple[int, ...], memory_format: torch.memory_format, repeats: int) -> dict[str, float]:
    """Median seconds of each (layer, mode) pair, interleaved in alternating order."""
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    grad = torch.randn(shape).contiguous(memory_format=memory_format)
    layers = {"torch": nn.BatchNorm2d(shape[1]), "bnkit": BatchNorm(shape[1])}
    inputs = {name: x.clone().requires_grad_() for name in layers}

    def train_step(name: str) -> Callable[[], None]:
        def run() -> None:
            layers[name].train()
            layers[name](inputs[name]).backward(grad)

        return run

    def eval_step(name: str) -> Callable[[], None]:
        def run() -> None:
            layers[name].eval()
            with torch.no_grad():
                layers[name](x)

        return run

    times: dict[str, list[float]] = {f"{mode}/{name}": [] for mode in ("train", "eval") for name in layers}
    for _ in range(2):  # warm-up
        for name in layers:
            train_step(name)()
            eval_step(name)()
    for repeat in range(repeats):
        # Alternate which layer goes first: allocator and cache state favour one position.
        order = list(layers) if repeat % 2 == 0 else list(reversed(layers))
        for name in order:
            times[f"train/{name}"].append(_timer(train_step(name)))
        for name in order:
            times[f"eval/{name}"].append(_timer(eval_step(name)))
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="wall-clock time instead of thread CPU time")
    args = parser.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    elif args.threads != 1:
        parser.error("thread CPU time needs --threads 1; add --wall to time several threads")
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    clock = "wall-clock" if args.wall else "thread CPU time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock}, shape {list(shape)}, float32")
    print(f"{'layout':<16}{'mode':<16}{'torch ms':>10}{'bnkit ms':>10}{'ratio':>8}")
    worst = 0.0
    for label, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        result = measure(shape, fmt, args.repeats)
        for mode, title in (("train", "train fwd+bwd"), ("eval", "eval fwd")):
            ref, ours = result[f"{mode}/torch"], result[f"{mode}/bnkit"]
            ratio = ours / ref
            worst = max(worst, ratio)
            print(f"{label:<16}{title:<16}{ref * 1e3:>10.2f}{ours * 1e3:>10.2f}{ratio:>8.3f}")
    print(f"worst ratio {worst:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
