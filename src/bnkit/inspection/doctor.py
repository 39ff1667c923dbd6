"""``bnkit.doctor``: find what is wrong with a model's BatchNorm layers and say how to fix it.

Every rule is one function ``(context) -> list[Finding]`` with a stable code; :data:`RULES` lists them in code
order. Codes never change meaning; new rules get new codes.

========  ========  =================================================================================
code      severity  rule
========  ========  =================================================================================
BN001     error     momentum that looks like a Keras value (0.9-1.0) in a PyTorch-convention layer
BN002     warning   eps differs across BN layers (a partial port from Keras, 1e-3 vs PyTorch's 1e-5)
BN003     warning   momentum differs across BN layers (a partial port)
BN004     warning   gamma/beta frozen (requires_grad=False) but running statistics still update in train()
BN005     error     BN in training mode (or without running statistics) when ``intent="inference"``
BN006     warning   per-device batch below 8 samples for layers that use batch statistics (needs example)
BN007     info      a conv/linear bias directly before a BN that normalises with batch statistics
BN008     error     running statistics never updated (0/1, num_batches_tracked 0) in a model used for inference
BN009     error     running variance non-finite or negative (warning: channels with variance below eps)
BN010     warning   one BN module called more than once per forward pass (error for synchronised BN)
BN011     warning   a BN put in eval() to freeze it, in a model that will train: model.train() undoes it
BN012     warning   batches with non-finite statistics were skipped (bnkit's ``skipped_batches`` counter > 0)
BN013     warning   a module holds running statistics but bnkit does not recognise its class
========  ========  =================================================================================

Every BatchNorm kind bnkit recognises is examined (:func:`bnkit.named_batchnorm_like`): ``torch.nn`` and
``bnkit`` layers, timm's BatchNormAct2d, and layers whose class fixes the statistics (FrozenBatchNorm2d, ...),
which are never in training mode and have no momentum.

Rules BN006 and BN010 need ``example_inputs`` (the model runs once on them in eval mode, without gradients, and
every training flag is restored); BN007 uses the same run when available, else a torch.fx trace, else the order of
``nn.Sequential`` children. ``intent`` (``"inference"``, ``"training"`` or ``"fine-tune"``) sharpens BN005,
BN006, BN008 and BN011; without it, the model's own ``training`` flag stands for the intent.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnkit.inspection._common import (
    channel_axis,
    fixed_by_class,
    frozen_by_bnkit,
    has_running_stats,
    is_synchronized,
    mode_in,
    never_updated,
)
from bnkit.layers.kinds import named_batchnorm_like, unrecognised_running_stats
from bnkit.shared.diagnosis import MIN_BATCH, SEVERITIES, Diagnosis, Finding
from bnkit.shared.errors import first_line
from bnkit.tools.model_edit import affine_params, check_model
from bnkit.tools.model_inputs import call_with_example, eval_run

__all__ = ["RULES", "SEVERITIES", "Diagnosis", "Finding", "doctor"]

#: A PyTorch-convention momentum in this closed range looks like a Keras momentum copied unchanged.
KERAS_LIKE_MOMENTUM = (0.9, 1.0)

_INTENTS = (None, "inference", "training", "fine-tune")


@dataclass
class _Trace:
    """What one forward pass on the example inputs showed, per BN layer name."""

    calls: dict[str, int] = field(default_factory=dict)
    batch: dict[str, int] = field(default_factory=dict)
    values_per_channel: dict[str, int] = field(default_factory=dict)
    ndim: dict[str, int] = field(default_factory=dict)
    producers: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    """What every rule receives.

    Attributes:
        model: The model examined.
        batchnorms: ``(name, module)`` of every BatchNorm layer, in module order.
        intent: ``None``, ``"inference"``, ``"training"`` or ``"fine-tune"``.
        trace: Observations from one forward pass on ``example_inputs`` (None without them).

    Example:
        >>> Context(nn.Identity(), [], None, None).will_train()
        True
    """

    model: nn.Module
    batchnorms: list[tuple[str, nn.Module]]
    intent: str | None
    trace: _Trace | None

    def for_inference(self) -> bool:
        """The model is meant to predict: ``intent="inference"``, or no intent and the model is in eval mode.

        Example:
            >>> Context(nn.Identity().eval(), [], None, None).for_inference()
            True
        """
        if self.intent is not None:
            return self.intent == "inference"
        return not self.model.training

    def will_train(self) -> bool:
        """The model is meant to train: a training intent, or no intent and the model is in train mode.

        Example:
            >>> Context(nn.Identity(), [], "inference", None).will_train()
            False
        """
        if self.intent is not None:
            return self.intent in ("training", "fine-tune")
        return self.model.training


Rule = Callable[[Context], list[Finding]]


def _momentum(module: nn.Module) -> float | None:
    """The layer's momentum in PyTorch's convention (weight of the new batch); Keras layers are converted."""
    keras = getattr(module, "keras_momentum", None)
    if keras is not None:
        return 1.0 - float(keras)
    momentum = getattr(module, "momentum", None)
    return None if momentum is None else float(momentum)


def check_keras_momentum(ctx: Context) -> list[Finding]:
    """BN001: a PyTorch-convention momentum between 0.9 and 1.0, the classic Keras-to-PyTorch porting bug.

    PyTorch's momentum weighs the NEW batch (default 0.1), Keras's the OLD value (default 0.99); copying 0.99
    into a torch layer makes the running statistics follow the last batch almost exactly.

    Example:
        >>> [f.code for f in check_keras_momentum(_ctx(nn.BatchNorm1d(2, momentum=0.99)))]
        ['BN001']
    """
    low, high = KERAS_LIKE_MOMENTUM
    findings = []
    for name, module in ctx.batchnorms:
        if getattr(module, "keras_momentum", None) is not None or not has_running_stats(module):
            continue
        momentum = getattr(module, "momentum", None)
        if momentum is None or not low <= float(momentum) <= high:
            continue
        m = float(momentum)
        findings.append(
            Finding(
                "BN001",
                "error",
                name,
                f"momentum={m:g} in PyTorch's convention (weight of the new batch) keeps only "
                f"{1 - m:.0%} of the old running statistics per step: this looks like Keras's momentum "
                "(weight of the old value) copied unchanged",
                f"set momentum={1 - m:g} (= 1 - {m:g}), or build the layer with "
                f"bnkit.BatchNorm.from_keras(momentum={m:g})",
            )
        )
    return findings


def _mixed(
    layers: list[tuple[str, nn.Module]], code: str, what: str, value_of: Callable[[nn.Module], Any], hint: str
) -> list[Finding]:
    values = [(name, value_of(module)) for name, module in layers]
    keys = [_key(v) for _, v in values]
    counts = Counter(keys)
    if len(counts) < 2:
        return []
    majority = counts.most_common(1)[0][0]
    majority_value = next(v for (_, v), k in zip(values, keys, strict=True) if k == majority)
    findings = []
    for (name, value), key in zip(values, keys, strict=True):
        if key == majority:
            continue
        findings.append(
            Finding(
                code,
                "warning",
                name,
                f"{what}={_fmt(value)} here but {what}={_fmt(majority_value)} in {counts[majority]} of "
                f"{len(values)} BN layers: mixed values suggest a partial port ({hint})",
                f"use the original model's {what} in every layer (set module.{what} = ...)",
            )
        )
    return findings


def _key(value: float | None) -> Any:
    return None if value is None else float(f"{value:.6g}")


def _fmt(value: float | None) -> str:
    return "None" if value is None else f"{value:g}"


def check_mixed_eps(ctx: Context) -> list[Finding]:
    """BN002: eps differs across BN layers, as when some layers were ported from Keras (1e-3) and others not.

    Example:
        >>> model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2), nn.BatchNorm1d(2, eps=1e-3))
        >>> [f.layer for f in check_mixed_eps(_ctx(model))]
        ['2']
    """
    hint = "Keras's default eps is 1e-3, PyTorch's 1e-5"
    return _mixed(ctx.batchnorms, "BN002", "eps", lambda m: float(m.eps), hint)


def check_mixed_momentum(ctx: Context) -> list[Finding]:
    """BN003: momentum (compared in PyTorch's convention) differs across BN layers.

    Example:
        >>> model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2), nn.BatchNorm1d(2, momentum=0.01))
        >>> [f.layer for f in check_mixed_momentum(_ctx(model))]
        ['2']
    """
    layers = [
        (name, module)
        for name, module in ctx.batchnorms
        if has_running_stats(module) and fixed_by_class(module) is None  # fixed statistics have no momentum
    ]
    hint = "Keras's default 0.99 is 0.01 in PyTorch's convention, whose default is 0.1"
    return _mixed(layers, "BN003", "momentum", _momentum, hint)


def check_frozen_params_updating_stats(ctx: Context) -> list[Finding]:
    """BN004: gamma/beta have requires_grad=False but model.train() still updates the running statistics.

    The fine-tuning trap (pytorch#66073): freezing parameters does not freeze BatchNorm; the statistics drift
    to the fine-tuning data while the frozen layers around them expect the old ones.

    Example:
        >>> bn = nn.BatchNorm1d(2).requires_grad_(False)
        >>> [f.code for f in check_frozen_params_updating_stats(_ctx(bn))]
        ['BN004']
    """
    findings = []
    for name, module in ctx.batchnorms:
        params = affine_params(module).values()
        if not params or any(p.requires_grad for p in params):
            continue
        if not mode_in(module, True).updates_running_stats:
            continue
        findings.append(
            Finding(
                "BN004",
                "warning",
                name,
                "gamma/beta have requires_grad=False but model.train() still updates the running statistics "
                "(freezing parameters does not freeze BatchNorm)",
                f"bnkit.freeze(model, layers={name!r}) freezes statistics too and survives model.train(); "
                "if adapting statistics is intended, say so with bnkit.freeze(model, stats=False)",
            )
        )
    return findings


def check_training_mode_for_inference(ctx: Context) -> list[Finding]:
    """BN005: with ``intent="inference"``, a BN that normalises with batch statistics.

    Either the layer is in training mode (forgotten ``model.eval()``: predictions depend on the batch and every
    call changes the running statistics) or it has no running statistics (``track_running_stats=False``).

    Example:
        >>> [f.code for f in check_training_mode_for_inference(_ctx(nn.BatchNorm1d(2), "inference"))]
        ['BN005']
    """
    if ctx.intent != "inference":
        return []
    findings = []
    for name, module in ctx.batchnorms:
        mode = mode_in(module, bool(module.training))
        if mode.normalize != "batch":
            continue
        if not has_running_stats(module):
            findings.append(
                Finding(
                    "BN005",
                    "warning",
                    name,
                    "track_running_stats=False: normalises with batch statistics even in eval(), so each "
                    "prediction depends on the rest of its batch",
                    "keep running statistics (track_running_stats=True) and compute them with "
                    "bnkit.recalibrate(model, data)",
                )
            )
        else:
            findings.append(
                Finding(
                    "BN005",
                    "error",
                    name,
                    "in training mode: normalises with batch statistics and updates the running statistics "
                    "on every call, so predictions depend on the batch",
                    "call model.eval() before inference (or bnkit.freeze(model) to keep it frozen)",
                )
            )
    return findings


def check_small_batch(ctx: Context) -> list[Finding]:
    """BN006: the example batch gives fewer than :data:`MIN_BATCH` samples to a layer using batch statistics.

    Needs ``example_inputs`` (the per-device batch). Quiet for ``intent="inference"`` and for frozen layers.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4))
        >>> [f.code for f in doctor(model, torch.randn(4, 3))]
        ['BN006']
    """
    if ctx.trace is None or ctx.intent == "inference":
        return []
    findings = []
    for name, module in ctx.batchnorms:
        batch = ctx.trace.batch.get(name)
        if batch is None or mode_in(module, True).normalize != "batch":
            continue
        ghost = getattr(module, "virtual_batch_size", None)
        group = min(batch, int(ghost)) if ghost else batch
        if group >= MIN_BATCH:
            continue
        where = f"ghost batches of {group}" if ghost and group < batch else f"a per-device batch of {batch}"
        single = ctx.trace.values_per_channel.get(name, 2) <= group
        findings.append(
            Finding(
                "BN006",
                "error" if group == 1 and single else "warning",
                name,
                f"{where} sample{'s' if group != 1 else ''}: batch statistics from fewer than {MIN_BATCH} "
                "samples are noisy (ResNet-50 top-1 error 23.6% at 32 images per GPU, 27.3% at 4)",
                (f"raise virtual_batch_size to {MIN_BATCH} or more; or " if ghost else "")
                + "convert to GroupNorm (bnkit.convert(model, 'group')), use Batch Renormalization "
                "(bnkit.BatchNorm(..., renorm=bnkit.Renorm())), synchronise across devices "
                "(bnkit.convert(model, 'sync')), or freeze the statistics (bnkit.freeze(model, affine=False))",
            )
        )
    return findings


def check_bias_before_bn(ctx: Context) -> list[Finding]:
    """BN007: a conv or linear layer with a bias feeds a BN that normalises with batch statistics.

    The batch mean removes the bias exactly in training (its gradient is zero) and the running mean absorbs it:
    the bias is redundant.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> [f.code for f in check_bias_before_bn(_ctx(model))]
        ['BN007']
    """
    producers = ctx.trace.producers if ctx.trace is not None else _static_producers(ctx.model)
    modules = dict(ctx.model.named_modules())
    findings = []
    for name, module in ctx.batchnorms:
        producer_name = producers.get(name)
        producer = modules.get(producer_name) if producer_name is not None else None
        if producer is None or getattr(producer, "bias", None) is None:
            continue
        if mode_in(module, True).normalize != "batch" or not _aligned(producer, module, ctx, name):
            continue
        findings.append(
            Finding(
                "BN007",
                "info",
                name,
                f"{type(producer).__name__} {producer_name!r} has a bias and feeds this BatchNorm directly: the "
                "batch mean cancels it in training and the running mean absorbs it",
                f"build {producer_name!r} with bias=False (bnkit.fuse folds the BN away for deployment)",
            )
        )
    return findings


def _aligned(producer: nn.Module, bn: nn.Module, ctx: Context, name: str) -> bool:
    """The producer's output channels lie on the BN's channel axis (so the bias is per BN channel)."""
    ndim = ctx.trace.ndim.get(name) if ctx.trace is not None else None
    if isinstance(producer, nn.modules.conv._ConvNd):
        return channel_axis(bn, ndim or 4) == 1
    if isinstance(producer, nn.Linear):
        ndim = ndim or 2
        return channel_axis(bn, ndim) == ndim - 1
    return False


def _static_producers(model: nn.Module) -> dict[str, str]:
    """BN name -> name of the conv/linear module whose output it takes directly (torch.fx, else Sequential)."""
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # untraceable models are common; fall back to Sequential order
        return _sequential_producers(model)
    producers = {}
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1:
            producers[str(node.target)] = str(source.target)
    return producers


def _sequential_producers(model: nn.Module) -> dict[str, str]:
    producers = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (prev_name, _), (child_name, _) in itertools.pairwise(children):
            prefix = f"{name}." if name else ""
            producers[prefix + child_name] = prefix + prev_name
    return producers


def check_never_updated_stats(ctx: Context) -> list[Finding]:
    """BN008: running statistics still at their initial 0/1 (num_batches_tracked 0) in a model used to predict.

    Typical after loading weights without buffers, or converting a model without copying its statistics.

    Example:
        >>> [f.code for f in check_never_updated_stats(_ctx(nn.BatchNorm1d(2).eval()))]
        ['BN008']
    """
    if not ctx.for_inference():
        return []
    findings = []
    for name, module in ctx.batchnorms:
        if not has_running_stats(module):
            continue
        if not never_updated(module):
            continue
        if fixed_by_class(module) is not None:
            findings.append(
                Finding(
                    "BN008",
                    "error",
                    name,
                    f"{type(module).__name__} holds mean 0 and variance 1 in every channel: its statistics were "
                    "never loaded, yet it always normalises with them",
                    "load the pretrained checkpoint into the model, or compute the statistics with "
                    "bnkit.recalibrate(model, data, include_frozen=True)",
                )
            )
            continue
        findings.append(
            Finding(
                "BN008",
                "error",
                name,
                "running statistics were never updated (mean 0, variance 1, num_batches_tracked 0), yet "
                "inference normalises with them",
                "load the trained checkpoint with its buffers (running_mean, running_var), or compute the "
                "statistics with bnkit.recalibrate(model, data)",
            )
        )
    return findings


def check_running_variance(ctx: Context) -> list[Finding]:
    """BN009: non-finite running mean/variance or negative variance (error); variance below eps (warning).

    Example:
        >>> bn = nn.BatchNorm1d(2); bn.running_var[0] = float("nan")
        >>> [(f.code, f.severity) for f in check_running_variance(_ctx(bn))]
        [('BN009', 'error')]
    """
    findings = []
    for name, module in ctx.batchnorms:
        if not has_running_stats(module):
            continue
        mean, var = module.running_mean.detach().double(), module.running_var.detach().double()
        channels = var.numel()
        bad = int((~torch.isfinite(mean)).sum()) + int((~torch.isfinite(var)).sum())
        negative = int((var < 0).sum())
        if bad or negative:
            counted = ((bad, "non-finite value"), (negative, "negative variance"))
            what = [f"{n} {noun}{'s' if n > 1 else ''}" for n, noun in counted if n]
            findings.append(
                Finding(
                    "BN009",
                    "error",
                    name,
                    f"running statistics hold {' and '.join(what)} (of {channels} channels): every output "
                    "in eval() is wrong for those channels",
                    "reload the statistics from a good checkpoint or recompute them with "
                    "bnkit.recalibrate(model, data); find the step that diverged (bnkit.Monitor)",
                )
            )
            continue
        eps = float(getattr(module, "eps", 0.0))
        tiny = int((var < eps).sum())
        if tiny:
            findings.append(
                Finding(
                    "BN009",
                    "warning",
                    name,
                    f"{tiny} of {channels} channels have running variance below eps={eps:g}: those inputs "
                    "were (nearly) constant, and eval() multiplies their noise by up to 1/sqrt(eps)",
                    "check for dead channels upstream; recalibrate with bnkit.recalibrate(model, data) or raise eps",
                )
            )
    return findings


def check_called_more_than_once(ctx: Context) -> list[Finding]:
    """BN010: one BN module is called several times per forward pass (needs ``example_inputs``).

    Each call updates the running statistics (mixing the call sites' distributions), breaks precise
    recalibration, and with SyncBN all ranks must call it the same number of times or the job hangs.

    Example:
        >>> class Twice(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.bn = nn.BatchNorm1d(2)
        ...     def forward(self, x):
        ...         return self.bn(self.bn(x))
        >>> [f.code for f in doctor(Twice(), torch.randn(8, 2))]
        ['BN010']
    """
    if ctx.trace is None:
        return []
    findings = []
    for name, module in ctx.batchnorms:
        calls = ctx.trace.calls.get(name, 0)
        if calls <= 1:
            continue
        findings.append(
            Finding(
                "BN010",
                "error" if is_synchronized(module) else "warning",
                name,
                f"called {calls} times in one forward pass: the running statistics mix the call sites, "
                "precise recalibration cannot separate them, and SyncBN needs equal call counts on every rank",
                "give each call site its own BatchNorm module (e.g. copy.deepcopy of this one)",
            )
        )
    return findings


def check_eval_not_frozen(ctx: Context) -> list[Finding]:
    """BN011: a BN put in eval() to freeze it in a model that will train; the next model.train() undoes it.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = model[1].eval()
        >>> [f.code for f in check_eval_not_frozen(_ctx(model))]
        ['BN011']
    """
    if not ctx.will_train():
        return []
    findings = []
    for name, module in ctx.batchnorms:
        if module.training or module is ctx.model or not has_running_stats(module):
            continue
        if frozen_by_bnkit(module)[0] or mode_in(module, True).normalize != "batch":
            continue
        findings.append(
            Finding(
                "BN011",
                "warning",
                name,
                "in eval() inside a model that will train: the next model.train() switches it back to batch "
                "statistics and updates (pytorch#66073)",
                f"bnkit.freeze(model, layers={name!r}) keeps it frozen through model.train()",
            )
        )
    return findings


def check_skipped_batches(ctx: Context) -> list[Finding]:
    """BN012: a bnkit layer skipped training batches whose statistics were NaN/Inf (``skipped_batches`` > 0).

    Example:
        >>> from bnkit import BatchNorm
        >>> bn = BatchNorm(2); _ = bn(torch.tensor([[float("nan"), 1.0], [2.0, 3.0]]))
        >>> [f.code for f in check_skipped_batches(_ctx(bn))]
        ['BN012']
    """
    findings = []
    for name, module in ctx.batchnorms:
        skipped = getattr(module, "skipped_batches", None)
        if isinstance(skipped, torch.Tensor) and int(skipped) > 0:
            findings.append(
                Finding(
                    "BN012",
                    "warning",
                    name,
                    f"{int(skipped)} training batch(es) had non-finite statistics (NaN/Inf) and were skipped: the "
                    "running statistics never saw them",
                    "check the inputs and the learning rate; pass on_nonfinite='raise' to stop at the first one",
                )
            )
    return findings


def check_unrecognised(ctx: Context) -> list[Finding]:
    """BN013: a module holds ``running_mean`` and ``running_var`` but bnkit does not recognise its class.

    Such a layer is probably a BatchNorm that every bnkit tool leaves out; teach bnkit its class.

    Example:
        >>> class Odd(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_buffer("running_mean", torch.zeros(2))
        ...         self.register_buffer("running_var", torch.ones(2))
        >>> [(f.code, f.layer) for f in check_unrecognised(_ctx(nn.Sequential(Odd())))]
        [('BN013', '0')]
    """
    return [
        Finding(
            "BN013",
            "warning",
            name,
            f"{type(module).__name__} holds running statistics (running_mean, running_var) but bnkit does not "
            "recognise the class, so no bnkit tool examines or changes it",
            f"teach bnkit the layer: bnkit.register_batchnorm({type(module).__name__}, ...) (see docs/tools.md)",
        )
        for name, module in unrecognised_running_stats(ctx.model)
    ]


#: Every rule, in code order.
RULES: tuple[Rule, ...] = (
    check_keras_momentum,
    check_mixed_eps,
    check_mixed_momentum,
    check_frozen_params_updating_stats,
    check_training_mode_for_inference,
    check_small_batch,
    check_bias_before_bn,
    check_never_updated_stats,
    check_running_variance,
    check_called_more_than_once,
    check_eval_not_frozen,
    check_skipped_batches,
    check_unrecognised,
)


def doctor(model: nn.Module, example_inputs: Any = None, *, intent: str | None = None) -> Diagnosis:
    """Check a model's BatchNorm layers for known mistakes; each finding has a code, severity, layer, message, fix.

    The rules (see the module docstring for the table) cover Keras momentum in a PyTorch layer, eps/momentum
    mixed across layers, frozen gamma/beta with statistics still updating, training mode at inference, small
    per-device batches, a redundant conv/linear bias before BN, never-updated or degenerate running statistics,
    a BN called more than once per forward pass, and a BN frozen with eval() that model.train() will undo.

    Args:
        model: Any module. It is not changed: with ``example_inputs`` it runs once in eval mode without gradients
            and every module's training flag is restored (running statistics cannot move in eval mode).
        example_inputs: Optional per-device example inputs in bnkit's one convention (docs/tools.md, "Example
            inputs"): a tensor or a list is ONE positional argument (a detector's ``[image, ...]``), a tuple
            positional arguments, a dict keyword arguments, a callable ``forward(model)``. Enables the batch-size
            and call-count rules.
        intent: ``"inference"``, ``"training"``, ``"fine-tune"`` or None (the model's ``training`` flag decides).

    Returns:
        A :class:`Diagnosis` (a list of :class:`Finding`), printable as a table, with ``to_dicts``/``to_json``.

    Raises:
        ValueError: Unknown ``intent``, or the model fails on ``example_inputs``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, momentum=0.99)).eval()
        >>> doctor(model, intent="inference").codes()
        ['BN001', 'BN008']
    """
    check_model(model, "doctor")
    if intent not in _INTENTS:
        raise ValueError(f"intent must be one of 'inference', 'training', 'fine-tune' or None, got {intent!r}")
    batchnorms = _batchnorms(model)
    if not batchnorms and not unrecognised_running_stats(model):
        warnings.warn("doctor: the model has no BatchNorm layer; nothing to check", UserWarning, stacklevel=2)
    trace = _trace(model, example_inputs, batchnorms) if example_inputs is not None else None
    ctx = Context(model=model, batchnorms=batchnorms, intent=intent, trace=trace)
    findings = Diagnosis()
    for rule in RULES:
        findings.extend(rule(ctx))
    return findings


def _trace(model: nn.Module, example_inputs: Any, batchnorms: list[tuple[str, nn.Module]]) -> _Trace:
    trace = _Trace()
    names = {id(module): name for name, module in batchnorms}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}

    def producer_hook(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                outputs[id(output)] = (name, output)  # keep the tensor alive so its id stays unique

        return hook

    def bn_hook(module: nn.Module, args: Any) -> None:
        name = names[id(module)]
        trace.calls[name] = trace.calls.get(name, 0) + 1
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            return
        trace.batch[name] = min(trace.batch.get(name, x.shape[0]), int(x.shape[0]))
        axis = channel_axis(module, x.ndim)
        per_channel = math.prod(s for d, s in enumerate(x.shape) if d != axis)
        trace.values_per_channel[name] = per_channel
        trace.ndim[name] = x.ndim
        entry = outputs.get(id(x))
        if entry is not None and entry[1] is x:
            trace.producers[name] = entry[0]

    with eval_run(model) as handles:
        for name, module in model.named_modules():
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                handles.append(module.register_forward_hook(producer_hook(name)))
        for _, module in batchnorms:
            handles.append(module.register_forward_pre_hook(bn_hook))
        try:
            call_with_example(model, example_inputs)
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise ValueError(f"the model failed on example_inputs: {first_line(exc)}") from exc
    return trace


def _ctx(model: nn.Module, intent: str | None = None) -> Context:
    """A context without example run (used by the rule docstring examples)."""
    return Context(model, _batchnorms(model), intent, None)


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, info.module) for name, info in named_batchnorm_like(model)]


def describe_rules() -> list[dict[str, str]]:
    """Code, name and first docstring line of every rule.

    Example:
        >>> describe_rules()[0]["code"]
        'BN001'
    """
    out = []
    for rule in RULES:
        doc = (rule.__doc__ or "").strip().splitlines()[0]
        code, _, text = doc.partition(":")
        out.append({"code": code, "rule": rule.__name__, "description": text.strip()})
    return out
