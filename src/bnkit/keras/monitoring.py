"""``bnkit.keras.Monitor``: a ``fit()`` callback that records BatchNorm statistics, drift and alerts, in the log
format of ``bnkit.Monitor`` (so ``bnkit plot`` reads it) and TensorBoard, on every Keras backend.

No hook runs inside the compiled train step. The callback reads each layer's moving statistics (per-channel
vectors) after the step it records and after the step before it, and recovers the statistics the layer
normalised that batch with from Keras's update rule ``new = m * old + (1 - m) * batch`` (``m``: Keras momentum,
the weight of the OLD value): ``batch = (new - m * old) / (1 - m)``. With ``renorm=True`` the mean comes from
``moving_mean`` the same way and the variance from ``moving_stddev`` (``std = sqrt(var + eps)``). A layer whose
moving statistics did not move ran in inference mode (``trainable=False``, ``training=False`` inside a subclassed
``call()``, a bnkit layer with ``freeze_stats``): its record says ``uses_batch_stats: false`` and has no batch
statistics.

Private Keras state read here (through :func:`bnkit.keras.compat.jax_fit_state`): on JAX, ``fit()`` keeps the
variables' values in the trainer's state between steps (the variables themselves are emptied); the callback
reads them there, and reads the variables when that state is absent.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bnkit.keras import compat
from bnkit.keras.find import select_batchnorms
from bnkit.shared.alerts import Alert, AlertRules, MonitorWarning, Thresholds, as_thresholds
from bnkit.shared.monitor_log import HISTOGRAMS, JSONL_NAME, QUANTITIES, meta_record
from bnkit.shared.monitor_stats import summarize
from bnkit.shared.monitor_writer import TENSORBOARD_MISSING, EventWriter, LogWriter
from bnkit.shared.selection import Selector, check_selector

__all__ = ["Monitor"]

keras = compat.import_keras()

_BATCH_FIELDS = ("batch_mean", "batch_var", "batch_var_min", "batch_var_max", "drift", "drift_max", "dead_fraction")


class _Watched:
    """One watched layer: its variables and the constants of its update rule."""

    __slots__ = ("channels", "eps", "factor", "layer", "momentum", "name", "renorm", "variables")

    def __init__(self, name: str, layer: Any) -> None:
        self.name = name
        self.layer = layer
        self.eps = float(layer.epsilon)
        self.momentum = float(layer.momentum)
        # Keras multiplies float32 variables by the Python floats m and (1 - m): the update used their float32
        # roundings, so the recovery divides by the same numbers.
        self.factor = (float(np.float32(self.momentum)), float(np.float32(1.0 - self.momentum)))
        self.renorm = bool(getattr(layer, "renorm", False)) and getattr(layer, "moving_stddev", None) is not None
        self.channels = int(np.prod(layer.moving_mean.shape))
        # moving mean, moving variance, the moving stddev (renorm), gamma, beta: None where the layer has none.
        self.variables = [layer.moving_mean, layer.moving_variance, layer.moving_stddev if self.renorm else None]
        self.variables += [layer.gamma if layer.scale else None, layer.beta if layer.center else None]


class _Group:
    """One variable of every watched layer (all moving means, ...) in the flat per-channel layout of all layers.

    ``positions`` are the channel positions of the layers that have the variable; the others get NaN.
    """

    def __init__(self, watched: list[_Watched], k: int, total: int, starts: np.ndarray) -> None:
        chosen = [i for i, w in enumerate(watched) if w.variables[k] is not None]
        self.variables = [watched[i].variables[k] for i in chosen]
        self.size = sum(watched[i].channels for i in chosen)
        self.total = total
        self.full = len(chosen) == len(watched)
        self.positions = np.concatenate(
            [np.arange(starts[i], starts[i] + watched[i].channels) for i in chosen] or [np.zeros(0, np.int64)]
        )

    def place(self, flat: np.ndarray) -> np.ndarray | None:
        """This group's values (``flat``) at their channel positions; None when no layer has the variable."""
        if not self.variables:
            return None
        if self.full:
            return flat
        out = np.full(self.total, np.nan)
        out[self.positions] = flat
        return out


