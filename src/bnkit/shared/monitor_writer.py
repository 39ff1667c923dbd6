"""Where the BatchNorm monitors' records go: the JSONL file and TensorBoard, written on a background thread.

:class:`LogWriter` owns the JSONL file and a TensorBoard writer and serialises each step's records on a worker
thread, so training never waits for JSON or protobuf encoding. :class:`EventWriter` writes TensorBoard event
files with the ``tensorboard`` package's protos and record format only: no TensorFlow and no torch (importing
``tensorboard.compat.tf``, as ``SummaryWriter`` does, loads TensorFlow when it is installed).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bnkit.shared.alerts import Alert, alert_record
from bnkit.shared.monitor_log import JSONL_NAME, QUANTITIES, jsonable
from bnkit.shared.monitor_stats import histograms

__all__ = ["TENSORBOARD_MISSING", "EventWriter", "LogWriter", "scalars_of", "write_tensorboard"]

#: How to get TensorBoard output when the ``tensorboard`` package is missing.
TENSORBOARD_MISSING = "pip install 'bnkit[monitor]' (or tensorboard)"

_UID = itertools.count()


class EventWriter:
    """A TensorBoard event file in ``log_dir``, written with the ``tensorboard`` package alone (no TensorFlow).

    Has the methods of ``SummaryWriter`` a monitor needs (``add_scalar``, ``add_histogram_raw``, ``flush``,
    ``close``, ``get_logdir``), plus ``add_summary`` for a whole ``Summary`` proto in one event. Thread-safe.

    Raises:
        ImportError: the tensorboard package is not installed.

    Example:
        >>> import tempfile
        >>> w = EventWriter(tempfile.mkdtemp())
        >>> w.add_scalar("loss", 0.5, global_step=1)
        >>> w.close()
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self.log_dir = str(log_dir)
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_UID)}"
        self._file = open(Path(self.log_dir) / name, "wb")
        self._records = RecordWriter(self._file)
        self._lock = threading.Lock()
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def get_logdir(self) -> str:
        """The directory of the event file (as ``SummaryWriter.get_logdir``).

        Example:
            >>> import tempfile
            >>> d = tempfile.mkdtemp(); w = EventWriter(d); w.get_logdir() == d
            True
            >>> w.close()
        """
        return self.log_dir

    def _write(self, event: Any) -> None:
        with self._lock:
            if self._file is None:
                raise ValueError(f"EventWriter: the event file in {self.log_dir!r} is closed")
            self._records.write(event.SerializeToString())

    def add_summary(self, summary: Any, step: int, walltime: float | None = None) -> None:
        """Write a ``Summary`` proto as one event at ``step``.

        Example:
            >>> import tempfile
            >>> from tensorboard.compat.proto.summary_pb2 import Summary
            >>> w = EventWriter(tempfile.mkdtemp())
            >>> w.add_summary(Summary(value=[Summary.Value(tag="a", simple_value=1.0)]), 0); w.close()
        """
        when = time.time() if walltime is None else walltime
        self._write(self._event_pb2.Event(wall_time=when, step=int(step), summary=summary))

    def add_scalar(
        self, tag: str, scalar_value: float, global_step: int | None = None, walltime: float | None = None
    ) -> None:
        """Write one scalar (as ``SummaryWriter.add_scalar``).

        Example:
            >>> import tempfile
            >>> w = EventWriter(tempfile.mkdtemp()); w.add_scalar("x", 2.0, 3); w.close()
        """
        value = self._summary_pb2.Summary.Value(tag=tag, simple_value=float(scalar_value))
        self.add_summary(self._summary_pb2.Summary(value=[value]), global_step or 0, walltime)

    def add_histogram_raw(
        self,
        tag: str,
        min: float,
        max: float,
        num: int,
        sum: float,
        sum_squares: float,
        bucket_limits: list[float],
        bucket_counts: list[float],
        global_step: int | None = None,
        walltime: float | None = None,
    ) -> None:
        """Write one histogram from its statistics (as ``SummaryWriter.add_histogram_raw``).

        Example:
            >>> import tempfile
            >>> w = EventWriter(tempfile.mkdtemp())
            >>> w.add_histogram_raw("h", 0.0, 1.0, 2, 1.0, 1.0, [0.0, 1.0], [0.0, 2.0], 0); w.close()
        """
        proto = _histogram_proto(
            self._summary_pb2,
            {
                "min": min,
                "max": max,
                "num": num,
                "sum": sum,
                "sum_squares": sum_squares,
                "bucket_limits": bucket_limits,
                "bucket_counts": bucket_counts,
            },
        )
        summary = self._summary_pb2.Summary(value=[self._summary_pb2.Summary.Value(tag=tag, histo=proto)])
        self.add_summary(summary, global_step or 0, walltime)

    def flush(self) -> None:
        """Push what is written to disk.

        Example:
            >>> import tempfile
            >>> w = EventWriter(tempfile.mkdtemp()); w.flush(); w.close()
        """
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        """Flush and close the event file; a second call does nothing.

        Example:
            >>> import tempfile
            >>> w = EventWriter(tempfile.mkdtemp()); w.close(); w.close()
        """
        with self._lock:
            if self._file is not None:
                self._file.flush()
                self._file.close()
                self._file = None


