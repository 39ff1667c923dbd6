"""Fold every foldable inference BatchNorm of a model into its neighbouring convolution or linear layer.

An inference BatchNorm is a per-channel affine map, so it can be folded into the weights of the layer that
produces its input (always exact, whatever the stride, padding, dilation or groups) or, in some cases, of the
layer that consumes its output. :func:`fuse` finds those pairs on the model's ``torch.fx`` graph, so residual
networks and models that are not ``nn.Sequential`` fuse too, decides for each pair whether the fold is exact,
folds it in float64 and replaces the BatchNorm by ``nn.Identity``, or by what the layer applied after
normalising (timm's ``BatchNormAct2d``: its activation, or its drop and activation, kept as they are). The
fused model is a deep copy of the original (same class, same forward code, picklable wherever the original is)
in eval mode.

Layers folded: ``torch.nn`` BatchNorm1d/2d/3d (and subclasses that keep their ``forward``), ``SyncBatchNorm``
(plain BN in eval), ``bnkit.BatchNorm`` (any channel axis, as long as it is the layer's channel axis),
torchvision's ``FrozenBatchNorm2d`` (also timm's), timm's ``BatchNormAct2d``, ``SyncBatchNormAct``,
``FrozenBatchNormAct2d`` and ``SplitBatchNorm2d``. A module that holds running statistics but is none of these
is listed in the report as unrecognised, with a warning; so is a model in which nothing could be folded.

Rules (each refusal is listed in the report with its reason):

- BN AFTER a ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d`` or ``Linear``: folded when the BN is the layer's only
  consumer (a layer whose output also feeds another branch keeps its BN), each is called once, and the BN's
  channel axis is the layer's channel axis (axis 1 of a batched conv output; the last axis of a linear
  output, so ``BatchNorm1d`` only on 2-D linear outputs).
- BN BEFORE such a layer: folded when the layer is the BN's only consumer, the BN applies nothing after
  normalising, and the fold is exact. For ``Conv``: no zero padding (``padding=0``/``"valid"``), or a non-zero
  ``padding_mode`` (reflect/replicate/circular pad with copies of the normalised values, which commutes with
  the per-channel map); with zero padding the border outputs would see padded zeros instead of the BN's shift,
  so such a BN is not folded (unless its shift is exactly zero). For ``ConvTranspose``: unit kernel and stride
  only. For ``Linear``: the BN's channel axis must be the input's last axis.
- A BN is folded only if its inference output uses running statistics (not ``track_running_stats=False``), bnkit
  knows its ``forward`` (a subclass that overrides it is kept, never silently dropped), it has no hooks and it
  is not shared.
- Modules that ``torch.fx`` cannot trace are handled separately: the tracer treats the failing module as opaque,
  traces the rest, and then fuses inside the opaque module on its own (and ``nn.Sequential`` children pairwise
  when even that fails).

With ``check=True`` (default) the fused model is compared with the original in eval mode on
``example_inputs`` (or inputs generated from the first layer's shape) and a ``ValueError`` naming the fold that
broke the output is raised if they differ beyond tolerance, or if the outputs hold no value to compare (a
detector with no detections); the input model is then untouched.

The package: :mod:`~bnkit.tools.fuse.norms` (the layers recognised), :mod:`~bnkit.tools.fuse.trace` (fx graph,
recorded eval run), :mod:`~bnkit.tools.fuse.inputs` (generated inputs), :mod:`~bnkit.tools.fuse.rules` and
:mod:`~bnkit.tools.fuse.plan` (what folds where), :mod:`~bnkit.tools.fuse.apply`, :mod:`~bnkit.tools.fuse.check`
and :mod:`~bnkit.tools.fuse.report`.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from bnkit.layers.keras_guard import refuse_keras
from bnkit.layers.kinds import warn_unrecognised
from bnkit.shared.errors import first_line
from bnkit.tools.fuse.apply import apply_fold, transplant
from bnkit.tools.fuse.check import compare, describe_output, find_culprit
from bnkit.tools.fuse.inputs import generate_inputs
from bnkit.tools.fuse.plan import make_plan
from bnkit.tools.fuse.report import FoldRecord, FuseReport, SkipRecord
from bnkit.tools.fuse.trace import RecordedRun, fresh, run_recording
from bnkit.tools.model_inputs import ExampleInputs, call_with_example

__all__ = ["FoldRecord", "FuseReport", "SkipRecord", "fuse", "fuse_with_report"]

# The report's public home is this package: pickles of fused models (which carry their report) name
# bnkit.tools.fuse.FuseReport, whatever module defines it.
for _cls in (FoldRecord, SkipRecord, FuseReport):
    _cls.__module__ = __name__
del _cls

_INPUTS_HELP = (
    "pass example_inputs the model accepts: a tensor or a list (one argument, e.g. a detector's list of images), "
    "a tuple (positional arguments), a mapping (keyword arguments) or a callable forward(model)"
)


def fuse(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    check: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    inplace: bool = False,
) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable inference BatchNorm folded into its neighbour.

    See the module docstring for the exact rules. Folded BatchNorms become ``nn.Identity`` (or, for a layer that
    applies an activation after normalising, that activation module); the absorbing layers get new
    ``weight``/``bias`` parameters (same dtype, device and ``requires_grad``; a layer without bias gains one).
    The fused model's eval output equals the original's eval output up to rounding; its training behaviour is
    not the original's (the BatchNorms are gone). The report is attached as ``fused.bnkit_fuse_report``
    (:class:`FuseReport`); :func:`fuse_with_report` returns it too.

    Args:
        model: Any ``nn.Module`` with BatchNorm layers (see the module docstring for those recognised) at any
            depth. It is never modified unless ``inplace=True``, and then only after a successful check.
        example_inputs: How to call the model, as every bnkit tool does
            (:func:`bnkit.tools.model_inputs.call_with_example`): a tensor or a list (one positional argument: a
            torchvision detector takes a list of images), a tuple (positional arguments), a mapping (keyword
            arguments) or a callable ``forward(model)``. Used for the check and to learn the rank each layer
            sees. ``None`` generates a batch of 2 random inputs from the first layer's shape
            (``Conv``/``Linear``/``BatchNorm`` first layers).
        check: Compare fused and original (both in eval mode) on the inputs and raise if they differ or if the
            outputs hold no value to compare.
        atol: Absolute tolerance of the check (default 1e-6 for float32, 1e-12 for float64, 1e-3 for 16-bit).
        rtol: Tolerance relative to the largest absolute value of each output tensor (default 1e-4 for
            float32, 1e-9 for float64, 2e-2 for 16-bit).
        inplace: Fold into ``model`` itself (its BatchNorms replaced, its layers given the fused parameters)
            and return it, instead of returning a fused copy.

    Returns:
        The fused model, in eval mode.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or cannot be deep-copied.
        ValueError: the model fails on ``example_inputs``; ``check=True`` without usable inputs; the fused
            output differs from the original beyond tolerance (the message names the fold responsible); or the
            check compared no value (the model's outputs are empty on these inputs).

    Warns:
        UserWarning: nothing was folded, or the model has modules with running statistics that bnkit does not
            recognise as BatchNorm (named in the warning and in ``report.unrecognised``).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> fused = fuse(model, torch.randn(2, 3, 8, 8))
        >>> fused
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
    """
    fused, _ = fuse_with_report(model, example_inputs, check=check, atol=atol, rtol=rtol, inplace=inplace)
    return fused


