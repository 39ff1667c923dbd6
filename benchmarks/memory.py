"""Training memory of BatchNorm + activation: bytes autograd saves in one step, step time, largest batch.

Three networks, each built three ways with the same convolutions and activations:

- ``bnkit``: :class:`bnkit.BatchNormAct` (``memory="low"``: leaky ReLU and identity keep only their output);
- ``torch``: ``nn.BatchNorm2d`` followed by the same activation module;
- ``no-BN``: the same network without BatchNorm (the limit: what the convolutions and activations keep anyway).

Networks: a pre-activation ResNet-18-like with leaky ReLU (every BN followed by its activation), a
post-activation ResNet-18-like with ReLU (its BNs before the residual add have no activation) and a
post-activation ResNet-50-like (bottlenecks, ReLU).

Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks`` over one forward, by storage and
deduplicated (a tensor the next layer also keeps counts once); parameters and buffers are left out, so the
figure is the activations a step keeps. Step time is forward + backward, the median of interleaved repetitions
(thread CPU time on one thread, robust on a shared machine). "Largest batch" is the batch whose saved
activations fit ``--budget-mb`` (saved bytes grow linearly with the batch). For the ReLU networks the run also
prints the idealised figure of an exact ReLU in-place ABN that packs the pre-activations at the clipped
positions (what it would need: their count on the host, one sync per layer per step, which bnkit never does).

Targets (issue 16): pre-activation saved bytes <= 1.05x no-BN; step time <= 1.10x torch.

    python benchmarks/memory.py [--batch 8] [--size 32] [--repeats 3] [--budget-mb 1024]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import bnkit

CLOCK = time.thread_time
VARIANTS = ("bnkit", "torch", "no-BN")


def _act(kind: str) -> nn.Module:
    # in place, as ResNets and timm's BatchNormAct2d do: the activation then keeps only its output
    return {"relu": nn.ReLU(inplace=True), "leaky_relu": nn.LeakyReLU(0.01, inplace=True), "identity": nn.Identity()}[
        kind
    ]


class CopyThenAct(nn.Module):
    """An in-place activation on a copy: for an input that is also the residual (a pre-activation block without
    BN), so the activation keeps only its output, as the best no-BN network would."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.act = _act(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x.clone())


def norm_act(variant: str, channels: int, kind: str, *, input_reused: bool = False) -> nn.Module:
    """BN + activation ``kind`` built as ``variant`` (see the module docstring)."""
    if variant == "bnkit":
        return bnkit.BatchNormAct(channels, kind)
    if variant == "torch":
        return nn.Sequential(nn.BatchNorm2d(channels), _act(kind)) if kind != "identity" else nn.BatchNorm2d(channels)
    return CopyThenAct(kind) if input_reused else _act(kind)


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


