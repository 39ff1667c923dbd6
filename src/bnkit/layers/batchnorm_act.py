"""``bnkit.BatchNormAct``: BatchNorm followed by an activation, with an in-place-ABN backward that keeps no input.

A plain BatchNorm keeps its input for the backward pass while the next layer keeps BN+activation's output, so a
network with BN saves about twice the activations of the same network without it. In-Place Activated BatchNorm
(Rota Bulo et al., CVPR 2018) keeps only the output ``y = act(gamma * xhat + beta)`` and recomputes ``xhat``
from it in the backward pass. That needs an invertible activation (identity, leaky ReLU, ELU); ReLU keeps the
exact standard backward in training (see :class:`BatchNormAct`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnkit.layers.batchnorm import BatchNorm
from bnkit.layers.torch_layer import copy_grad_flags

__all__ = ["ACTIVATIONS", "BatchNormAct"]

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu")
_INVERTIBLE = frozenset({"identity", "leaky_relu", "elu"})
_MEMORY = ("low", "standard")
_FAST_DTYPES = (torch.float32, torch.float64)
# a channel is "ill-conditioned" when |gamma| < _RATIO * |beta| (its xhat recovered from y would carry an error
# above about 1e-5 of its size); the threshold scales with the dtype's precision
_ACCURACY = 1e-5


def _apply_activation(z: Tensor, kind: str, param: float, inplace: bool) -> Tensor:
    if kind == "relu":
        return torch.relu_(z) if inplace else torch.relu(z)
    if kind == "leaky_relu":
        return F.leaky_relu(z, param, inplace=inplace)
    if kind == "elu":
        return F.elu(z, param, inplace=inplace)
    return z


_SETTINGS = frozenset({"activation", "negative_slope", "alpha", "memory", "exact_channels"})


def _check_setting(label: str, name: str, value: Any, layer: nn.Module) -> Any:
    """The value to store for ``name``, or a one-line ``ValueError`` naming the layer."""
    if name == "activation" and value not in ACTIVATIONS:
        raise ValueError(f"{label}: activation must be one of {', '.join(ACTIVATIONS)}. Received: {value!r}")
    if name == "memory" and value not in _MEMORY:
        raise ValueError(f"{label}: memory must be 'low' or 'standard'. Received: {value!r}")
    if name in ("negative_slope", "alpha"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"{label}: {name} must be a finite number > 0 (the activation must be invertible). Received: {value!r}"
            )
        return float(value)
    if name == "exact_channels":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{label}: exact_channels must be an int >= 0. Received: {value!r}")
        return min(value, layer.num_features)
    return value


class _BatchNormActFunction(torch.autograd.Function):
    """BN (batch or running statistics) + activation that saves its output, not its input.

    Inputs are channels-first. Returns ``(y, new_mean, new_var, inexact)``: the batch statistics written into
    copies of the running buffers by torch's kernel (training) and a 0-dim bool, True when more channels were
    ill-conditioned than ``capacity`` keeps exactly.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        batch: bool,
        momentum: float,
        eps: float,
        kind: str,
        param: float,
        capacity: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        channels = x.shape[1]
        if batch:
            # torch's kernel writes the batch statistics into these copies: with momentum 1 and fresh buffers
            # exactly the batch mean and unbiased variance, with the layer's buffers torch's own update
            if running_mean is None or running_var is None:
                new_mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
                new_var = torch.ones(channels, dtype=x.dtype, device=x.device)
            else:
                new_mean, new_var = running_mean.clone(), running_var.clone()
            z, mean, invstd = torch.native_batch_norm(x, weight, bias, new_mean, new_var, True, momentum, eps)
        else:
            assert running_mean is not None and running_var is not None
            z = torch.native_batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
            mean, invstd = running_mean, torch.rsqrt(running_var + eps)
            new_mean, new_var = running_mean, running_var
        y = _apply_activation(z, kind, param, inplace=True)
        inexact = torch.zeros((), dtype=torch.bool, device=x.device)
        index = selected = None
        if weight is not None and ctx.needs_input_grad[1] and capacity >= 0:
            # gamma's gradient needs xhat, which y loses where gamma is (nearly) 0: keep the exact xhat of the
            # `capacity` worst-conditioned channels, chosen on the device (no host read, fixed size)
            gamma = weight.detach().abs()
            beta = bias.detach().abs() if bias is not None else torch.zeros_like(gamma)
            score = gamma / (beta + torch.finfo(x.dtype).tiny)
            ratio = torch.finfo(x.dtype).eps / _ACCURACY
            inexact = (score < ratio).sum() > capacity
            if capacity > 0:
                index = torch.topk(score, min(capacity, channels), largest=False, sorted=False).indices
                kept = (1, index.numel()) + (1,) * (x.ndim - 2)
                selected = (x.index_select(1, index) - mean[index].reshape(kept)) * invstd[index].reshape(kept)
        ctx.batch = batch
        ctx.kind = kind
        ctx.param = param
        ctx.save_for_backward(y, weight, bias, invstd, index, selected)
        ctx.mark_non_differentiable(new_mean, new_var, inexact)
        return y, new_mean, new_var, inexact

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        y, weight, bias, invstd, index, selected = ctx.saved_tensors
        channels = y.shape[1]
        view = (1, channels) + (1,) * (y.ndim - 2)
        dims = [0, *range(2, y.ndim)]
        kind, param = ctx.kind, ctx.param
        # the activation's derivative and its inverse, both from the output (y > 0 exactly where z > 0)
        if kind == "identity":
            dz, z = grad, (y if index is None else y.clone())
        elif kind == "relu":  # running statistics only: xhat is never needed where the ReLU clipped
            dz, z = torch.ops.aten.threshold_backward(grad, y, 0), y.clone()
        elif kind == "leaky_relu":
            dz = torch.ops.aten.leaky_relu_backward(grad, y, param, True)
            z = F.leaky_relu(y, 1.0 / param)
        else:  # elu: y = alpha * (exp(z) - 1) for z <= 0
            dz = torch.ops.aten.elu_backward(grad, param, 1, 1, True, y)
            negative = y.clamp_max(0)
            z = (y - negative).add_(torch.log1p(negative / param))
        need_weight = weight is not None and ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        # xhat = (z - beta) / gamma, per channel. A channel with gamma == 0 gets dx == 0 (its scale is 0) whatever
        # xhat is; the channels in `index` take their exact xhat from `selected` (shift 0, scale 1)
        shift = bias.detach() if bias is not None else torch.zeros_like(invstd)
        if weight is None:
            inverse = torch.ones_like(invstd)
        else:
            inverse = 1.0 / torch.where(weight == 0, torch.ones_like(weight), weight.detach())
        if index is not None:
            z.index_copy_(1, index, selected)
            shift = shift.index_fill(0, index, 0)
            inverse = inverse.index_fill(0, index, 1)
        scale = invstd if weight is None else invstd * weight.detach()
        mask = [ctx.needs_input_grad[0], need_weight, need_bias]
        if ctx.batch:
            # torch's fused BN backward with "mean" beta and "invstd" 1/gamma sees exactly xhat, and with weight
            # gamma * invstd / (1/gamma) it computes dx = gamma * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)),
            # dgamma = sum(dz * xhat) and dbeta = sum(dz)
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                dz, z, scale / inverse, None, None, shift, inverse, True, 0.0, mask
            )
        else:
            grad_x = dz * scale.reshape(view) if mask[0] else None
            xhat = (z - shift.reshape(view)) * inverse.reshape(view) if mask[1] else None
            grad_w = (dz * xhat).sum(dims) if xhat is not None else None
            grad_b = dz.sum(dims) if mask[2] else None
        grad_x = grad_x if mask[0] else None
        grad_w = grad_w if mask[1] else None
        grad_b = grad_b if mask[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


class BatchNormAct(BatchNorm):
    r"""BatchNorm followed by an activation, whose low-memory backward keeps only the output (In-Place ABN).

    ``y = act(BatchNorm(x))`` with ``act`` one of ``"identity"``, ``"relu"``, ``"leaky_relu"`` (``negative_slope``)
    or ``"elu"`` (``alpha``). Everything else is :class:`bnkit.BatchNorm` (a subclass: every mode, switch, option,
    conversion and tool works, and the state dict has ``torch.nn.BatchNorm2d``'s keys, so it loads strictly into
    and from ``nn.BatchNorm2d`` and timm's ``BatchNormAct2d``).

    **memory="low"** (default): the backward recomputes ``xhat = (act^{-1}(y) - beta) / gamma`` from the output,
    which the next layer keeps anyway, instead of keeping the input: one activation-sized tensor less per layer.
    Used for float32/float64 inputs (parameters and buffers of the same dtype), no mask, and

    - training with batch statistics (or no running statistics): identity, leaky ReLU and ELU, without ghost
      batches, renorm or a synchronised world of more than one rank;
    - running statistics (``eval()``, ``freeze_stats``): every activation, ReLU included (``dx = dz * gamma *
      invstd`` needs no ``xhat``; gamma's gradient needs it only where ReLU let the value through).

    Elsewhere, and with ``memory="standard"``, the layer computes ``bnkit.BatchNorm`` then the activation, with
    the standard backward. :meth:`uses_low_memory` says which one a call takes.

    **ReLU in training** keeps the standard path: BN's input gradient at a clipped position still needs that
    position's ``xhat``, which ReLU's output no longer holds. The least that keeps it exact is the pre-activation
    value at the clipped positions (about half of BN's input, plus nothing for the mask, which is ``y == 0``);
    packing them needs their count on the host, a sync per layer per step that the default forward never does,
    and an unpacked copy costs as much as keeping the input. The activation is never changed behind your back.

    **The gamma rule.** ``xhat`` cannot be recovered where gamma is 0 (the channel's output is the constant
    ``act(beta)``), and loses digits where ``|gamma|`` is small against ``|beta|``. Only gamma's own gradient
    needs it there: the input gradient is ``gamma * ...`` (exactly 0 for gamma = 0, computed with gamma
    replaced by 1 in the division). So when gamma is trained the layer keeps the exact ``xhat`` of the
    ``exact_channels`` channels with the smallest ``|gamma| / |beta|`` (chosen on the device with ``topk``: no
    host read, a fixed size; default ``ceil(C / 64)``, about 1.6% of the input). Gradients are exact for every
    gamma, 0 included, as long as no more channels than that have ``|gamma| < (eps_dtype / 1e-5) * |beta|``
    (float32: ``|beta| > 84 |gamma|``). A step with more counts in the non-persistent buffer ``inexact_batches``
    (gamma's gradient in the extra channels then carries the recovery error; raise ``exact_channels``, e.g.
    to ``C`` for a zero-initialised layer, or use ``memory="standard"``). The paper instead trains
    ``|gamma| + eps``, which changes the model; this layer does not.

    **ELU's limit**: at strongly negative ``z`` the output is close to ``-alpha`` and ``log1p(y / alpha)`` recovers
    ``z`` only to about ``eps * exp(-z)`` (float32: 1e-5 at ``z = -5``); identity and leaky ReLU have no such limit.

    Args:
        num_features: Number of channels ``C``.
        activation: ``"identity"``, ``"relu"``, ``"leaky_relu"`` or ``"elu"``.
        negative_slope: Leaky ReLU's slope for negative inputs (> 0, so it can be inverted).
        alpha: ELU's ``alpha`` (> 0).
        memory: ``"low"`` (recompute from the output where exact) or ``"standard"``.
        exact_channels: Channels whose exact ``xhat`` is kept for gamma's gradient (default ``ceil(C / 64)``).
        **kwargs: :class:`bnkit.BatchNorm`'s options (``eps``, ``momentum``, ``affine``, ``axis``, ...).

    Example:
        >>> import torch
        >>> layer = BatchNormAct(8, "leaky_relu")
        >>> x = torch.randn(4, 8, 5, 5, requires_grad=True)
        >>> layer(x).sum().backward()
        >>> layer.uses_low_memory(), x.grad.shape
        (True, torch.Size([4, 8, 5, 5]))
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "relu",
        *,
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        memory: str = "low",
        exact_channels: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, **kwargs)
        if exact_channels is None:
            exact_channels = math.ceil(num_features / 64)
        # checked here and on every later assignment (``layer.activation = "gelu"`` raises), with the same messages
        self.activation = activation
        self.negative_slope = negative_slope
        self.alpha = alpha
        self.memory = memory
        self.exact_channels = exact_channels
        #: the class this layer was converted from (``"module.QualName"``, set by :meth:`from_torch`), so that
        #: ``bnkit.convert(model, "torch")`` can give timm's ``BatchNormAct2d`` back; None when built directly
        self.source_class: str | None = None
        # steps whose gamma gradient could not be kept exact (more ill-conditioned channels than exact_channels);
        # not persistent, so state dicts stay torch.nn's
        self.register_buffer(
            "inexact_batches", torch.zeros((), dtype=torch.long, device=kwargs.get("device")), persistent=False
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SETTINGS:
            value = _check_setting(self.label() if "name" in self.__dict__ else "BatchNormAct", name, value, self)
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"activation={self.activation!r}"]
        if self.activation == "leaky_relu":
            parts.append(f"negative_slope={self.negative_slope}")
        if self.activation == "elu":
            parts.append(f"alpha={self.alpha}")
        parts.append(f"memory={self.memory!r}")
        return ", ".join(parts)

    def label(self) -> str:
        """The name used in messages: :attr:`name` when set, else a short description.

        Example:
            >>> BatchNormAct(3).label()
            'BatchNormAct(3)'
        """
        return self.name if self.name else f"BatchNormAct({self.num_features})"

    def _activation_param(self) -> float:
        return self.negative_slope if self.activation == "leaky_relu" else self.alpha

    def uses_low_memory(
        self, training: bool | None = None, *, masked: bool = False, dtype: torch.dtype = torch.float32
    ) -> bool:
        """Whether a forward call (this mode, an input of ``dtype``, with or without a mask) keeps only the output.

        Example:
            >>> layer = BatchNormAct(4, "relu")
            >>> layer.uses_low_memory(), layer.uses_low_memory(training=False)
            (False, True)
        """
        if self.memory != "low" or masked or dtype not in _FAST_DTYPES:
            return False
        for tensor in (self.weight, self.bias, self.running_mean):
            if tensor is not None and tensor.dtype != dtype:
                return False
        if not self.uses_batch_stats(training):
            return True
        if self.activation not in _INVERTIBLE or self.virtual_batch_size is not None or self.renorm is not None:
            return False
        return not (self.sync and self._resolve(training) and self._sync_world() > 1)

    def forward(self, x: Tensor, training: bool | None = None, mask: Tensor | None = None) -> Tensor:
        """``act(BatchNorm(x))``; ``training`` and ``mask`` as in :meth:`bnkit.BatchNorm.forward`.

        Example:
            >>> BatchNormAct(3, "elu", axis=-1)(torch.randn(2, 5, 3)).shape
            torch.Size([2, 5, 3])
        """
        if not (
            isinstance(x, Tensor)
            and x.numel() > 0
            and self.uses_low_memory(training, masked=mask is not None, dtype=x.dtype)
        ):
            # BatchNorm's output is a fresh tensor its backward does not need: the activation runs in place (as
            # timm's BatchNormAct2d), keeping only its output for the backward
            y = super().forward(x, training, mask)
            return _apply_activation(y, self.activation, self._activation_param(), inplace=True)
        axis = self._check_input(x, mask)
        if self._seen_dim != x.ndim:
            self._seen_dim = x.ndim
        use_batch = self.uses_batch_stats(training)
        update = self.updates_running_stats(training)
        if use_batch:
            self._check_values_per_channel(x, axis, None)
        weight, bias = self._affine()
        xc = x if axis == 1 else x.movedim(axis, 1)
        # torch's own running update where it is this layer's arithmetic (as BatchNorm's native path)
        native = update and self.keras_momentum is None and self.unbiased_running_var and self.momentum is not None
        if use_batch:
            running = (self.running_mean, self.running_var) if native else (None, None)
            momentum = self.momentum if native else 1.0
        else:
            running, momentum = (self.running_mean, self.running_var), 0.0
        # gamma's gradient is the only one that needs the exact channels (-1: not needed, nothing selected)
        trains_gamma = weight is not None and weight.requires_grad and torch.is_grad_enabled()
        capacity = self.exact_channels if trains_gamma else -1
        y, new_mean, new_var, inexact = _BatchNormActFunction.apply(
            xc,
            weight,
            bias,
            *running,
            use_batch,
            momentum,
            self.eps,
            self.activation,
            self._activation_param(),
            capacity,
        )
        if capacity >= 0:
            with torch.no_grad():
                self.inexact_batches.add_(inexact.to(self.inexact_batches.dtype))
        if update:
            if native:
                finite = torch.isfinite(new_mean + new_var).all()
                self._verdict(finite)
                self._commit({"running_mean": new_mean, "running_var": new_var}, finite)
            else:
                count = xc.numel() // xc.shape[1]
                stored = new_var if self.unbiased_running_var else new_var * ((count - 1) / count)
                finite = self._finite(new_mean, new_var)
                self._commit_running(new_mean, stored, finite)
        return y if axis == 1 else y.movedim(1, axis)

    # ------------------------------------------------------------------ conversions

    @classmethod
    def from_torch(cls, module: nn.Module, activation: str | None = None, **kwargs: Any) -> BatchNormAct:
        """A copy of a ``torch.nn`` BatchNorm (``activation``, default identity) or of timm's ``BatchNormAct2d``.

        timm's activation (ReLU, LeakyReLU, ELU or Identity, with ``drop`` an Identity) is taken over; any other
        is refused. Extra keyword arguments (``memory``, ``exact_channels``) go to the constructor.

        The source class is recorded in :attr:`source_class`.

        Example:
            >>> import torch.nn as nn
            >>> layer = BatchNormAct.from_torch(nn.BatchNorm2d(4), "leaky_relu")
            >>> layer.activation, layer.source_class
            ('leaky_relu', 'torch.nn.modules.batchnorm.BatchNorm2d')
        """
        act = getattr(module, "act", None)
        negative_slope, alpha = 0.01, 1.0
        if act is not None and activation is None:
            drop = getattr(module, "drop", None)
            if drop is not None and not isinstance(drop, nn.Identity):
                raise ValueError(f"BatchNormAct.from_torch: drop layer {type(drop).__name__} is unsupported")
            kinds = {nn.Identity: "identity", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu"}
            if type(act) not in kinds:
                raise ValueError(
                    f"BatchNormAct.from_torch: activation {type(act).__name__} is not one of identity, relu, "
                    "leaky_relu, elu; keep the module or pass activation= explicitly"
                )
            activation = kinds[type(act)]
            negative_slope = getattr(act, "negative_slope", 0.01)
            alpha = getattr(act, "alpha", 1.0)
        base = BatchNorm.from_torch(module)
        ref = base.weight if base.weight is not None else base.running_mean
        layer = cls(
            base.num_features,
            activation or "identity",
            negative_slope=kwargs.pop("negative_slope", negative_slope),
            alpha=kwargs.pop("alpha", alpha),
            eps=base.eps,
            momentum=base.momentum,
            affine=base.affine,
            track_running_stats=base.track_running_stats,
            sync=base.sync,
            process_group=base.process_group,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
            **kwargs,
        )
        if base.bias is None and layer.bias is not None:
            layer.register_parameter("bias", None)
        layer.load_state_dict(base.state_dict())
        copy_grad_flags(base, layer)
        layer.train(module.training)
        layer.source_class = f"{type(module).__module__}.{type(module).__qualname__}"
        return layer

    def to_torch(self, dim: int | None = None, *, strict: bool = True) -> nn.modules.batchnorm._BatchNorm:
        """The BatchNorm part as ``torch.nn.BatchNorm{dim}d``; refused unless the activation is the identity.

        Example:
            >>> type(BatchNormAct(4, "identity").to_torch()).__name__
            'BatchNorm2d'
        """
        if self.activation != "identity":
            raise ValueError(
                f"{self.label()}: torch.nn.BatchNorm has no activation, so to_torch() would drop the "
                f"{self.activation}; load the state dict into timm's BatchNormAct2d or nn.BatchNorm2d followed by "
                "the activation"
            )
        return super().to_torch(dim, strict=strict)