def fuse_with_report(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    check: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    inplace: bool = False,
) -> tuple[nn.Module, FuseReport]:
    """:func:`fuse`, returning ``(fused_model, report)``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3, affine=False), nn.BatchNorm1d(3))
        >>> fused, report = fuse_with_report(model)
        >>> [f.bn for f in report.folded], report.skipped
        (['1', '2'], [])
    """
    refuse_keras(model, "fuse")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: expected an nn.Module. Received: {type(model).__name__}")
    label = type(model).__name__
    try:
        work = copy.deepcopy(model)
    except Exception as error:  # any failure means the same thing to the user
        raise TypeError(
            f"fuse: cannot deep-copy {label} ({first_line(error, with_type=True)}); fuse needs a copy to work on"
        ) from None
    work.eval()
    report = FuseReport()

    inputs: ExampleInputs = example_inputs
    run: RecordedRun | None = None
    if example_inputs is not None:
        try:
            run = run_recording(work, example_inputs)
        except Exception as error:
            raise ValueError(
                f"fuse: {label} failed on example_inputs in eval mode ({first_line(error, with_type=True)}); "
                + _INPUTS_HELP
            ) from None
    else:
        generated = generate_inputs(work)
        if generated is not None:
            inputs, run = generated.inputs, generated.run
            report.notes.append(
                f"inputs generated from the first layer: a random tensor of shape {tuple(generated.inputs.shape)}"
            )
        elif check:
            raise ValueError(
                f"fuse: cannot generate example inputs for {label} from its first layer; "
                "pass example_inputs=(...) or check=False"
            )

    plan = make_plan(work, run)
    report.folded = [FoldRecord(op.bn, op.layer, op.position, op.note) for op in plan.folds]
    report.skipped = [SkipRecord(name, reason) for name, reason in plan.skipped.items()]
    report.notes.extend(plan.notes)
    for op in plan.folds:
        apply_fold(work, op)
    work.eval()

    if check:
        assert run is not None
        with torch.no_grad():
            output = call_with_example(work, fresh(inputs))
        comparison = compare(run.output, output, atol, rtol)
        report.checked = True
        report.max_abs_diff, report.tolerance = comparison.max_abs_diff, comparison.tolerance
        report.compared = comparison.compared
        if comparison.differs:
            culprit = find_culprit(model, plan.folds, inputs, run.output, atol, rtol)
            where = f" {comparison.where}" if comparison.where else ""
            raise ValueError(
                f"fuse: the fused model differs from {label} by {comparison.max_abs_diff:.3g} "
                f"(tolerance {comparison.tolerance:.3g}){where}{culprit}; the input model is unchanged; "
                "raise atol/rtol or pass check=False if this rounding is acceptable"
            )
        if comparison.compared == 0:
            raise ValueError(
                f"fuse: the check compared nothing: {label} returned {describe_output(run.output)} on the example "
                "inputs (e.g. a detector with no detections); the input model is unchanged; pass example_inputs "
                "for which the model produces output (or check=False to fuse unchecked)"
            )

    # Named on the copy, whose module names are the model's; warned about only once the check has passed.
    report.unrecognised = list(warn_unrecognised(work, "fuse", stacklevel=3))
    _warn_if_nothing_folded(label, report)
    if inplace:
        transplant(model, work, plan.folds)
        model.eval()
        work = model
    work.bnkit_fuse_report = report
    return work, report


def _warn_if_nothing_folded(label: str, report: FuseReport) -> None:
    """No silent no-op: say so when nothing was folded, and why."""
    if report.folded:
        return
    if report.skipped:
        first = report.skipped[0]
        message = (
            f"fuse: none of the {len(report.skipped)} BatchNorm layer(s) of {label} could be folded "
            f"(e.g. {first.bn}: {first.reason}; see report.skipped)"
        )
    else:
        message = f"fuse: {label} has no BatchNorm layer bnkit recognises; nothing was folded"
    warnings.warn(message, UserWarning, stacklevel=3)
