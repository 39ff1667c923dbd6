"""PyTorch 2.13's SyncBatchNorm algorithm, runnable on CPU (gloo), as the oracle and baseline for bnkit's SyncBN.

``torch.nn.SyncBatchNorm`` refuses CPU input ("SyncBatchNorm expected input tensor to be on GPU") and its
kernels (``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``, ``batch_norm_backward_reduce``,
``batch_norm_backward_elemt``) exist only for CUDA. This module follows
``torch/nn/modules/_functions.py::SyncBatchNorm`` line by line, with the same collectives and payloads
(forward: ``all_gather`` of ``[mean, invstd, count]``, ``world * (2C + 1)`` numbers; backward: ``all_reduce`` of
``[sum_dy, sum_dy_xmu]``, ``2C`` numbers), and replaces each CUDA kernel by the formula it computes, in the
kernel's own accumulation type (float32 for float32 input) and order: in particular the per-rank variance is
rebuilt as ``(1 / invstd)^2 - eps`` and merged rank by rank, as ``batch_norm_reduce_statistics_kernel`` does.

Example:
    >>> layer = TorchSyncBatchNormCPU(4)
    >>> layer(torch.randn(3, 4, 2, 2)).shape  # not distributed: plain batch norm
    torch.Size([3, 4, 2, 2])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["TorchSyncBatchNormCPU", "convert_to_port"]


def _stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    # batch_norm_stats: Welford mean and biased variance per channel, then invstd = 1 / sqrt(var + eps).
    dims = [d for d in range(x.ndim) if d != 1]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, torch.rsqrt(var + eps)


def _gather_stats(
    mean_all: Tensor,
    invstd_all: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    counts: Tensor,
) -> tuple[Tensor, Tensor]:
    # batch_norm_gather_stats_with_counts / batch_norm_reduce_statistics_kernel, vectorised over channels.
    acc = mean_all.dtype
    avg = torch.zeros(mean_all.shape[1], dtype=acc)
    var_n = torch.zeros_like(avg)
    n = 0.0
    for j in range(mean_all.shape[0]):
        count = float(counts[j])
        m = mean_all[j]
        v = 1.0 / invstd_all[j]
        v = (v * v - eps) * count
        factor = torch.tensor(1.0 / (n + count), dtype=acc)
        var_n = var_n + v + (avg - m) * (avg - m) * n * count * factor
        avg = n * factor * avg + count * factor * m
        n += count
    invstd = 1.0 / torch.sqrt(var_n / n + eps)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.copy_((1 - momentum) * running_mean + momentum * avg)
        if running_var is not None:
            running_var.copy_((1 - momentum) * running_var + momentum * (var_n / (n - 1)))
    return avg, invstd


def _bshape(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(1, -1, *([1] * (ndim - 2)))


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float,
        process_group: Any,
        world_size: int,
    ) -> Tensor:
        input = input.contiguous()
        num_channels = input.shape[1]
        if input.numel() > 0:
            mean, invstd = _stats(input, eps)
            count = torch.full((1,), input.numel() // input.size(1), dtype=mean.dtype)
            combined = torch.cat([mean, invstd, count], dim=0)
        else:
            combined = torch.zeros(2 * num_channels + 1, dtype=input.dtype)
        combined_list = [torch.empty_like(combined) for _ in range(world_size)]
        dist.all_gather(combined_list, combined, process_group, async_op=False)
        combined = torch.stack(combined_list, dim=0)
        mean_all, invstd_all, count_all = torch.split(combined, num_channels, dim=1)
        mask = count_all.squeeze(-1) >= 1
        count_all, mean_all, invstd_all = count_all[mask], mean_all[mask], invstd_all[mask]
        counts = count_all.view(-1)
        mean, invstd = _gather_stats(mean_all, invstd_all, running_mean, running_var, momentum, eps, counts)
        ctx.save_for_backward(input, weight, mean, invstd, count_all.to(torch.int32))
        ctx.process_group = process_group
        if input.numel() == 0:
            return torch.empty_like(input)
        out = (input - _bshape(mean, input.ndim)) * _bshape(invstd, input.ndim)
        if weight is not None:
            out = out * _bshape(weight, input.ndim)
        if bias is not None:
            out = out + _bshape(bias, input.ndim)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_output = grad_output.contiguous()
        saved_input, weight, mean, invstd, count_tensor = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        num_channels = saved_input.shape[1]
        if saved_input.numel() > 0:
            dims = [d for d in range(saved_input.ndim) if d != 1]
            xmu = saved_input - _bshape(mean, saved_input.ndim)
            sum_dy = grad_output.sum(dims)
            sum_dy_xmu = (grad_output * xmu).sum(dims)
            grad_weight = sum_dy_xmu * invstd if weight is not None and ctx.needs_input_grad[1] else None
            # PyTorch drops grad_bias together with grad_weight when there is no weight (affine=False).
            grad_bias = sum_dy if weight is not None and ctx.needs_input_grad[2] else None
            if ctx.needs_input_grad[0]:
                combined = torch.cat([sum_dy, sum_dy_xmu], dim=0)
                dist.all_reduce(combined, dist.ReduceOp.SUM, ctx.process_group, async_op=False)
                sum_dy, sum_dy_xmu = torch.split(combined, num_channels)
                norm = 1.0 / float(count_tensor.sum())
                mean_dy = sum_dy * norm
                mean_dy_xmu = sum_dy_xmu * norm
                scale = invstd if weight is None else weight * invstd
                grad_input = (
                    grad_output
                    - _bshape(mean_dy, saved_input.ndim)
                    - xmu * _bshape(invstd * invstd * mean_dy_xmu, saved_input.ndim)
                ) * _bshape(scale, saved_input.ndim)
        elif ctx.needs_input_grad[0]:
            combined = torch.zeros(2 * num_channels, dtype=saved_input.dtype)
            dist.all_reduce(combined, dist.ReduceOp.SUM, ctx.process_group, async_op=False)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class TorchSyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` with its synchronised branch ported to CPU (same state dict, same semantics).

    Outside a process group, in eval, or with world size 1 it is exactly ``torch.nn.SyncBatchNorm``'s
    fallback (``F.batch_norm``). It derives from ``_BatchNorm``, not ``nn.SyncBatchNorm``, because DDP
    refuses SyncBatchNorm modules on CPU.

    Example:
        >>> TorchSyncBatchNormCPU(2)(torch.randn(4, 2)).shape
        torch.Size([4, 2])
    """

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        need_sync = self.training and dist.is_available() and dist.is_initialized()
        if need_sync:
            group = self.process_group or dist.group.WORLD
            world = dist.get_world_size(group)
            need_sync = world > 1
        if not need_sync:
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        return _SyncBatchNormFn.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group, world
        )


def convert_to_port(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn`` BatchNorm in ``module`` by :class:`TorchSyncBatchNormCPU` (state copied).

    Example:
        >>> type(convert_to_port(nn.Sequential(nn.BatchNorm2d(3)))[0]).__name__
        'TorchSyncBatchNormCPU'
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = TorchSyncBatchNormCPU(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_to_port(child))
    return module
