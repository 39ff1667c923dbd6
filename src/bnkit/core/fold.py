"""Folding an inference-mode BatchNorm into the weights of a neighbouring convolution or linear layer.

An inference BatchNorm is a per-channel affine map ``y = scale * x + shift`` (see
:func:`bnkit.core.normalize.scale_shift`). When it follows a layer it multiplies the layer's output channels;
when it precedes one it multiplies the layer's input channels and adds a constant that the layer's bias
absorbs. The functions here are pure tensor maps (no ``nn.Module``): they return the new ``(weight, bias)``
in the dtype of ``weight`` and leave their arguments alone. Arithmetic runs in the promoted dtype of
``weight`` and ``scale``, so passing float64 ``scale``/``shift`` gives a float64 fold rounded once at the end.

Weight layouts (PyTorch's):

- ``Conv{1,2,3}d``: ``[out, in / groups, *kernel]``; output channel ``o`` belongs to group ``o // (out / groups)``.
- ``ConvTranspose{1,2,3}d``: ``[in, out / groups, *kernel]``; input channels split dimension 0 into groups and
  output channel ``g * (out / groups) + j`` is column ``j`` of group ``g``. Scaling dimension 1 by the whole
  ``scale`` vector, as ``torch.nn.utils.fusion.fuse_conv_bn_weights(transpose=True)`` does, is only right for
  ``groups=1`` (pytorch#180995).
- ``Linear``: ``[out, in]``; a BatchNorm after it scales rows, one before it scales columns.

Folding a BatchNorm that comes BEFORE a convolution is exact only when every output position sees every kernel
tap applied to a real (normalised) input value: no zero padding for ``Conv``, unit kernel and unit stride for
``ConvTranspose``. The functions compute the interior value; deciding exactness is the caller's job
(:func:`bnkit.tools.fuse.fuse` does it).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "fold_after_conv",
    "fold_after_linear",
    "fold_before_conv",
    "fold_before_linear",
]


def _fold_dtype(weight: Tensor, scale: Tensor, shift: Tensor, channels: int, where: str) -> torch.dtype:
    """Check ``scale``/``shift`` against the ``channels`` they multiply; the dtype the fold computes in."""
    if scale.ndim != 1 or shift.shape != scale.shape:
        raise ValueError(
            f"{where}: scale and shift must be 1-D vectors of the same length, "
            f"got {tuple(scale.shape)} and {tuple(shift.shape)}"
        )
    if scale.shape[0] != channels:
        raise ValueError(f"{where}: the layer has {channels} channels here but scale has {scale.shape[0]}")
    return torch.promote_types(weight.dtype, scale.dtype)


def _linear_fold_dtype(weight: Tensor, scale: Tensor, shift: Tensor, dim: int, where: str) -> torch.dtype:
    """:func:`_fold_dtype` for a ``Linear`` weight whose dimension ``dim`` the BatchNorm's channels line up with."""
    if weight.ndim != 2:
        raise ValueError(f"{where}: weight must be 2-D, got shape {tuple(weight.shape)}")
    return _fold_dtype(weight, scale, shift, weight.shape[dim], where)


