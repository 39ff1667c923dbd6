"""The ``bnkit.doctor`` rules: one function ``(context) -> list[Finding]`` each, with a stable code (the table is in
:mod:`bnkit.inspection.doctor`); :data:`RULES` lists them in code order."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
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
from bnkit.inspection.doctor_context import (
    Context,
    Rule,
    context_of,  # noqa: F401 (the rules' docstring examples use it)
)
from bnkit.layers.kinds import unrecognised_running_stats
from bnkit.shared.diagnosis import MIN_BATCH, Finding
from bnkit.tools.model_edit import affine_params

__all__ = ["KERAS_LIKE_MOMENTUM", "RULES", "describe_rules"]

#: A PyTorch-convention momentum in this closed range looks like a Keras momentum copied unchanged.
KERAS_LIKE_MOMENTUM = (0.9, 1.0)


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
        >>> [f.code for f in check_keras_momentum(context_of(nn.BatchNorm1d(2, momentum=0.99)))]
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
        >>> [f.layer for f in check_mixed_eps(context_of(model))]
        ['2']
    """
    hint = "Keras's default eps is 1e-3, PyTorch's 1e-5"
    return _mixed(ctx.batchnorms, "BN002", "eps", lambda m: float(m.eps), hint)


def check_mixed_momentum(ctx: Context) -> list[Finding]:
    """BN003: momentum (compared in PyTorch's convention) differs across BN layers.

    Example:
        >>> model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2), nn.BatchNorm1d(2, momentum=0.01))
        >>> [f.layer for f in check_mixed_momentum(context_of(model))]
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
        >>> [f.code for f in check_frozen_params_updating_stats(context_of(bn))]
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
        >>> [f.code for f in check_training_mode_for_inference(context_of(nn.BatchNorm1d(2), "inference"))]
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
        >>> [f.code for f in check_small_batch(context_of(model, example_inputs=torch.randn(4, 3)))]
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
        >>> [f.code for f in check_bias_before_bn(context_of(model))]
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
        >>> [f.code for f in check_never_updated_stats(context_of(nn.BatchNorm1d(2).eval()))]
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
        >>> [(f.code, f.severity) for f in check_running_variance(context_of(bn))]
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
        >>> [f.code for f in check_called_more_than_once(context_of(Twice(), example_inputs=torch.randn(8, 2)))]
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
        >>> [f.code for f in check_eval_not_frozen(context_of(model))]
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
        >>> [f.code for f in check_skipped_batches(context_of(bn))]
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
        >>> [(f.code, f.layer) for f in check_unrecognised(context_of(nn.Sequential(Odd())))]
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
