"""torch.compile'd ResNet-18 with bnkit.BatchNorm vs with torch.nn.BatchNorm2d: time ratios measured in one run.

The same torchvision ResNet-18 twice (bnkit's copy made by ``bnkit.convert(model, to="bnkit")``, identical
weights), each compiled with ``torch.compile`` (inductor) and run eagerly; a training step (forward, backward,
SGD step) and an inference forward. Repetitions of the two models are interleaved and medians compared. Host
syncs per bnkit training step and per inference forward are counted at the dispatcher (aten._local_scalar_dense,
is_nonzero, equal, item) in eager mode. Targets (issue 13): compiled bnkit / compiled torch <= 1.05, eager
<= 1.05, host syncs per step 0. On CPU torch runs on one thread (``--threads``) and each step is timed with that
thread's CPU time, which other processes on a shared machine barely disturb; CUDA uses wall-clock time.

    python benchmarks/compile.py [--batch 8] [--size 64] [--repeats 15] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bnkit

_SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.item.default,
}


class HostReads(TorchDispatchMode):
    """Counts operators that copy a tensor's value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _steps(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        opt.step()

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return train, infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = args.device
    clock = time.perf_counter if device == "cuda" else time.thread_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10).to(device)
    models = {"torch": base, "bnkit": bnkit.convert(copy.deepcopy(base), to="bnkit")}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, 10, (args.batch,), device=device)

    # host syncs of the bnkit model, eager (what a compiled graph would have to break on)
    train, infer = _steps(copy.deepcopy(models["bnkit"]), x, target)
    counts = {}
    for name, fn in (("train", train), ("eval", infer)):
        fn()
        with HostReads() as reads:
            fn()
        counts[name] = reads.count

    steps: dict[str, Callable[[], None]] = {}
    for kind in ("eager", "compiled"):
        for name, model in models.items():
            m = copy.deepcopy(model)
            if kind == "compiled":
                m = torch.compile(m, fullgraph=True)
            train, infer = _steps(m, x, target)
            steps[f"{kind}/train/{name}"] = train
            steps[f"{kind}/eval/{name}"] = infer
    start = time.perf_counter()
    for fn in steps.values():  # compile (both modes) and warm up
        fn()
        fn()
    _sync(device)
    print(f"compile + warm-up: {time.perf_counter() - start:.0f} s")
    times: dict[str, list[float]] = {key: [] for key in steps}
    keys = list(steps)
    for rep in range(args.repeats):
        for key in keys if rep % 2 == 0 else reversed(keys):
            _sync(device)
            t0 = clock()
            steps[key]()
            _sync(device)
            times[key].append(clock() - t0)
    where = f"{device}, {args.threads} thread(s)" if device != "cuda" else device
    print(f"ResNet-18, batch {args.batch}, {args.size}x{args.size}, {where}, torch {torch.__version__}")
    print(f"{'':20s} {'torch ms':>9s} {'bnkit ms':>9s} {'ratio':>7s}")
    for kind in ("compiled", "eager"):
        for mode in ("train", "eval"):
            t = statistics.median(times[f"{kind}/{mode}/torch"]) * 1e3
            b = statistics.median(times[f"{kind}/{mode}/bnkit"]) * 1e3
            print(f"{kind + ' ' + mode:20s} {t:9.2f} {b:9.2f} {b / t:7.3f}")
    print(f"host syncs per bnkit training step: {counts['train']}, per inference forward: {counts['eval']}")


if __name__ == "__main__":
    main()
