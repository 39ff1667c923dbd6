"""What a Keras <-> PyTorch port did and how it verified: one check per layer pair and mode, the first divergence."""

from __future__ import annotations

from dataclasses import dataclass, field

from bnkit.shared.table import text_table

__all__ = ["LayerCheck", "TransferReport"]


@dataclass
class LayerCheck:
    """One layer pair checked in one mode.

    Attributes:
        keras: Keras layer name.
        torch: PyTorch module name(s).
        layers: ``"Conv2D -> Conv2d"``.
        mode: ``"inference"`` or ``"training"`` (one step of batch statistics and running-statistics update).
        error: Relative error (L2 norm of the difference over the L2 norm of Keras's value) of the layer's
            output, or of its running statistics in training.
        status: ``"ok"``; ``"diverged"`` (this layer is where the models part: ``reason`` says why);
            ``"upstream"`` (differs only because an earlier layer did); ``"expected"`` (a known convention
            difference the models were built with, named in ``reason``).
        reason: The explanation found, empty when ok.

    Example:
        >>> LayerCheck("bn1", "bn1", "BatchNormalization -> BatchNorm2d", "inference", 0.0, "ok").line()
        'bn1 -> bn1 (BatchNormalization -> BatchNorm2d), inference: ok (error 0)'
    """

    keras: str
    torch: str
    layers: str
    mode: str
    error: float
    status: str
    reason: str = ""

    def line(self) -> str:
        """One line: the pair, the mode, the status, the error and the reason."""
        text = f"{self.keras} -> {self.torch} ({self.layers}), {self.mode}: {self.status} (error {self.error:.2g})"
        return f"{text}: {self.reason}" if self.reason else text


@dataclass
class TransferReport:
    """The result of :func:`bnkit.transfer_weights` or :func:`bnkit.transfer.verify`.

    Attributes:
        direction: ``"keras -> torch"`` or ``"torch -> keras"`` (``"verify"`` for a check without copying).
        pairs: ``(keras layer, torch module(s))`` in execution order.
        changes: Settings the transfer changed (eps, momentum, ...), one line each.
        checks: Per-layer checks, inference first, then training.
        output_error: Relative error of the model outputs per mode.
        argmax_agreement: Fraction of samples whose argmax agrees (inference), for 2-D outputs.
        notes: Anything else worth knowing (a skipped training check, convention differences).

    Example:
        >>> r = TransferReport("verify")
        >>> r.ok, r.first_divergence is None
        (True, True)
    """

    direction: str
    pairs: list[tuple[str, str]] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    checks: list[LayerCheck] = field(default_factory=list)
    output_error: dict[str, float] = field(default_factory=dict)
    argmax_agreement: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no layer diverged (``expected`` convention differences do not count)."""
        return all(check.status != "diverged" for check in self.checks)

    @property
    def first_divergence(self) -> LayerCheck | None:
        """The first diverging check in execution order (inference before training), or None."""
        for mode in ("inference", "training"):
            for check in self.checks:
                if check.mode == mode and check.status == "diverged":
                    return check
        return None

    @property
    def divergences(self) -> list[LayerCheck]:
        """Every diverging check (a model can have several independent mistakes)."""
        return [check for check in self.checks if check.status == "diverged"]

    def __str__(self) -> str:
        head = f"transfer {self.direction}: {len(self.pairs)} layer pairs, "
        head += "verified" if self.ok else f"{len(self.divergences)} divergence(s)"
        outputs = ", ".join(f"{mode} {err:.2g}" for mode, err in self.output_error.items())
        lines = [head]
        if outputs:
            agree = "" if self.argmax_agreement is None else f"; argmax agreement {self.argmax_agreement:.0%}"
            lines.append(f"output relative error: {outputs}{agree}")
        rows = [[c.keras, c.torch, c.mode, f"{c.error:.2g}", c.status] for c in self.checks]
        if rows:
            lines.append(text_table(["keras", "torch", "mode", "error", "status"], rows))
        first = self.first_divergence
        if first is not None:
            lines.append(f"first divergence: {first.line()}")
        lines += [f"expected: {check.line()}" for check in self.checks if check.status == "expected"]
        lines += [f"changed: {change}" for change in self.changes]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)
