"""The Keras study's model: the PyTorch study's network (:class:`bnkit.study.model.DigitsNet`) in Keras 3.

Three 3x3 convolutions (16, 32, 64 channels, no bias) each followed by ``keras.layers.BatchNormalization`` with
Keras's defaults (momentum 0.99, epsilon 1e-3) and ReLU, a 2x2 max-pool after the second, global average pooling
and a dense head named ``"head"``. Channels-last inputs ``[N, 8, 8, 1]``. The convolutions pad by repeating the
border pixel (:class:`EdgePad2D`), as the PyTorch network does, so a BatchNorm after the first convolution can undo
an affine change of the input exactly once its statistics are recomputed.

Example:
    >>> import numpy as np
    >>> model = digits_net(seed=0)
    >>> model(np.zeros((4, 8, 8, 1), "float32")).shape[-1]
    10
"""

from __future__ import annotations

from typing import Any

from bnkit.keras.compat import import_keras

__all__ = ["EdgePad2D", "digits_net"]

keras = import_keras()


class EdgePad2D(keras.layers.Layer):
    """Pad the two spatial axes of channels-last images by one pixel, repeating the border (replicate padding).

    Example:
        >>> import numpy as np
        >>> x = np.arange(4, dtype="float32").reshape(1, 2, 2, 1)
        >>> keras.ops.convert_to_numpy(EdgePad2D()(x))[0, :, :, 0].tolist()[0]
        [0.0, 0.0, 1.0, 1.0]
    """

    def call(self, inputs: Any) -> Any:
        ops = keras.ops
        x = ops.concatenate([inputs[:, :1], inputs, inputs[:, -1:]], axis=1)
        return ops.concatenate([x[:, :, :1], x, x[:, :, -1:]], axis=2)

    def compute_output_shape(self, input_shape: Any) -> Any:
        n, h, w, c = input_shape
        return (n, None if h is None else h + 2, None if w is None else w + 2, c)


def digits_net(seed: int = 0, width: int = 16, num_classes: int = 10, momentum: float = 0.99) -> Any:
    """A new, untrained Keras functional model: conv-BN-ReLU x3, global average pooling, dense ``head``.

    Args:
        seed: initialisation seed (``keras.utils.set_random_seed``).
        width: channels of the first convolution (doubled twice).
        num_classes: outputs of the head.
        momentum: BatchNormalization momentum in Keras's convention (weight of the old value; 0.99 is Keras's
            default and the point of the Keras study).

    Example:
        >>> [type(layer).__name__ for layer in digits_net().layers][1:4]
        ['EdgePad2D', 'Conv2D', 'BatchNormalization']
    """
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    x = inputs
    for i, channels in enumerate((width, 2 * width, 4 * width)):
        x = EdgePad2D(name=f"pad{i + 1}")(x)
        x = layers.Conv2D(channels, 3, use_bias=False, name=f"conv{i + 1}")(x)
        x = layers.BatchNormalization(momentum=momentum, name=f"bn{i + 1}")(x)
        x = layers.ReLU(name=f"relu{i + 1}")(x)
        if i == 1:
            x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, name="head")(x)
    return keras.Model(inputs, outputs, name="digits_net")
