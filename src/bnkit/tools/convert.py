"""Convert every BatchNorm-like layer of a model between torch.nn, bnkit, synchronised, frozen and GroupNorm forms.

Each conversion keeps what the target can hold: device, dtype, ``requires_grad`` of gamma/beta, the training
flag, momentum (PyTorch convention: weight of the NEW batch), eps, running statistics and
``num_batches_tracked``, and bnkit's freeze state (a frozen layer stays frozen: see :mod:`bnkit.tools.freeze`).
Conversions are type-preserving: torch -> bnkit -> torch gives back the same classes without running the model.
Nothing is dropped or passed over silently: a layer the target cannot hold (timm's ``BatchNormAct2d`` under
``"bnkit"``, a subclass with behaviour of its own) is left as it is, listed in the :class:`ConvertReport` and
named in a warning, as are modules that hold running statistics but that bnkit does not recognise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from torch import nn

from bnkit.layers.find import LayerSelector
from bnkit.layers.kinds import describe_batchnorm, unrecognised_running_stats, warn_unrecognised
from bnkit.shared.errors import first_line
from bnkit.shared.selection import check_selector, matches
from bnkit.tools._convert_layers import (
    TORCH_CLASSES,
    Leave,
    layer_kind,
    to_bnkit,
    to_frozen,
    to_group,
    to_torch,
    to_torch_sync,
    to_trainable,
)
from bnkit.tools._layer_dims import infer_dims, recorded_ranks
from bnkit.tools.bnact_rewrite import rewrite_bnact
from bnkit.tools.freeze import has_foreign_hooks
from bnkit.tools.model_edit import check_model, copy_unless_inplace, replace_modules

__all__ = ["TARGETS", "ConvertReport", "convert", "convert_with_report", "default_groups"]

#: Accepted values of ``to``.
TARGETS = ("bnkit", "sync", "bnkit-sync", "torch", "torch-sync", "group", "frozen", "trainable", "bnact")

_RANK_TO_DIM = {2: 1, 3: 1, 4: 2, 5: 3}
_NO_INFO = SimpleNamespace(spatial_dims=None)
# the targets that need to know whether a layer of unknown class is a 1d, 2d or 3d one
_NEEDS_DIM = {
    "torch": ("torch-sync", "bnkit", "bnact"),
    "frozen": ("torch-sync", "bnkit", "bnact", "sync-act"),
    "trainable": ("frozen",),
}


def default_groups(num_channels: int) -> int:
    """The number of GroupNorm groups ``convert(model, "group")`` uses: the largest divisor of C that is <= 32.

    32 groups is Wu & He's recommended setting; layers with fewer or awkward channel counts get the largest
    group count that divides them (a prime C > 32 gets 1 group, i.e. LayerNorm over channels and space).

    Example:
        >>> default_groups(64), default_groups(48), default_groups(20), default_groups(37)
        (32, 24, 20, 1)
    """
    return max(g for g in range(1, min(32, num_channels) + 1) if num_channels % g == 0)


@dataclass(frozen=True)
class ConvertReport:
    """What :func:`convert` did, layer by layer (qualified names; ``"<model>"`` is the model itself).

    Attributes:
        to: the target.
        converted: layers replaced, as ``name -> "OldClass -> NewClass"``.
        unchanged: selected layers already in the target form.
        kept: layers left as they are on purpose, with the reason (no warning: nothing the target promises is
            lost, e.g. a frozen layer under ``"bnkit"``).
        skipped: layers the target cannot hold, left as they are, with the reason (a warning names them).
        unrecognised: modules anywhere in the model that hold running statistics (``running_mean`` /
            ``running_var`` buffers) but that bnkit does not recognise as a BatchNorm; they were not touched.
        notes: what else the user should know about the result (``"bnact"``: that it is a ``torch.fx``
            GraphModule, when the graph had to be rewritten).

    ``len(report)`` and iteration go over ``converted``.

    Example:
        >>> import torch
        >>> _, report = convert_with_report(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), "bnkit")
        >>> print(report)
        converted: 0 (BatchNorm2d -> BatchNorm)
    """

    to: str
    converted: dict[str, str] = field(default_factory=dict)
    unchanged: tuple[str, ...] = ()
    kept: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unrecognised: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __iter__(self) -> Any:
        return iter(self.converted)

    def __len__(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        done = ", ".join(f"{name} ({change})" for name, change in self.converted.items())
        lines = [f"converted: {done or 'none'}"]
        if self.unchanged:
            lines.append(f"already {self.to}: {', '.join(self.unchanged)}")
        lines.extend(f"kept {name}: {reason}" for name, reason in self.kept.items())
        lines.extend(f"skipped {name}: {reason}" for name, reason in self.skipped.items())
        if self.unrecognised:
            lines.append(f"not recognised (hold running statistics): {', '.join(self.unrecognised)}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable data (``"notes"`` only when there are some).

        Example:
            >>> ConvertReport("torch", unchanged=("0",)).to_dict()["unchanged"]
            ['0']
        """
        return {
            "to": self.to,
            "converted": dict(self.converted),
            "unchanged": list(self.unchanged),
            "kept": dict(self.kept),
            "skipped": dict(self.skipped),
            "unrecognised": list(self.unrecognised),
            **({"notes": list(self.notes)} if self.notes else {}),
        }


