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
layers are computed together and read back with one device sync per recorded step, and JSON/TensorBoard
serialisation runs on a writer thread (``detach``/``close`` wait for it).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import sys
import threading
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
from bnkit.layers.keras_guard import refuse_keras

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
# Below this many contiguous values per (sample, channel), reducing over the outer dimension is faster.
_INNER_MIN = 32


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
        """A JSON-ready dict (``value`` and ``threshold`` None when not finite).

        Example:
            >>> Alert(0, "bn", "drift", 2.0, 1.0, "m").to_dict()["value"]
            2.0
        """
        out = asdict(self)
        out["value"] = _finite_or_none(self.value)
        out["threshold"] = _finite_or_none(self.threshold)
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


#: Rows of a layer's packed statistics (see :class:`_Pending`).
_ROWS = ("stat0", "stat1", "running_mean", "running_var", "weight", "bias")
_STATE_KEYS = _ROWS[2:]


class _Pending:
    """Statistics of one layer taken during a forward call, not yet summarised.

    ``packed`` is a float64 ``[6, C]`` tensor with the rows of :data:`_ROWS`: the first two are the batch's
    float32 sums and sums of squares when ``raw`` (the CPU fast path, finished at flush time for all layers
    at once), else its mean and biased variance; then the snapshot of the layer's tensors, NaN where the
    layer has no such tensor (``state_keys`` names those it has).
    """

    __slots__ = ("count", "layer", "nbt", "packed", "raw", "skipped", "state", "state_keys", "uses_batch")

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer
        self.state: Tensor | None = None
        self.state_keys: tuple[str, ...] = ()
        self.nbt: int | Tensor | None = None
        self.skipped: Tensor | None = None  # bnkit's skipped_batches after the call (non-finite batches)
        self.packed: Tensor | None = None
        self.raw = False
        self.count = 0
        self.uses_batch = True

    def pack(self, stats: Tensor) -> None:
        """Store the batch statistics together with the snapshot, as one float64 tensor."""
        if self.state_keys == _STATE_KEYS:
            packed = torch.cat((stats, self.state.to(stats.dtype)))
        else:
            packed = torch.full((len(_ROWS), stats.shape[1]), math.nan, dtype=torch.float64, device=stats.device)
            packed[:2] = stats
            for i, key in enumerate(self.state_keys):
                packed[_ROWS.index(key)] = self.state[i]
        self.packed = packed.to(torch.float64)
        self.state = None

    def snapshot(self, key: str) -> Tensor | None:
        """Row ``key`` of the packed snapshot, or None when the layer has no such tensor."""
        return self.packed[_ROWS.index(key)] if key in self.state_keys else None


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
        refuse_keras(model, "Monitor")
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
        # JSONL and TensorBoard writing happens on a worker thread, off the training loop (see _submit).
        self._queue: queue.Queue[tuple[Any, ...] | None] | None = None
        self._worker: threading.Thread | None = None
        self._write_error: BaseException | None = None
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
        try:
            self.flush()
        finally:
            self._stop_worker()

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
        self._flush_for_step()
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
        keys, tensors = [], []
        # The registries first: nn.Module.__getattr__ costs more than the rest of this hook.
        buffers, params = module._buffers, module._parameters
        for key in _STATE_KEYS:
            value = buffers.get(key) if key in buffers else params.get(key) if key in params else None
            if value is None and key not in buffers and key not in params:
                value = getattr(module, key, None)
            if isinstance(value, Tensor):
                keys.append(key)
                tensors.append(value.detach())
        if "running_var" in keys and "running_mean" not in keys:  # half a pair is no running statistics
            keys, tensors = keys[1:], tensors[1:]
        if tensors:
            with torch.no_grad():
                # A copy taken now: the forward call updates the buffers in place, the optimizer the parameters.
                if all(t.dtype == tensors[0].dtype and t.shape == tensors[0].shape for t in tensors):
                    pending.state = torch.stack(tensors)
                else:
                    pending.state = torch.stack([t.to(torch.float64).flatten() for t in tensors])
                pending.state_keys = tuple(keys)
                nbt = buffers.get("num_batches_tracked")
                if "running_mean" in keys and isinstance(nbt, Tensor):
                    # A Python int costs nothing on CPU; elsewhere a copy avoids a device sync.
                    pending.nbt = int(nbt) if nbt.device.type == "cpu" else nbt.detach().clone()
        self._open[id(module)] = pending

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self._open:
            return
        pending = self._open.pop(id(module), None)
        if pending is None:
            return
        layer = pending.layer
        skipped = getattr(module, "skipped_batches", None)
        if layer.is_bnkit and isinstance(skipped, Tensor):
            pending.skipped = skipped.detach().clone()  # a copy on the device: read when the step is written
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
            stats, pending.raw, pending.count = _channel_moments(x.detach(), axis, mask, layer.eps)
            pending.pack(stats)
        pending.uses_batch = uses_batch
        layer.seen_step = self.global_step
        self._pending.append(pending)

    # ------------------------------------------------------------------ summaries

    def flush(self) -> list[dict[str, Any]]:
        """Summarise and check the records taken so far in the current step, queue them for writing; returns them.

        Files are written by a background thread, so training does not wait for JSON and TensorBoard
        serialisation; :meth:`detach` and :meth:`close` (and the end of a ``with`` block) wait until everything
        is on disk. A write error (disk full, ...) is raised as ``OSError`` at the next step or at detach.

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
        table, means, variances = _summarize(pending)
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
                "channels": int(p.packed.shape[1]),
                "count": p.count,
                "num_batches_tracked": None if p.nbt is None else int(row[len(QUANTITIES)]),
            }
            if p.skipped is not None:
                record["skipped_batches"] = int(p.skipped)
            has_running = "running_mean" in p.state_keys
            for name, value in zip(QUANTITIES, row, strict=False):
                if name.startswith(("running_", "drift")) and not has_running:
                    record[name] = None
                elif name == "weight_norm" and "weight" not in p.state_keys:
                    record[name] = None
                elif name == "bias_norm" and "bias" not in p.state_keys:
                    record[name] = None
                else:
                    record[name] = value
            records.append(record)
        alerts = [alert for p, rec in zip(pending, records, strict=True) for alert in self._check(p.layer, rec)]
        for record in records:
            self.last[record["layer"]] = record
        if self.keep_history:
            self.history.extend(records)
        self._submit((records, alerts, pending, means, variances, step, now))
        return records

    def _flush_for_step(self) -> None:
        self._raise_write_error()
        self.flush()

    # ------------------------------------------------------------------ writer thread

    def _submit(self, item: tuple[Any, ...]) -> None:
        """Queue a step's records for the writer thread (started on first use)."""
        if self._file is None and self._writer is None:
            return
        if self._worker is None:
            self._queue = queue.Queue()
            self._worker = threading.Thread(target=self._work, name="bnkit-monitor-writer", daemon=True)
            self._worker.start()
            atexit.register(self._stop_worker)
        self._queue.put(item)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._write_error is None:
                    self._write(*item)
            except BaseException as exc:  # kept for the training thread, which raises it at its next step
                self._write_error = exc
            finally:
                self._queue.task_done()

    def _stop_worker(self) -> None:
        """Wait until everything queued is written, end the writer thread, raise a write error if one happened."""
        worker, self._worker = self._worker, None
        if worker is not None:
            atexit.unregister(self._stop_worker)
            self._queue.put(None)
            worker.join()
            self._queue = None
        self._raise_write_error()

    def _raise_write_error(self) -> None:
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            where = self.log_dir if self.log_dir is not None else "the TensorBoard writer"
            raise OSError(f"bnkit.Monitor: writing the log to {where} failed: {error}") from error

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
        self,
        records: list[dict[str, Any]],
        alerts: list[Alert],
        pending: list[_Pending],
        means: list[Tensor],
        variances: list[Tensor],
        step: int,
        now: float,
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
        histograms: list[tuple[str, dict[str, Any]]] = []
        if self.histogram_every and step % self.histogram_every == 0:
            vectors: list[tuple[str, Tensor]] = []
            for p, mean, var in zip(pending, means, variances, strict=True):
                tag_layer = p.layer.name or "(model)"
                vectors += [(f"bn_hist_batch_mean/{tag_layer}", mean), (f"bn_hist_batch_var/{tag_layer}", var)]
                vectors += [(f"bn_hist_{key}/{tag_layer}", p.snapshot(key)) for key in p.state_keys]
            histograms = _histograms(vectors)
        _write_tensorboard(self._writer, scalars, histograms, step, now)


