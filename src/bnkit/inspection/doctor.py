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

import warnings
from typing import Any

from torch import nn

from bnkit.inspection.doctor_context import context_of
from bnkit.inspection.doctor_rules import RULES, describe_rules
from bnkit.layers.kinds import unrecognised_running_stats
from bnkit.shared.diagnosis import SEVERITIES, Diagnosis, Finding
from bnkit.tools.model_edit import check_model

__all__ = ["RULES", "SEVERITIES", "Diagnosis", "Finding", "describe_rules", "doctor"]

_INTENTS = (None, "inference", "training", "fine-tune")


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
    ctx = context_of(model, intent, example_inputs)
    if not ctx.batchnorms and not unrecognised_running_stats(model):
        warnings.warn("doctor: the model has no BatchNorm layer; nothing to check", UserWarning, stacklevel=2)
    findings = Diagnosis()
    for rule in RULES:
        findings.extend(rule(ctx))
    return findings
