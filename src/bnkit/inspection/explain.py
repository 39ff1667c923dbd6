"""``bnkit.explain``: what every normalisation layer of a model does in ``model.train()`` and ``model.eval()``, and why.

The answer comes from each layer's own mode rule (bnkit.BatchNorm's ``uses_batch_stats`` /
``updates_running_stats``; PyTorch's ``module.training`` rule for torch layers, unless ``bnkit.freeze`` froze
them), never from running the model. Nothing is changed.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bnkit.inspection._common import (
    Mode,
    fixed_by_class,
    frozen_by_bnkit,
    has_running_stats,
    is_synchronized,
    layer_type,
    mode_in,
    never_updated,
    num_channels,
)
from bnkit.layers.find import named_norms
from bnkit.layers.kinds import describe_batchnorm, warn_unrecognised
from bnkit.shared.table import RowList
from bnkit.tools.model_edit import affine_params, check_model, is_bnkit_batchnorm

__all__ = ["Explanation", "LayerExplanation", "explain"]


@dataclass
class LayerExplanation:
    """What one normalisation layer does, in both model modes, with the reasons in words.

    Attributes:
        name: Qualified module name (``""`` when the model itself is the layer).
        type: Class name (``bnkit.BatchNorm`` for bnkit layers).
        channels: Number of channels normalised (None for lazy layers not yet initialised).
        batch_dependent: False for GroupNorm/LayerNorm/InstanceNorm rows (their output ignores the batch).
        now: ``"train"`` or ``"eval"``: the layer's own ``training`` flag at the time of the call.
        train: What it does after ``model.train()``.
        eval: What it does after ``model.eval()``.
        affine: ``"learn"``, ``"frozen"``, ``"weight frozen"``, ``"bias frozen"``, ``"fixed"`` (buffers, as in
            FrozenBatchNorm2d) or ``"none"`` (gamma/beta).
        reasons: Why, in words, one short sentence each.
        kind: The BatchNorm kind (:data:`bnkit.layers.kinds.KINDS`), or None for batch-independent norms.
        after: What the layer applies after normalising, in order (timm's ``drop`` and ``act``), e.g.
            ``["SiLU"]``; empty for plain BatchNorm.

    Example:
        >>> row = explain(nn.Sequential(nn.BatchNorm1d(3)))[0]
        >>> row.train.normalize, row.eval.normalize, row.affine
        ('batch', 'running', 'learn')
    """

    name: str
    type: str
    channels: int | None
    batch_dependent: bool
    now: str
    train: Mode
    eval: Mode
    affine: str
    reasons: list[str] = field(default_factory=list)
    kind: str | None = None
    after: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready).

        Example:
            >>> explain(nn.BatchNorm1d(2))[0].to_dict()["eval"]["normalize"]
            'running'
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerExplanation:
        """The row back from :meth:`to_dict` (e.g. from ``bnkit explain --json``).

        Example:
            >>> row = explain(nn.BatchNorm1d(2))[0]
            >>> LayerExplanation.from_dict(row.to_dict()) == row
            True
        """
        return cls(**{**data, "train": Mode(**data["train"]), "eval": Mode(**data["eval"])})


class Explanation(RowList):
    """A list of :class:`LayerExplanation` that prints as a table and converts to dicts or JSON.

    Example:
        >>> table = explain(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        >>> [row.name for row in table]
        ['1']
        >>> print(explain(nn.Identity()))
        no BatchNorm or other normalisation layer found
    """

    columns = ("layer", "type", "ch", "now", "in train()", "in eval()", "gamma/beta", "why")
    empty = "no BatchNorm or other normalisation layer found"
    #: Modules that hold running statistics but that bnkit does not recognise (left out of the rows).
    unrecognised: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = super().__str__()
        if self.unrecognised:
            text += (
                f"\nnot recognised (running statistics, unknown class; see bnkit.register_batchnorm): "
                f"{', '.join(self.unrecognised)}"
            )
        return text

    def rows(self) -> list[list[Any]]:
        """Table rows matching :attr:`columns` (one reason per line in the last cell).

        Example:
            >>> explain(nn.BatchNorm1d(2)).rows()[0][4]
            'batch stats, updates running'
        """
        return [
            [
                row.name or "(model)",
                row.type,
                row.channels,
                row.now,
                row.train.describe(),
                row.eval.describe(),
                row.affine,
                "\n".join(row.reasons),
            ]
            for row in self
        ]


def explain(model: nn.Module) -> Explanation:
    """Explain, layer by layer, what every BatchNorm (and batch-independent norm) does in train() and eval().

    One row per layer: every BatchNorm kind bnkit recognises (torch ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
    ``bnkit.BatchNorm``, torchvision's and timm's ``FrozenBatchNorm2d``, timm's ``BatchNormAct2d`` with the
    activation it applies, look-alikes and classes taught with :func:`bnkit.register_batchnorm`), and GroupNorm,
    LayerNorm, InstanceNorm rows marked batch-independent. Modules that hold running statistics but that bnkit
    does not recognise are named in a warning and in ``Explanation.unrecognised``.
    For each model mode: whether the layer normalises with
    batch or running statistics and whether it updates the running statistics; whether gamma/beta learn; and the
    reasons in words (``"freeze_stats is set"``, ``"track_running_stats=False"``, ``"requires_grad is False on
    weight but statistics still update in train()"``, a torch layer frozen by ``bnkit.freeze``, a layer put in
    ``eval()`` that the next ``model.train()`` will switch back, ...). The model is not changed or run.

    Args:
        model: Any module; it may itself be a normalisation layer.

    Returns:
        An :class:`Explanation`: a list of :class:`LayerExplanation`, printable as a table, with
        ``to_dicts()`` and ``to_json()``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        >>> _ = model[1].weight.requires_grad_(False)
        >>> print(explain(model)[0].reasons[-1])
        requires_grad is False on weight but statistics still update in train(); bnkit.freeze(model) freezes both
    """
    check_model(model, "explain")
    result = Explanation(_explain_layer(name, module) for name, module in named_norms(model))
    result.unrecognised = warn_unrecognised(model, "explain")
    if not result and not result.unrecognised:
        warnings.warn("explain: the model has no BatchNorm or other normalisation layer", UserWarning, stacklevel=2)
    return result


def _explain_layer(name: str, module: nn.Module) -> LayerExplanation:
    train, evaluation = mode_in(module, True), mode_in(module, False)
    batch_dependent = train.normalize != "per-sample"
    row = LayerExplanation(
        name=name,
        type=layer_type(module),
        channels=num_channels(module),
        batch_dependent=batch_dependent,
        now="train" if module.training else "eval",
        train=train,
        eval=evaluation,
        affine=_affine_state(module),
        reasons=[],
    )
    info = describe_batchnorm(module)
    if info is not None:
        row.kind = info.kind
        row.after = [type(m).__name__ for m in info.after]
    if not batch_dependent:
        row.reasons = _independent_reasons(module)
    elif info is not None and info.fixed:
        row.reasons = _fixed_reasons(module, row)
    else:
        row.reasons = _reasons(module, row)
        if row.after:
            row.reasons.append(f"then {' -> '.join(row.after)} in the same module ({type(module).__name__})")
    return row


def _fixed_reasons(module: nn.Module, row: LayerExplanation) -> list[str]:
    """Why a layer whose class fixes its statistics (FrozenBatchNorm2d, ...) never changes."""
    name = type(module).__name__
    what = "statistics and gamma/beta are buffers" if row.affine == "fixed" else "statistics are fixed"
    reasons = [
        f"{name}: {what}, running statistics in train() and eval(), never updated; "
        "bnkit.recalibrate(model, data, include_frozen=True) recomputes them (AdaBN)"
    ]
    if never_updated(module):
        reasons.append("running statistics never loaded (still mean 0, variance 1)")
    if row.after:
        reasons.append(f"then {' -> '.join(row.after)} in the same module")
    return reasons


def _frozen_affine(module: nn.Module) -> tuple[int, list[str]]:
    """(number of gamma/beta parameters, names of those with requires_grad False)."""
    params = affine_params(module)
    return len(params), [key for key, value in params.items() if not value.requires_grad]


def _affine_state(module: nn.Module) -> str:
    info = fixed_by_class(module)
    if info is not None and info.affine_is_buffer:
        return "fixed"
    count, frozen = _frozen_affine(module)
    if not count:
        return "none"
    if not frozen:
        return "learn"
    if len(frozen) == count:
        return "frozen"
    return f"{frozen[0]} frozen"


def _independent_reasons(module: nn.Module) -> list[str]:
    reasons = ["batch-independent: each sample is normalised with its own statistics in train() and eval()"]
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and has_running_stats(module):
        reasons = [
            "InstanceNorm with track_running_stats=True: per-sample statistics in train(), running statistics in eval()"
        ]
    return reasons


def _reasons(module: nn.Module, row: LayerExplanation) -> list[str]:
    reasons: list[str] = []
    stats_frozen, affine_frozen = frozen_by_bnkit(module)
    bnkit_layer = is_bnkit_batchnorm(module)
    tracked = has_running_stats(module)

    if not tracked and row.eval.normalize == "running":
        reasons.append(
            "track_running_stats=False but the running buffers exist: batch statistics in train() without "
            "updating them, and PyTorch still normalises with them in eval()"
        )
    elif not tracked:
        reasons.append("track_running_stats=False: batch statistics in train() and eval(), none stored")
    elif stats_frozen:
        if bnkit_layer:
            reasons.append("freeze_stats is set: running statistics in train() and eval(), never updated")
        else:
            reasons.append(
                "statistics frozen by bnkit.freeze: running statistics even after model.train(), never updated"
            )
    elif row.train.normalize == "running":
        # bnkit layers may have other reasons (their own rule); say what the rule gave
        reasons.append("the layer's mode rule keeps running statistics in train()")
    else:
        reasons.append("default rule: module.training picks batch (train) or running (eval) statistics")
        if not module.training:
            reasons.append(
                "now in eval() but not frozen: a parent's model.train() switches it back to batch statistics"
            )

    if is_synchronized(module):
        reasons.append("synchronised: batch statistics merged across processes in train()")
    ghost = getattr(module, "virtual_batch_size", None)
    if ghost:
        reasons.append(f"ghost batches of {ghost} samples in train()")
    if getattr(module, "renorm", None) is not None:
        reasons.append("Batch Renormalization in train()")

    if tracked and row.train.updates_running_stats:
        keras = getattr(module, "keras_momentum", None)
        momentum = getattr(module, "momentum", None)
        if keras is not None:
            reasons.append(
                f"Keras momentum {float(keras):g} (weight of the old value; {1 - float(keras):g} "
                "in PyTorch's convention)"
            )
        elif momentum is None:
            reasons.append("momentum=None: running statistics are a cumulative average")
        elif float(momentum) == 0.0:
            reasons.append("momentum=0: updates never move the running statistics")

    if tracked and never_updated(module):
        reasons.append("running statistics never updated (still mean 0, variance 1)")
    skipped = getattr(module, "skipped_batches", None)
    if isinstance(skipped, torch.Tensor) and int(skipped) > 0:
        reasons.append(f"{int(skipped)} batch(es) with non-finite statistics skipped (skipped_batches)")

    count, frozen = _frozen_affine(module)
    if not count:
        reasons.append("affine=False: no gamma/beta")
    elif affine_frozen and len(frozen) == count:
        reasons.append(
            "freeze_affine is set: gamma/beta do not learn" if bnkit_layer else "gamma/beta frozen by bnkit.freeze"
        )
    elif frozen:
        which = " and ".join(frozen)
        if row.train.updates_running_stats:
            reasons.append(
                f"requires_grad is False on {which} but statistics still update in train(); "
                "bnkit.freeze(model) freezes both"
            )
        else:
            reasons.append(f"requires_grad is False on {which}")
    return reasons
