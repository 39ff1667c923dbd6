"""Watch BatchNorm statistics while a model trains: JSONL and TensorBoard logs, drift and variance alerts.

:class:`Monitor` records, for each selected BatchNorm layer, on every ``every``-th training step: the batch
mean and variance of the layer's input (averaged over channels, with the variance's extremes), the same
summaries of the running statistics, their distance (:func:`bnkit.core.divergence.gaussian_symmetric_kl`
averaged over channels, the measure ``bnkit.shift`` uses), the norms of gamma and beta, the fraction of dead
channels (batch variance below the layer's eps) and whether the layer normalised with batch or running
statistics. The records go to a JSONL file (always, when there is a place to write it) and to TensorBoard
(scalars, plus per-channel histograms every ``histogram_every`` steps) through ``torch.utils.tensorboard``.

How it hooks in, and why: the monitor registers one *global* forward pre-hook and one global forward hook
(``torch.nn.modules.module.register_module_forward_pre_hook``) while attached, and nothing on the model
itself. A model with a monitor attached therefore pickles (``torch.save(model)``), deep-copies and scripts
exactly as the bare model does, and copies carry no trace of the monitor. The hooks ignore every module that
is not one of the selected layers or the model, and do nothing while tracing, compiling or exporting.
``torch.export.export(..., strict=True)`` refuses any global hook: detach the monitor first (the default,
non-strict export works while attached).

Cost: statistics are taken with one fused reduction pass per layer (float32 sums, finished in float64, with an
exact two-pass fallback when ``|mean| >> std`` would make the one-pass variance inaccurate), summaries of all
layers are computed together and read back with one device sync per recorded step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from bnkit.core.divergence import gaussian_symmetric_kl
from bnkit.layers.find import LayerSelector, named_batchnorms

__all__ = [
    "JSONL_NAME",
    "QUANTITIES",
    "Alert",
    "Monitor",
    "MonitorWarning",
    "Thresholds",
    "read_log",
]

#: Name of the JSONL file a :class:`Monitor` writes in its log directory.
JSONL_NAME = "bn_monitor.jsonl"

#: Per-layer quantities of a stats record, in the order used internally (all floats; None when the layer has
#: no such thing, e.g. running statistics with ``track_running_stats=False``).
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

#: Per-channel vectors written as TensorBoard histograms.
HISTOGRAMS: tuple[str, ...] = ("batch_mean", "batch_var", "running_mean", "running_var", "weight", "bias")

_LOG_VERSION = 1
# float32 sums of squares carry a relative error of a few 1e-8 per element; 2e-6 is a generous bound.
_F32_SUM_REL_ERR = 2e-6
# One-pass variances are accepted while their error bound stays below this fraction of max(var, eps).
_VAR_REL_TOL = 1e-3


class MonitorWarning(UserWarning):
    """Warning category of the alerts a :class:`Monitor` raises (filter it with the ``warnings`` module).

    Example:
        >>> import warnings
        >>> warnings.simplefilter("ignore", MonitorWarning)
    """


@dataclass(frozen=True)
class Thresholds:
    """When a :class:`Monitor` raises an alert. ``None`` switches a check off.

    Attributes:
        drift: alert when a layer's drift (symmetric KL between batch and running statistics, mean over
            channels) exceeds this. 1.0 is what a one-standard-deviation shift of every channel's mean gives.
        drift_warmup: no drift alert while the layer's ``num_batches_tracked`` (or, without it, the number of
            records of the layer) is below this: freshly initialised running statistics (0 and 1) are far
            from any real data for the first updates.
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
        """A JSON-ready dict (``value`` None when not finite).

        Example:
            >>> Alert(0, "bn", "drift", 2.0, 1.0, "m").to_dict()["value"]
            2.0
        """
        out = asdict(self)
        out["value"] = _finite_or_none(self.value)
        return out


