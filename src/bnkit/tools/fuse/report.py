"""What :func:`bnkit.fuse` did: the folds, the BatchNorms it kept and why, the modules it did not recognise, the
check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["FoldRecord", "FuseReport", "SkipRecord"]


@dataclass(frozen=True)
class FoldRecord:
    """One BatchNorm folded into a layer.

    Attributes:
        bn: Qualified name of the BatchNorm. In the fused model it is an ``nn.Identity``, or what the layer applied
            after normalising (the activation of a timm ``BatchNormAct2d``, its drop + activation), kept as is.
        into: Qualified name of the layer that absorbed it.
        position: ``"after"`` when the BN followed the layer (output side), ``"before"`` when it preceded it.
        note: Anything the user should know, e.g. that the input rank could not be verified or what was kept.

    Example:
        >>> FoldRecord("bn1", "conv1", "after")
        FoldRecord(bn='bn1', into='conv1', position='after', note='')
    """

    bn: str
    into: str
    position: Literal["after", "before"]
    note: str = ""


@dataclass(frozen=True)
class SkipRecord:
    """One BatchNorm left in place, and why.

    Example:
        >>> SkipRecord("bn0", "track_running_stats=False: normalises with batch statistics in eval").bn
        'bn0'
    """

    bn: str
    reason: str


@dataclass
class FuseReport:
    """What :func:`fuse` folded, what it skipped and why, what it did not recognise, and how the check went.

    Attributes:
        folded: The folds, in the order they were applied.
        skipped: Every BatchNorm of the model that was not folded, with its reason.
        unrecognised: Qualified names of modules that hold running statistics (``running_mean`` /
            ``running_var``) but that bnkit does not recognise as a BatchNorm, so nothing was folded there.
        notes: Model-level remarks (modules that could not be traced, inputs that were generated, ...).
        checked: Whether fused and original outputs were compared.
        max_abs_diff: Largest absolute output difference seen by the check (None when unchecked).
        tolerance: The tolerance the largest difference was compared with (None when unchecked).
        compared: How many output values the check compared (None when unchecked; never 0 after a check).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bnkit.tools.fuse import fuse_with_report
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> fused, report = fuse_with_report(model)
        >>> [(f.bn, f.into, f.position) for f in report.folded], report.compared
        ([('1', '0', 'after')], 7200)
    """

    folded: list[FoldRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: bool = False
    max_abs_diff: float | None = None
    tolerance: float | None = None
    compared: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable data.

        Example:
            >>> sorted(FuseReport().to_dict())
            ['checked', 'compared', 'folded', 'max_abs_diff', 'notes', 'skipped', 'tolerance', 'unrecognised']
        """
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm layer(s), skipped {len(self.skipped)}"]
        lines += [
            f"  folded  {f.bn} -> {f.into} ({f.position}){' [' + f.note + ']' if f.note else ''}" for f in self.folded
        ]
        lines += [f"  skipped {s.bn}: {s.reason}" for s in self.skipped]
        if self.unrecognised:
            lines.append(
                f"  unrecognised: {len(self.unrecognised)} module(s) with running statistics that bnkit does not "
                f"recognise as BatchNorm, not folded: {', '.join(self.unrecognised)}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        if self.checked:
            lines.append(
                f"  check: max |fused - original| = {self.max_abs_diff:.3g} <= {self.tolerance:.3g} "
                f"over {self.compared} output values"
            )
        return "\n".join(lines)
