"""The alert rules of the BatchNorm monitors (torch and Keras): thresholds, alerts, and when an alert fires.

Four checks run on every stats record (see :mod:`bnkit.shared.monitor_log`): non-finite statistics, variance
collapse (dead channels), variance explosion and drift. An alert fires when a check starts failing for a layer,
and again only after the check has passed in between.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from bnkit.shared.monitor_log import finite_or_none

__all__ = ["Alert", "AlertRules", "MonitorWarning", "Thresholds", "alert_record", "as_thresholds"]


class MonitorWarning(UserWarning):
    """Warning category of the alerts a monitor raises (filter it with the ``warnings`` module).

    Example:
        >>> import warnings
        >>> warnings.simplefilter("ignore", MonitorWarning)
    """


@dataclass(frozen=True)
class Thresholds:
    """When a monitor raises an alert. ``None`` switches a check off.

    Attributes:
        drift: alert when a layer's drift (symmetric KL between batch and running statistics, mean over
            channels) exceeds this. 1.0 is what a one-standard-deviation shift of every channel's mean gives.
        drift_warmup: no drift alert while the layer's ``num_batches_tracked`` (or, without it, the number of
            records of the layer; for Keras, the optimizer's steps) is below this: freshly initialised running
            statistics (0 and 1) are far from any real data for the first updates.
        collapse_fraction: variance collapse: alert when at least this fraction of a layer's channels have a
            batch variance below the layer's eps.
        var_max: variance explosion: alert when any channel's batch or running variance exceeds this.
        nonfinite: alert when a batch or running statistic is NaN or infinite.

    Example:
        >>> Thresholds(drift=0.5).drift
        0.5
    """

    drift: float | None = 1.0
    drift_warmup: int = 100
    collapse_fraction: float | None = 0.5
    var_max: float | None = 1e6
    nonfinite: bool = True


@dataclass(frozen=True)
class Alert:
    """One alert: a check that started failing for a layer at a step.

    Attributes:
        step: the monitor step of the record that triggered it.
        layer: qualified layer name (``""`` when the model is itself a BatchNorm).
        kind: ``"nonfinite"``, ``"variance_collapse"``, ``"variance_explosion"`` or ``"drift"``.
        value: the measured value (NaN for ``"nonfinite"``).
        threshold: the threshold it crossed.
        message: one line for people.

    Example:
        >>> Alert(3, "bn1", "drift", 2.5, 1.0, "bn1: drift 2.5 > 1").kind
        'drift'
    """

    step: int
    layer: str
    kind: str
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``value`` and ``threshold`` None when not finite).

        Example:
            >>> Alert(0, "bn", "drift", 2.0, 1.0, "m").to_dict()["value"]
            2.0
        """
        out = asdict(self)
        out["value"] = finite_or_none(self.value)
        out["threshold"] = finite_or_none(self.threshold)
        return out


def alert_record(alert: Alert) -> dict[str, Any]:
    """The JSONL form of an alert: ``kind`` is ``"alert"`` and the alert's own kind goes under ``"alert"``.

    Example:
        >>> alert_record(Alert(0, "bn", "drift", 2.0, 1.0, "m"))["alert"]
        'drift'
    """
    fields_ = alert.to_dict()
    return {"kind": "alert", "alert": fields_.pop("kind"), **fields_}


def as_thresholds(value: Thresholds | Mapping[str, Any] | None, tool: str = "Monitor") -> Thresholds:
    """A :class:`Thresholds` from itself, a mapping of its fields, or None (the defaults).

    Raises:
        ValueError: an unknown field in the mapping.
        TypeError: anything else.

    Example:
        >>> as_thresholds({"drift": None}).drift is None
        True
    """
    if value is None:
        return Thresholds()
    if isinstance(value, Thresholds):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(Thresholds)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{tool}: unknown threshold(s) {unknown}; known: {sorted(known)}")
        return Thresholds(**value)
    raise TypeError(f"{tool}: thresholds must be a Thresholds, a dict or None, got {type(value).__name__}")


