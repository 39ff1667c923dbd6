"""The BatchNorm monitor log: its JSONL file name, record shapes and reader, shared by ``bnkit.Monitor`` (torch)
and ``bnkit.keras.Monitor``.

A log directory holds ``bn_monitor.jsonl``: one JSON object per line, of three kinds:

- ``{"kind": "meta", "version", "time", "every", "thresholds", "layers": [{"name", "type", "channels", "eps"}]}``
  when a monitor opens the file (a file appended to by several runs has several);
- ``{"kind": "stats", "step", "time", "layer", "uses_batch_stats", "channels", "count", "num_batches_tracked",
  <QUANTITIES>}``: one per layer and recorded step;
- ``{"kind": "alert", "alert": <alert kind>, "step", "layer", "value", "threshold", "message"}``.

JSON is strict: a non-finite float is written as null and its field named in the record's ``"nonfinite"`` list;
:func:`read_log` gives it back as NaN.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "HISTOGRAMS",
    "JSONL_NAME",
    "LOG_VERSION",
    "QUANTITIES",
    "finite_or_none",
    "jsonable",
    "meta_record",
    "read_log",
]

#: Name of the JSONL file a monitor writes in its log directory.
JSONL_NAME = "bn_monitor.jsonl"

#: Version of the record shapes, written in every meta record.
LOG_VERSION = 1

#: Per-layer quantities of a stats record, in this order (floats; None when the layer has no such thing, e.g.
#: running statistics with ``track_running_stats=False``, or batch statistics a Keras layer did not use).
QUANTITIES: tuple[str, ...] = (
    "batch_mean",
    "batch_var",
    "batch_var_min",
    "batch_var_max",
    "running_mean",
    "running_var",
    "running_var_min",
    "running_var_max",
    "drift",
    "drift_max",
    "weight_norm",
    "bias_norm",
    "dead_fraction",
)

#: Per-channel vectors written as TensorBoard histograms (``bn_hist_<name>/<layer>``).
HISTOGRAMS: tuple[str, ...] = ("batch_mean", "batch_var", "running_mean", "running_var", "weight", "bias")


def finite_or_none(value: Any) -> Any:
    """``value``, or None when it is a non-finite float.

    Example:
        >>> finite_or_none(1.5), finite_or_none(float("nan"))
        (1.5, None)
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def jsonable(record: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: non-finite floats become null and are named under ``"nonfinite"``.

    Example:
        >>> jsonable({"drift": float("inf"), "step": 3})
        {'drift': None, 'step': 3, 'nonfinite': ['drift']}
    """
    out = {}
    bad = []
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            value = None
        out[key] = value
    if bad:
        out["nonfinite"] = bad
    return out


def meta_record(every: int, thresholds: dict[str, Any], layers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The meta record a monitor writes when it opens the log.

    Args:
        every: the monitor's recording interval (steps).
        thresholds: the alert thresholds as a dict.
        layers: one dict per watched layer: ``name``, ``type``, ``channels``, ``eps`` (and anything else the
            monitor knows, e.g. Keras's ``momentum``).

    Example:
        >>> meta_record(10, {"drift": 1.0}, [{"name": "bn", "type": "BatchNorm2d", "channels": 4, "eps": 1e-5}])["kind"]
        'meta'
    """
    return {
        "kind": "meta",
        "version": LOG_VERSION,
        "time": time.time(),
        "every": every,
        "thresholds": dict(thresholds),
        "layers": list(layers),
    }


def read_log(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a monitor log: a log directory (its ``bn_monitor.jsonl``) or the JSONL file itself.

    Returns:
        ``{"meta": [...], "stats": [...], "alerts": [...]}``: lists of the records of each kind, in file
        order (a file appended to by several runs has several meta records). Nulls written for non-finite
        values are read back as NaN in the stats records.

    Raises:
        ValueError: the file is missing, unreadable, or a line is not a JSON object.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / JSONL_NAME).write_text('{"kind": "stats", "step": 0, "drift": null, "nonfinite": ["drift"]}\\n')
        >>> read_log(d)["stats"][0]["drift"]
        nan
    """
    path = Path(path)
    file = path / JSONL_NAME if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"{str(file)!r}: no monitor log here; pass the log_dir given to bnkit.Monitor or its {JSONL_NAME}"
        )
    out: dict[str, list[dict[str, Any]]] = {"meta": [], "stats": [], "alerts": []}
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(file)!r}: cannot read the monitor log: {exc}") from exc
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break  # a run still writing (or killed) may leave a partial last line
            raise ValueError(f"{str(file)!r} line {number}: not JSON ({exc.msg}); is this a monitor log?") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{str(file)!r} line {number}: expected a JSON object; is this a monitor log?")
        kind = record.get("kind")
        if kind == "stats":
            for key in record.get("nonfinite", ()):
                record[key] = math.nan
            out["stats"].append(record)
        elif kind == "alert":
            out["alerts"].append(record)
        elif kind == "meta":
            out["meta"].append(record)
    return out