# ---------------------------------------------------------------------- statistics


def _channel_moments(x: Tensor, axis: int, mask: Tensor | None, eps: float) -> tuple[Tensor, bool, int]:
    """Per-channel statistics of ``x`` over every axis but ``axis``: ``(stats [2, C], raw, values per channel)``.

    ``raw``: ``stats`` holds float32 sums and sums of squares, to be finished in float64 (:func:`_summarize`);
    otherwise float64 mean and biased variance. ``torch.var_mean`` is exact but runs several times slower than
    the BatchNorm layer itself on CPU, so on CPU one pass of float32 sums is used, unless a channel's
    ``|mean| >> std`` would make ``E[x^2] - E[x]^2`` inaccurate (relative error above 1e-3 of
    ``max(var, eps)``): then the layer's statistics are computed exactly in two passes.
    """
    channels = x.shape[axis]
    dims = tuple(d for d in range(x.ndim) if d != axis)
    if mask is not None:
        from bnkit.core.moments import channel_moments

        full_mask = mask.unsqueeze(axis).expand_as(x) if mask.ndim == x.ndim - 1 else mask
        m = channel_moments(x.double(), dims, full_mask)
        count = m.count.clamp_min(1.0)
        return torch.stack((m.mean, m.m2 / count)), False, int(m.count.min())
    count = x.numel() // channels
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        x = x.float()
    if x.device.type != "cpu":
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return torch.stack((mean, var)).double(), False, count
    flat = _channel_view(x, axis)
    if flat.ndim == 3 and flat.shape[2] >= _INNER_MIN:  # (outer, C, inner): reduce the contiguous inner run
        s1 = flat.sum(dim=2).sum(dim=0)
        s2 = torch.linalg.vecdot(flat, flat, dim=2).sum(dim=0)
    else:  # short inner runs: reduce over rows of (outer, C * inner), vectorised across the columns
        rows = flat.reshape(flat.shape[0], -1)
        s1 = rows.sum(dim=0)
        s2 = torch.linalg.vecdot(rows, rows, dim=0)
        if flat.ndim == 3:
            s1 = s1.view(channels, -1).sum(dim=1)
            s2 = s2.view(channels, -1).sum(dim=1)
    # One-pass error bound ~ _F32_SUM_REL_ERR * E[x^2]; it exceeds _VAR_REL_TOL * max(var, eps) when
    # mean^2 > (1 - r) E[x^2] (and E[x^2] > eps / r, left out: exactly zero channels never trigger),
    # r = _F32_SUM_REL_ERR / _VAR_REL_TOL. One fused expression, one sync (free on CPU).
    r = _F32_SUM_REL_ERR / _VAR_REL_TOL
    if not bool(torch.addcmul(s2, s1, s1, value=-1.0 / ((1.0 - r) * count)).min() < 0):
        return torch.stack((s1, s2)), True, count
    shape = [1] * x.ndim
    shape[axis] = channels
    shift = (s1 / count).view(shape)
    centred = x - shift
    d1 = centred.sum(dim=dims).double() / count
    d2 = (centred * centred).sum(dim=dims).double() / count
    return torch.stack((shift.flatten().double() + d1, (d2 - d1 * d1).clamp_min(0.0))), False, count


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


