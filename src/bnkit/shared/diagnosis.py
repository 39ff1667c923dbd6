"""Findings of bnkit.doctor and bnkit.keras.doctor: one record shape, one table (framework-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bnkit.shared.table import RowList

__all__ = ["MIN_BATCH", "SEVERITIES", "Diagnosis", "Finding"]

#: Severities, most serious first.
SEVERITIES = ("error", "warning", "info")

#: Smallest per-device batch that gives usable BN statistics (GroupNorm paper: ResNet-50 top-1 error 23.6% at 32
#: images per GPU, 24.8% at 8, 27.3% at 4, 34.7% at 2).
MIN_BATCH = 8


@dataclass(frozen=True)
class Finding:
    """One problem found by :func:`doctor`.

    Attributes:
        code: Stable rule code (``"BN001"`` for ``bnkit.doctor``, ``"KBN001"`` for ``bnkit.keras.doctor``).
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        layer: Qualified name of the layer concerned (``""`` for the model itself).
        message: What is wrong, with the values found.
        fix: A concrete fix.

    Example:
        >>> f = Finding("BN001", "error", "0", "momentum 0.99 looks like Keras's", "use 0.01")
        >>> f.code, f.severity, f.layer
        ('BN001', 'error', '0')
    """

    code: str
    severity: str
    layer: str
    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        """Plain data (JSON-ready).

        Example:
            >>> Finding("BN001", "error", "bn", "m", "f").to_dict()["code"]
            'BN001'
        """
        return asdict(self)


class Diagnosis(RowList):
    """A list of :class:`Finding` that prints as a table and converts to dicts or JSON.

    Example:
        >>> len(Diagnosis()), str(Diagnosis())
        (0, 'no problems found')
        >>> Diagnosis([Finding("BN001", "error", "", "m", "f")]).to_dicts()[0]["severity"]
        'error'
    """

    columns = ("code", "severity", "layer", "problem", "fix")
    empty = "no problems found"

    def codes(self) -> list[str]:
        """The codes found, in order, each once.

        Example:
            >>> Diagnosis([Finding("BN001", "error", "", "m", "f")] * 2).codes()
            ['BN001']
        """
        return list(dict.fromkeys(f.code for f in self))

    def worst(self) -> str | None:
        """The most serious severity found, or None when there is no finding.

        Example:
            >>> Diagnosis([Finding("A", "info", "", "m", "f"), Finding("B", "error", "", "m", "f")]).worst()
            'error'
        """
        for severity in SEVERITIES:
            if any(f.severity == severity for f in self):
                return severity
        return None

    def rows(self) -> list[list[str]]:
        """Table rows matching :attr:`columns`.

        Example:
            >>> Diagnosis([Finding("BN001", "error", "", "m", "f")]).rows()[0][:3]
            ['BN001', 'error', '(model)']
        """
        return [[f.code, f.severity, f.layer or "(model)", f.message, f.fix] for f in self]