class _Layer:
    """What the monitor keeps about one selected BatchNorm layer."""

    __slots__ = ("eps", "is_bnkit", "module", "name", "records", "seen_step")

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.eps = float(module.eps)
        self.is_bnkit = callable(getattr(module, "uses_batch_stats", None)) and callable(
            getattr(module, "channel_axis", None)
        )
        self.seen_step: int | None = None
        self.records = 0


class _Pending:
    """Statistics of one layer taken during a forward call, not yet summarised."""

    __slots__ = ("bias", "count", "layer", "mean", "nbt", "running", "uses_batch", "var", "weight")

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer
        self.running: Tensor | None = None
        self.nbt: Tensor | None = None
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.count = 0
        self.uses_batch = True


class Monitor:
    """Record BatchNorm statistics during training, write them to JSONL/TensorBoard and raise alerts.

    What is recorded, per selected layer, on every ``every``-th training step (see :data:`QUANTITIES`):

    - ``batch_mean``, ``batch_var`` (channel averages of the per-channel mean and biased variance of the
      layer's input), ``batch_var_min``, ``batch_var_max``;
    - ``running_mean``, ``running_var``, ``running_var_min``, ``running_var_max``: the running statistics as
      they were *before* this batch updated them (what inference would have used);
    - ``drift``: symmetric KL divergence between the per-channel Gaussians (batch mean, batch variance) and
      (running mean, running variance), layer eps added to both variances, averaged over channels (the
      measure of ``bnkit.shift``); ``drift_max`` is the largest channel's;
    - ``weight_norm``, ``bias_norm``: L2 norms of gamma and beta;
    - ``dead_fraction``: fraction of channels whose batch variance is below the layer's eps;
    - ``uses_batch_stats``: whether the layer normalised with batch statistics (False for frozen layers or
      layers in ``eval()`` inside a training model), ``count`` (values per channel) and
      ``num_batches_tracked``.

    Steps: a *training step* is a forward call of ``model`` while ``model.training`` is True. Without calls
    to :meth:`step`, every such call starts a new step (step 0, 1, 2, ...). Calling ``monitor.step()`` once
    per iteration of your loop (after ``optimizer.step()``), or ``monitor.step(global_step)``, makes the
    monitor follow your numbering instead: records are then made at steps that are multiples of ``every``,
    and several forward calls in one step (gradient accumulation) are recorded once, at the first call. Use
    ``auto_step=False`` when the loop runs several forward calls before its first ``step()`` call. A layer
    called several times in one step is recorded at its first call. Forward calls in ``eval()`` mode are
    never recorded. Records of a step are summarised, written and checked when the next step starts (or at
    :meth:`flush`, :meth:`detach`, :meth:`close`).

    Where records go: ``log_dir`` gets ``bn_monitor.jsonl`` (appended to; see :func:`read_log`) and, when the
    tensorboard package is installed, TensorBoard event files. ``writer`` takes an existing
    ``SummaryWriter`` instead (the JSONL file then goes to its log directory, and the monitor does not close
    it). With neither, records stay in memory (:attr:`history`).

    Args:
        model: the model to watch; its BatchNorm layers are found at any depth (it may itself be one).
        log_dir: directory for the JSONL file and TensorBoard events (created when missing).
        writer: an existing ``torch.utils.tensorboard.SummaryWriter`` (or anything with the same methods).
        every: record every ``every``-th step.
        layers: which BatchNorm layers (:data:`bnkit.layers.find.LayerSelector`): None for all, a glob on the
            qualified name, a type, a predicate ``(name, module) -> bool`` or a list of names/globs.
        thresholds: a :class:`Thresholds`, or a mapping of its fields to override the defaults.
        tensorboard: True requires TensorBoard output (ImportError when tensorboard is missing), False writes
            only JSONL, None (default) writes TensorBoard events when ``log_dir`` is given and tensorboard is
            installed (a warning says so when it is not).
        histogram_every: write per-channel histograms at recorded steps that are multiples of this; None
            means ``10 * every``; 0 never.
        warn: raise alerts as Python warnings (:class:`MonitorWarning`) as well as collecting them.
        keep_history: keep every record in :attr:`history`; None keeps them only when nothing is written.
        auto_step: let training forward calls advance the step until the first :meth:`step` call.

    Attributes:
        alerts: every :class:`Alert` raised so far. An alert fires when a check starts failing for a layer;
            it fires again only after the check has passed in between.
        history: the records (dicts as in the JSONL file) when kept.
        last: the latest record of each layer, by layer name.
        global_step: the current step.
        layers: qualified names of the watched layers.

    Raises:
        TypeError: ``model`` is not a module, or ``writer``/``thresholds`` has the wrong type.
        ValueError: ``every`` is not a positive int, or no BatchNorm layer matches.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
        >>> with Monitor(model) as monitor:
        ...     for _ in range(3):
        ...         _ = model(torch.randn(8, 3, 6, 6))
        >>> [(r["step"], r["layer"]) for r in monitor.history]
        [(0, '1'), (1, '1'), (2, '1')]
    """

    def __init__(
        self,
        model: nn.Module,
        log_dir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        every: int = 1,
        layers: LayerSelector = None,
        *,
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        tensorboard: bool | None = None,
        histogram_every: int | None = None,
        warn: bool = True,
        keep_history: bool | None = None,
        auto_step: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor: model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Monitor: every must be a positive int (record every n-th step), got {every!r}")
        if histogram_every is not None and (
            isinstance(histogram_every, bool) or not isinstance(histogram_every, int) or histogram_every < 0
        ):
            raise ValueError(f"Monitor: histogram_every must be an int >= 0 or None, got {histogram_every!r}")
        if writer is not None and not (hasattr(writer, "add_scalar") and hasattr(writer, "add_histogram")):
            raise TypeError(
                f"Monitor: writer must be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}"
            )
        if tensorboard is not None and not isinstance(tensorboard, bool):
            raise TypeError(f"Monitor: tensorboard must be True, False or None, got {tensorboard!r}")
        self.thresholds = _as_thresholds(thresholds)
        selected = named_batchnorms(model, layers)
        if not selected:
            what = "has no BatchNorm layer" if layers is None else f"has no BatchNorm layer matching {layers!r}"
            raise ValueError(f"Monitor: the model {what}; pass a model with BatchNorm layers or another layers=")
        self.model = model
        self.every = every
        self.histogram_every = 10 * every if histogram_every is None else histogram_every
        self.warn = warn
        self.auto_step = auto_step
        self._layers = [_Layer(name, module) for name, module in selected]
        self._by_id = {id(layer.module): layer for layer in self._layers}
        self.layers: list[str] = [layer.name for layer in self._layers]

        self.log_dir: Path | None = Path(log_dir) if log_dir is not None else None
        self._writer = writer
        self._owns_writer = False
        self._want_tb = tensorboard
        if writer is not None and tensorboard is False:
            raise ValueError("Monitor: writer= was given with tensorboard=False; pass one or the other")
        if self.log_dir is None and writer is not None:
            get_logdir = getattr(writer, "get_logdir", None)
            found = get_logdir() if callable(get_logdir) else getattr(writer, "log_dir", None)
            self.log_dir = Path(found) if found else None
        self.keep_history = (self.log_dir is None) if keep_history is None else bool(keep_history)

        self.global_step = 0
        self.alerts: list[Alert] = []
        self.history: list[dict[str, Any]] = []
        self.last: dict[str, dict[str, Any]] = {}
        self._active: set[tuple[str, str]] = set()
        self._manual = not auto_step
        self._forwards_in_step = 0
        self._recording = True
        self._pending: list[_Pending] = []
        self._open: dict[int, _Pending] = {}
        self._handles: list[Any] = []
        self._file: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def attached(self) -> bool:
        """Whether the monitor's hooks are installed.

        Example:
            >>> Monitor(nn.BatchNorm1d(2)).attached
            False
        """
        return bool(self._handles)

    @property
    def writer(self) -> Any:
        """The TensorBoard writer in use (None when writing JSONL only).

        Example:
            >>> Monitor(nn.BatchNorm1d(2)).writer is None
            True
        """
        return self._writer

    def attach(self) -> Monitor:
        """Install the hooks and open the log files; a second call does nothing. Returns the monitor.

        Raises:
            ImportError: ``tensorboard=True`` and the tensorboard package is not installed.

        Example:
            >>> monitor = Monitor(nn.BatchNorm1d(2)).attach()
            >>> monitor.detach()
        """
        if self._handles:
            return self
        self._open_outputs()
        self._handles = [
            register_module_forward_pre_hook(self._pre_hook),
            register_module_forward_hook(self._post_hook, with_kwargs=True),
        ]
        self._recording = self.global_step % self.every == 0
        return self

    def detach(self) -> None:
        """Remove every hook, then summarise and write what is pending. Log files stay open for a re-attach.

        Example:
            >>> monitor = Monitor(nn.BatchNorm1d(2)).attach()
            >>> monitor.detach(); monitor.attached
            False
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._open.clear()
        self.flush()

    def close(self) -> None:
        """Detach, flush, close the JSONL file and the TensorBoard writer the monitor created.

        A writer passed in by the caller is flushed but left open.

        Example:
            >>> Monitor(nn.BatchNorm1d(2)).attach().close()
        """
        self.detach()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            if self._owns_writer:
                self._writer.close()
                self._writer = None
                self._owns_writer = False
            else:
                self._writer.flush()

    def __enter__(self) -> Monitor:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self.log_dir) if self.log_dir is not None else "memory"
        return (
            f"Monitor({len(self._layers)} layers, every={self.every}, step={self.global_step}, "
            f"log={where}, attached={self.attached})"
        )

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("Monitor cannot be pickled: it holds hooks and open files; pickle the model instead")

    # ------------------------------------------------------------------ steps

    def step(self, global_step: int | None = None) -> None:
        """End the current step: summarise, write and check its records, then move to the next step.

        Args:
            global_step: the number of the step that starts now; None adds one to the current step.

        Example:
            >>> model = nn.BatchNorm1d(3).train()
            >>> monitor = Monitor(model, every=2).attach()
            >>> for i in range(4):
            ...     _ = model(torch.randn(5, 3)); monitor.step()
            >>> monitor.close(); [r["step"] for r in monitor.history]
            [0, 2]
        """
        if global_step is not None and (isinstance(global_step, bool) or not isinstance(global_step, int)):
            raise TypeError(f"Monitor.step: global_step must be an int, got {global_step!r}")
        self._manual = True
        self._advance(self.global_step + 1 if global_step is None else global_step)

    def _advance(self, new_step: int) -> None:
        self.flush()
        self.global_step = new_step
        self._forwards_in_step = 0
        self._recording = new_step % self.every == 0

    # ------------------------------------------------------------------ hooks

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module is self.model and module.training:
            if torch.jit.is_tracing() or torch.compiler.is_compiling():
                return
            if not self._manual and self._forwards_in_step > 0:
                self._advance(self.global_step + 1)
            self._forwards_in_step += 1
        if not self._recording:
            return
        layer = self._by_id.get(id(module))
        if layer is None or layer.seen_step == self.global_step or not self.model.training:
            return
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        pending = _Pending(layer)
        with torch.no_grad():
            running_mean = getattr(module, "running_mean", None)
            running_var = getattr(module, "running_var", None)
            if isinstance(running_mean, Tensor) and isinstance(running_var, Tensor):
                # Cloned here because the forward call updates the buffers in place.
                pending.running = torch.stack((running_mean.detach(), running_var.detach()))
                nbt = getattr(module, "num_batches_tracked", None)
                if isinstance(nbt, Tensor):
                    pending.nbt = nbt.detach().clone()
        self._open[id(module)] = pending

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self._open:
            return
        pending = self._open.pop(id(module), None)
        if pending is None:
            return
        layer = pending.layer
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, Tensor) or x.ndim < 2 or x.numel() == 0:
            return
        if layer.is_bnkit:
            training = kwargs.get("training", args[1] if len(args) > 1 else None)
            mask = kwargs.get("mask", args[2] if len(args) > 2 else None)
            uses_batch = bool(module.uses_batch_stats(training))
            axis = int(module.channel_axis(x.ndim))
        else:
            mask = None
            # Read after the call, so a hook that ran the layer in inference mode for this call (bnkit.freeze
            # restores the flag only after global hooks) is seen with the flag it actually used.
            uses_batch = bool(module.training) or getattr(module, "running_mean", None) is None
            axis = 1
        with torch.no_grad():
            mean, var, count = _channel_moments(x.detach(), axis, mask, layer.eps)
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            pending.weight = weight.detach().clone() if isinstance(weight, Tensor) else None
            pending.bias = bias.detach().clone() if isinstance(bias, Tensor) else None
        pending.mean, pending.var, pending.count = mean, var, count
        pending.uses_batch = uses_batch
        layer.seen_step = self.global_step
        self._pending.append(pending)

    # ------------------------------------------------------------------ summaries

    def flush(self) -> list[dict[str, Any]]:
        """Summarise, write and check the records taken so far in the current step; returns them.

        Example:
            >>> model = nn.BatchNorm1d(2).train()
            >>> monitor = Monitor(model).attach()
            >>> _ = model(torch.randn(4, 2))
            >>> [r["layer"] for r in monitor.flush()]
            ['']
            >>> monitor.close()
        """
        pending, self._pending = self._pending, []
        if not pending:
            return []
        now = time.time()
        table = _summarize(pending)
        step = self.global_step
        records = []
        for p, row in zip(pending, table, strict=True):
            layer = p.layer
            layer.records += 1
            record: dict[str, Any] = {
                "kind": "stats",
                "step": step,
                "time": now,
                "layer": layer.name,
                "uses_batch_stats": p.uses_batch,
                "channels": int(p.mean.numel()),
                "count": p.count,
                "num_batches_tracked": None if p.nbt is None else int(row[len(QUANTITIES)]),
            }
            has = {
                "running": p.running is not None,
                "weight": p.weight is not None,
                "bias": p.bias is not None,
            }
            for name, value in zip(QUANTITIES, row, strict=False):
                if name.startswith(("running_", "drift")) and not has["running"]:
                    record[name] = None
                elif name == "weight_norm" and not has["weight"]:
                    record[name] = None
                elif name == "bias_norm" and not has["bias"]:
                    record[name] = None
                else:
                    record[name] = value
            records.append(record)
        alerts = [alert for p, rec in zip(pending, records, strict=True) for alert in self._check(p.layer, rec)]
        for record in records:
            self.last[record["layer"]] = record
        if self.keep_history:
            self.history.extend(records)
        self._write(records, alerts, pending, step, now)
        return records

    def _check(self, layer: _Layer, record: dict[str, Any]) -> list[Alert]:
        t = self.thresholds
        name = layer.name or "(model)"
        checks: list[tuple[str, bool, float, float, str]] = []
        stats = [record[k] for k in ("batch_mean", "batch_var", "running_mean", "running_var") if record[k] is not None]
        if t.nonfinite:
            bad = [
                k
                for k in ("batch_mean", "batch_var", "running_mean", "running_var")
                if record[k] is not None and not math.isfinite(record[k])
            ]
            checks.append(
                (
                    "nonfinite",
                    bool(bad),
                    math.nan,
                    math.nan,
                    f"{name}: non-finite {', '.join(bad)} at step {record['step']}",
                )
            )
        finite = all(math.isfinite(v) for v in stats)
        if t.collapse_fraction is not None:
            frac = record["dead_fraction"]
            checks.append(
                (
                    "variance_collapse",
                    finite and frac >= t.collapse_fraction,
                    frac,
                    t.collapse_fraction,
                    f"{name}: variance collapse at step {record['step']}: {frac:.0%} of channels have "
                    f"batch variance below eps={layer.eps:g}",
                )
            )
        if t.var_max is not None:
            peak = max(v for v in (record["batch_var_max"], record["running_var_max"]) if v is not None)
            checks.append(
                (
                    "variance_explosion",
                    finite and peak > t.var_max,
                    peak,
                    t.var_max,
                    f"{name}: variance explosion at step {record['step']}: a channel variance of "
                    f"{peak:.4g} exceeds {t.var_max:g}",
                )
            )
        if t.drift is not None and record["drift"] is not None:
            tracked = record["num_batches_tracked"]
            seen = layer.records if tracked is None else tracked
            drift = record["drift"]
            fired = finite and seen >= t.drift_warmup and drift > t.drift
            checks.append(
                (
                    "drift",
                    fired,
                    drift,
                    t.drift,
                    f"{name}: drift {drift:.4g} between batch and running statistics exceeds "
                    f"{t.drift:g} at step {record['step']}",
                )
            )
        out = []
        for kind, fired, value, threshold, message in checks:
            key = (layer.name, kind)
            if not fired:
                self._active.discard(key)
                continue
            if key in self._active:
                continue
            self._active.add(key)
            alert = Alert(record["step"], layer.name, kind, float(value), float(threshold), message)
            self.alerts.append(alert)
            out.append(alert)
            if self.warn:
                warnings.warn(message, MonitorWarning, stacklevel=_user_stacklevel())
        return out

    # ------------------------------------------------------------------ outputs

    def _open_outputs(self) -> None:
        if self.log_dir is not None and self._file is None:
            try:
                self.log_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"Monitor: cannot create log_dir {str(self.log_dir)!r}: {exc}") from exc
            self._file = open(self.log_dir / JSONL_NAME, "a", encoding="utf-8")
            meta = {
                "kind": "meta",
                "version": _LOG_VERSION,
                "time": time.time(),
                "every": self.every,
                "thresholds": asdict(self.thresholds),
                "layers": [
                    {
                        "name": layer.name,
                        "type": type(layer.module).__name__,
                        "channels": int(getattr(layer.module, "num_features", 0) or 0),
                        "eps": layer.eps,
                    }
                    for layer in self._layers
                ],
            }
            self._file.write(json.dumps(meta) + "\n")
            self._file.flush()
        if self._writer is None and self.log_dir is not None and self._want_tb is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                if self._want_tb:
                    raise ImportError(
                        "bnkit.Monitor: TensorBoard output needs the tensorboard package: pip install "
                        "'bnkit[monitor]' (or tensorboard), or pass tensorboard=False to write only JSONL"
                    ) from exc
                warnings.warn(
                    "bnkit.Monitor: tensorboard is not installed; writing only "
                    f"{self.log_dir / JSONL_NAME} (pip install tensorboard for event files)",
                    MonitorWarning,
                    stacklevel=3,
                )
                self._want_tb = False
                return
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
            self._owns_writer = True

    def _write(
        self, records: list[dict[str, Any]], alerts: list[Alert], pending: list[_Pending], step: int, now: float
    ) -> None:
        if self._file is not None:
            lines = [json.dumps(_jsonable(r), allow_nan=False) for r in records]
            lines += [json.dumps(_alert_record(alert), allow_nan=False) for alert in alerts]
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        if self._writer is None:
            return
        scalars: list[tuple[str, float]] = []
        for record in records:
            tag_layer = record["layer"] or "(model)"
            for name in QUANTITIES:
                value = record[name]
                if value is not None:
                    scalars.append((f"bn_{name}/{tag_layer}", value))
            scalars.append((f"bn_uses_batch_stats/{tag_layer}", float(record["uses_batch_stats"])))
        _write_scalars(self._writer, scalars, step, now)
        if self.histogram_every and step % self.histogram_every == 0:
            for p in pending:
                tag_layer = p.layer.name or "(model)"
                vectors = {
                    "batch_mean": p.mean,
                    "batch_var": p.var,
                    "running_mean": None if p.running is None else p.running[0],
                    "running_var": None if p.running is None else p.running[1],
                    "weight": p.weight,
                    "bias": p.bias,
                }
                for name, vec in vectors.items():
                    if vec is not None and bool(torch.isfinite(vec).all()):
                        self._writer.add_histogram(
                            f"bn_hist_{name}/{tag_layer}", vec.detach().double().cpu().numpy(), step, walltime=now
                        )


# ---------------------------------------------------------------------- statistics


def _channel_moments(x: Tensor, axis: int, mask: Tensor | None, eps: float) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance (float64) of ``x`` over every axis but ``axis``; values per channel.

    ``torch.var_mean`` is the exact answer but runs several times slower than the layer itself on CPU, so on
    CPU one pass of float32 sums and sums of squares is finished in float64; channels whose variance that
    cannot resolve (``|mean| >> std``) make the layer fall back to an exact two-pass computation.
    """
    channels = x.shape[axis]
    dims = tuple(d for d in range(x.ndim) if d != axis)
    if mask is not None:
        from bnkit.core.moments import channel_moments

        full_mask = mask.unsqueeze(axis).expand_as(x) if mask.ndim == x.ndim - 1 else mask
        m = channel_moments(x.double(), dims, full_mask)
        count = m.count.clamp_min(1.0)
        return m.mean, m.m2 / count, int(m.count.min())
    count = x.numel() // channels
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        x = x.float()
    if x.device.type != "cpu":
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean.double(), var.double(), count
    flat = _channel_view(x, axis)
    if flat.ndim == 3:  # (outer, C, inner), inner contiguous
        s1 = flat.sum(dim=2).sum(dim=0)
        s2 = torch.linalg.vecdot(flat, flat, dim=2).sum(0)
    else:  # (rows, C), channels contiguous
        s1 = flat.sum(dim=0)
        s2 = (flat * flat).sum(dim=0)
    mean = s1.double() / count
    raw = s2.double() / count
    var = (raw - mean * mean).clamp_min(0.0)
    err = _F32_SUM_REL_ERR * raw
    if bool((err > _VAR_REL_TOL * var.clamp_min(eps)).any()):
        shape = [1] * x.ndim
        shape[axis] = channels
        centred = x - mean.to(x.dtype).view(shape)
        d1 = centred.sum(dim=dims).double() / count
        d2 = (centred * centred).sum(dim=dims).double() / count
        mean = mean + d1
        var = (d2 - d1 * d1).clamp_min(0.0)
    return mean, var, count


def _channel_view(x: Tensor, axis: int) -> Tensor:
    """A copy-free view of ``x`` as ``(outer, C, inner)`` or ``(rows, C)``; copies only odd layouts."""
    channels = x.shape[axis]
    if x.ndim >= 3 and axis == 1:
        last = torch.channels_last if x.ndim == 4 else torch.channels_last_3d if x.ndim == 5 else None
        if last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=last):
            return x.movedim(1, -1).reshape(-1, channels)
    if not x.is_contiguous():
        x = x.contiguous()
    outer = math.prod(x.shape[:axis])
    inner = math.prod(x.shape[axis + 1 :])
    if inner == 1:
        return x.view(outer, channels)
    return x.view(outer, channels, inner)


