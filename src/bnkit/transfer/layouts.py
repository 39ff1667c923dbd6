"""Weight and activation layouts between Keras 3 (channels last) and PyTorch (channels first), in NumPy.

Every rule of the porting table, as pure functions that each have an inverse:

========================  =====================================  ==========================================
layer                     Keras                                  PyTorch
========================  =====================================  ==========================================
ConvND kernel             ``(k..., in/groups, out)``             ``(out, in/groups, k...)``: a transpose
DepthwiseConvND kernel    ``(k..., C, mult)``                    ``(C*mult, 1, k...)``, channel ``c*mult+m``
ConvNDTranspose kernel    ``(k..., out, in)``                    ``(in, out, k...)``
Dense kernel              ``(in, out)``                          ``(out, in)``; after Flatten the rows are
                                                                 reordered from ``(H, W, C)`` to ``(C, H, W)``
activations               ``(N, spatial..., C)``                 ``(N, C, spatial...)``
'same' padding            ``(total // 2, total - total // 2)``   symmetric ``padding`` only
========================  =====================================  ==========================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "activation_to_keras",
    "activation_to_torch",
    "conv_kernel_to_keras",
    "conv_kernel_to_torch",
    "dense_kernel_to_keras",
    "dense_kernel_to_torch",
    "depthwise_kernel_to_keras",
    "depthwise_kernel_to_torch",
    "keras_padding",
]


def conv_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Keras ``(k..., in, out)`` (ConvND) or ``(k..., out, in)`` (ConvNDTranspose) -> PyTorch ``(out|in, ...)``.

    The same axis permutation serves both: the two last axes swap and move to the front.

    Example:
        >>> conv_kernel_to_torch(np.zeros((3, 5, 4, 8))).shape
        (8, 4, 3, 5)
    """
    n = kernel.ndim - 2
    return np.ascontiguousarray(np.transpose(kernel, (n + 1, n, *range(n))))


def conv_kernel_to_keras(weight: np.ndarray) -> np.ndarray:
    """Inverse of :func:`conv_kernel_to_torch`.

    Example:
        >>> conv_kernel_to_keras(np.zeros((8, 4, 3, 5))).shape
        (3, 5, 4, 8)
    """
    n = weight.ndim - 2
    return np.ascontiguousarray(np.transpose(weight, (*range(2, n + 2), 1, 0)))


