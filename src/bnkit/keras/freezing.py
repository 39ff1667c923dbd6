"""``bnkit.keras.freeze`` / ``unfreeze``: freeze BatchNormalization statistics and/or gamma/beta, in place.

Each selected layer is switched, on the very object the user holds, to the registered subclass
:class:`bnkit.keras.BatchNormalization` (same weights, same name) whose ``freeze_stats`` / ``freeze_affine``
flags survive ``base.trainable = True``, ``compile()`` and ``fit()``: "statistics frozen, gamma/beta learn" is
expressible in a functional model, which stock Keras's single ``trainable`` flag cannot do. ``unfreeze`` clears
the flags; a layer with no flag left becomes a stock ``keras.layers.BatchNormalization`` again, so a saved model
loads without bnkit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnkit.keras import compat
from bnkit.keras.find import select_batchnorms
from bnkit.keras.layer import BatchNormalization
from bnkit.shared.selection import Selector

__all__ = ["KerasFreezeReport", "freeze", "unfreeze"]


@dataclass
class KerasFreezeReport:
    """What :func:`freeze` / :func:`unfreeze` changed.

    Attributes:
        changed: Paths of the layers whose flags changed.
        unchanged: Paths selected but already in the asked state.
        notes: Reminders (compile again, why on this backend; layers with ``trainable=False``).

    Example:
        >>> print(KerasFreezeReport(changed=["bn"]))
        changed: bn
    """

    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"changed: {', '.join(self.changed) or 'none'}"]
        if self.unchanged:
            lines.append(f"unchanged: {', '.join(self.unchanged)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _check_flags(stats: Any, affine: Any, tool: str) -> None:
    if not isinstance(stats, bool) or not isinstance(affine, bool):
        raise TypeError(f"bnkit.keras.{tool}: stats and affine must be True or False; got {stats!r}, {affine!r}")
    if not (stats or affine):
        raise ValueError(f"bnkit.keras.{tool}: stats=False and affine=False selects nothing to do")


def _recompile_note(model: Any, changed: list[str]) -> list[str]:
    if not changed or not compat.is_compiled(model):
        return []
    return [
        "the model was compiled before this change: call model.compile(...) again before fit(); without it "
        + compat.recompile_consequence()
    ]


def freeze(model: Any, stats: bool = True, affine: bool = True, layers: Selector = None) -> KerasFreezeReport:
    """Freeze the statistics (``stats``) and/or gamma/beta (``affine``) of the selected BatchNormalization layers.

    In place: the layers become :class:`bnkit.keras.BatchNormalization` with ``freeze_stats`` / ``freeze_affine``
    set (flags already set stay set). Nothing else changes: no weight value, no other layer, no ``trainable``.

    Args:
        model: A Keras 3 model (or one BatchNormalization layer).
        stats: Normalise with the moving statistics and never update them, in ``fit()`` too.
        affine: Take gamma and beta out of the trainable weights.
        layers: Which layers (None: all; a glob on the path such as ``"base/*"``, a type, a predicate, a list).

    Returns:
        A :class:`KerasFreezeReport`; it reminds you to compile again when the model was compiled.

    Raises:
        TypeError: not a Keras model, or bad flags. ValueError: ``layers`` matched nothing.

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="bn")])
        >>> print(freeze(m, affine=False))
        changed: bn
        >>> type(m.layers[0]).__module__, len(m.trainable_weights)
        ('bnkit.keras.layer', 2)
    """
    _check_flags(stats, affine, "freeze")
    found = select_batchnorms(model, layers, "freeze")
    report = KerasFreezeReport()
    if not found:
        report.notes.append("no BatchNormalization layer found: nothing frozen")
        return report
    for item in found:
        layer = item.layer
        before = (getattr(layer, "freeze_stats", False), getattr(layer, "freeze_affine", False))
        after = (before[0] or stats, before[1] or affine)
        if before == after and isinstance(layer, BatchNormalization):
            report.unchanged.append(item.path)
            continue
        if not isinstance(layer, BatchNormalization):
            layer.__class__ = BatchNormalization
        layer.freeze_stats, layer.freeze_affine = after
        layer._apply_affine_freeze()
        report.changed.append(item.path)
    report.notes += _recompile_note(model, report.changed)
    return report


def unfreeze(model: Any, stats: bool = True, affine: bool = True, layers: Selector = None) -> KerasFreezeReport:
    """Clear ``freeze_stats`` and/or ``freeze_affine``; a layer with no flag left becomes a stock Keras layer.

    ``trainable`` is left as it is: a layer (or an ancestor) with ``trainable=False`` stays in inference mode and
    untrained, and the report says so.

    Args:
        model: A Keras 3 model (or one BatchNormalization layer).
        stats: Let the statistics update again under ``fit()``.
        affine: Let gamma and beta train again.
        layers: Which layers (see :func:`freeze`).

    Returns:
        A :class:`KerasFreezeReport`.

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="bn")])
        >>> _ = freeze(m)
        >>> print(unfreeze(m))
        changed: bn
        >>> type(m.layers[0]) is keras.layers.BatchNormalization
        True
    """
    _check_flags(stats, affine, "unfreeze")
    keras = compat.import_keras()
    found = select_batchnorms(model, layers, "unfreeze")
    report = KerasFreezeReport()
    if not found:
        report.notes.append("no BatchNormalization layer found: nothing unfrozen")
        return report
    for item in found:
        layer = item.layer
        if not isinstance(layer, BatchNormalization):
            report.unchanged.append(item.path)
            continue
        before = (layer.freeze_stats, layer.freeze_affine)
        after = (before[0] and not stats, before[1] and not affine)
        if before == after:
            report.unchanged.append(item.path)
            continue
        layer.freeze_stats, layer.freeze_affine = after
        layer._apply_affine_freeze()
        if after == (False, False):
            layer.__class__ = keras.layers.BatchNormalization
            del layer.freeze_stats, layer.freeze_affine
        report.changed.append(item.path)
        if not all(a.trainable for a in [*item.ancestors, layer]):
            report.notes.append(f"{item.path}: trainable=False (its own or a container's) still freezes it")
    report.notes += _recompile_note(model, report.changed)
    return report
