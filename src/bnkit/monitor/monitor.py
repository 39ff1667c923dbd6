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

import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from bnkit.layers.find import LayerSelector, named_batchnorms
from bnkit.layers.keras_guard import refuse_keras
from bnkit.monitor.statistics import STATE_KEYS, Layer, Pending, channel_moments, summarize
from bnkit.shared.alerts import Alert, AlertRules, MonitorWarning, Thresholds, as_thresholds
from bnkit.shared.monitor_log import HISTOGRAMS, JSONL_NAME, QUANTITIES, meta_record, read_log
from bnkit.shared.monitor_writer import TENSORBOARD_MISSING, LogWriter

__all__ = [
    "HISTOGRAMS",
    "JSONL_NAME",
    "QUANTITIES",
    "Alert",
    "Monitor",
    "MonitorWarning",
    "Thresholds",
    "read_log",
]

_channel_moments = channel_moments  # the name the tests of the input statistics use


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
        self.thresholds = as_thresholds(thresholds)
        selected = named_batchnorms(model, layers)
        if not selected:
            what = "has no BatchNorm layer" if layers is None else f"has no BatchNorm layer matching {layers!r}"
            raise ValueError(f"Monitor: the model {what}; pass a model with BatchNorm layers or another layers=")
        self.model = model
        self.every = every
        self.histogram_every = 10 * every if histogram_every is None else histogram_every
        self.warn = warn
        self.auto_step = auto_step
        self._layers = [Layer(name, module) for name, module in selected]
        self._by_id = {id(layer.module): layer for layer in self._layers}
        self.layers: list[str] = [layer.name for layer in self._layers]

        self.log_dir: Path | None = Path(log_dir) if log_dir is not None else None
        # JSONL and TensorBoard writing happens on a worker thread, off the training loop (see flush).
        self._log = LogWriter("bnkit.Monitor")
        self._log.tensorboard = writer
        self._want_tb = tensorboard
        if writer is not None and tensorboard is False:
            raise ValueError("Monitor: writer= was given with tensorboard=False; pass one or the other")
        if self.log_dir is None and writer is not None:
            get_logdir = getattr(writer, "get_logdir", None)
            found = get_logdir() if callable(get_logdir) else getattr(writer, "log_dir", None)
            self.log_dir = Path(found) if found else None
        self.keep_history = (self.log_dir is None) if keep_history is None else bool(keep_history)

        self.global_step = 0
        self._rules = AlertRules(self.thresholds, warn)
        self.alerts: list[Alert] = self._rules.alerts
        self.history: list[dict[str, Any]] = []
        self.last: dict[str, dict[str, Any]] = {}
        self._manual = not auto_step
        self._forwards_in_step = 0
        self._recording = True
        self._pending: list[Pending] = []
        self._open: dict[int, Pending] = {}
        self._handles: list[Any] = []

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
        return self._log.tensorboard

    @property
    def _file(self) -> Any:
        return self._log.file

    @_file.setter
    def _file(self, value: Any) -> None:
        self._log.file = value

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
            self._log.drain()

    def close(self) -> None:
        """Detach, flush, close the JSONL file and the TensorBoard writer the monitor created.

        A writer passed in by the caller is flushed but left open.

        Example:
            >>> Monitor(nn.BatchNorm1d(2)).attach().close()
        """
        self.detach()
        self._log.close()

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
        pending = Pending(layer)
        keys, tensors = [], []
        # The registries first: nn.Module.__getattr__ costs more than the rest of this hook.
        buffers, params = module._buffers, module._parameters
        for key in STATE_KEYS:
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
        table, means, variances, packed = summarize(pending)
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
        alerts = []
        for p, record in zip(pending, records, strict=True):
            tracked = record["num_batches_tracked"]
            seen = p.layer.records if tracked is None else tracked
            alerts += self._rules.check(p.layer.name, p.layer.eps, seen, record, stacklevel=_user_stacklevel())
        for record in records:
            self.last[record["layer"]] = record
        if self.keep_history:
            self.history.extend(records)
        vectors: list[tuple[str, Any]] = []
        if self._log.tensorboard is not None and self.histogram_every and step % self.histogram_every == 0:
            for p, mean, var, rows in zip(pending, means, variances, packed, strict=True):
                tag_layer = p.layer.name or "(model)"
                vectors += [(f"bn_hist_batch_mean/{tag_layer}", mean), (f"bn_hist_batch_var/{tag_layer}", var)]
                vectors += [(f"bn_hist_{key}/{tag_layer}", rows[2 + STATE_KEYS.index(key)]) for key in p.state_keys]
        self._log.submit(records, alerts, vectors, step, now)
        return records

    def _flush_for_step(self) -> None:
        self._log.raise_error()
        self.flush()

    # ------------------------------------------------------------------ outputs

    def _open_outputs(self) -> None:
        if self.log_dir is not None and self._log.file is None:
            layers = [
                {
                    "name": layer.name,
                    "type": type(layer.module).__name__,
                    "channels": int(getattr(layer.module, "num_features", 0) or 0),
                    "eps": layer.eps,
                }
                for layer in self._layers
            ]
            self._log.open_jsonl(self.log_dir, meta_record(self.every, asdict(self.thresholds), layers))
        if self._log.tensorboard is None and self.log_dir is not None and self._want_tb is not False:
            _import_compiler_before_tensorflow()
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                if self._want_tb:
                    raise ImportError(
                        f"bnkit.Monitor: TensorBoard output needs the tensorboard package: {TENSORBOARD_MISSING}, "
                        "or pass tensorboard=False to write only JSONL"
                    ) from exc
                warnings.warn(
                    "bnkit.Monitor: tensorboard is not installed; writing only "
                    f"{self.log_dir / JSONL_NAME} (pip install tensorboard for event files)",
                    MonitorWarning,
                    stacklevel=3,
                )
                self._want_tb = False
                return
            self._log.tensorboard = SummaryWriter(log_dir=str(self.log_dir))
            self._log.owns_tensorboard = True


_SKIP_FRAMES = (str(Path(__file__).parent), str(Path(nn.__file__).parent), str(Path(__file__).parents[1] / "shared"))


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside bnkit's monitor and torch.nn."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_FRAMES):
        frame = frame.f_back
        level += 1
    return level


def _import_compiler_before_tensorflow() -> None:
    """Import ``torch._dynamo`` before ``torch.utils.tensorboard`` can import TensorFlow, when Keras runs on torch.

    ``torch.utils.tensorboard`` imports TensorFlow when it is installed; TensorFlow imports Keras, which on the
    torch backend imports ``torch._dynamo`` and with it triton, whose LLVM then clashes with TensorFlow's already
    loaded one: the process dies with a segmentation fault (TF 2.21, torch 2.14, triton 3.x). In the other order
    both load.
    """
    if "tensorflow" in sys.modules or "torch._dynamo" in sys.modules:
        return
    if os.environ.get("KERAS_BACKEND", "").strip().lower() == "torch":
        import torch._dynamo  # noqa: F401