def _bias_after(bias: Tensor | None, scale: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    """The bias of ``scale * (x + bias) + shift``: ``bias * scale + shift`` (a missing bias counts as 0)."""
    if bias is None:
        return shift.to(dtype)
    return bias.to(dtype) * scale.to(dtype) + shift.to(dtype)


def _result(new_weight: Tensor, new_bias: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` back in the dtypes of the inputs (the bias in the weight's when there was none)."""
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype if bias is None else bias.dtype)


def _bias_before(bias: Tensor | None, extra: Tensor, dtype: torch.dtype) -> Tensor:
    """The bias of a layer whose input gained ``shift``: its own bias (0 if missing) plus ``extra``."""
    return extra if bias is None else bias.to(dtype) + extra


def _grouped_view(weight: Tensor, groups: int, transposed: bool) -> tuple[Tensor, int, int]:
    """``weight`` as ``[groups, in_per_group, out_per_group, taps]`` whatever its layout."""
    if weight.ndim < 3:
        raise ValueError(f"conv weight must have at least 3 dimensions, got shape {tuple(weight.shape)}")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups={groups} does not divide weight dimension 0 of shape {tuple(weight.shape)}")
    taps = weight[0, 0].numel()
    if transposed:
        in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
        view = weight.reshape(groups, in_per_group, out_per_group, taps)
    else:
        in_per_group, out_per_group = weight.shape[1], weight.shape[0] // groups
        view = weight.reshape(groups, out_per_group, in_per_group, taps).transpose(1, 2)
    return view, in_per_group, out_per_group


def _ungroup(view: Tensor, like: Tensor, transposed: bool) -> Tensor:
    if transposed:
        return view.reshape(like.shape)
    return view.transpose(1, 2).reshape(like.shape)


def fold_after_conv(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold ``y = scale * conv(x) + shift`` (BatchNorm after the convolution) into the convolution.

    Every output channel ``o`` of the convolution is multiplied by ``scale[o]``; the new bias is
    ``bias * scale + shift`` (a missing bias counts as 0). Exact for any stride, padding, dilation and groups.

    Args:
        weight: ``Conv`` weight ``[out, in/groups, *k]`` or ``ConvTranspose`` weight ``[in, out/groups, *k]``.
        bias: The convolution's bias ``[out]`` or None.
        scale: Per-output-channel scale ``[out]``.
        shift: Per-output-channel shift ``[out]``.
        transposed: True for ``ConvTranspose`` weights.
        groups: The convolution's ``groups``.

    Returns:
        ``(weight, bias)`` in the dtype of ``weight``; the bias is always a tensor.

    Raises:
        ValueError: if the shapes do not fit together.

    Example:
        >>> w, b = fold_after_conv(torch.ones(4, 1, 3), None, torch.full((4,), 2.0), torch.ones(4), groups=2)
        >>> w[:, 0, 0].tolist(), b.tolist()
        ([2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0])
    """
    view, _, out_per_group = _grouped_view(weight, groups, transposed)
    out = groups * out_per_group
    dtype = _fold_dtype(weight, scale, shift, out, "fold_after_conv")
    s = scale.to(dtype).reshape(groups, 1, out_per_group, 1)
    new_weight = _ungroup(view.to(dtype) * s, weight, transposed)
    return _result(new_weight, _bias_after(bias, scale, shift, dtype), weight, bias)


def fold_before_conv(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold ``conv(scale * x + shift)`` (BatchNorm before the convolution) into the convolution.

    Every input channel ``c`` is multiplied by ``scale[c]``, and each output channel's bias gains the sum of
    its kernel taps times ``shift`` of the input channel they read. That constant is what an output position
    that sees all taps on real input receives; positions whose taps fall on zero padding (``Conv`` with zero
    padding; ``ConvTranspose`` with a kernel or stride above 1) receive less, so the fold is exact only
    without them.

    Arguments, return value and errors as in :func:`fold_after_conv`, except that ``scale`` and ``shift`` are
    per INPUT channel (``[in]``).

    Example:
        >>> w, b = fold_before_conv(torch.ones(2, 3, 1), None, torch.full((3,), 2.0), torch.ones(3))
        >>> w[0, :, 0].tolist(), b.tolist()
        ([2.0, 2.0, 2.0], [3.0, 3.0])
    """
    view, in_per_group, out_per_group = _grouped_view(weight, groups, transposed)
    dtype = _fold_dtype(weight, scale, shift, groups * in_per_group, "fold_before_conv")
    w = view.to(dtype)
    s = scale.to(dtype).reshape(groups, in_per_group, 1, 1)
    t = shift.to(dtype).reshape(groups, in_per_group, 1, 1)
    new_weight = _ungroup(w * s, weight, transposed)
    extra = (w * t).sum(dim=(1, 3)).reshape(groups * out_per_group)
    return _result(new_weight, _bias_before(bias, extra, dtype), weight, bias)


def fold_after_linear(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Fold ``y = scale * linear(x) + shift`` (BatchNorm over the output features) into the linear layer.

    Works for a BatchNorm without affine parameters and a linear layer without bias (where
    ``torch.nn.utils.fusion.fuse_linear_bn_eval`` fails): pass the ``scale``/``shift`` they give.

    Args:
        weight: ``Linear`` weight ``[out, in]``.
        bias: ``[out]`` or None.
        scale: Per-output-feature scale ``[out]``.
        shift: Per-output-feature shift ``[out]``.

    Returns:
        ``(weight, bias)`` in the dtype of ``weight``.

    Raises:
        ValueError: if the shapes do not fit together.

    Example:
        >>> w, b = fold_after_linear(torch.ones(2, 3), None, torch.tensor([1.0, 3.0]), torch.zeros(2))
        >>> w.tolist()
        [[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]]
    """
    dtype = _linear_fold_dtype(weight, scale, shift, 0, "fold_after_linear")
    new_weight = weight.to(dtype) * scale.to(dtype)[:, None]
    return _result(new_weight, _bias_after(bias, scale, shift, dtype), weight, bias)


def fold_before_linear(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Fold ``linear(scale * x + shift)`` (BatchNorm over the input features) into the linear layer.

    ``W' = W * scale`` over columns and ``b' = b + W @ shift``. Always exact when the BatchNorm's channel axis
    is the axis the linear layer reads (the last one).

    Arguments, return value and errors as in :func:`fold_after_linear`, except that ``scale`` and ``shift``
    are per INPUT feature (``[in]``).

    Example:
        >>> w, b = fold_before_linear(torch.ones(1, 2), None, torch.tensor([2.0, 3.0]), torch.ones(2))
        >>> w.tolist(), b.tolist()
        ([[2.0, 3.0]], [2.0])
    """
    dtype = _linear_fold_dtype(weight, scale, shift, 1, "fold_before_linear")
    w = weight.to(dtype)
    new_weight = w * scale.to(dtype)[None, :]
    return _result(new_weight, _bias_before(bias, w @ shift.to(dtype), dtype), weight, bias)
