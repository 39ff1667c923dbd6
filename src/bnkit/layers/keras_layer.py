"""Exact copies between a Keras 3 ``BatchNormalization`` layer and :class:`bnkit.BatchNorm`, both ways.

:meth:`bnkit.BatchNorm.from_keras_layer` and :meth:`bnkit.BatchNorm.to_keras_layer` delegate here. Keras is
imported inside the functions (it reads ``KERAS_BACKEND`` at import). What is copied:

* configuration: ``axis``, ``epsilon``, ``momentum`` (Keras's: weight of the OLD value, kept as
  ``keras_momentum`` so the update is written as Keras writes it), ``center``/``scale`` (beta/gamma on their own),
  ``renorm``/``renorm_clipping``/``renorm_momentum``, the biased moving variance;
* weights: gamma -> ``weight``, beta -> ``bias``, moving_mean -> ``running_mean``, moving_variance ->
  ``running_var``; with renorm moving_stddev -> ``running_std``, renorm_mean -> ``renorm_mean``, renorm_stddev
  -> ``renorm_std``;
* switches: ``trainable=False`` -> ``freeze_stats`` and ``freeze_affine``; bnkit's Keras layer's own
  ``freeze_stats``/``freeze_affine`` flags map one to one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from bnkit.layers.batchnorm import BatchNorm

__all__ = ["batchnorm_from_keras_layer", "batchnorm_to_keras_layer"]

_RENORM_WEIGHTS = (("running_std", "moving_stddev"), ("renorm_mean", "renorm_mean"), ("renorm_std", "renorm_stddev"))


def _numpy(keras: Any, value: Any) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(value), dtype=np.float32, copy=True)


def _import_keras() -> Any:
    try:
        import keras
    except ModuleNotFoundError:
        raise ModuleNotFoundError("this needs Keras 3: pip install 'bnkit[keras]'", name="keras") from None
    return keras


def _label(layer: Any) -> str:
    return f"Keras layer {getattr(layer, 'name', '?')!r}"


def batchnorm_from_keras_layer(cls: type[BatchNorm], layer: Any, axis: int | None = None) -> BatchNorm:
    """A :class:`bnkit.BatchNorm` that computes exactly what the built Keras ``BatchNormalization`` computes.

    Args:
        cls: ``bnkit.BatchNorm`` (or a subclass).
        layer: A built ``keras.layers.BatchNormalization`` (bnkit's Keras subclass too).
        axis: Channel axis of the new layer; default Keras's ``layer.axis`` (``-1``: channels last). Pass ``1``
            to use the layer on channels-first PyTorch tensors.

    Returns:
        The new layer, in training mode (``nn.Module``'s default), with Keras's statistics and switches.

    Raises:
        TypeError: ``layer`` is not a Keras BatchNormalization.
        ValueError: the layer is not built (it has no weights yet).

    Example:
        >>> import keras
        >>> from bnkit import BatchNorm
        >>> k = keras.layers.BatchNormalization(momentum=0.9); k.build((None, 3))
        >>> bn = BatchNorm.from_keras_layer(k)
        >>> bn.keras_momentum, bn.eps, bn.axis
        (0.9, 0.001, -1)
    """
    keras = _import_keras()
    if not isinstance(layer, keras.layers.BatchNormalization):
        raise TypeError(
            f"BatchNorm.from_keras_layer expects a keras.layers.BatchNormalization. Received: {type(layer).__name__}"
        )
    if layer.moving_mean is None:
        raise ValueError(f"{_label(layer)}: not built yet; call it on a batch or layer.build(shape) first")
    mean = _numpy(keras, layer.moving_mean)
    if layer.axis is None or isinstance(layer.axis, (list, tuple)):
        raise ValueError(f"{_label(layer)}: only a single int axis is supported. Received: axis={layer.axis}")
    new = cls.from_keras(
        int(mean.shape[0]),
        momentum=float(layer.momentum),
        epsilon=float(layer.epsilon),
        axis=int(layer.axis) if axis is None else int(axis),
        center=bool(layer.center),
        scale=bool(layer.scale),
        renorm=bool(layer.renorm),
        renorm_clipping=layer.renorm_clipping,
        renorm_momentum=float(layer.renorm_momentum),
        name=layer.name,
    )
    state = {"running_mean": mean, "running_var": _numpy(keras, layer.moving_variance)}
    if layer.scale:
        state["weight"] = _numpy(keras, layer.gamma)
    if layer.center:
        state["bias"] = _numpy(keras, layer.beta)
    if layer.renorm:
        for ours, theirs in _RENORM_WEIGHTS:
            state[ours] = _numpy(keras, getattr(layer, theirs))
    with torch.no_grad():
        for key, value in state.items():
            getattr(new, key).copy_(torch.from_numpy(value))
    frozen = not layer.trainable
    new.freeze_stats = frozen or bool(getattr(layer, "freeze_stats", False))
    new.freeze_affine = frozen or bool(getattr(layer, "freeze_affine", False))
    return new


def _keras_renorm(bn: BatchNorm) -> dict[str, Any]:
    renorm = bn.renorm
    assert renorm is not None
    if renorm.warmup_steps or renorm.rmax_ramp_steps or renorm.dmax_ramp_steps:
        raise ValueError(
            f"{bn.label()}: Keras renorm has no warm-up or ramp schedule; use Renorm(...) with warmup_steps=0, "
            "rmax_ramp_steps=0, dmax_ramp_steps=0"
        )
    clipping = {}
    rmin = renorm.rmin if renorm.rmin is not None else 1.0 / renorm.rmax
    for key, value in (("rmax", renorm.rmax), ("rmin", rmin), ("dmax", renorm.dmax)):
        if not math.isinf(value) and not (key == "rmin" and value == 0.0):
            clipping[key] = float(value)
    momentum = renorm.keras_momentum if renorm.keras_momentum is not None else 1.0 - renorm.momentum
    return {"renorm": True, "renorm_clipping": clipping, "renorm_momentum": float(momentum)}


def batchnorm_to_keras_layer(bn: BatchNorm, input_rank: int | None = None, *, strict: bool = True) -> Any:
    """A built ``keras.layers.BatchNormalization`` that computes exactly what ``bn`` computes.

    Args:
        bn: The bnkit layer.
        input_rank: Rank of the inputs the Keras layer will see (Keras builds per rank); default the rank of
            the last input ``bn`` saw, else 4 for a channel axis other than -1 and 2 for ``axis=-1``.
        strict: Refuse what Keras cannot express exactly in training (PyTorch's unbiased running variance,
            ``momentum=None``, ghost batches, a renorm schedule). With ``strict=False`` the unbiased variance is
            dropped (inference stays exact; training then follows Keras). ``momentum=None`` always refuses.

    Returns:
        The Keras layer, built, with the statistics, ``momentum = keras_momentum`` (or ``1 - momentum``) and
        ``trainable=False`` when both of bnkit's freeze switches are set. Only one of them set is refused unless
        ``strict=False`` (stock Keras has a single switch).

    Example:
        >>> from bnkit import BatchNorm
        >>> k = BatchNorm.from_keras(3, momentum=0.9).to_keras_layer()
        >>> type(k).__name__, k.momentum, k.axis
        ('BatchNormalization', 0.9, -1)
    """
    keras = _import_keras()
    if bn.momentum is None:
        raise ValueError(f"{bn.label()}: momentum=None (cumulative average) has no Keras equivalent; set a momentum")
    problems = []
    if bn.unbiased_running_var:
        problems.append("unbiased running variance (Keras stores the biased one; use unbiased_running_var=False)")
    if bn.virtual_batch_size is not None:
        problems.append("ghost batches (virtual_batch_size)")
    if bn.freeze_stats != bn.freeze_affine:
        problems.append("only one of freeze_stats/freeze_affine (stock Keras has one switch, trainable)")
    if problems and strict:
        raise ValueError(f"{bn.label()}: Keras cannot express {'; '.join(problems)}; pass strict=False to drop them")
    if bn.track_running_stats is False:
        raise ValueError(f"{bn.label()}: track_running_stats=False has no Keras equivalent")
    momentum = bn.keras_momentum if bn.keras_momentum is not None else 1.0 - bn.momentum
    kwargs: dict[str, Any] = {
        "axis": bn.axis,
        "momentum": float(momentum),
        "epsilon": float(bn.eps),
        "center": bn.bias is not None,
        "scale": bn.weight is not None,
    }
    if bn.renorm is not None:
        kwargs.update(_keras_renorm(bn))
    if bn.name:
        kwargs["name"] = bn.name.replace(".", "_")
    layer = keras.layers.BatchNormalization(**kwargs)
    if input_rank is None:
        seen = getattr(bn, "_seen_dim", 0)
        input_rank = seen if seen else (2 if bn.axis in (-1, 1) else 4)
    shape: list[int | None] = [None] * input_rank
    shape[bn.axis] = bn.num_features
    layer.build(tuple(shape))
    values = {"moving_mean": bn.running_mean, "moving_variance": bn.running_var}
    if bn.weight is not None:
        values["gamma"] = bn.weight
    if bn.bias is not None:
        values["beta"] = bn.bias
    if bn.renorm is not None:
        values.update({theirs: getattr(bn, ours) for ours, theirs in _RENORM_WEIGHTS})
    for name, tensor in values.items():
        getattr(layer, name).assign(tensor.detach().cpu().float().numpy())
    if bn.freeze_stats and bn.freeze_affine:
        layer.trainable = False
    return layer
