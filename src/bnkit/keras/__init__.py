"""bnkit.keras: the bnkit tools for Keras 3 models, on the TensorFlow, JAX and torch backends.

Pure ``keras`` + ``keras.ops`` + NumPy: one implementation for every backend, and importing it never imports
torch. Keras itself is imported by the first tool used (Keras reads ``KERAS_BACKEND`` when it is imported), and
a missing Keras is a one-line error naming the extra to install (``pip install 'bnkit[keras]'``).

Example:
    >>> import bnkit.keras
    >>> "freeze" in bnkit.keras.__all__
    True
"""

from __future__ import annotations

from bnkit import _lazy

# public name -> module that defines it. Module names differ from the function names on purpose: importing a
# submodule called ``explain`` would replace the function ``bnkit.keras.explain`` with the module.
_EXPORTS: dict[str, str] = {
    "BatchNormalization": "bnkit.keras.layer",
    "named_batchnorms": "bnkit.keras.find",
    "summary": "bnkit.keras.accounting",
    "explain": "bnkit.keras.explanation",
    "KerasExplanation": "bnkit.keras.explanation",
    "doctor": "bnkit.keras.diagnosis",
    "freeze": "bnkit.keras.freezing",
    "unfreeze": "bnkit.keras.freezing",
    "KerasFreezeReport": "bnkit.keras.freezing",
    "recalibrate": "bnkit.keras.recalibration",
    "KerasRecalibrationReport": "bnkit.keras.recalibration",
    "fold": "bnkit.keras.folding",
    "fold_with_report": "bnkit.keras.folding",
    "KerasFoldReport": "bnkit.keras.folding",
    "transfer_weights": "bnkit.transfer.port",  # lives above bnkit.keras (it needs torch); imported on first use
    "Monitor": "bnkit.keras.monitoring",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS, globals())
