"""Recompute BatchNorm running statistics from data: precise population statistics (Precise BN) or EMA updates.

``recalibrate(model, data)`` replaces the running mean and variance of every selected BatchNorm layer with the
exact count-weighted mean and variance of everything the layer sees while ``data`` flows through the model
(Wu & Johnson 2021, fvcore's ``update_bn_stats``). Run on target-domain data it is AdaBN. Unlike
``torch.optim.swa_utils.update_bn``, which averages per-batch unbiased variances and so misses the variance
between batches, the per-batch ``(count, mean, m2)`` triples are merged exactly (Chan et al.) in float64.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bnkit.core.moments import Moments, merge_moments, reduction_dims, variance
from bnkit.layers.find import LayerSelector
from bnkit.layers.kinds import BatchNormInfo, warn_unrecognised
from bnkit.tools.freeze import frozen_stats_hook
from bnkit.tools.model_edit import check_model, is_bnkit_batchnorm, select_batchnorm_like
from bnkit.tools.model_inputs import call_on_batch

__all__ = ["METHODS", "RecalibrationReport", "recalibrate"]

#: Accepted values of ``method``.
METHODS = ("precise", "ema")

# Per-batch statistics are merged in chunks of this many batches, so memory stays bounded on long data.
_CHUNK = 64
# Orders layers by their first call, so sequential recalibration follows execution order.
_CLOCK = itertools.count()
# The reason reported for a selected layer the forward passes never reached (the warning keys on "never").
_NEVER_CALLED = "never called during the forward passes"


@dataclass(frozen=True)
class RecalibrationReport:
    """What :func:`recalibrate` did.

    Attributes:
        method: ``"precise"`` or ``"ema"``.
        batches: batches drawn from ``data`` in one pass.
        passes: passes over ``data`` (1, or one per layer with ``sequential=True``).
        counts: per recalibrated layer (qualified name): values per channel its statistics summarise
            (``"precise"``, summed over ranks), or the number of momentum updates (``"ema"``).
        skipped: selected layers left unchanged, with the reason.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
        >>> recalibrate(model, [torch.randn(4, 3), torch.randn(2, 3)], progress=False).counts
        {'0': 6}
    """

    method: str
    batches: int
    passes: int
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


class _StopForward(BaseException):
    """Ends a sequential pass once its layer has seen its input (not an error; never leaves recalibrate)."""


def _tree_merge(parts: Moments) -> Moments:
    """Merge stacked moments (parts on dim 0) pairwise with Chan's formula; returns one part (dim 0 kept)."""
    while parts.mean.shape[0] > 1:
        k = parts.mean.shape[0]
        even = k - k % 2
        merged = merge_moments(
            Moments(parts.count[0:even:2], parts.mean[0:even:2], parts.m2[0:even:2]),
            Moments(parts.count[1:even:2], parts.mean[1:even:2], parts.m2[1:even:2]),
        )
        if k % 2:
            merged = Moments(*(torch.cat([a, b[even:]]) for a, b in zip(merged, parts, strict=True)))
        parts = merged
    return parts


