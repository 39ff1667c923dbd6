"""Overhead of bnkit.Monitor on a ResNet-18-like training step (CPU, batch 32).

Variants, timed interleaved in one run (each repetition runs a chunk of ``--chunk`` training steps of every
variant, in rotating order), per-step medians over the repetitions:

- ``plain``: forward, cross-entropy, backward, SGD step, nothing else;
- ``every=1``: the same with a Monitor recording every step (JSONL + TensorBoard scalars, histograms every
  10 steps, ``monitor.step()`` after each optimizer step);
- ``every=10``: recording every 10th step;
- ``every=1 JSONL only``: every step, ``tensorboard=False`` (what TensorBoard serialisation costs).

All three use the same model (so they see the same weights as training proceeds). Targets:
every=1 / plain <= 1.10 and every=10 / plain <= 1.03. The default input is 32x32 (``--size 224`` for the
real ImageNet shape: about 50x slower); ResNet-18's 20 BatchNorm layers see [32, 64, 8, 8] down to
[32, 512, 1, 1] at 32x32. Timings on a shared machine are noisy: read the ratios of one run together.

Usage: ``python benchmarks/monitor.py [--quick] [--size 32] [--reps 7] [--chunk 10] [--threads 1]``

Example:
    $ python benchmarks/monitor.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

try:
    from benchmarks.models import resnet18_like
except ImportError:  # run as a script from inside benchmarks/
    from models import resnet18_like

from bnkit.monitor import Monitor


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print per-step medians and ratios; returns the ratios.

    Example:
        >>> main(["--reps", "1", "--chunk", "1", "--size", "16"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about 20 s)")
    parser.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 9, 5 with --quick)")
    parser.add_argument("--chunk", type=int, default=10, help="training steps per variant per repetition")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    reps = args.reps if args.reps is not None else (5 if args.quick else 9)
    torch.set_num_threads(args.threads)

    model = resnet18_like(num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    with tempfile.TemporaryDirectory() as tmp:
        monitors: dict[str, Monitor | None] = {
            "plain": None,
            "every=1": Monitor(model, log_dir=f"{tmp}/every1", every=1, warn=False),
            "every=10": Monitor(model, log_dir=f"{tmp}/every10", every=10, warn=False),
            "every=1 JSONL only": Monitor(model, log_dir=f"{tmp}/jsonl", every=1, warn=False, tensorboard=False),
        }
        names = list(monitors)
        for _ in range(3):  # warm-up: allocator, first TensorBoard writes
            for name in names:
                _run_chunk(model, opt, x, y, monitors[name], 2)
        times: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                wall, used = _run_chunk(model, opt, x, y, monitors[name], args.chunk)
                times[name].append(wall / args.chunk)
                cpu[name].append(used / args.chunk)
        records = {name: len(m.last) for name, m in monitors.items() if m is not None}
        for monitor in monitors.values():
            if monitor is not None:
                monitor.close()

    def ratio(samples: dict[str, list[float]], name: str, stat) -> float:
        return stat(samples[name]) / stat(samples["plain"])

    ratios = {name: ratio(times, name, statistics.median) for name in names if name != "plain"}
    print(
        f"ResNet-18-like training step, batch {args.batch}, input {args.size}x{args.size}, "
        f"{torch.get_num_threads()} thread(s), {reps} reps x {args.chunk} steps per variant, interleaved"
    )
    print("  ratios to plain: wall median (the target), wall min, process CPU-time median")
    for name in names:
        line = (
            f"  {name:18s} {statistics.median(times[name]) * 1e3:8.2f} ms/step (min {min(times[name]) * 1e3:.2f}, "
            f"CPU {statistics.median(cpu[name]) * 1e3:.2f})"
        )
        if name != "plain":
            target = 1.03 if name == "every=10" else 1.10
            verdict = "ok" if ratios[name] <= target else "ABOVE TARGET"
            line += (
                f"  ratio {ratios[name]:.3f} (target <= {target:.2f}: {verdict}), "
                f"min {ratio(times, name, min):.3f}, CPU {ratio(cpu, name, statistics.median):.3f}"
            )
        print(line)
    print(f"  layers recorded: {records}")
    return ratios


def _run_chunk(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    monitor: Monitor | None,
    steps: int,
) -> tuple[float, float]:
    """Wall and process CPU seconds for ``steps`` training steps, attach/detach and the final flush included."""
    start, cpu = time.perf_counter(), time.process_time()
    if monitor is not None:
        monitor.attach()
    for _ in range(steps):
        _train_step(model, opt, x, y)
        if monitor is not None:
            monitor.step()
    if monitor is not None:
        monitor.detach()
    return time.perf_counter() - start, time.process_time() - cpu


if __name__ == "__main__":
    main()
