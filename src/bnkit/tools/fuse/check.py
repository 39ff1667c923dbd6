"""Comparing the fused model with the original: every output value, to a tolerance relative to its scale."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bnkit.tools.fuse.apply import apply_fold
from bnkit.tools.fuse.plan import Fold
from bnkit.tools.fuse.trace import fresh
from bnkit.tools.model_inputs import ExampleInputs, call_with_example

__all__ = ["Comparison", "compare", "default_tolerances", "describe_output", "find_culprit"]


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing two output trees.

    Attributes:
        differs: Whether they differ beyond tolerance (or in structure, shape, dtype, integer or non-finite values).
        max_abs_diff: The largest absolute difference of the tensor closest to its tolerance (inf for a
            structural difference).
        tolerance: The tolerance that difference was compared with.
        where: Which output differs, for messages ("" for a single output).
        compared: How many values were compared (tensor elements); 0 means the check proved nothing.

    Example:
        >>> result = compare(torch.ones(3), torch.ones(3) * (1 + 2**-20), None, None)
        >>> result.differs, result.max_abs_diff, result.compared
        (False, 9.5367431640625e-07, 3)
    """

    differs: bool
    max_abs_diff: float
    tolerance: float
    where: str
    compared: int


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` of the check for outputs of ``dtype``.

    Example:
        >>> default_tolerances(torch.float64)
        (1e-12, 1e-09)
    """
    if dtype == torch.float64:
        return 1e-12, 1e-9
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-3, 2e-2
    return 1e-6, 1e-4


def compare(reference: Any, output: Any, atol: float | None, rtol: float | None) -> Comparison:
    """Compare every tensor of two output trees (same structure, shapes, dtypes; floating values to
    ``atol + rtol * max|reference tensor|``, integers and non-finite values exactly).

    Example:
        >>> compare({"a": torch.zeros(2)}, {"a": torch.ones(2)}, None, None).differs
        True
    """
    from torch.utils._pytree import tree_flatten

    ref_leaves, ref_spec = tree_flatten(reference)
    out_leaves, out_spec = tree_flatten(output)

    def structural(why: str, compared: int) -> Comparison:
        return Comparison(True, math.inf, 0.0, f"({why})", compared)

    if ref_spec != out_spec:
        return structural("the output structure changed", 0)
    worst = Comparison(False, 0.0, 0.0, "", 0)
    worst_ratio = -1.0
    compared = 0
    for index, (ref, out) in enumerate(zip(ref_leaves, out_leaves, strict=True)):
        where = f" at output leaf {index}" if len(ref_leaves) > 1 else ""
        if not isinstance(ref, Tensor):
            if not isinstance(out, Tensor) and ref == out:
                continue
            return structural(f"a non-tensor output changed{where}", compared)
        if not isinstance(out, Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
            return structural(f"an output's shape or dtype changed{where}", compared)
        compared += ref.numel()
        if not ref.is_floating_point() and not ref.is_complex():
            if not torch.equal(ref, out):
                return structural(f"an integer output changed{where}", compared)
            continue
        default_atol, default_rtol = default_tolerances(ref.dtype)
        a = default_atol if atol is None else atol
        r = default_rtol if rtol is None else rtol
        ref64, out64 = ref.detach().double(), out.detach().double()
        finite = torch.isfinite(ref64)
        same = (ref64 == out64) | (ref64.isnan() & out64.isnan())
        if bool((~finite & ~same).any()) or bool((finite & ~torch.isfinite(out64)).any()):
            return structural(f"non-finite values changed{where}", compared)
        diff = float((ref64 - out64).abs()[finite].max()) if bool(finite.any()) else 0.0
        scale = float(ref64.abs()[finite].max()) if bool(finite.any()) else 0.0
        tolerance = a + r * scale
        ratio = diff / tolerance if tolerance > 0 else (math.inf if diff > 0 else 0.0)
        if ratio > worst_ratio:
            worst_ratio = ratio
            worst = Comparison(diff > tolerance, diff, tolerance, where.strip(), 0)
        if diff > tolerance:
            break
    return Comparison(worst.differs, worst.max_abs_diff, worst.tolerance, worst.where, compared)


def describe_output(output: Any) -> str:
    """A short description of an output tree's tensors, for the message of a check that compared nothing.

    Example:
        >>> describe_output([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
        '2 tensors, all empty (shapes (0, 4), (0,))'
    """
    from torch.utils._pytree import tree_flatten

    tensors = [leaf for leaf in tree_flatten(output)[0] if isinstance(leaf, Tensor)]
    if not tensors:
        return f"no tensor (a {type(output).__name__})"
    shapes = ", ".join(str(tuple(t.shape)) for t in tensors[:4]) + (", ..." if len(tensors) > 4 else "")
    return f"{len(tensors)} tensor{'s' if len(tensors) > 1 else ''}, all empty (shapes {shapes})"


def find_culprit(
    model: nn.Module,
    plan: list[Fold],
    example_inputs: ExampleInputs,
    reference: Any,
    atol: float | None,
    rtol: float | None,
) -> str:
    """Replay the folds one by one on a fresh copy of ``model`` and name the first that breaks the output
    (best effort: "" when the replay itself fails).

    Example:
        >>> find_culprit(nn.Identity(), [], torch.ones(1), torch.ones(1), None, None)
        ''
    """
    try:
        trial = copy.deepcopy(model).eval()
        for op in plan:
            apply_fold(trial, op)
            with torch.no_grad():
                if compare(reference, call_with_example(trial, fresh(example_inputs)), atol, rtol).differs:
                    return f", first after folding {op.bn} into {op.layer} ({op.position})"
    except Exception:  # the diagnosis is best effort; the main error is raised anyway
        return ""
    return ""