def depthwise_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Keras depthwise ``(k..., C, mult)`` -> PyTorch ``(C*mult, 1, k...)`` (``groups=C``, channel ``c*mult+m``).

    Example:
        >>> depthwise_kernel_to_torch(np.zeros((3, 3, 4, 2))).shape
        (8, 1, 3, 3)
    """
    *spatial, channels, mult = kernel.shape
    flat = kernel.reshape(*spatial, channels * mult)
    n = len(spatial)
    return np.ascontiguousarray(np.transpose(flat, (n, *range(n)))[:, None])


def depthwise_kernel_to_keras(weight: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of :func:`depthwise_kernel_to_torch` for ``channels`` input channels.

    Example:
        >>> depthwise_kernel_to_keras(np.zeros((8, 1, 3, 3)), 4).shape
        (3, 3, 4, 2)
    """
    n = weight.ndim - 2
    flat = np.transpose(weight[:, 0], (*range(1, n + 1), 0))
    return np.ascontiguousarray(flat.reshape(*flat.shape[:-1], channels, weight.shape[0] // channels))


def dense_kernel_to_torch(kernel: np.ndarray, flatten_from: Sequence[int] | None = None) -> np.ndarray:
    """Keras Dense ``(in, out)`` -> PyTorch Linear ``(out, in)``.

    Args:
        kernel: The Keras kernel.
        flatten_from: The shape (without the batch axis, channels last) that a Keras ``Flatten`` flattened into
            this Dense's input; its rows are reordered from Keras's ``(spatial..., C)`` to PyTorch's
            ``(C, spatial...)`` order.

    Example:
        >>> k = np.arange(12.0).reshape(6, 2)  # Flatten of (1, 3, 2) -> 6 rows
        >>> dense_kernel_to_torch(k, (1, 3, 2))[0].tolist()
        [0.0, 4.0, 8.0, 2.0, 6.0, 10.0]
    """
    if flatten_from is not None and len(flatten_from) >= 2:
        out = kernel.shape[1]
        kernel = np.moveaxis(kernel.reshape(*flatten_from, out), -2, 0).reshape(-1, out)
    return np.ascontiguousarray(kernel.T)


def dense_kernel_to_keras(weight: np.ndarray, flatten_from: Sequence[int] | None = None) -> np.ndarray:
    """Inverse of :func:`dense_kernel_to_torch`.

    Example:
        >>> k = np.arange(12.0).reshape(6, 2)
        >>> bool((dense_kernel_to_keras(dense_kernel_to_torch(k, (1, 3, 2)), (1, 3, 2)) == k).all())
        True
    """
    kernel = weight.T
    if flatten_from is not None and len(flatten_from) >= 2:
        out = kernel.shape[1]
        channels_first = (flatten_from[-1], *flatten_from[:-1], out)
        kernel = np.moveaxis(kernel.reshape(channels_first), 0, -2).reshape(-1, out)
    return np.ascontiguousarray(kernel)


def activation_to_torch(
    value: np.ndarray, torch_shape: Sequence[int] | None = None, flatten_from: Sequence[int] | None = None
) -> np.ndarray:
    """A Keras activation in PyTorch's layout: channels moved to axis 1, flattened features in ``(C, H, W)`` order.

    Args:
        value: The Keras tensor (batch first, channels last).
        torch_shape: The PyTorch tensor's shape, when known: a rank >= 3 tensor keeps Keras's layout when that
            is the shape PyTorch has (a Dense over a sequence), else its channels move to axis 1.
        flatten_from: As in :func:`dense_kernel_to_torch`, for a rank-2 tensor that a Flatten produced.

    Example:
        >>> activation_to_torch(np.zeros((2, 5, 5, 3))).shape
        (2, 3, 5, 5)
    """
    if value.ndim == 2 and flatten_from is not None and len(flatten_from) >= 2:
        return np.moveaxis(value.reshape(value.shape[0], *flatten_from), -1, 1).reshape(value.shape[0], -1)
    if value.ndim < 3:
        return value
    moved = np.moveaxis(value, -1, 1)
    if torch_shape is not None and tuple(moved.shape) != tuple(torch_shape) and value.shape == tuple(torch_shape):
        return value
    return np.ascontiguousarray(moved)


def activation_to_keras(value: np.ndarray) -> np.ndarray:
    """A PyTorch channels-first tensor in Keras's channels-last layout (rank >= 3).

    Example:
        >>> activation_to_keras(np.zeros((2, 3, 5, 5))).shape
        (2, 5, 5, 3)
    """
    return value if value.ndim < 3 else np.ascontiguousarray(np.moveaxis(value, 1, -1))


def keras_padding(
    padding: str, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilation: Sequence[int]
) -> list[tuple[int, int]]:
    """``(before, after)`` per spatial axis that a Keras convolution pads its input with.

    ``'same'``: ``total = max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)``, ``before = total // 2`` (the
    extra row/column goes after, as TensorFlow does); ``'causal'``: ``((k - 1) * d, 0)``; ``'valid'``: none.

    Example:
        >>> keras_padding("same", (32, 32), (3, 3), (2, 2), (1, 1))
        [(0, 1), (0, 1)]
        >>> keras_padding("same", (32,), (3,), (1,), (1,))
        [(1, 1)]
    """
    pads = []
    for n, k, s, d in zip(sizes, kernel, strides, dilation, strict=True):
        if padding == "same":
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        elif padding == "causal":
            pads.append(((k - 1) * d, 0))
        else:
            pads.append((0, 0))
    return pads
