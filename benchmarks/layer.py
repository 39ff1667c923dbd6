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


def measure(shape: tuple[int, ...], memory_format: torch.memory_format, repeats: int) -> dict[str, tuple[float, float]]:
    """(min, median) seconds of each (layer, mode) pair, interleaved in alternating order."""
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    grad = torch.randn(shape).contiguous(memory_format=memory_format)
    layers = {"torch": nn.BatchNorm2d(shape[1]), "bnkit": BatchNorm(shape[1])}
    inputs = {name: x.clone().requires_grad_() for name in layers}

    def train_step(name: str) -> Callable[[], None]:
        def run() -> None:
            layers[name].train()
            layers[name](inputs[name]).backward(grad)

        return run

    def clear_grads(name: str) -> None:
        # Every step allocates fresh gradients instead of accumulating into old ones, the same for both layers.
        inputs[name].grad = None
        layers[name].zero_grad(set_to_none=True)

    def eval_step(name: str) -> Callable[[], None]:
        def run() -> None:
            layers[name].eval()
            with torch.no_grad():
                layers[name](x)

        return run

    times: dict[str, list[float]] = {f"{mode}/{name}": [] for mode in ("train", "eval") for name in layers}
    for _ in range(2):  # warm-up
        for name in layers:
            clear_grads(name)
            train_step(name)()
            eval_step(name)()
    for mode, step in (("train", train_step), ("eval", eval_step)):
        for repeat in range(repeats):
            # Alternate which layer goes first: allocator and cache state favour one position.
            order = list(layers) if repeat % 2 == 0 else list(reversed(layers))
            for name in order:
                clear_grads(name)
                times[f"{mode}/{name}"].append(_timer(step(name)))
    # The minimum is the least disturbed run (interference only adds time); the median is shown beside it.
    return {key: (min(values), statistics.median(values)) for key, values in times.items()}


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
    print("times in ms as min / median; ratio = bnkit / torch of the minima (median ratio in brackets)")
    print(f"{'layout':<15}{'mode':<15}{'torch':>15}{'bnkit':>15}{'ratio':>16}")
    worst = 0.0
    for label, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        result = measure(shape, fmt, args.repeats)
        for mode, title in (("train", "train fwd+bwd"), ("eval", "eval fwd")):
            (ref, ref_med), (ours, ours_med) = result[f"{mode}/torch"], result[f"{mode}/bnkit"]
            ratio = ours / ref
            worst = max(worst, ratio)
            cells = f"{ref * 1e3:>7.2f} /{ref_med * 1e3:>6.2f}{ours * 1e3:>8.2f} /{ours_med * 1e3:>6.2f}"
            print(f"{label:<15}{title:<15}{cells}{ratio:>9.3f} ({ours_med / ref_med:.3f})")
    print(f"worst ratio {worst:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