def _histogram_proto(summary_pb2: Any, h: dict[str, Any]) -> Any:
    return summary_pb2.HistogramProto(
        min=h["min"],
        max=h["max"],
        num=h["num"],
        sum=h["sum"],
        sum_squares=h["sum_squares"],
        bucket_limit=h["bucket_limits"],
        bucket=h["bucket_counts"],
    )


def write_tensorboard(
    writer: Any,
    scalars: list[tuple[str, float]],
    histograms_: list[tuple[str, dict[str, Any]]],
    step: int,
    walltime: float,
) -> None:
    """Everything of a step as one TensorBoard event when the writer allows it.

    ``writer`` is an :class:`EventWriter`, a ``torch.utils.tensorboard.SummaryWriter`` or anything with
    ``add_scalar`` and ``add_histogram_raw`` (one event per value then). One event per step (instead of one per
    tag) keeps a writer's bounded queue from blocking training while its background thread catches up.

    Example:
        >>> import tempfile
        >>> w = EventWriter(tempfile.mkdtemp())
        >>> write_tensorboard(w, [("bn_drift/bn", 0.5)], [], step=0, walltime=0.0); w.close()
    """
    add_summary = getattr(writer, "add_summary", None) if isinstance(writer, EventWriter) else None
    if add_summary is None:
        get_file_writer = getattr(writer, "_get_file_writer", None)  # SummaryWriter's one-event path
        if callable(get_file_writer):
            add_summary = getattr(get_file_writer(), "add_summary", None)
    if callable(add_summary):
        try:
            from tensorboard.compat.proto.summary_pb2 import Summary
        except ImportError:
            add_summary = None
    if not callable(add_summary):
        for tag, value in scalars:
            writer.add_scalar(tag, value, step, walltime=walltime)
        for tag, fields_ in histograms_:
            writer.add_histogram_raw(tag, global_step=step, walltime=walltime, **fields_)
        return
    from tensorboard.compat.proto import summary_pb2

    values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars]
    values += [Summary.Value(tag=tag, histo=_histogram_proto(summary_pb2, h)) for tag, h in histograms_]
    add_summary(Summary(value=values), step, walltime)


