"""Refuse a Keras model at the entry of a PyTorch tool, with one line naming the ``bnkit.keras`` function to use.

On the torch backend a Keras 3 model *is* a ``torch.nn.Module`` whose BatchNormalization layers are not torch
BatchNorm modules, so without this guard every torch tool would silently find nothing. The check looks at the
class hierarchy only: it imports neither Keras nor torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_keras_object", "refuse_keras"]

#: torch tool -> the bnkit.keras function that does the same job on a Keras model (None: no Keras equivalent).
KERAS_EQUIVALENT: dict[str, str | None] = {
    "explain": "explain",
    "summary": "summary",
    "doctor": "doctor",
    "freeze": "freeze",
    "unfreeze": "unfreeze",
    "recalibrate": "recalibrate",
    "fuse": "fold",
    "fuse_with_report": "fold",
    "Monitor": "Monitor",
    "convert": None,
    "shift": None,
    "sync_running_stats": None,
}


def is_keras_object(obj: Any) -> bool:
    """True when ``obj`` is an instance of a Keras (``keras``, ``tf_keras`` or ``tf.keras``) class.

    Example:
        >>> is_keras_object(object()), is_keras_object([1])
        (False, False)
    """
    for cls in type(obj).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if module.split(".")[0] in {"keras", "tf_keras"} or module.startswith("tensorflow.python.keras"):
            return True
    return False


def refuse_keras(model: Any, tool: str) -> None:
    """Raise a one-line TypeError when ``model`` is a Keras model or layer handed to the PyTorch tool ``tool``.

    Example:
        >>> refuse_keras(object(), "freeze")  # not Keras: nothing happens
    """
    if not is_keras_object(model):
        return
    equivalent = KERAS_EQUIVALENT.get(tool, tool)
    name = type(model).__name__
    if equivalent is None:
        raise TypeError(
            f"bnkit.{tool}: {name} is a Keras model; bnkit.{tool} works on torch.nn.Module only and bnkit.keras "
            "has no equivalent (see bnkit.keras for the Keras tools)"
        )
    raise TypeError(f"bnkit.{tool}: {name} is a Keras model; use bnkit.keras.{equivalent}(model) instead")