def _find(model: nn.Module, layers: LayerSelector) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, kind)`` of every BatchNorm-like layer chosen by ``layers`` (each module once)."""
    check_selector(layers, "convert")
    found: list[tuple[str, nn.Module, str]] = []
    everything: list[str] = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            continue
        everything.append(name or "<model>")
        if matches(layers, name, module):
            found.append((name, module, kind))
    if layers is not None and not found:
        shown = ", ".join(everything[:8]) + (", ..." if len(everything) > 8 else "")
        raise ValueError(f"convert: layers={layers!r} matched no BatchNorm layer; the model has: {shown or 'none'}")
    return found


def _unrecognised(model: nn.Module) -> tuple[str, ...]:
    return tuple(name or "<model>" for name, _ in unrecognised_running_stats(model))


def _check_lazy(name: str, module: nn.Module) -> None:
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
            raise ValueError(
                f"convert: layer {name or '<model>'!r} is a lazy BatchNorm that has not seen an input yet; run one "
                "forward pass first so its size is known"
            )


def _check_dim(dim: Any, key: str = "") -> None:
    if dim is not None and (isinstance(dim, bool) or dim not in TORCH_CLASSES):
        where = f"dim[{key!r}]" if key else "dim"
        raise ValueError(f"convert: {where} must be 1, 2, 3 or a dict of layer name to dim; got {dim!r}")


def _dims(
    model: nn.Module,
    found: list[tuple[str, nn.Module, str]],
    dim: int | Mapping[str, int] | None,
    example_inputs: Any,
    kinds: tuple[str, ...],
) -> dict[int, int]:
    """``id(module) -> 1|2|3``: ``dim``, the rank seen in a forward of ``example_inputs``, the rank a bnkit layer
    last saw, the class a layer was converted from, then the layers around it in the model."""
    if not isinstance(dim, Mapping):
        _check_dim(dim)
    ranks: dict[int, int] = {}
    if example_inputs is not None:
        try:
            ranks = recorded_ranks(model, [m for _, m, _ in found], example_inputs)
        except Exception as err:
            raise ValueError(
                f"convert: the model failed on example_inputs ({first_line(err, with_type=True)}); pass inputs it "
                "accepts, or leave them out: the ranks are read from the model itself"
            ) from err
    dims: dict[int, int] = {}
    for name, module, _ in found:
        chosen = dim.get(name) if isinstance(dim, Mapping) else dim
        if isinstance(dim, Mapping):
            _check_dim(chosen, name)
        chosen = chosen or _RANK_TO_DIM.get(ranks.get(id(module), 0))
        chosen = chosen or _RANK_TO_DIM.get(getattr(module, "_seen_dim", 0))
        chosen = chosen or getattr(module, "torch_dim", None) or getattr(module, "bnkit_torch_dim", None)
        chosen = chosen or (describe_batchnorm(module) or _NO_INFO).spatial_dims
        if chosen in TORCH_CLASSES:
            dims[id(module)] = chosen
    missing = [m for _, m, kind in found if id(m) not in dims and kind in kinds]
    if missing:
        dims.update(infer_dims(model, missing))
    return dims


def _build(
    name: str,
    module: nn.Module,
    kind: str,
    to: str,
    dim: int | None,
    groups: int | Callable[[int], int] | None,
    process_group: Any,
    strict: bool,
) -> nn.Module:
    if to in ("bnkit", "sync", "bnkit-sync"):
        return to_bnkit(name, module, kind, to != "bnkit", process_group, dim)
    if to == "torch":
        return to_torch(name, module, kind, dim, strict)
    if to == "torch-sync":
        return to_torch_sync(module, kind, process_group)
    if to == "frozen":
        return to_frozen(name, module, kind, dim)
    if to == "trainable":
        return to_trainable(name, module, kind, dim)
    return to_group(name, module, kind, groups, {1: 3, 2: 4, 3: 5}.get(dim or 0))


def convert_with_report(
    model: nn.Module,
    to: str,
    *,
    inplace: bool = False,
    layers: LayerSelector = None,
    dim: int | Mapping[str, int] | None = None,
    example_inputs: Any = None,
    groups: int | Callable[[int], int] | None = None,
    process_group: Any = None,
    strict: bool = True,
) -> tuple[nn.Module, ConvertReport]:
    """:func:`convert`, returning ``(converted_model, report)``.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> frozen, report = convert_with_report(model, "frozen")
        >>> type(frozen[1]).__name__, report.converted
        ('FrozenBatchNorm2d', {'1': 'BatchNorm2d -> FrozenBatchNorm2d'})
    """
    check_model(model, "convert")
    if not isinstance(to, str) or to not in TARGETS:
        raise ValueError(f"convert: to must be one of {', '.join(TARGETS)}; got {to!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"convert: inplace must be True or False, got {inplace!r}")
    if groups is not None and to != "group":
        raise ValueError(f"convert: groups= only applies to to='group', not to={to!r}")
    if dim is not None and to not in ("torch", "frozen", "trainable"):
        raise ValueError(f"convert: dim= only applies to to='torch', 'frozen' and 'trainable', not to={to!r}")

    # Check every selected layer on the original before copying or touching anything.
    for name, module, _ in _find(model, layers):
        _check_lazy(name, module)

    result = copy_unless_inplace(model, inplace)
    found = _find(result, layers)
    if to == "bnact":
        return _convert_bnact(model, result, found, inplace)
    dims: dict[int, int] = {}
    synced = to in ("bnkit", "sync", "bnkit-sync") and any(kind == "torch-sync" for *_, kind in found)
    if to in ("torch", "frozen", "trainable") or example_inputs is not None or synced:
        # "bnkit" from SyncBatchNorm: the rank is recorded on the bnkit layer for a later "torch"
        dims = _dims(result, found, dim, example_inputs, _NEEDS_DIM.get(to, ("torch-sync",)))

    # Build every replacement first, so an error leaves even an in-place model unchanged.
    replacements: dict[int, nn.Module] = {}
    converted: dict[str, str] = {}
    unchanged: list[str] = []
    kept: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, module, kind in found:
        label = name or "<model>"
        try:
            new = _build(name, module, kind, to, dims.get(id(module)), groups, process_group, strict)
        except Leave as leave:
            (skipped if leave.warn else kept)[label] = leave.reason
            continue
        if new is module:
            unchanged.append(label)
            continue
        replacements[id(module)] = new
        converted[label] = f"{type(module).__name__} -> {type(new).__name__}"

    report = ConvertReport(to, converted, tuple(unchanged), kept, skipped, _unrecognised(model))
    _warn(model, found, replacements, report)
    # The report is returned, not attached to the model: a "torch" result must unpickle without bnkit.
    return replace_modules(result, replacements), report


def _convert_bnact(
    model: nn.Module, result: nn.Module, found: list[tuple[str, nn.Module, str]], inplace: bool
) -> tuple[nn.Module, ConvertReport]:
    plan = rewrite_bnact(result, found, inplace=inplace)
    report = ConvertReport(
        "bnact", plan.converted, (), plan.kept, plan.skipped, _unrecognised(model), tuple(plan.notes)
    )
    converted = {id(m) for name, m, _ in found if (name or "<model>") in plan.converted}
    _warn(model, found, dict.fromkeys(converted), report)  # type: ignore[arg-type]
    return plan.model, report


def _warn(model: nn.Module, found: list, replacements: dict[int, nn.Module], report: ConvertReport) -> None:
    dropped = [name or "<model>" for name, m, _ in found if id(m) in replacements and has_foreign_hooks(m)]
    if dropped:
        warnings.warn(
            f"convert: hooks registered on {', '.join(dropped)} were not carried over to the converted layers; "
            "register them again on the returned model",
            UserWarning,
            stacklevel=3,
        )
    if report.skipped:
        first = next(iter(report.skipped.values()))
        warnings.warn(
            f"convert: {len(report.skipped)} layer(s) left as they are for to={report.to!r}: "
            f"{', '.join(report.skipped)} ({first}); see the report",
            UserWarning,
            stacklevel=3,
        )
    if report.unrecognised:
        warn_unrecognised(model, "convert", stacklevel=4)
    if not found and not report.unrecognised:
        warnings.warn(
            f"convert: the model ({type(model).__name__}) has no BatchNorm layer; nothing to convert",
            UserWarning,
            stacklevel=3,
        )
    elif found and not report.converted and not report.skipped:
        warnings.warn(
            f"convert: nothing to convert to {report.to!r}: the {len(found)} selected layer(s) are already in that "
            "form or kept as they are (see the report)",
            UserWarning,
            stacklevel=3,
        )


def convert(
    model: nn.Module,
    to: str,
    *,
    inplace: bool = False,
    layers: LayerSelector = None,
    dim: int | Mapping[str, int] | None = None,
    example_inputs: Any = None,
    groups: int | Callable[[int], int] | None = None,
    process_group: Any = None,
    strict: bool = True,
) -> nn.Module:
    """Convert the BatchNorm-like layers of ``model`` (at any depth) to another form.

    Targets (every one exact in train and eval unless said otherwise; the input model is never changed unless
    ``inplace=True``):

    - ``"bnkit"``: ``torch.nn`` BatchNorm1d/2d/3d and SyncBatchNorm -> ``bnkit.BatchNorm`` (SyncBatchNorm becomes
      ``sync=True`` with its process group). The layer remembers its class (``torch_dim``), so ``"torch"`` gives
      the same class back without running the model. bnkit layers are unchanged; timm's ``BatchNormAct2d`` /
      ``SyncBatchNormAct`` are kept (``"bnact"`` converts them) and frozen layers are kept.
    - ``"sync"`` (alias ``"bnkit-sync"``): every BatchNorm -> ``bnkit.BatchNorm(sync=True)``: statistics merged
      exactly across ``torch.distributed`` ranks in training, on CPU (gloo) and GPU; bnkit layers keep their
      settings and gain ``sync=True``.
    - ``"torch"``: ``bnkit.BatchNorm`` and ``SyncBatchNorm`` -> ``torch.nn.BatchNorm1d/2d/3d`` (PyTorch has no
      SyncBN -> BN converter, pytorch#41081; works on CPU without a process group); timm's ``SyncBatchNormAct``
      -> ``BatchNormAct2d`` (activation kept). The class comes from, in this order: ``dim`` (an int, or a dict
      of qualified name -> dim), the input rank in one eval-mode, no-grad forward of ``example_inputs`` (see
      :data:`bnkit.tools.model_inputs.ExampleInputs`), the rank a bnkit layer last saw, the class it was
      converted from, then the model itself: the module producing its input or consuming its output on the
      ``torch.fx`` graph (traced in training mode too, so auxiliary heads count) or among its siblings. A
      layer whose rank is still unknown raises. bnkit settings torch cannot express (channel axis other than
      1, biased running variance, Keras momentum formula, ghost batches, renorm) are refused unless
      ``strict=False``, which keeps inference exact and lets training follow PyTorch's rules.
    - ``"torch-sync"``: BatchNorm1d/2d/3d -> ``torch.nn.SyncBatchNorm`` (CUDA only in PyTorch; the class is
      remembered for ``"torch"``), timm ``BatchNormAct2d`` -> ``SyncBatchNormAct``; bnkit layers gain ``sync=True``.
    - ``"frozen"``: BatchNorm2d-shaped layers -> torchvision's ``FrozenBatchNorm2d`` (timm's
      ``FrozenBatchNormAct2d`` for BatchNormAct2d), as detectron2's ``convert_frozen_batchnorm``: the result
      equals the source in eval mode (to float rounding: it computes ``x * scale + shift``), in train mode too
      (it never uses batch statistics); momentum and ``num_batches_tracked`` are dropped. Layers that are not
      2d or have no running statistics are skipped (``bnkit.freeze`` freezes them in place).
    - ``"trainable"``: ``FrozenBatchNorm2d`` (torchvision, timm, detectron2 look-alikes, classes registered
      with ``frozen=True``) -> ``nn.BatchNorm2d`` (1d/3d for a registered class, by the rules of ``"torch"``)
      and ``FrozenBatchNormAct2d`` -> ``BatchNormAct2d``, to fine-tune a detector backbone: same eps, gamma,
      beta and statistics (equal in eval mode), ``momentum=0.1``, ``num_batches_tracked=0``, gamma/beta
      trainable, the training flag the frozen layer had; in train mode the layers now use batch statistics.
      Other layers are unchanged.
    - ``"group"``: every BatchNorm -> ``torch.nn.GroupNorm(G, C, eps=eps)`` (timm's ``GroupNormAct`` for
      BatchNormAct) with ``G = groups`` (an int, or a callable ``C -> G``), by default :func:`default_groups`.
      gamma and beta are copied (with their ``requires_grad``); running statistics, momentum and freeze state
      are discarded. The outputs differ from the BatchNorm's, so fine-tune after converting.

    - ``"bnact"``: each ``torch.nn`` BatchNorm (or SyncBatchNorm) followed by its activation, and each timm
      ``BatchNormAct2d``, -> one ``bnkit.BatchNormAct`` (exact in train and eval; see
      :mod:`bnkit.tools.bnact_rewrite`). Pairs are found on the model's ``torch.fx`` graph, else among the
      children of an ``nn.Sequential``. Supported activations: identity, ReLU, LeakyReLU and ELU (slope/alpha
      > 0), as modules or functions. When the activation module is called once, the BatchNorm is replaced and
      the activation becomes ``nn.Identity`` (the model keeps its class); when one module is called several
      times (torchvision's ResNet reuses ``self.relu``) or the activation is a function, the result is a
      ``torch.fx.GraphModule`` with the activation removed after that BatchNorm (a note in the report says so;
      not with ``inplace=True``, nor when the traced forward differs in train and eval mode). Left, with the
      reason: a BatchNorm whose output goes elsewhere (``kept``: e.g. to a residual sum), or to the activation
      and something else, an unsupported activation (ReLU6, SiLU, ...), a timm drop layer, an activated output
      modified in place by a later explicit in-place call (``skipped``, with a warning). On the way back,
      ``"torch"`` gives timm's ``BatchNormAct2d`` for a layer converted from one (``BatchNormAct.source_class``),
      a ``torch.nn`` BatchNorm for the identity, and leaves any other (listed, with a warning).

    A layer the target cannot hold (a subclass with behaviour of its own, timm's BatchNormAct under
    ``"bnkit"``) is left as it is and listed under ``skipped`` in the report, with a warning; the call never
    fails because of it. Modules that hold running statistics but that bnkit does not recognise are named in
    the report and a warning, as is a model without any BatchNorm; :func:`convert_with_report` returns the
    :class:`ConvertReport` (it is not attached to the model, so a ``"torch"`` result unpickles without bnkit).
    Hooks on a replaced layer do not move (a warning names the layers), except bnkit's own freeze. Lazy layers
    must have seen an input.

    Args:
        model: any module; the model itself may be a BatchNorm.
        to: one of :data:`TARGETS`.
        inplace: convert inside ``model`` instead of a deep copy. A model that is itself a BatchNorm cannot be
            replaced in place; its conversion is returned.
        layers: which BatchNorm layers (None: all; glob, type, predicate or list of names).
        dim: ``"torch"``/``"frozen"``/``"trainable"``: 1, 2 or 3 for every layer whose class does not fix it
            (it wins over everything else), or a dict of qualified name -> dim.
        example_inputs: inputs for one eval-mode forward pass that records each layer's input rank.
        groups: ``"group"`` only: the number of groups, or a callable ``num_channels -> groups``.
        process_group: ``"sync"``/``"bnkit-sync"``/``"torch-sync"``: the process group (default: the world).
        strict: ``"torch"`` only: refuse bnkit settings torch cannot express (default) or drop them.

    Returns:
        The converted model (a new one unless ``inplace=True``).

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: unknown target, a selector that matches nothing, an unknown rank for ``"torch"`` or
            ``"frozen"``, groups that do not divide the channels, a bnkit setting torch cannot express (all
            naming the layer). The input model is left untouched.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SyncBatchNorm(4))
        >>> type(convert(model, "torch")[1]).__name__
        'BatchNorm2d'
        >>> type(convert(model, "bnkit")[1]).__name__
        'BatchNorm'
        >>> convert(model, "group")[1]
        GroupNorm(4, 4, eps=1e-05, affine=True, bias=True)
    """
    converted, _ = convert_with_report(
        model,
        to,
        inplace=inplace,
        layers=layers,
        dim=dim,
        example_inputs=example_inputs,
        groups=groups,
        process_group=process_group,
        strict=strict,
    )
    return converted