def _summarize(pending: list[_Pending]) -> tuple[list[list[float]], list[Tensor], list[Tensor]]:
    """Rows of :data:`QUANTITIES` plus num_batches_tracked, and per-layer batch mean/variance vectors.

    Every layer is summarised at once on one flat float64 tensor (segment reductions, about twenty tensor
    operations whatever the number of layers) and read back with one device sync.
    """
    device = pending[0].packed.device
    f64 = torch.float64
    lengths_list = [p.packed.shape[1] for p in pending]
    lengths = torch.tensor(lengths_list, device=device)
    per_layer = torch.tensor([[p.layer.eps, float(p.count), float(p.raw)] for p in pending], dtype=f64, device=device)
    eps, count, raw = torch.repeat_interleave(per_layer, lengths, dim=0).unbind(1)
    s0, s1, rm, rv, w, b = torch.cat([p.packed.to(device) for p in pending], dim=1).unbind(0)
    # Raw layers hold float32 sums: finish them in float64 here, all layers at once.
    is_raw = raw > 0
    mean = torch.where(is_raw, s0 / count, s0)
    var = torch.where(is_raw, (s1 / count - mean * mean).clamp_min(0.0), s1)
    kl = gaussian_symmetric_kl(mean, var + eps, rm, rv + eps, eps=0.0)
    dead = (var < eps).to(f64)

    def seg(rows: tuple[Tensor, ...], reduce: str) -> Tensor:
        return torch.segment_reduce(
            torch.stack(rows), reduce, lengths=lengths.expand(len(rows), -1), axis=1, unsafe=True
        )

    means = seg((mean, var, rm, rv, kl, dead, w * w, b * b), "mean")
    mins = seg((var, rv), "min")
    maxs = seg((var, rv, kl), "max")
    norms = (means[6:] * lengths).sqrt()
    nbt = torch.tensor([p.nbt if isinstance(p.nbt, int) else math.nan for p in pending], dtype=f64, device=device)
    for i, p in enumerate(pending):
        if isinstance(p.nbt, Tensor):
            nbt[i] = p.nbt.to(device, f64)
    # Columns in the order of QUANTITIES, then num_batches_tracked.
    table = torch.stack(
        (
            means[0], means[1], mins[0], maxs[0],  # batch mean, var, var min, var max
            means[2], means[3], mins[1], maxs[1],  # running mean, var, var min, var max
            means[4], maxs[2],  # drift, drift max
            norms[0], norms[1], means[5], nbt,  # weight norm, bias norm, dead fraction
        ),
        dim=1,
    )  # fmt: skip
    return table.tolist(), list(mean.split(lengths_list)), list(var.split(lengths_list))


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