def _batch_sums(x: Tensor, axis: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(shift, s1, s2)`` of a batch: its mean, ``sum(x - shift)`` and ``sum((x - shift)^2)``.

    Two passes (mean, then deviations) in the input's precision. The exact moments follow in float64 as
    ``mean = shift + s1/n`` and ``m2 = s2 - s1^2/n`` (:func:`_moments_from_sums`): ``s1`` removes the rounding
    error of ``shift`` itself, which would otherwise dominate the between-batch term of the merge when
    ``|mean| >> std``. Plain reductions are used instead of ``torch.var_mean`` because on CPU that kernel is
    several times slower over an NCHW tensor than the whole BatchNorm.
    """
    dims = reduction_dims(x.ndim, axis)
    shift = x.mean(dims, keepdim=True)
    d = x - shift
    s1 = d.sum(dims)
    s2 = d.square_().sum(dims)
    return shift.reshape(-1), s1, s2


def _moments_from_sums(count: Tensor, shift: Tensor, s1: Tensor, s2: Tensor) -> Moments:
    """Float64 :class:`Moments` from stacked ``(shift, s1, s2)`` (parts on dim 0; ``count`` shaped ``[K, 1]``)."""
    shift, s1, s2 = (t.to(torch.float64) for t in (shift, s1, s2))
    return Moments(count, shift + s1 / count, (s2 - s1 * s1 / count).clamp_min_(0.0))


class _Capture:
    """Statistics capture for one layer: a forward pre-hook and per-batch moments.

    The layer runs in eval mode. Its pre-hook computes the batch's per-channel mean and m2, records them, and
    writes the batch mean and biased variance into the running buffers, so the eval-mode forward normalises
    with batch statistics exactly as training mode would, at the cost of an inference-mode BatchNorm plus two
    reductions, and with nothing else of training mode (momentum updates, ghost batches, renorm corrections,
    synchronisation) involved. The buffers are restored or overwritten afterwards.

    ``mode`` is ``"record"`` (batch statistics, recorded), ``"batch"`` (batch statistics, not recorded) or
    ``"off"`` (inference with the buffers as they are: an already recalibrated layer in a sequential pass).
    """

    def __init__(self, name: str, info: BatchNormInfo) -> None:
        self.name = name
        self.module = info.module
        self.info = info
        self.bnkit = is_bnkit_batchnorm(info.module)
        self.unbiased = bool(info.module.unbiased_running_var) if self.bnkit else True
        self.mode = "record"
        self.stop = False
        self.calls = 0
        self.first_call: int | None = None
        self.parts: list[tuple[int, Tensor, Tensor, Tensor]] = []
        self.total: Moments | None = None

    def reset(self) -> None:
        self.calls = 0
        self.parts = []
        self.total = None

    def _collapse(self) -> None:
        if not self.parts:
            return
        device = self.parts[0][1].device
        count = torch.tensor([[float(p[0])] for p in self.parts], dtype=torch.float64, device=device)
        stacked = (torch.stack([p[i] for p in self.parts]) for i in (1, 2, 3))
        merged = _tree_merge(_moments_from_sums(count, *stacked))
        merged = Moments(merged.count.reshape(()), merged.mean[0], merged.m2[0])
        self.total = merged if self.total is None else merge_moments(self.total, merged)
        self.parts = []

    def result(self) -> Moments:
        """All recorded statistics merged (float64); count 0 when the layer recorded nothing."""
        self._collapse()
        if self.total is not None:
            return self.total
        ref = self.info.running_mean
        zeros = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        return Moments(torch.zeros((), dtype=torch.float64, device=ref.device), zeros, zeros.clone())

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.mode == "off" or not args or not isinstance(args[0], Tensor):
            return
        x = args[0].detach()
        if x.ndim < 2:
            return  # let the layer report a bad input
        axis = self.info.axis_for(x.ndim)
        if x.shape[axis] == 0 or x.numel() == 0:
            return  # an empty batch contributes nothing
        n = x.numel() // x.shape[axis]
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        shift, s1, s2 = _batch_sums(xf, axis)
        # The batch's own mean and biased variance, for the eval-mode forward (input precision is enough here).
        self.info.running_mean.copy_(shift).add_(s1, alpha=1.0 / n)
        self.info.running_var.copy_(torch.addcmul(s2, s1, s1, value=-1.0 / n).div_(n).clamp_min_(0.0))
        if self.mode == "record":
            if self.first_call is None:
                self.first_call = next(_CLOCK)
            self.calls += 1
            self.parts.append((n, shift, s1, s2))
            if len(self.parts) >= _CHUNK:
                self._collapse()
            if self.stop:
                raise _StopForward


class _Progress(AbstractContextManager):
    """A progress bar from rich, else tqdm, else nothing (both are optional dependencies)."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled = enabled
        self.total = total
        self._rich: Any = None
        self._task: Any = None
        self._tqdm: Any = None

    def __enter__(self) -> _Progress:
        if not self.enabled:
            return self
        try:
            from rich.console import Console
            from rich.progress import Progress

            self._rich = Progress(console=Console(stderr=True), transient=True)
            self._rich.start()
        except ImportError:
            self._rich = None
        return self

    def start(self, description: str) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            if self._task is not None:
                self._rich.remove_task(self._task)
            self._task = self._rich.add_task(description, total=self.total)
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        self._tqdm = tqdm(total=self.total, desc=description, leave=False)

    def advance(self) -> None:
        if self._rich is not None and self._task is not None:
            self._rich.advance(self._task)
        elif self._tqdm is not None:
            self._tqdm.update(1)

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()
        if self._tqdm is not None:
            self._tqdm.close()


class _Session:
    """Everything recalibrate changes, saved first and put back in ``restore`` (always) and on failure."""

    def __init__(self, model: nn.Module) -> None:
        self.flags = [(m, m.training) for m in model.modules()]
        self.buffers = [(b, b.clone()) for b in model.buffers()]
        self.attrs: list[tuple[Any, str, Any]] = []
        self.handles: list[Any] = []

    def suspend_freeze(self, modules: list[nn.Module]) -> None:
        for module in modules:
            hook = frozen_stats_hook(module)
            if hook is not None:
                self.set(hook, "enabled", False)
            if is_bnkit_batchnorm(module):
                self.set(module, "freeze_stats", False)

    def set(self, obj: Any, attr: str, value: Any) -> None:
        self.attrs.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for buf, saved in self.buffers:
                buf.copy_(saved)

    def restore(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        for obj, attr, value in reversed(self.attrs):
            setattr(obj, attr, value)
        for module, flag in self.flags:
            module.training = flag


def _check_arguments(
    model: nn.Module,
    data: Any,
    method: str,
    num_batches: int | None,
    forward: Any,
    progress: Any,
    sequential: Any,
) -> None:
    check_model(model, "recalibrate")
    if method not in METHODS:
        raise ValueError(f"recalibrate: method must be one of {', '.join(METHODS)}; got {method!r}")
    if isinstance(data, Tensor):
        raise TypeError(
            "recalibrate: data must be an iterable of batches (a DataLoader or a list of tensors), got a single "
            "Tensor; pass [x] or x.split(batch_size)"
        )
    if not isinstance(data, Iterable):
        raise TypeError(f"recalibrate: data must be an iterable of batches, got {type(data).__name__}")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"recalibrate: num_batches must be a positive int or None; got {num_batches!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"recalibrate: forward must be a callable (model, batch) -> Any; got {type(forward).__name__}")
    for flag_name, flag in (("progress", progress), ("sequential", sequential)):
        if not isinstance(flag, bool):
            raise TypeError(f"recalibrate: {flag_name} must be True or False, got {flag!r}")
    if sequential and method != "precise":
        raise ValueError("recalibrate: sequential=True applies to method='precise' only")
    if sequential and iter(data) is data:
        raise ValueError(
            "recalibrate: sequential=True passes over the data once per layer, so data must be re-iterable "
            "(a list or a DataLoader), not a one-shot iterator or generator"
        )
    lazy = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if isinstance(tensor, lazy):
            raise ValueError(
                f"recalibrate: {name} belongs to a lazy module that has not seen an input; run one forward pass first"
            )


@dataclass
class _Passes:
    """What every pass over the data needs: the model, the batches, how to call the model, the progress bar."""

    model: nn.Module
    data: Iterable[Any]
    num_batches: int | None
    forward: Callable[[nn.Module, Any], Any]
    bar: _Progress

    def run(self, description: str) -> int:
        """One pass (at most ``num_batches`` batches); returns the number of batches drawn."""
        self.bar.start(description)
        batches = 0
        iterator: Iterator[Any] = iter(self.data)
        while self.num_batches is None or batches < self.num_batches:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            try:
                self.forward(self.model, batch)
            except _StopForward:
                pass
            batches += 1
            self.bar.advance()
        return batches

    def first(self, description: str) -> int:
        """The first pass, which must draw at least one batch."""
        batches = self.run(description)
        if batches == 0:
            raise ValueError("recalibrate: data yielded no batches; nothing was recalibrated")
        return batches


def _commit(capture: _Capture, moments: Moments) -> None:
    """Write population statistics into the layer's buffers, in its own variance convention."""
    module = capture.module
    var = variance(moments, unbiased=capture.unbiased)
    mean = moments.mean
    if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
        raise ValueError(
            f"recalibrate: layer {capture.name or '<model>'} got non-finite statistics (NaN/Inf in the data or "
            "produced by earlier layers); the model was left unchanged"
        )
    with torch.no_grad():
        if getattr(module, "renorm", None) is not None:
            # Keep the renorm layer's invariant running_var == relu(running_std**2 - eps).
            std = torch.sqrt(var + module.eps).to(module.running_std.dtype)
            module.running_std.copy_(std)
            var = torch.relu(std * std - module.eps)
        capture.info.running_mean.copy_(mean.to(capture.info.running_mean.dtype))
        capture.info.running_var.copy_(var.to(capture.info.running_var.dtype))


def _reduce(moments: Moments) -> Moments:
    from bnkit.distributed import reduce_moments

    return reduce_moments(moments, group=None)


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    method: str = "precise",
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    layers: LayerSelector = None,
    sequential: bool = False,
    include_frozen: bool = False,
) -> RecalibrationReport:
    """Recompute the running statistics of the selected BatchNorm layers from ``data``, in place.

    ``method="precise"`` (Precise BN; AdaBN on target-domain data): every selected layer's ``running_mean``
    and ``running_var`` become the exact count-weighted mean and variance of all values the layer sees over
    the batches, whatever the batch sizes: per-batch ``(count, mean, m2)`` triples are merged with Chan's
    formula in float64 and stored in the layer's own convention (unbiased ``n/(n-1)`` for ``torch.nn`` layers
    and ``bnkit.BatchNorm(unbiased_running_var=True)``, biased for ``unbiased_running_var=False``; renorm layers
    also get ``running_std``). ``num_batches_tracked`` is left unchanged. During the pass the selected layers
    normalise with batch statistics (as fvcore does), so a layer's statistics reflect earlier layers in
    training-mode behaviour. ``sequential=True`` instead recomputes layer by layer in execution order: each
    layer's statistics see all earlier layers already normalising with their new population statistics. Its
    cost is one pass over ``data`` per layer (L passes for L layers; each pass stops at its layer when that
    layer is called once per batch), and ``data`` must be re-iterable. Under ``torch.distributed`` (initialised,
    several ranks) the statistics are merged across ranks, so every rank must call recalibrate with the same
    model and layers.

    ``method="ema"``: the selected layers run in training mode and update their running statistics with their
    own momentum rule, once per batch (what training forwards would do, without gradients).

    Everything else runs in eval mode (dropout off, other BatchNorm layers on their running statistics),
    under ``torch.no_grad()``. Frozen selected layers (:func:`bnkit.freeze`) are recalibrated too; select with
    ``layers`` to leave them out. Every BatchNorm kind bnkit recognises is recalibrated (timm's BatchNormAct2d,
    classes taught with :func:`bnkit.register_batchnorm`, ...); layers whose class fixes their statistics
    (torchvision's and timm's FrozenBatchNorm2d, FrozenBatchNormAct2d, look-alikes, a detector's frozen
    backbone) only with ``include_frozen=True`` (AdaBN for a frozen backbone; ``method="precise"`` only, they
    have no momentum), and are otherwise listed under ``skipped`` with the reason. Their statistics are stored
    in PyTorch's convention (unbiased variance), as those layers load them from ``torch.nn`` checkpoints.
    On return, and on any exception (including ``KeyboardInterrupt`` from the data
    iterator), every module's training flag, the layers' momentum and freeze switches and all hooks are as
    before; on an exception all buffers (running statistics included) are restored bit for bit.

    Args:
        model: any module containing BatchNorm layers (the model itself may be one).
        data: an iterable of batches (list, DataLoader, generator unless ``sequential``).
        method: ``"precise"`` or ``"ema"``.
        num_batches: use at most this many batches per pass (default: all).
        forward: ``(model, batch) -> Any`` to call the model (pytorch#49082); the default calls ``model(batch)``,
            ``model(batch[0])`` for a list/tuple (a DataLoader's ``(inputs, targets)``) and ``model(**batch)`` for
            a dict. Batches are not moved between devices. A detector whose batch is a list of images needs
            ``forward=lambda model, images: model(images)`` (docs/tools.md, "Example inputs").
        progress: show a progress bar (rich or tqdm when installed, to stderr).
        layers: which BatchNorm layers (None: all; glob, type, predicate or list of names). Layers without
            running statistics are skipped.
        sequential: ``"precise"`` only: exact layer-by-layer recomputation (see above).
        include_frozen: also recompute the statistics of layers whose class fixes them (FrozenBatchNorm2d).

    Returns:
        A :class:`RecalibrationReport`. Selected layers never called during the passes keep their statistics
        (listed under ``skipped``, with a warning).

    Raises:
        TypeError: ``model`` is not a module, ``data`` is a single tensor or not iterable, ``forward`` not callable.
        ValueError: bad ``method``/``num_batches``, ``data`` yields no batch, no selected layer has running
            statistics, ``layers`` matches nothing, or non-finite statistics (the model is left unchanged).

    Example:
        >>> import torch
        >>> torch.manual_seed(0) is not None
        True
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1))
        >>> data = torch.randn(10, 2) * 3 + 1
        >>> _ = recalibrate(model, data.split(4), progress=False)
        >>> torch.allclose(model[0].running_mean, data.mean(0)), torch.allclose(model[0].running_var, data.var(0))
        (True, True)
    """
    _check_arguments(model, data, method, num_batches, forward, progress, sequential)
    if not isinstance(include_frozen, bool):
        raise TypeError(f"recalibrate: include_frozen must be True or False, got {include_frozen!r}")
    call = forward if forward is not None else functools.partial(call_on_batch, tool="recalibrate")
    selected = select_batchnorm_like(model, layers, "recalibrate", stacklevel=3)
    skipped: dict[str, str] = {}
    if layers is None and selected:
        for name in warn_unrecognised(model, "recalibrate"):
            skipped[name] = "running statistics, but bnkit does not recognise the class (bnkit.register_batchnorm)"
    targets: list[tuple[str, BatchNormInfo]] = []
    for name, info in selected:
        if not info.has_running_stats:
            skipped[name] = "no running statistics (track_running_stats=False)"
        elif info.fixed and not include_frozen:
            skipped[name] = (
                f"{type(info.module).__name__} fixes its statistics by class; pass include_frozen=True to "
                "recompute them"
            )
        elif info.fixed and method == "ema":
            skipped[name] = f"{type(info.module).__name__} has no momentum; use method='precise'"
        elif info.lazy:
            skipped[name] = "a lazy layer that has not seen an input"
        else:
            targets.append((name, info))
    if not targets:
        frozen = [name or "<model>" for name, info in selected if info.fixed and info.has_running_stats]
        hint = ""
        if frozen and not include_frozen:
            hint = f" ({len(frozen)} with statistics fixed by class, e.g. {frozen[0]}: pass include_frozen=True)"
        raise ValueError(
            f"recalibrate: no selected BatchNorm layer has running statistics to recalibrate{hint}; nothing was changed"
        )

    total = None
    if hasattr(data, "__len__"):
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if total is not None and num_batches is not None:
        total = min(total, num_batches)

    session = _Session(model)
    failed = True
    try:
        session.suspend_freeze([info.module for _, info in targets])
        for module in model.modules():
            module.training = False
        with torch.no_grad(), _Progress(progress, total) as bar:
            passes = _Passes(model, data, num_batches, call, bar)
            if method == "ema":
                report = _ema(passes, targets, session, skipped)
            else:
                report = _precise(passes, targets, session, skipped, sequential)
        failed = False
    finally:
        if failed:
            session.restore_buffers()
        session.restore()
    if report.skipped:
        never = [name or "<model>" for name, reason in report.skipped.items() if reason == _NEVER_CALLED]
        if never:
            warnings.warn(
                f"recalibrate: {', '.join(never)} never ran during the forward passes; their statistics were kept",
                UserWarning,
                stacklevel=2,
            )
    return report


def _ema(
    passes: _Passes, targets: list[tuple[str, BatchNormInfo]], session: _Session, skipped: dict[str, str]
) -> RecalibrationReport:
    calls = {id(info.module): 0 for _, info in targets}

    def count(module: nn.Module, args: Any, output: Any) -> None:
        calls[id(module)] += 1

    for _, info in targets:
        info.module.training = True
        session.handles.append(info.module.register_forward_hook(count))
    batches = passes.first("recalibrate (ema)")
    counts: dict[str, int] = {}
    for name, info in targets:
        if calls[id(info.module)]:
            counts[name] = calls[id(info.module)]
        else:
            skipped[name] = _NEVER_CALLED
    return RecalibrationReport("ema", batches, 1, counts, skipped)


def _precise(
    passes: _Passes,
    targets: list[tuple[str, BatchNormInfo]],
    session: _Session,
    skipped: dict[str, str],
    sequential: bool,
) -> RecalibrationReport:
    captures = []
    for name, info in targets:
        capture = _Capture(name, info)
        captures.append(capture)
        session.handles.append(info.module.register_forward_pre_hook(capture.pre_hook))

    from bnkit.distributed import is_active

    # Under torch.distributed a rank with an empty shard still takes part in every reduction (it contributes
    # nothing) instead of raising alone and leaving the other ranks waiting.
    batches = passes.run("recalibrate") if is_active() else passes.first("recalibrate")
    count_passes = 1
    # Every rank reduces every layer in the same order, even layers it never called (count 0).
    results = {id(c): _reduce(c.result()) for c in captures}
    if batches == 0 and all(float(r.count) == 0 for r in results.values()):
        raise ValueError("recalibrate: data yielded no batches on any rank; nothing was recalibrated")
    called = [c for c in captures if float(results[id(c)].count) > 0]

    if sequential and len(called) > 1:
        order = sorted(called, key=lambda c: c.first_call if c.first_call is not None else float("inf"))
        calls_in_first_pass = {id(c): c.calls for c in order}
        _commit(order[0], results[id(order[0])])
        order[0].mode = "off"
        for k, capture in enumerate(order[1:], start=1):
            for later in order[k + 1 :]:
                later.mode = "batch"
            capture.reset()
            capture.mode = "record"
            capture.stop = calls_in_first_pass[id(capture)] == batches
            passes.run(f"recalibrate {capture.name} ({k + 1}/{len(order)})")
            count_passes += 1
            results[id(capture)] = _reduce(capture.result())
            _commit(capture, results[id(capture)])
            capture.stop = False
            capture.mode = "off"

    session.restore_buffers()
    counts: dict[str, int] = {}
    for capture in captures:
        moments = results[id(capture)]
        if float(moments.count) > 0:
            _commit(capture, moments)
            counts[capture.name] = round(float(moments.count))
        else:
            skipped[capture.name] = _NEVER_CALLED
    return RecalibrationReport("precise", batches, count_passes, counts, skipped)