class PreActBlock(nn.Module):
    def __init__(self, variant: str, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.na1 = norm_act(variant, cin, "leaky_relu", input_reused=True)
        self.conv1 = _conv(cin, cout, 3, stride)
        self.na2 = norm_act(variant, cout, "leaky_relu")
        self.conv2 = _conv(cout, cout)
        self.shortcut = _conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.na1(x)
        skip = x if self.shortcut is None else self.shortcut(out)
        return self.conv2(self.na2(self.conv1(out))) + skip


def _projection(variant: str, cin: int, cout: int, stride: int) -> nn.Module | None:
    """A post-activation block's shortcut: 1x1 conv + norm when the shape changes, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), norm_act(variant, cout, "identity"))


class PostActBlock(nn.Module):
    def __init__(self, variant: str, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride)
        self.na1 = norm_act(variant, cout, "relu")
        self.conv2 = _conv(cout, cout)
        self.n2 = norm_act(variant, cout, "identity")
        self.shortcut = _projection(variant, cin, cout, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.n2(self.conv2(self.na1(self.conv1(x)))) + skip)


class Bottleneck(nn.Module):
    def __init__(self, variant: str, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = _conv(cin, width, 1)
        self.na1 = norm_act(variant, width, "relu")
        self.conv2 = _conv(width, width, 3, stride)
        self.na2 = norm_act(variant, width, "relu")
        self.conv3 = _conv(width, cout, 1)
        self.n3 = norm_act(variant, cout, "identity")
        self.shortcut = _projection(variant, cin, cout, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        out = self.na2(self.conv2(self.na1(self.conv1(x))))
        return self.relu(self.n3(self.conv3(out)) + skip)


def preact_resnet18(variant: str) -> nn.Module:
    """Pre-activation ResNet-18-like with leaky ReLU (every BN followed by its activation)."""
    layers: list[nn.Module] = [_conv(3, 64)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [PreActBlock(variant, cin, cout, stride), PreActBlock(variant, cout, cout, 1)]
        cin = cout
    layers += [norm_act(variant, cin, "leaky_relu"), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def postact_resnet18(variant: str) -> nn.Module:
    """Post-activation ResNet-18-like with ReLU (the BNs before each residual add have no activation)."""
    layers: list[nn.Module] = [_conv(3, 64), norm_act(variant, 64, "relu")]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [PostActBlock(variant, cin, cout, stride), PostActBlock(variant, cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def resnet50(variant: str) -> nn.Module:
    """Post-activation ResNet-50-like (bottlenecks 3-4-6-3, ReLU)."""
    layers: list[nn.Module] = [_conv(3, 64), norm_act(variant, 64, "relu")]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(variant, cin, width, stride if i == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


NETWORKS: dict[str, Callable[[str], nn.Module]] = {
    "preact-resnet18 (leaky ReLU)": preact_resnet18,
    "postact-resnet18 (ReLU)": postact_resnet18,
    "resnet50-like (ReLU)": resnet50,
}


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters and buffers left out."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    loss.backward()
    return sum(storages.values())


def packed_relu_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """What the ReLU BatchNormActs would save less if they kept only the pre-activations where ReLU clipped."""
    saved = 0
    hooks = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal saved
        if module.activation == "relu" and not module.uses_low_memory():
            inp = inputs[0]
            saved += inp.numel() * inp.element_size() - int((output == 0).sum()) * inp.element_size()

    for module in model.modules():
        if isinstance(module, bnkit.BatchNormAct):
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return saved


def step_times(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward+backward seconds of each model, repetitions interleaved."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up
        model(x).sum().backward()
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            model = models[name]
            model.zero_grad(set_to_none=True)
            start = CLOCK()
            model(x).sum().backward()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-mb", type=float, default=1024.0)
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    budget = args.budget_mb * 2**20
    print(f"batch {args.batch}, {args.size}x{args.size}, float32, torch {torch.__version__}, 1 thread")
    print(f"largest batch: saved activations within {args.budget_mb:.0f} MiB")
    for net_name in args.networks:
        build = NETWORKS[net_name]
        models = {variant: build(variant).train() for variant in VARIANTS}
        bytes_ = {variant: saved_bytes(model, x) for variant, model in models.items()}
        times = step_times(models, x, args.repeats)
        print(f"\n{net_name}")
        header = ("variant", "saved MB", "/ no-BN", "/ torch", "step s", "/ torch", "largest batch")
        print(
            f"  {header[0]:8s} " + " ".join(f"{h:>{w}s}" for h, w in zip(header[1:], (9, 8, 8, 8, 8, 14), strict=True))
        )
        for variant in VARIANTS:
            b = bytes_[variant]
            largest = int(budget // (b / args.batch))
            print(
                f"  {variant:8s} {b / 1e6:9.2f} {b / bytes_['no-BN']:8.3f} {b / bytes_['torch']:8.3f} "
                f"{times[variant]:8.3f} {times[variant] / times['torch']:8.3f} {largest:14d}"
            )
        low = sum(1 for m in models["bnkit"].modules() if isinstance(m, bnkit.BatchNormAct) and m.uses_low_memory())
        total = sum(1 for m in models["bnkit"].modules() if isinstance(m, bnkit.BatchNormAct))
        print(f"  BatchNormAct layers keeping only their output in training: {low} of {total}")
        packed = packed_relu_bytes(models["bnkit"], x)
        if packed:
            ideal = bytes_["bnkit"] - packed
            print(
                f"  idealised exact ReLU in-place ABN (packed clipped pre-activations, a host sync per layer): "
                f"{ideal / 1e6:.2f} MB = {ideal / bytes_['no-BN']:.3f}x no-BN"
            )


if __name__ == "__main__":
    main()