def _reader(model: Any, variables: list[Any]) -> Any:
    """A function returning the values of ``variables`` as one flat float64 NumPy vector, with as few backend
    calls as the backend allows (one TF graph call; on JAX the values ``fit()`` holds, :func:`compat.jax_fit_state`)."""
    if not variables:
        return lambda: np.zeros(0)
    backend = compat.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        handles = [v.value for v in variables]

        @tf.function(autograph=False, reduce_retracing=True)
        def read_all() -> Any:
            return tf.concat([tf.reshape(tf.cast(h, tf.float32), [-1]) for h in handles], 0)

        return lambda: np.asarray(read_all().numpy(), dtype=np.float64)
    index = {}
    for kind in ("trainable_variables", "non_trainable_variables"):
        for i, variable in enumerate(getattr(model, kind, [])):
            index[id(variable)] = (kind, i)
    where = [index.get(id(v), (None, -1)) for v in variables]

    def read() -> np.ndarray:
        state = compat.jax_fit_state(model)
        values = []
        for variable, (kind, i) in zip(variables, where, strict=True):
            held = state.get(kind) if state is not None and kind is not None else None
            value = held[i] if held else variable.value
            values.append(np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64).reshape(-1))
        return np.concatenate(values)

    return read


class Monitor(keras.callbacks.Callback):
    """Record BatchNorm statistics during ``fit()``, write them to JSONL/TensorBoard and raise alerts.

    Recorded per selected layer on every ``every``-th training step (the fields of ``bnkit.Monitor``'s log):

    - ``batch_mean``, ``batch_var`` (+ ``_min``/``_max``): channel averages of the statistics the layer
      normalised the batch with, recovered from the update of its moving statistics (biased variance, as Keras
      uses); None when the layer did not use batch statistics;
    - ``running_mean``, ``running_var`` (+ ``_min``/``_max``): the moving statistics *before* this batch (what
      inference would have used);
    - ``drift``, ``drift_max``: symmetric KL between N(batch mean, batch var) and N(moving mean, moving var), the
      layer's epsilon added to both variances, mean and largest over channels (the measure of ``bnkit.shift``);
    - ``weight_norm``, ``bias_norm``: L2 norms of gamma and beta after the step (None with ``scale``/``center``
      False); ``dead_fraction``: channels whose batch variance is below epsilon;
    - ``uses_batch_stats``: whether the moving statistics moved in this step (False for layers in inference
      mode); ``channels``; ``count`` and ``num_batches_tracked`` are None (Keras keeps no such counters).

    Steps count training batches across ``fit()`` calls (0, 1, 2, ...). ``model.fit(steps_per_execution=k)``
    with ``k > 1`` runs several steps between callbacks: the batch statistics cannot be recovered then and stay
    None (a warning says so). Files are written by a background thread; each ``fit()`` appends to
    ``bn_monitor.jsonl`` (a new meta record) and writes a new TensorBoard event file, and everything is on disk
    when ``fit()`` returns.

    Args:
        log_dir: directory for ``bn_monitor.jsonl`` and TensorBoard event files (created when missing). None keeps
            the records in memory (:attr:`history`).
        every: record every ``every``-th step.
        layers: which BatchNormalization layers (paths like ``"base/bn2"``): None for all, a glob, a type, a
            predicate ``(path, layer) -> bool`` or a list of names/globs.
        thresholds: a ``Thresholds`` (``bnkit.monitor.Thresholds``), or a mapping of its fields. The drift
            warm-up counts the optimizer's steps (``optimizer.iterations``).
        tensorboard: True requires TensorBoard output (ImportError without the tensorboard package), False writes
            only JSONL, None writes event files when ``log_dir`` is given and tensorboard is installed. Event files
            are written with the tensorboard package alone: neither TensorFlow nor torch is needed.
        histogram_every: per-channel histograms at recorded steps that are multiples of this; None means
            ``10 * every``; 0 never.
        warn: raise alerts as :class:`~bnkit.shared.alerts.MonitorWarning` as well as collecting them.
        keep_history: keep every record in :attr:`history`; None keeps them only when nothing is written.

    Attributes:
        alerts: every alert raised so far (``Alert(step, layer, kind, value, threshold, message)``).
        history: the records (dicts as in the JSONL file) when kept.
        last: the latest record of each layer, by layer path.
        last_channels: the per-channel float64 vectors of each layer's latest record: ``running_mean``,
            ``running_var``, and ``batch_mean``, ``batch_var`` when the layer used batch statistics.
        global_step: the number of the next training step.
        layers: paths of the watched layers (known once ``fit()`` has started).

    Raises:
        ValueError: ``every``/``histogram_every`` is not a positive int, or (when ``fit()`` starts) no layer
            matches ``layers``.
        TypeError: a bad ``layers`` or ``thresholds``.

    Example:
        >>> import numpy as np
        >>> layers = [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name="bn")]
        >>> model = keras.Sequential(layers)
        >>> model.compile("sgd", "mse")
        >>> monitor = Monitor()
        >>> x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
        >>> _ = model.fit(x, np.zeros((32, 4), "float32"), batch_size=16, epochs=1, callbacks=[monitor], verbose=0)
        >>> [(r["step"], r["layer"], r["uses_batch_stats"]) for r in monitor.history]
        [(0, 'bn', True), (1, 'bn', True)]
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        every: int = 1,
        layers: Selector = None,
        *,
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        tensorboard: bool | None = None,
        histogram_every: int | None = None,
        warn: bool = True,
        keep_history: bool | None = None,
    ) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"bnkit.keras.Monitor: every must be a positive int (record every n-th step), got {every!r}"
            )
        if histogram_every is not None and (
            isinstance(histogram_every, bool) or not isinstance(histogram_every, int) or histogram_every < 0
        ):
            raise ValueError(
                f"bnkit.keras.Monitor: histogram_every must be an int >= 0 or None, got {histogram_every!r}"
            )
        if tensorboard is not None and not isinstance(tensorboard, bool):
            raise TypeError(f"bnkit.keras.Monitor: tensorboard must be True, False or None, got {tensorboard!r}")
        check_selector(layers, "bnkit.keras.Monitor")
        self.thresholds = as_thresholds(thresholds, "bnkit.keras.Monitor")
        self.log_dir: Path | None = Path(log_dir) if log_dir is not None else None
        self.every = every
        self.histogram_every = 10 * every if histogram_every is None else histogram_every
        self.selector = layers
        self.warn = warn
        self.keep_history = (self.log_dir is None) if keep_history is None else bool(keep_history)
        self._want_tb = tensorboard
        self._rules = AlertRules(self.thresholds, warn)
        self.alerts: list[Alert] = self._rules.alerts
        self.history: list[dict[str, Any]] = []
        self.last: dict[str, dict[str, Any]] = {}
        self.last_channels: dict[str, dict[str, np.ndarray]] = {}
        self.global_step = 0
        self.layers: list[str] = []
        self._watched: list[_Watched] = []
        self._log = LogWriter("bnkit.keras.Monitor")
        self._old: list[np.ndarray | None] | None = None
        self._recover = True
        self._groups: list[_Group] = []
        self._readers: dict[tuple[Any, ...], Any] = {}
        self._reading: dict[int, Any] = {}
        self._base_steps = 0
        self._fit_start = 0

    def __repr__(self) -> str:
        where = str(self.log_dir) if self.log_dir is not None else "memory"
        size = f"{len(self._watched)} layers, every={self.every}, step={self.global_step}"
        return f"bnkit.keras.Monitor({size}, log={where})"

    # ------------------------------------------------------------------ fit() events

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Find the layers, open the log files, take the moving statistics before the first step.

        Example:
            >>> Monitor().on_train_begin  # called by fit()
            <bound method Monitor.on_train_begin of bnkit.keras.Monitor(0 layers, every=1, step=0, log=memory)>
        """
        model = self.model
        found = select_batchnorms(model, self.selector, "bnkit.keras.Monitor")
        if not found:
            raise ValueError(
                f"bnkit.keras.Monitor: {getattr(model, 'name', type(model).__name__)} has no BatchNormalization layer; "
                "pass a model with BatchNormalization layers or remove the callback"
            )
        self._watched = [_Watched(f.path, f.layer) for f in found]
        self.layers = [w.name for w in self._watched]
        lengths = np.array([w.channels for w in self._watched], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        total = int(lengths.sum())
        self._lengths, self._starts = lengths, starts
        self._groups = [_Group(self._watched, k, total, starts) for k in range(5)]
        for count in (3, 5):  # kept across fit() calls: a TensorFlow reader is traced once
            variables = [v for g in self._groups[:count] for v in g.variables]
            key = (count, id(model), tuple(id(v) for v in variables))
            if key not in self._readers:
                self._readers = {k: r for k, r in self._readers.items() if k[0] != count}
                self._readers[key] = _reader(model, variables)
            self._reading[count] = self._readers[key]
        m, c = np.array([w.factor for w in self._watched]).T
        self._m, self._c = np.repeat(m, lengths), np.repeat(c, lengths)
        self._eps = np.repeat([w.eps for w in self._watched], lengths)
        self._renorm = np.repeat([w.renorm for w in self._watched], lengths)
        spe = getattr(model, "steps_per_execution", 1)
        self._recover = not (isinstance(spe, int) and spe > 1)
        if not self._recover:
            warnings.warn(
                f"bnkit.keras.Monitor: steps_per_execution={spe} runs several steps between callbacks; batch "
                "statistics cannot be recovered and are left out (compile with steps_per_execution=1 to get them)",
                MonitorWarning,
                stacklevel=2,
            )
        self._base_steps = compat.optimizer_steps(model) or 0
        self._fit_start = self.global_step
        self._open_outputs()
        self._old = self._read(moving_only=True) if self.global_step % self.every == 0 else None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Record the step when it is due; keep the moving statistics when the next step is due.

        Example:
            >>> Monitor(every=2).every
            2
        """
        step = self.global_step
        values = None
        if self._old is not None:
            values = self._read(moving_only=False)
            self._record(step, self._old, values)
        self.global_step = step + 1
        if self.global_step % self.every == 0:
            self._old = values if values is not None else self._read(moving_only=True)
        else:
            self._old = None

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        """Write everything pending and close the files (the next ``fit()`` opens them again, appending).

        Example:
            >>> Monitor().on_train_end()
        """
        self.close()

    def close(self) -> None:
        """Wait until every record is written, close the JSONL file and the TensorBoard event file.

        Raises:
            OSError: writing the log failed.

        Example:
            >>> Monitor().close()
        """
        self._old = None
        self._log.close()

    # ------------------------------------------------------------------ reading the variables

    def _read(self, moving_only: bool) -> list[np.ndarray | None]:
        """Flat per-channel vectors of every watched layer (one backend call): moving mean, moving variance,
        moving stddev (NaN outside renorm layers; None without any), and unless ``moving_only`` gamma and beta
        (NaN where absent, None when no layer has them)."""
        count = 3 if moving_only else 5
        flat = self._reading[count]()
        out: list[np.ndarray | None] = []
        start = 0
        for group in self._groups[:count]:
            out.append(group.place(flat[start : start + group.size]))
            start += group.size
        return out + [None] * (5 - count)

    # ------------------------------------------------------------------ records

    def _record(self, step: int, old: list[np.ndarray | None], new: list[np.ndarray | None]) -> None:
        now = time.time()
        old_mean, old_var, old_std = old[:3]
        new_mean, new_var, new_std, gamma, beta = new
        changed = (old_mean != new_mean) | (old_var != new_var)
        moved = np.logical_or.reduceat(changed, self._starts)
        use = np.repeat(moved, self._lengths) & (self._c > 0) & self._recover
        nan = np.full(old_mean.shape, np.nan)
        with np.errstate(all="ignore"):
            batch_mean = np.where(use, (new_mean - self._m * old_mean) / self._c, nan)
            batch_var = np.maximum((new_var - self._m * old_var) / self._c, 0.0)
            if old_std is not None:
                std = (new_std - self._m * old_std) / self._c
                batch_var = np.where(self._renorm, np.maximum(std * std - self._eps, 0.0), batch_var)
            batch_var = np.where(use, batch_var, nan)
        gamma = nan if gamma is None else gamma
        beta = nan if beta is None else beta
        packed = np.stack((batch_mean, batch_var, old_mean, old_var, gamma, beta))
        table = summarize(packed, self._lengths, [w.eps for w in self._watched])
        records, alerts = [], []
        seen = self._base_steps + step - self._fit_start
        histogram = self._log.tensorboard is not None and self.histogram_every and step % self.histogram_every == 0
        splits = np.split(packed, self._starts[1:], axis=1)
        vectors: list[tuple[str, np.ndarray]] = []
        for i, (watched, row) in enumerate(zip(self._watched, table.tolist(), strict=True)):
            recovered = bool(use[self._starts[i]])
            record: dict[str, Any] = {
                "kind": "stats",
                "step": step,
                "time": now,
                "layer": watched.name,
                "uses_batch_stats": bool(moved[i]),
                "channels": watched.channels,
                "count": None,
                "num_batches_tracked": None,
            }
            record.update(zip(QUANTITIES, row, strict=True))
            if not recovered:
                record.update(dict.fromkeys(_BATCH_FIELDS))
            if watched.variables[3] is None:
                record["weight_norm"] = None
            if watched.variables[4] is None:
                record["bias_norm"] = None
            records.append(record)
            alerts += self._rules.check(watched.name, watched.eps, seen, record, stacklevel=3)
            self.last[watched.name] = record
            rows = splits[i]
            channels = {"running_mean": rows[2], "running_var": rows[3]}
            if recovered:
                channels.update(batch_mean=rows[0], batch_var=rows[1])
            self.last_channels[watched.name] = channels
            if histogram:
                tag_layer = watched.name or "(model)"
                present = [
                    k for k in range(6) if (k >= 2 or recovered) and (k < 4 or watched.variables[k - 1] is not None)
                ]
                vectors += [(f"bn_hist_{HISTOGRAMS[k]}/{tag_layer}", rows[k]) for k in present]
        if self.keep_history:
            self.history.extend(records)
        self._log.raise_error()
        self._log.submit(records, alerts, vectors, step, now)

    # ------------------------------------------------------------------ outputs

    def _open_outputs(self) -> None:
        if self.log_dir is None:
            return
        layers = [
            {
                "name": w.name,
                "type": type(w.layer).__name__,
                "channels": w.channels,
                "eps": w.eps,
                "momentum": w.momentum,
            }
            for w in self._watched
        ]
        self._log.open_jsonl(self.log_dir, meta_record(self.every, asdict(self.thresholds), layers))
        if self._log.tensorboard is not None or self._want_tb is False:
            return
        try:
            self._log.tensorboard = EventWriter(self.log_dir)
        except ImportError as exc:
            if self._want_tb:
                raise ImportError(
                    f"bnkit.keras.Monitor: TensorBoard output needs the tensorboard package: {TENSORBOARD_MISSING}, "
                    "or pass tensorboard=False to write only JSONL"
                ) from exc
            warnings.warn(
                f"bnkit.keras.Monitor: tensorboard is not installed; writing only {self.log_dir / JSONL_NAME} "
                "(pip install tensorboard for event files)",
                MonitorWarning,
                stacklevel=3,
            )
            self._want_tb = False
            return
        self._log.owns_tensorboard = True
