"""Benchmark models shared by the benchmarks (fuse, monitor, SyncBN): a ResNet-18-like network, random weights.

Example:
    >>> import torch
    >>> model = resnet18_like(num_classes=10, width=8).eval()
    >>> model(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "NormFactory", "ResNetLike", "randomize_batchnorm_", "resnet18_like", "resnet18_like_no_bn"]

#: Builds the norm layer for a given number of channels, e.g. ``nn.BatchNorm2d`` or ``bnkit.BatchNorm``.
NormFactory = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs with norms, a residual addition and a 1x1 projection when needed.

    With ``norm=None`` the norms are absent (not ``nn.Identity``) and the convs carry a bias, which is what a
    fully folded network computes: the physical limit of BN folding.

    Example:
        >>> BasicBlock(8, 16, 2, nn.BatchNorm2d)(torch.randn(1, 8, 8, 8)).shape
        torch.Size([1, 16, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: NormFactory | None) -> None:
        super().__init__()
        bias = norm is None
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=bias)
        self.bn1 = norm(planes) if norm is not None else None
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=bias)
        self.bn2 = norm(planes) if norm is not None else None
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            layers: list[nn.Module] = [nn.Conv2d(in_planes, planes, 1, stride, bias=bias)]
            if norm is not None:
                layers.append(norm(planes))
            self.downsample = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        if self.bn1 is not None:
            out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        if self.bn2 is not None:
            out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNetLike(nn.Module):
    """ResNet-18's layout (stem, four stages of ``blocks`` basic blocks, average pool, linear head).

    Example:
        >>> ResNetLike((1, 1, 1, 1), nn.BatchNorm2d, width=4, num_classes=3)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        norm: NormFactory | None = nn.BatchNorm2d,
        *,
        width: int = 64,
        in_channels: int = 3,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=norm is None)
        self.bn1 = norm(width) if norm is not None else None
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages: list[nn.Module] = []
        in_planes = width
        for index, count in enumerate(blocks):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(in_planes, planes, stride, norm)]
            stage += [BasicBlock(planes, planes, 1, norm) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.bn1(x)
        x = self.maxpool(self.relu(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomize_batchnorm_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, so folding is not a no-op.

    Means ~ N(0, 0.1), variances ~ U(0.5, 1.5), weights ~ U(0.5, 1.5), biases ~ N(0, 0.1): activations stay
    in a sane range through 18 layers.

    Example:
        >>> bn = randomize_batchnorm_(nn.BatchNorm2d(4))
        >>> bool((bn.running_var != 1).all())
        True
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            mean = getattr(module, "running_mean", None)
            var = getattr(module, "running_var", None)
            if not isinstance(mean, Tensor) or not isinstance(var, Tensor):
                continue
            n = mean.numel()
            mean.copy_(0.1 * torch.randn(n, generator=generator))
            var.copy_(0.5 + torch.rand(n, generator=generator))
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, Tensor):
                weight.copy_(0.5 + torch.rand(n, generator=generator))
            if isinstance(bias, Tensor):
                bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model


def resnet18_like(
    norm: NormFactory | None = nn.BatchNorm2d,
    *,
    num_classes: int = 1000,
    width: int = 64,
    in_channels: int = 3,
    seed: int = 0,
) -> ResNetLike:
    """A ResNet-18-like network ([2, 2, 2, 2] basic blocks) with seeded random weights and BN statistics.

    Args:
        norm: Norm layer factory ``channels -> module`` (``nn.BatchNorm2d``, ``bnkit.BatchNorm``,
            ``nn.SyncBatchNorm``, ...), or None for no norm at all (convs then have a bias).
        num_classes: Size of the linear head.
        width: Channels of the first stage (64 in ResNet-18); later stages double it.
        in_channels: Input channels.
        seed: Seed of the weights and of the BatchNorm statistics.

    Returns:
        The model, in training mode as constructed.

    Example:
        >>> sum(p.numel() for p in resnet18_like().parameters())
        11689512
    """
    torch.manual_seed(seed)
    model = ResNetLike((2, 2, 2, 2), norm, width=width, in_channels=in_channels, num_classes=num_classes)
    return randomize_batchnorm_(model, seed)


def resnet18_like_no_bn(*, num_classes: int = 1000, width: int = 64, in_channels: int = 3, seed: int = 0) -> ResNetLike:
    """:func:`resnet18_like` without any norm layer: what a fully folded network computes.

    Example:
        >>> any(isinstance(m, nn.BatchNorm2d) for m in resnet18_like_no_bn(width=8).modules())
        False
    """
    return resnet18_like(None, num_classes=num_classes, width=width, in_channels=in_channels, seed=seed)