class AlertRules:
    """The checks of :class:`Thresholds` applied to stats records, remembering which checks are failing.

    Args:
        thresholds: when to alert.
        warn: also raise each alert as a :class:`MonitorWarning`.

    Attributes:
        alerts: every alert fired so far.

    Example:
        >>> rules = AlertRules(Thresholds(), warn=False)
        >>> record = {"step": 0, "batch_mean": 0.0, "batch_var": 1.0, "running_mean": 0.0, "running_var": 1.0,
        ...           "dead_fraction": 0.75, "batch_var_max": 1.0, "running_var_max": 1.0, "drift": 0.0}
        >>> [a.kind for a in rules.check("bn", 1e-3, 0, record)]
        ['variance_collapse']
        >>> rules.check("bn", 1e-3, 1, record)  # still failing: no new alert
        []
    """

    def __init__(self, thresholds: Thresholds, warn: bool = True) -> None:
        self.thresholds = thresholds
        self.warn = warn
        self.alerts: list[Alert] = []
        self._active: set[tuple[str, str]] = set()

    def check(self, layer: str, eps: float, seen: int, record: dict[str, Any], stacklevel: int = 2) -> list[Alert]:
        """The alerts ``record`` (a stats record of ``layer``) fires.

        Batch fields that are None (statistics a layer did not use) are left out of every check.

        Args:
            layer: the layer's name.
            eps: the layer's eps (dead-channel bound, quoted in the message).
            seen: updates the layer's running statistics had before this record (for the drift warm-up).
            record: the stats record.
            stacklevel: passed to ``warnings.warn``.

        Example:
            >>> AlertRules(Thresholds(), warn=False).check("bn", 1e-3, 500, {"step": 0, "batch_mean": None,
            ...     "batch_var": None, "running_mean": 0.0, "running_var": 1.0, "dead_fraction": None,
            ...     "batch_var_max": None, "running_var_max": 1.0, "drift": None})
            []
        """
        t = self.thresholds
        name = layer or "(model)"
        step = record["step"]
        checks: list[tuple[str, bool, float, float, str]] = []
        keys = ("batch_mean", "batch_var", "running_mean", "running_var")
        stats = [record[k] for k in keys if record[k] is not None]
        if t.nonfinite:
            bad = [k for k in keys if record[k] is not None and not math.isfinite(record[k])]
            checks.append(
                ("nonfinite", bool(bad), math.nan, math.nan, f"{name}: non-finite {', '.join(bad)} at step {step}")
            )
        finite = all(math.isfinite(v) for v in stats)
        frac = record["dead_fraction"]
        if t.collapse_fraction is not None and frac is not None:
            checks.append(
                (
                    "variance_collapse",
                    finite and frac >= t.collapse_fraction,
                    frac,
                    t.collapse_fraction,
                    f"{name}: variance collapse at step {step}: {frac:.0%} of channels have "
                    f"batch variance below eps={eps:g}",
                )
            )
        peaks = [v for v in (record["batch_var_max"], record["running_var_max"]) if v is not None]
        if t.var_max is not None and peaks:
            peak = max(peaks)
            checks.append(
                (
                    "variance_explosion",
                    finite and peak > t.var_max,
                    peak,
                    t.var_max,
                    f"{name}: variance explosion at step {step}: a channel variance of "
                    f"{peak:.4g} exceeds {t.var_max:g}",
                )
            )
        if t.drift is not None and record["drift"] is not None:
            drift = record["drift"]
            checks.append(
                (
                    "drift",
                    finite and seen >= t.drift_warmup and drift > t.drift,
                    drift,
                    t.drift,
                    f"{name}: drift {drift:.4g} between batch and running statistics exceeds "
                    f"{t.drift:g} at step {step}",
                )
            )
        out = []
        for kind, fired, value, threshold, message in checks:
            key = (layer, kind)
            if not fired:
                self._active.discard(key)
                continue
            if key in self._active:
                continue
            self._active.add(key)
            alert = Alert(step, layer, kind, float(value), float(threshold), message)
            self.alerts.append(alert)
            out.append(alert)
            if self.warn:
                warnings.warn(message, MonitorWarning, stacklevel=stacklevel)
        return out