def _summarize(pending: list[_Pending]) -> list[list[float]]:
    """One row per pending record: the :data:`QUANTITIES` then num_batches_tracked, with one device sync."""
    device = pending[0].mean.device
    f64 = torch.float64
    lengths = torch.tensor([p.mean.numel() for p in pending], device=device)
    eps = torch.tensor([p.layer.eps for p in pending], dtype=f64, device=device)
    mean = torch.cat([p.mean.to(device) for p in pending])
    var = torch.cat([p.var.to(device) for p in pending])
    eps_c = torch.repeat_interleave(eps, lengths)

    def seg(data: Tensor, reduce: str, lens: Tensor) -> Tensor:
        return torch.segment_reduce(data, reduce, lengths=lens)

    n = len(pending)
    nan = torch.full((n,), math.nan, dtype=f64, device=device)
    cols = {
        "batch_mean": seg(mean, "mean", lengths),
        "batch_var": seg(var, "mean", lengths),
        "batch_var_min": seg(var, "min", lengths),
        "batch_var_max": seg(var, "max", lengths),
        "dead_fraction": seg((var < eps_c).to(f64), "mean", lengths),
    }
    with_running = [i for i, p in enumerate(pending) if p.running is not None]
    for name in ("running_mean", "running_var", "running_var_min", "running_var_max", "drift", "drift_max"):
        cols[name] = nan.clone()
    if with_running:
        idx = torch.tensor(with_running, device=device)
        lens_r = lengths[idx]
        keep = torch.repeat_interleave(
            torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, idx, True), lengths
        )
        rm = torch.cat([pending[i].running[0].to(device, f64) for i in with_running])
        rv = torch.cat([pending[i].running[1].to(device, f64) for i in with_running])
        e = eps_c[keep]
        kl = gaussian_symmetric_kl(mean[keep], var[keep] + e, rm, rv + e, eps=0.0)
        cols["running_mean"][idx] = seg(rm, "mean", lens_r)
        cols["running_var"][idx] = seg(rv, "mean", lens_r)
        cols["running_var_min"][idx] = seg(rv, "min", lens_r)
        cols["running_var_max"][idx] = seg(rv, "max", lens_r)
        cols["drift"][idx] = seg(kl, "mean", lens_r)
        cols["drift_max"][idx] = seg(kl, "max", lens_r)
    for name, attr in (("weight_norm", "weight"), ("bias_norm", "bias")):
        cols[name] = nan.clone()
        have = [i for i, p in enumerate(pending) if getattr(p, attr) is not None]
        if have:
            idx = torch.tensor(have, device=device)
            vec = torch.cat([getattr(pending[i], attr).to(device, f64).flatten() for i in have])
            cols[name][idx] = seg(vec * vec, "sum", lengths[idx]).sqrt()
    missing = torch.tensor(math.nan, dtype=f64, device=device)
    nbt = torch.stack([missing if p.nbt is None else p.nbt.to(device, f64) for p in pending])
    table = torch.stack([cols[name] for name in QUANTITIES] + [nbt], dim=1)
    return table.tolist()


