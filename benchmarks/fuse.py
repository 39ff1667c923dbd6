"""Benchmark BatchNorm folding (CPU, eval, random weights) on a ResNet-18-like network and on timm's
efficientnet_b0 and mobilenetv3_large_100, whose BatchNorms are ``BatchNormAct2d`` (BatchNorm + activation).

Variants, timed interleaved in one run (each repetition times every variant once, in rotating order), medians.
ResNet-18-like:

- ``unfused``: the model with its BatchNorm layers;
- ``bnkit``: ``bnkit.fuse(model)``;
- ``no-BN``: the same network built without any norm layer (convs with bias): the physical limit of folding;
- ``fx.fuse``: ``torch.fx.experimental.optimization.fuse``;
- ``jit.freeze``: ``torch.jit.freeze(torch.jit.script(model))`` (folds conv+BN and removes Python overhead);
- ``jit(bnkit)``: ``torch.jit.freeze`` applied to the bnkit-fused model (the two compose).

timm models (``--models efficientnet_b0 mobilenetv3_large_100``):

- ``unfused``: the timm model with its ``BatchNormAct2d`` layers;
- ``bnkit``: ``bnkit.fuse(model)`` (each BatchNormAct folded into its conv and replaced by its activation);
- ``no-BN``: the same network with the BatchNorm removed: each ``BatchNormAct2d`` replaced by its activation
  only, and every conv given a bias (what a fully folded network computes: the physical limit of folding).

Targets: bnkit / no-BN <= 1.03 (every model), bnkit <= fx.fuse and bnkit <= jit.freeze (ResNet-18-like).
Timings on a shared machine are noisy: by default one torch thread is used and each forward is timed with
the CPU time of the calling thread (``time.thread_time``), which does not count the time the process waits for
a core; ``--clock wall`` times wall-clock instead. Read the ratios of one run together.

Usage: ``python benchmarks/fuse.py [--quick] [--size 224] [--threads 1] [--clock thread|wall]
[--models resnet18_like efficientnet_b0 mobilenetv3_large_100]``

Example:
    $ python benchmarks/fuse.py --quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

try:
    from benchmarks.models import randomize_batchnorm_, resnet18_like, resnet18_like_no_bn
except ImportError:  # run as a script from inside benchmarks/
    from models import randomize_batchnorm_, resnet18_like, resnet18_like_no_bn

import bnkit

TIMM_MODELS = ("efficientnet_b0", "mobilenetv3_large_100")
Variants = dict[str, nn.Module | Callable[..., torch.Tensor]]


def _check(variants: Variants, example: torch.Tensor, names: tuple[str, ...]) -> None:
    """Every variant in ``names`` computes the unfused model's output (1e-4 relative), or the run stops."""
    with torch.no_grad():
        reference = variants["unfused"](example)
        for name in names:
            error = (variants[name](example) - reference).abs().max() / reference.abs().max()
            if error > 1e-4:
                raise SystemExit(f"{name} output differs from the unfused model by {float(error):.2e} (relative)")


def _without_bn(model: nn.Module) -> nn.Module:
    """A copy of a timm model with each ``BatchNormAct2d`` replaced by its activation (or drop + activation) and
    a bias on every conv: the network a fold computes, built without bnkit."""
    from timm.layers import BatchNormAct2d

    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BatchNormAct2d):
                drop_is_identity = isinstance(child.drop, nn.Identity)
                setattr(parent, name, child.act if drop_is_identity else nn.Sequential(child.drop, child.act))
            elif isinstance(child, nn.Conv2d) and child.bias is None:
                child.bias = nn.Parameter(torch.zeros(child.out_channels))
    return model


def _timm_variants(name: str, size: int) -> Variants:
    import timm

    model = randomize_batchnorm_(timm.create_model(name, pretrained=False)).eval()
    example = torch.randn(2, 3, size, size)
    variants: Variants = {"unfused": model, "bnkit": bnkit.fuse(model, example), "no-BN": _without_bn(model).eval()}
    _check(variants, example, ("bnkit",))
    return variants


def _variants(size: int) -> Variants:
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
    # bnkit.fuse keeps an eager nn.Module; TorchScript's executor is a separate, composable speed-up.
    variants["jit(bnkit)"] = torch.jit.freeze(torch.jit.script(variants["bnkit"]))
    _check(variants, example, ("bnkit", "fx.fuse", "jit.freeze", "jit(bnkit)"))
    return variants


def _time(
    variants: dict[str, Callable[..., torch.Tensor]], x: torch.Tensor, reps: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:  # warm-up: allocator, oneDNN primitives, TorchScript profiling runs
            for _ in range(3):
                variants[name](x)
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                start = clock()
                variants[name](x)
                samples[name].append(clock() - start)
    return samples


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
    parser.add_argument(
        "--models",
        nargs="+",
        choices=["resnet18_like", *TIMM_MODELS],
        default=["resnet18_like", *TIMM_MODELS],
        help="networks to time (default: all three)",
    )
    parser.add_argument(
        "--clock",
        choices=["thread", "wall"],
        default=None,
        help="thread: CPU time of the calling thread (robust on a shared machine, needs --threads 1; the "
        "default then); wall: perf_counter",
    )
    args = parser.parse_args(argv)
    clock_name = args.clock or ("thread" if args.threads == 1 else "wall")
    if clock_name == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread only: use it with --threads 1")
    clock = time.thread_time if clock_name == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    for model_name in args.models:
        torch.manual_seed(0)
        if model_name == "resnet18_like":
            variants, title, ratios = _variants(args.size), "ResNet-18-like", RESNET_RATIOS
        else:
            variants, title, ratios = _timm_variants(model_name, args.size), f"timm {model_name}", TIMM_RATIOS
        print(
            f"\n{title}, {args.size}x{args.size}, CPU, eval, fp32, {args.threads} thread(s), torch {torch.__version__}"
        )
        for batch in args.batches:
            reps = (3 if args.quick else 15) if batch == 1 else (2 if args.quick else 5)
            x = torch.randn(batch, 3, args.size, args.size)
            samples = _time(variants, x, reps, clock)
            _print(batch, reps, clock_name, samples, ratios)


RESNET_RATIOS = (
    ("unfused / bnkit", "unfused", "bnkit", "speed-up from folding"),
    ("bnkit / no-BN", "bnkit", "no-BN", "target <= 1.03"),
    ("bnkit / fx.fuse", "bnkit", "fx.fuse", "target <= 1"),
    ("bnkit / jit.freeze", "bnkit", "jit.freeze", "target <= 1"),
    ("jit(bnkit) / jit.freeze", "jit(bnkit)", "jit.freeze", "TorchScript on top of bnkit.fuse"),
)
TIMM_RATIOS = RESNET_RATIOS[:2]


def _print(
    batch: int, reps: int, clock_name: str, samples: dict[str, list[float]], ratios: tuple[tuple[str, ...], ...]
) -> None:
    medians = {name: statistics.median(values) for name, values in samples.items()}
    minima = {name: min(values) for name, values in samples.items()}
    print(f"\nbatch {batch}: {reps} interleaved repetitions; {clock_name} clock, ms median (min)")
    for name in medians:
        print(f"  {name:<11} {medians[name] * 1e3:9.2f} ({minima[name] * 1e3:.2f})")
    print("  ratio of medians (of minima)")
    for label, num, den, target in ratios:
        ratio, ratio_min = medians[num] / medians[den], minima[num] / minima[den]
        print(f"  {label:<24} {ratio:6.3f} ({ratio_min:.3f})  {target}")


if __name__ == "__main__":
    main()