def _histograms(vectors: list[tuple[str, Tensor]], bins: int = 30) -> list[tuple[str, dict[str, Any]]]:
    """Histograms of many small vectors at once: ``(tag, fields of add_histogram_raw)``; equal-width bins.

    One pass of tensor operations for all vectors, instead of a NumPy histogram per tag (which costs more
    than the whole monitoring of a step). Vectors with a non-finite value are left out (TensorBoard refuses
    them; the scalars report them).
    """
    if not vectors:
        return []
    f64 = torch.float64
    device = vectors[0][1].device
    flat = torch.cat([v.detach().to(device, f64).flatten() for _, v in vectors])
    lengths_list = [v.numel() for _, v in vectors]
    lengths = torch.tensor(lengths_list, device=device)
    seg = torch.segment_reduce
    vmin, vmax = seg(flat, "min", lengths=lengths), seg(flat, "max", lengths=lengths)
    total, squares = seg(flat, "sum", lengths=lengths), seg(flat * flat, "sum", lengths=lengths)
    # Constant vectors get a unit-wide range around their value, as NumPy's histogram does.
    constant = vmax == vmin
    low = torch.where(constant, vmin - 0.5, vmin)
    high = torch.where(constant, vmax + 0.5, vmax)
    width = (high - low) / bins
    owner = torch.repeat_interleave(torch.arange(len(vectors), device=device), lengths)
    index = ((flat - low[owner]) / width[owner]).floor().nan_to_num(0.0).clamp(0, bins - 1).long()
    counts = torch.zeros(len(vectors) * bins, dtype=f64, device=device)
    counts.index_add_(0, owner * bins + index, torch.ones_like(flat))
    table = torch.cat(
        [torch.stack((vmin, vmax, total, squares, low, width), dim=1), counts.view(len(vectors), bins)], dim=1
    ).tolist()
    out = []
    for (tag, _), count, row in zip(vectors, lengths_list, table, strict=True):
        lo, hi, total_, squares_, start, step_ = row[:6]
        if not all(math.isfinite(v) for v in (lo, hi, total_, squares_)):
            continue
        # TensorBoard stores right bucket edges; the leading empty bucket carries the left edge.
        limits = [start + step_ * k for k in range(bins + 1)]
        fields_ = {
            "min": lo,
            "max": hi,
            "num": count,
            "sum": total_,
            "sum_squares": squares_,
            "bucket_limits": limits,
            "bucket_counts": [0.0, *row[6:]],
        }
        out.append((tag, fields_))
    return out


def _write_tensorboard(
    writer: Any,
    scalars: list[tuple[str, float]],
    histograms: list[tuple[str, dict[str, Any]]],
    step: int,
    walltime: float,
) -> None:
    """Everything of a step as one TensorBoard event when the writer allows it.

    One event per step (instead of one per tag) keeps the writer's bounded queue from blocking training while
    its background thread catches up.
    """
    get_file_writer = getattr(writer, "_get_file_writer", None)
    if callable(get_file_writer):
        try:
            from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
        except ImportError:
            get_file_writer = None
    if not callable(get_file_writer):
        for tag, value in scalars:
            writer.add_scalar(tag, value, step, walltime=walltime)
        for tag, fields_ in histograms:
            writer.add_histogram_raw(tag, global_step=step, walltime=walltime, **fields_)
        return
    values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars]
    for tag, h in histograms:
        proto = HistogramProto(
            min=h["min"],
            max=h["max"],
            num=h["num"],
            sum=h["sum"],
            sum_squares=h["sum_squares"],
            bucket_limit=h["bucket_limits"],
            bucket=h["bucket_counts"],
        )
        values.append(Summary.Value(tag=tag, histo=proto))
    get_file_writer().add_summary(Summary(value=values), step, walltime)


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
