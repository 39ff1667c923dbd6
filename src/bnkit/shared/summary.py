"""Parameter-count results in the Keras and the PyTorch convention side by side (framework-free).

Filled by ``bnkit.summary`` for torch modules and by ``bnkit.keras.summary`` for Keras models; both give the same
JSON shape (:meth:`Summary.to_dict`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from bnkit.shared.table import text_table

__all__ = ["LayerSummary", "Summary"]


@dataclass
class LayerSummary:
    """Counts for one module (its own tensors, not its children's).

    Attributes:
        name: Qualified module name.
        type: Class name.
        output_shape: Output shape with the batch dimension as -1 (only with ``input_size``), else None.
        total: Keras-style total (trainable + non-trainable).
        trainable: Keras-style trainable count.
        non_trainable: Keras-style non-trainable count (frozen parameters and norm running statistics).
        parameters: PyTorch-style number of parameter elements.
        trainable_parameters: Parameter elements with ``requires_grad=True``.
        buffers: Buffer elements (``num_batches_tracked`` included).

    Example:
        >>> row = LayerSummary("bn", "BatchNorm2d", None, 16, 8, 8, 8, 8, 9)
        >>> row.total - row.non_trainable == row.parameters
        True
    """

    name: str
    type: str
    output_shape: list[int] | None
    total: int
    trainable: int
    non_trainable: int
    parameters: int
    trainable_parameters: int
    buffers: int


@dataclass
class Summary:
    """Per-layer rows and totals in both conventions; prints as a table.

    Attributes:
        rows: One :class:`LayerSummary` per module that owns tensors (and per leaf module).
        total: Keras-style total, what ``keras.Model.count_params()`` gives for the same network.
        trainable: Keras-style trainable count.
        non_trainable: Keras-style non-trainable count.
        parameters: PyTorch-style parameter count (``sum(p.numel() for p in model.parameters())``).
        trainable_parameters: Parameters with ``requires_grad=True``.
        buffers: Buffer elements (``sum(b.numel() for b in model.buffers())``).

    Example:
        >>> s = Summary([], total=18, trainable=14, non_trainable=4, parameters=14, trainable_parameters=14, buffers=5)
        >>> s.total == s.trainable + s.non_trainable
        True
    """

    rows: list[LayerSummary] = field(default_factory=list)
    total: int = 0
    trainable: int = 0
    non_trainable: int = 0
    parameters: int = 0
    trainable_parameters: int = 0
    buffers: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready).

        Example:
            >>> Summary([], total=6).to_dict()["total"]
            6
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        """The summary back from :meth:`to_dict` (e.g. from ``bnkit summary --json``).

        Example:
            >>> s = Summary([LayerSummary("fc", "Linear", None, 6, 6, 0, 6, 6, 0)], total=6)
            >>> Summary.from_dict(s.to_dict()) == s
            True
        """
        return cls(**{**data, "rows": [LayerSummary(**row) for row in data["rows"]]})

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`.

        Example:
            >>> '"parameters": 6' in Summary([], parameters=6).to_json()
            True
        """
        return json.dumps(self.to_dict(), indent=indent)

    columns = (
        "layer",
        "type",
        "output shape",
        "keras total",
        "trainable",
        "non-trainable",
        "parameters",
        "trainable params",
        "buffers",
    )

    def table_rows(self) -> list[list[Any]]:
        """Rows matching :attr:`columns`, the totals last.

        Example:
            >>> Summary([], total=6).table_rows()[-1][3]
            6
        """
        rows: list[list[Any]] = [
            [
                row.name or "(model)",
                row.type,
                "" if row.output_shape is None else str(row.output_shape),
                row.total,
                row.trainable,
                row.non_trainable,
                row.parameters,
                row.trainable_parameters,
                row.buffers,
            ]
            for row in self.rows
        ]
        rows.append(
            [
                "total",
                "",
                "",
                self.total,
                self.trainable,
                self.non_trainable,
                self.parameters,
                self.trainable_parameters,
                self.buffers,
            ]
        )
        return rows

    def footer(self) -> str:
        """The totals in both conventions, one line each.

        Example:
            >>> print(Summary([], 6, 6, 0, 6, 6, 0).footer())
            Keras style:   total 6  trainable 6  non-trainable 0
            PyTorch style: parameters 6  trainable 6  buffers 0
        """
        return (
            f"Keras style:   total {self.total:,}  trainable {self.trainable:,}  "
            f"non-trainable {self.non_trainable:,}\n"
            f"PyTorch style: parameters {self.parameters:,}  trainable {self.trainable_parameters:,}  "
            f"buffers {self.buffers:,}"
        )

    def __str__(self) -> str:
        return f"{text_table(self.columns, self.table_rows())}\n\n{self.footer()}"