# ---------------------------------------------------------------------- helpers


def _as_thresholds(value: Thresholds | Mapping[str, Any] | None) -> Thresholds:
    if value is None:
        return Thresholds()
    if isinstance(value, Thresholds):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(Thresholds)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"Monitor: unknown threshold(s) {unknown}; known: {sorted(known)}")
        return Thresholds(**value)
    raise TypeError(f"Monitor: thresholds must be a Thresholds, a dict or None, got {type(value).__name__}")


def _alert_record(alert: Alert) -> dict[str, Any]:
    """The JSONL form of an alert: ``kind`` is ``"alert"`` and the alert's own kind goes under ``"alert"``."""
    fields_ = alert.to_dict()
    return {"kind": "alert", "alert": fields_.pop("kind"), **fields_}


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside bnkit's monitor and torch.nn."""
    skip = (str(Path(__file__).parent), str(Path(nn.__file__).parent))
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame = frame.f_back
        level += 1
    return level


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: non-finite floats become null and are named under ``"nonfinite"``."""
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


def _write_scalars(writer: Any, scalars: list[tuple[str, float]], step: int, walltime: float) -> None:
    """All scalars of a step as one TensorBoard event when the writer allows it (one proto, one write)."""
    get_file_writer = getattr(writer, "_get_file_writer", None)
    if callable(get_file_writer):
        try:
            from tensorboard.compat.proto.summary_pb2 import Summary
        except ImportError:
            get_file_writer = None
    if not callable(get_file_writer):
        for tag, value in scalars:
            writer.add_scalar(tag, value, step, walltime=walltime)
        return
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in scalars])
    get_file_writer().add_summary(summary, step, walltime)


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
        >>> d = tempfile.mkdtemp()
        >>> model = nn.BatchNorm1d(2).train()
        >>> with Monitor(model, log_dir=d, tensorboard=False):
        ...     _ = model(torch.randn(4, 2))
        >>> len(read_log(d)["stats"])
        1
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
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(text.splitlines()):
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
