"""What the TFLite converter leaves of the BatchNormalization layers, before and after :func:`bnkit.keras.fold`.

TFLite folds a BN after a Conv2D, DepthwiseConv2D, SeparableConv2D, Dense, Conv1D or Conv2DTranspose itself, and
leaves a MUL and an ADD for a BN before a conv (even a valid-padded one, where folding is exact) or after an
activation. Counting those ops in the converted original and in the folded model shows what ``fold`` adds. Needs
the TensorFlow backend and TensorFlow; imported only when ``tflite=True`` is asked.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any

from bnkit.keras import compat
from bnkit.shared.errors import first_line

__all__ = ["tflite_counts", "tflite_ops"]


def tflite_counts(model: Any, folded: Any) -> tuple[dict[str, int] | None, dict[str, int] | None, str]:
    """``(counts of model, counts of folded, note)`` from :func:`tflite_ops`; ``(None, None, why)`` when skipped.

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> before, after, note = tflite_counts(m, m) if compat.backend() != "tensorflow" else (None, None, "skipped")
        >>> before, after, "skipped" in note
        (None, None, True)
    """
    if compat.backend() != "tensorflow":
        return None, None, f"TFLite counts skipped: the Keras backend is {compat.backend()}, not tensorflow"
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return None, None, "TFLite counts skipped: tensorflow is not installed"
    try:
        return tflite_ops(model), tflite_ops(folded), ""
    except Exception as error:  # the converter's failures are many; the fold itself is done
        return None, None, f"TFLite counts skipped: the converter failed ({first_line(error, with_type=True)})"


def tflite_ops(model: Any) -> dict[str, int]:
    """The MUL and ADD ops left when ``tf.lite.TFLiteConverter`` converts ``model`` (TensorFlow backend).

    A BN the converter could not fold shows as a MUL and/or an ADD; Add layers (residuals) count as ADD too.
    Reads the op list with ``tf.lite.Interpreter._get_ops_details`` (private; the one TF call that lists them).

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> tflite_ops(m) if compat.backend() == "tensorflow" else {"MUL": 0, "ADD": 0}
        {'MUL': 0, 'ADD': 0}
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # Keras's export prints signatures
        warnings.simplefilter("ignore")
        content = converter.convert()
        interpreter = tf.lite.Interpreter(model_content=content)
    names = [str(op["op_name"]) for op in interpreter._get_ops_details()]
    return {"MUL": names.count("MUL"), "ADD": names.count("ADD")}
