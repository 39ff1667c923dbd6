"""``bnkit.summary``: parameter counts in the Keras and the PyTorch convention side by side.

Why two conventions: Keras counts a BatchNorm's moving mean and variance as (non-trainable) weights, so
``model.count_params()`` of a Keras network is larger than ``sum(p.numel() for p in model.parameters())`` of the
same PyTorch network, and users porting models ask why. The Keras-style columns here give exactly what Keras
prints for the same network; the PyTorch-style columns give what ``parameters()``/``buffers()`` hold.

Keras style:
    * trainable: parameters with ``requires_grad=True``;
    * non-trainable: parameters with ``requires_grad=False`` (frozen layers) plus the floating-point running
      statistics of normalisation layers (``running_mean``, ``running_var`` and, for Batch Renormalization, its
      extra moving statistics). Integer counters such as ``num_batches_tracked`` have no Keras counterpart and
      are not counted; neither are other buffers (they are not Keras weights);
    * total = trainable + non-trainable.

PyTorch style: parameters (all), trainable parameters (``requires_grad=True``), buffers (every element of every
buffer, ``num_batches_tracked`` included). Tensors shared between modules are counted once, where first met.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bnkit.inspection._common import layer_type
from bnkit.inspection._table import text_table
from bnkit.layers.find import is_batch_independent_norm, is_batchnorm
from bnkit.tools._common import check_model, eval_run, first_line, input_device_dtype

__all__ = ["LayerSummary", "Summary", "summary"]


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
        >>> row = summary(nn.Sequential(nn.BatchNorm2d(4))).rows[0]
        >>> row.total, row.trainable, row.non_trainable, row.parameters, row.buffers
        (16, 8, 8, 8, 9)
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
        >>> s = summary(nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)))
        >>> s.total, s.trainable, s.non_trainable, s.parameters, s.buffers
        (18, 14, 4, 14, 5)
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
            >>> summary(nn.Linear(2, 2)).to_dict()["total"]
            6
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        """The summary back from :meth:`to_dict` (e.g. from ``bnkit summary --json``).

        Example:
            >>> s = summary(nn.Linear(2, 2))
            >>> Summary.from_dict(s.to_dict()) == s
            True
        """
        return cls(**{**data, "rows": [LayerSummary(**row) for row in data["rows"]]})

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`.

        Example:
            >>> '"parameters": 6' in summary(nn.Linear(2, 2)).to_json()
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
            >>> summary(nn.Linear(2, 2)).table_rows()[-1][3]
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
            >>> print(summary(nn.Linear(2, 2)).footer())
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


def _is_keras_state(module: nn.Module, buffer: torch.Tensor) -> bool:
    """A buffer Keras would hold as a non-trainable weight: floating statistics of a norm layer."""
    if not buffer.is_floating_point():
        return False
    return is_batchnorm(module) or is_batch_independent_norm(module)


def summary(model: nn.Module, input_size: Sequence[int] | Sequence[Sequence[int]] | None = None) -> Summary:
    """Count parameters per layer and in total, Keras style and PyTorch style side by side.

    Keras style counts a BatchNorm's running mean and variance as non-trainable parameters and moves frozen
    parameters (``requires_grad=False``) to non-trainable, so ``.total`` equals Keras's ``count_params()`` for
    the same network; PyTorch style reports parameters, trainable parameters and buffers. See the module
    docstring for the exact rules.

    Args:
        model: Any module.
        input_size: Optional input shape WITHOUT the batch dimension (e.g. ``(1, 64, 64)``), or a list of shapes
            for a model with several inputs. When given, the model runs once on zeros (batch of 2, eval mode,
            no gradients; every training flag restored afterwards) to record each layer's output shape.

    Returns:
        A :class:`Summary` with ``.total``, ``.trainable``, ``.non_trainable``, ``.parameters``,
        ``.trainable_parameters``, ``.buffers`` and per-layer ``.rows``.

    Raises:
        ValueError: ``input_size`` does not fit the model.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Flatten(),
        ...                       nn.Linear(32 * 64 * 64, 100), nn.Linear(100, 10))
        >>> s = summary(model, input_size=(1, 64, 64))
        >>> s.total, s.trainable, s.non_trainable
        (13108758, 13108694, 64)
    """
    check_model(model, "summary")
    shapes = _output_shapes(model, input_size) if input_size is not None else {}
    result = Summary()
    seen: set[int] = set()
    for name, module in model.named_modules():
        own_params = [p for _, p in module.named_parameters(recurse=False) if id(p) not in seen]
        own_buffers = [b for _, b in module.named_buffers(recurse=False) if id(b) not in seen]
        seen.update(id(t) for t in (*own_params, *own_buffers))
        is_leaf = next(iter(module.children()), None) is None
        if not (own_params or own_buffers or is_leaf):
            continue
        trainable = sum(p.numel() for p in own_params if p.requires_grad)
        frozen = sum(p.numel() for p in own_params if not p.requires_grad)
        state = sum(b.numel() for b in own_buffers if _is_keras_state(module, b))
        row = LayerSummary(
            name=name,
            type=layer_type(module),
            output_shape=shapes.get(name),
            total=trainable + frozen + state,
            trainable=trainable,
            non_trainable=frozen + state,
            parameters=trainable + frozen,
            trainable_parameters=trainable,
            buffers=sum(b.numel() for b in own_buffers),
        )
        result.rows.append(row)
        result.total += row.total
        result.trainable += row.trainable
        result.non_trainable += row.non_trainable
        result.parameters += row.parameters
        result.trainable_parameters += row.trainable_parameters
        result.buffers += row.buffers
    return result


def _output_shapes(model: nn.Module, input_size: Sequence[int] | Sequence[Sequence[int]]) -> dict[str, list[int]]:
    sizes = list(input_size)
    if not sizes:
        raise ValueError("input_size must not be empty: give the input shape without the batch dimension")
    multi = all(isinstance(s, (tuple, list)) for s in sizes)
    shapes_in = [tuple(int(d) for d in s) for s in sizes] if multi else [tuple(int(d) for d in sizes)]
    device, dtype = input_device_dtype(model)
    inputs = [torch.zeros((2, *shape), device=device, dtype=dtype) for shape in shapes_in]
    shapes: dict[str, list[int]] = {}

    def record(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if name not in shapes and isinstance(output, torch.Tensor):
                shapes[name] = [-1, *output.shape[1:]]

        return hook

    with eval_run(model) as handles:
        for name, module in model.named_modules():
            handles.append(module.register_forward_hook(record(name)))
        try:
            model(*inputs)
        except Exception as exc:  # the model decides which errors a wrong shape raises
            described = " and ".join(str(list(s)) for s in shapes_in)
            raise ValueError(
                f"input_size {described} (batch dimension excluded) does not fit the model: {first_line(exc)}"
            ) from exc
    return shapes
