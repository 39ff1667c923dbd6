"""``bnkit.keras.BatchNormalization``: Keras's BatchNormalization with ``freeze_stats`` and ``freeze_affine``.

Stock Keras has one switch, ``trainable``, that freezes both the statistics and gamma/beta, and a container's
``trainable = True`` turns it back on for every layer inside. This registered subclass keeps two flags that no
recursive setter touches:

* ``freeze_stats=True``: the layer always normalises with its moving statistics and never updates them, under
  ``fit()`` too (``training`` is forced to False inside ``call``); gamma/beta still learn unless frozen too.
* ``freeze_affine=True``: gamma and beta are not trainable, whatever ``trainable`` is set to later.

Weights are the stock layer's (same names, same order), ``get_config`` adds the two flags, and a ``.keras`` file
loads again with ``bnkit.keras`` imported (the class is registered as ``bnkit>BatchNormalization``).
"""

from __future__ import annotations

from typing import Any

from bnkit.keras.compat import import_keras

__all__ = ["BatchNormalization"]

keras = import_keras()


@keras.saving.register_keras_serializable(package="bnkit")
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras BatchNormalization whose statistics and/or gamma/beta stay frozen through ``trainable`` changes.

    Args:
        freeze_stats: Normalise with the moving statistics and never update them, in ``fit()`` too.
        freeze_affine: Keep gamma and beta out of the trainable weights.
        **kwargs: Everything ``keras.layers.BatchNormalization`` takes (momentum in Keras's convention: the
            weight of the old value, 0.99 by default).

    Example:
        >>> import numpy as np
        >>> bn = BatchNormalization(freeze_stats=True, freeze_affine=False)
        >>> _ = bn(np.ones((4, 3), "float32"), training=True)
        >>> bn.trainable = True
        >>> len(bn.trainable_weights), float(bn.moving_mean.numpy()[0]) if hasattr(bn.moving_mean, "numpy") else 0.0
        (2, 0.0)
    """

    def __init__(self, *args: Any, freeze_stats: bool = False, freeze_affine: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.freeze_stats = bool(freeze_stats)
        self.freeze_affine = bool(freeze_affine)

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)
        self._apply_affine_freeze()

    @property
    def trainable(self) -> bool:
        return super().trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        keras.layers.BatchNormalization.trainable.fset(self, value)
        self._apply_affine_freeze()

    def _apply_affine_freeze(self) -> None:
        frozen = getattr(self, "freeze_affine", False)
        for name in ("gamma", "beta"):
            variable = getattr(self, name, None)
            if variable is not None:
                variable.trainable = bool(self._trainable) and not frozen

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if self.freeze_stats:
            training = False
        return super().call(inputs, training=training, mask=mask)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "freeze_stats": self.freeze_stats, "freeze_affine": self.freeze_affine}