def scalars_of(records: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """TensorBoard scalars of stats records: ``bn_<quantity>/<layer>`` (non-None values) and
    ``bn_uses_batch_stats/<layer>``; the layer ``""`` (a model that is itself a BatchNorm) is tagged ``(model)``.

    Example:
        >>> scalars_of([{"layer": "bn", "uses_batch_stats": True, **dict.fromkeys(QUANTITIES), "drift": 0.5}])
        [('bn_drift/bn', 0.5), ('bn_uses_batch_stats/bn', 1.0)]
    """
    scalars: list[tuple[str, float]] = []
    for record in records:
        tag_layer = record["layer"] or "(model)"
        for name in QUANTITIES:
            value = record[name]
            if value is not None:
                scalars.append((f"bn_{name}/{tag_layer}", value))
        scalars.append((f"bn_uses_batch_stats/{tag_layer}", float(record["uses_batch_stats"])))
    return scalars


class LogWriter:
    """The JSONL file and TensorBoard writer of a monitor, written by a worker thread (started on first use).

    Args:
        tool: the monitor's name for error messages (``"bnkit.Monitor"``).

    Attributes:
        file: the open JSONL file (None when there is none).
        tensorboard: the TensorBoard writer (None when there is none); ``owns_tensorboard`` says whether
            :meth:`close` closes it.

    Example:
        >>> import tempfile
        >>> log = LogWriter("demo")
        >>> log.open_jsonl(Path(tempfile.mkdtemp()), {"kind": "meta"})
        >>> log.submit([{"kind": "stats", "step": 0, "layer": "bn"}], [], [], 0, 0.0)
        >>> log.close()
    """

    def __init__(self, tool: str) -> None:
        self.tool = tool
        self.log_dir: Path | None = None
        self.file: Any = None
        self.tensorboard: Any = None
        self.owns_tensorboard = False
        self._queue: queue.Queue[tuple[Any, ...] | None] | None = None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def active(self) -> bool:
        """Whether anything is written (a JSONL file or a TensorBoard writer is open).

        Example:
            >>> LogWriter("demo").active
            False
        """
        return self.file is not None or self.tensorboard is not None

    def open_jsonl(self, log_dir: Path, meta: dict[str, Any]) -> None:
        """Create ``log_dir``, open its JSONL file for appending and write ``meta``; a second call does nothing.

        Raises:
            ValueError: ``log_dir`` cannot be created.

        Example:
            >>> import tempfile
            >>> log = LogWriter("demo"); log.open_jsonl(Path(tempfile.mkdtemp()), {"kind": "meta"}); log.close()
        """
        if self.file is not None:
            return
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{self.tool}: cannot create log_dir {str(log_dir)!r}: {exc}") from exc
        self.log_dir = log_dir
        self.file = open(log_dir / JSONL_NAME, "a", encoding="utf-8")
        self.file.write(json.dumps(meta) + "\n")
        self.file.flush()

    def submit(
        self,
        records: list[dict[str, Any]],
        alerts: list[Alert],
        vectors: list[tuple[str, np.ndarray]],
        step: int,
        now: float,
    ) -> None:
        """Queue a step's stats records, alerts and histogram vectors (``(tag, per-channel array)``) for writing.

        Example:
            >>> LogWriter("demo").submit([], [], [], 0, 0.0)  # nothing open: nothing to do
        """
        if not self.active:
            return
        if self._worker is None:
            self._queue = queue.Queue()
            self._worker = threading.Thread(target=self._work, name="bnkit-monitor-writer", daemon=True)
            self._worker.start()
            atexit.register(self.drain)
        self._queue.put((records, alerts, vectors, step, now))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._write(*item)
            except BaseException as exc:  # kept for the training thread, which raises it at its next step
                self._error = exc
            finally:
                self._queue.task_done()

    def _write(
        self,
        records: list[dict[str, Any]],
        alerts: list[Alert],
        vectors: list[tuple[str, np.ndarray]],
        step: int,
        now: float,
    ) -> None:
        if self.file is not None:
            lines = [json.dumps(jsonable(r), allow_nan=False) for r in records]
            lines += [json.dumps(alert_record(alert), allow_nan=False) for alert in alerts]
            self.file.write("\n".join(lines) + "\n")
            self.file.flush()
        if self.tensorboard is not None:
            write_tensorboard(self.tensorboard, scalars_of(records), histograms(vectors), step, now)

    def drain(self) -> None:
        """Wait until everything queued is written, end the worker thread, raise a write error if one happened.

        Example:
            >>> LogWriter("demo").drain()
        """
        worker, self._worker = self._worker, None
        if worker is not None:
            atexit.unregister(self.drain)
            self._queue.put(None)
            worker.join()
            self._queue = None
        self.raise_error()

    def raise_error(self) -> None:
        """Raise the worker thread's write error (once) as an ``OSError`` naming the log.

        Example:
            >>> LogWriter("demo").raise_error()  # no error: nothing happens
        """
        if self._error is not None:
            error, self._error = self._error, None
            where = self.log_dir if self.log_dir is not None else "the TensorBoard writer"
            raise OSError(f"{self.tool}: writing the log to {where} failed: {error}") from error

    def close(self) -> None:
        """Drain, close the JSONL file and the TensorBoard writer when it is ours (else flush it).

        Example:
            >>> LogWriter("demo").close()
        """
        try:
            self.drain()
        finally:
            if self.file is not None:
                self.file.close()
                self.file = None
            if self.tensorboard is not None:
                if self.owns_tensorboard:
                    self.tensorboard.close()
                    self.tensorboard = None
                    self.owns_tensorboard = False
                else:
                    self.tensorboard.flush()
