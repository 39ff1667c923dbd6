"""Fold every foldable inference BatchNorm of a model into its neighbouring convolution or linear layer.

An inference BatchNorm is a per-channel affine map, so it can be folded into the weights of the layer that
produces its input (always exact, whatever the stride, padding, dilation or groups) or, in some cases, of the
layer that consumes its output. :func:`fuse` finds those pairs on the model's ``torch.fx`` graph, so residual
networks and models that are not ``nn.Sequential`` fuse too, decides for each pair whether the fold is exact,
folds it in float64 and replaces the BatchNorm by ``nn.Identity``. The fused model is a deep copy of the
original (same class, same forward code, picklable wherever the original is) in eval mode.

Rules (each refusal is listed in the report with its reason):

- BN AFTER a ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d`` or ``Linear``: folded when the BN is the layer's only
  consumer (a layer whose output also feeds another branch keeps its BN), each is called once, and the BN's
  channel axis is the layer's channel axis (axis 1 of a batched conv output; the last axis of a linear
  output, so ``BatchNorm1d`` only on 2-D linear outputs).
- BN BEFORE such a layer: folded when the layer is the BN's only consumer and the fold is exact. For ``Conv``:
  no zero padding (``padding=0``/``"valid"``), or a non-zero ``padding_mode`` (reflect/replicate/circular pad
  with copies of the normalised values, which commutes with the per-channel map); with zero padding the border
  outputs would see padded zeros instead of the BN's shift, so such a BN is not folded (unless its shift is
  exactly zero). For ``ConvTranspose``: unit kernel and stride only. For ``Linear``: the BN's channel axis must
  be the input's last axis.
- A BN is folded only if its inference output uses running statistics (not ``track_running_stats=False``), its
  class does not override ``forward`` (a subclass with a fused activation is kept, never silently dropped),
  it has no hooks and it is not shared. ``torch.nn`` BatchNorm, ``SyncBatchNorm`` (in eval it is plain BN)
  and ``bnkit.BatchNorm`` (any channel axis, as long as it is the layer's channel axis) are handled.
- Modules that ``torch.fx`` cannot trace are handled separately: the tracer treats the failing module as opaque,
  traces the rest, and then fuses inside the opaque module on its own (and ``nn.Sequential`` children pairwise
  when even that fails).

With ``check=True`` (default) the fused model is compared with the original in eval mode on
``example_inputs`` (or inputs generated from the first layer's shape) and a ``ValueError`` naming the fold that
broke the output is raised if they differ beyond tolerance; the input model is then untouched.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from bnkit.core.fold import fold_after_conv, fold_after_linear, fold_before_conv, fold_before_linear
from bnkit.core.normalize import scale_shift
from bnkit.layers.find import is_batchnorm
from bnkit.layers.keras_guard import refuse_keras
from bnkit.shared.errors import first_line
from bnkit.tools.freeze import has_foreign_hooks

__all__ = ["FoldRecord", "FuseReport", "SkipRecord", "fuse", "fuse_with_report"]

_CONVS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_LAYERS: tuple[type[nn.Module], ...] = (*_CONVS, nn.Linear)

# Input sizes tried, per number of spatial dimensions, when inputs are generated from the first layer.
_GENERATED_SIZES: dict[int, tuple[int, ...]] = {0: (0,), 1: (64, 256), 2: (32, 64, 224), 3: (16, 32)}


# ---------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class FoldRecord:
    """One BatchNorm folded into a layer.

    Attributes:
        bn: Qualified name of the BatchNorm (now an ``nn.Identity`` in the fused model).
        into: Qualified name of the layer that absorbed it.
        position: ``"after"`` when the BN followed the layer (output side), ``"before"`` when it preceded it.
        note: Anything the user should know, e.g. that the input rank could not be verified.

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
    """What :func:`fuse` folded, what it skipped and why, and how the check went.

    Attributes:
        folded: The folds, in the order they were applied.
        skipped: Every BatchNorm of the model that was not folded, with its reason.
        notes: Model-level remarks (modules that could not be traced, inputs that were generated, ...).
        checked: Whether fused and original outputs were compared.
        max_abs_diff: Largest absolute output difference seen by the check (None when unchecked).
        tolerance: The tolerance the largest difference was compared with (None when unchecked).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> fused, report = fuse_with_report(model)
        >>> [(f.bn, f.into, f.position) for f in report.folded]
        [('1', '0', 'after')]
    """

    folded: list[FoldRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: bool = False
    max_abs_diff: float | None = None
    tolerance: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable data.

        Example:
            >>> sorted(FuseReport().to_dict())
            ['checked', 'folded', 'max_abs_diff', 'notes', 'skipped', 'tolerance']
        """
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm layer(s), skipped {len(self.skipped)}"]
        lines += [
            f"  folded  {f.bn} -> {f.into} ({f.position}){' [' + f.note + ']' if f.note else ''}" for f in self.folded
        ]
        lines += [f"  skipped {s.bn}: {s.reason}" for s in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        if self.checked:
            lines.append(f"  check: max |fused - original| = {self.max_abs_diff:.3g} <= {self.tolerance:.3g}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- public API


def fuse(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    check: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    inplace: bool = False,
) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable inference BatchNorm folded into its neighbour.

    See the module docstring for the exact rules. Folded BatchNorms become ``nn.Identity``; the absorbing
    layers get new ``weight``/``bias`` parameters (same dtype, device and ``requires_grad``; a layer without
    bias gains one). The fused model's eval output equals the original's eval output up to rounding; its
    training behaviour is not the original's (the BatchNorms are gone). The report is attached as
    ``fused.bnkit_fuse_report`` (:class:`FuseReport`); :func:`fuse_with_report` returns it too.

    Args:
        model: Any ``nn.Module`` with ``torch.nn`` BatchNorm, ``SyncBatchNorm`` or ``bnkit.BatchNorm`` layers
            at any depth. It is never modified unless ``inplace=True``, and then only after a successful check.
        example_inputs: One input tensor, or a tuple of positional arguments for ``model``. Used for the check
            and to learn the rank each layer sees. ``None`` generates a batch of 2 random inputs from the first
            layer's shape (``Conv``/``Linear``/``BatchNorm`` first layers).
        check: Compare fused and original (both in eval mode) on the inputs and raise if they differ.
        atol: Absolute tolerance of the check (default 1e-6 for float32, 1e-12 for float64, 1e-3 for 16-bit).
        rtol: Tolerance relative to the largest absolute value of each output tensor (default 1e-4 for
            float32, 1e-9 for float64, 2e-2 for 16-bit).
        inplace: Fold into ``model`` itself (its BatchNorms replaced, its layers given the fused parameters)
            and return it, instead of returning a fused copy.

    Returns:
        The fused model, in eval mode.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or cannot be deep-copied.
        ValueError: the model fails on ``example_inputs``; ``check=True`` without usable inputs; or the fused
            output differs from the original beyond tolerance (the message names the fold responsible).

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
    example_inputs: Any = None,
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
    try:
        work = copy.deepcopy(model)
    except Exception as error:  # any failure means the same thing to the user
        raise TypeError(
            f"fuse: cannot deep-copy {type(model).__name__} ({first_line(error, with_type=True)}); "
            "fuse needs a copy to work on"
        ) from None
    work.eval()
    report = FuseReport()

    args = _as_args(example_inputs) if example_inputs is not None else None
    ranks: dict[str, list[int]] = {}
    reference: Any = None
    if args is not None:
        try:
            reference = _run_recording(work, args, ranks)
        except Exception as error:
            raise ValueError(
                f"fuse: {type(model).__name__} failed on example_inputs in eval mode "
                f"({first_line(error, with_type=True)}); "
                "pass inputs the model accepts as a tensor or a tuple of positional arguments"
            ) from None
    else:
        args, reference = _generate_inputs(work, ranks, report)
        if args is None and check:
            raise ValueError(
                f"fuse: cannot generate example inputs for {type(model).__name__} from its first layer; "
                "pass example_inputs=(...) or check=False"
            )

    plan = _Analysis(work, ranks if args is not None else None, report).run()
    for op in plan:
        _apply(work, op)
    work.eval()

    if check:
        assert args is not None
        with torch.no_grad():
            out = work(*_fresh(args))
        problem = _compare(reference, out, atol, rtol)
        report.checked = True
        report.max_abs_diff, report.tolerance = problem[1], problem[2]
        if problem[0]:
            culprit = _find_culprit(model, plan, args, reference, atol, rtol)
            raise ValueError(
                f"fuse: the fused model differs from {type(model).__name__} by {problem[1]:.3g} "
                f"(tolerance {problem[2]:.3g}){' ' + problem[3] if problem[3] else ''}{culprit}; "
                "the input model is unchanged; "
                "raise atol/rtol or pass check=False if this rounding is acceptable"
            )

    if inplace:
        _transplant(model, work, plan)
        model.eval()
        work = model
    work.bnkit_fuse_report = report
    return work, report


# ---------------------------------------------------------------------------------------------- inputs


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _fresh(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Copies of the tensors in ``args``, so an in-place first layer cannot change the inputs between runs."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda value: value.clone() if isinstance(value, Tensor) else value, args)


def _run_recording(model: nn.Module, args: tuple[Any, ...], ranks: dict[str, list[int]]) -> Any:
    """Run ``model(*args)`` without gradient, recording the input rank of every layer and BatchNorm call."""
    handles = []
    seen: dict[str, list[int]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if inputs and isinstance(inputs[0], Tensor):
                seen.setdefault(name, []).append(inputs[0].ndim)

        return record

    for name, module in model.named_modules():
        if is_batchnorm(module) or isinstance(module, _LAYERS):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            out = model(*_fresh(args))
    finally:
        for handle in handles:
            handle.remove()
    ranks.clear()
    ranks.update(seen)
    return out


def _first_layer(model: nn.Module) -> nn.Module | None:
    try:
        graph = _Tracer(set()).trace(model)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) == 1:
            for user in placeholders[0].users:
                if user.op == "call_module" and user.args and user.args[0] is placeholders[0]:
                    return model.get_submodule(str(user.target))
    except Exception:  # fall back to registration order
        pass
    for module in model.modules():
        if is_batchnorm(module) or isinstance(module, _LAYERS):
            return module
    return None


def _generated_shapes(first: nn.Module) -> list[list[int]]:
    if isinstance(first, nn.Linear):
        return [[2, first.in_features]]
    if isinstance(first, _ConvNd):
        spatial = len(first.kernel_size)
        return [[2, first.in_channels] + [size] * spatial for size in _GENERATED_SIZES[spatial]]
    if isinstance(first, _BatchNorm) and not isinstance(first, nn.SyncBatchNorm):
        spatial = {nn.BatchNorm1d: 0, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(first))
        if spatial is not None:
            return [[2, first.num_features] + [size] * spatial for size in _GENERATED_SIZES[spatial]]
    return []


def _generate_inputs(
    model: nn.Module, ranks: dict[str, list[int]], report: FuseReport
) -> tuple[tuple[Any, ...] | None, Any]:
    first = _first_layer(model)
    if first is None:
        return None, None
    tensor = next(iter(first.parameters(recurse=False)), None)
    if tensor is None:
        tensor = next(iter(first.buffers(recurse=False)), None)
    if tensor is None or isinstance(tensor, nn.parameter.UninitializedTensorMixin):
        return None, None
    generator = torch.Generator().manual_seed(0)
    for shape in _generated_shapes(first):
        x = torch.randn(shape, generator=generator, dtype=torch.float64).to(tensor.device, tensor.dtype)
        try:
            out = _run_recording(model, (x,), ranks)
        except Exception:  # try the next size
            continue
        report.notes.append(f"inputs generated from the first layer: a random tensor of shape {tuple(shape)}")
        return (x,), out
    return None, None


# ---------------------------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class _Fold:
    bn: str
    layer: str
    position: Literal["after", "before"]


class _TraceFailure(Exception):
    """fx tracing failed inside ``culprit`` (a module id), or in the root's own forward when it is None."""

    def __init__(self, culprit: int | None, error: BaseException) -> None:
        super().__init__(str(error))
        self.culprit = culprit
        self.error = error


class _Tracer(fx.Tracer):
    """fx tracer that keeps layers, BatchNorms and known-untraceable modules as leaves and names a failure."""

    def __init__(self, opaque: set[int]) -> None:
        super().__init__()
        self.opaque = opaque
        self.culprit: int | None = None
        self.stack: list[nn.Module] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.opaque or is_batchnorm(m) or isinstance(m, _LAYERS):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.stack.append(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.culprit is None:
                # The innermost module being traced through when the error surfaced; never a leaf, since
                # marking a leaf opaque would change nothing.
                for candidate in reversed(self.stack):
                    try:
                        name = self.path_of_module(candidate)
                    except Exception:  # module created inside forward: blame its caller
                        continue
                    if not self.is_leaf_module(candidate, name):
                        self.culprit = id(candidate)
                        break
            raise
        finally:
            self.stack.pop()


def _trace(module: nn.Module, opaque: set[int]) -> fx.Graph:
    """Trace ``module``, growing ``opaque`` with each submodule that fails until the rest traces."""
    for _ in range(sum(1 for _ in module.modules()) + 1):
        tracer = _Tracer(opaque)
        try:
            return tracer.trace(module)
        except Exception as error:  # fx raises many kinds
            if tracer.culprit is None or tracer.culprit == id(module) or tracer.culprit in opaque:
                raise _TraceFailure(None, error) from None
            opaque.add(tracer.culprit)
    raise _TraceFailure(None, RuntimeError("tracing did not converge"))


def _standard_bn(module: nn.Module) -> bool:
    from bnkit.layers.batchnorm import BatchNorm

    forwards = {_BatchNorm.forward, nn.SyncBatchNorm.forward, BatchNorm.forward}
    return type(module).forward in forwards


def _hooked(module: nn.Module) -> bool:
    # bnkit.freeze's hooks only switch a BN to inference mode, which it already is in a fused (eval) model.
    return has_foreign_hooks(module)


def _bn_axis(bn: nn.Module, ndim: int | None) -> int | None:
    """The BN's non-negative channel axis for rank ``ndim``; None when unknown or out of range."""
    axis = getattr(bn, "axis", 1) if not isinstance(bn, _BatchNorm) else 1
    if ndim is None:
        return axis if axis >= 0 else None
    if not -ndim <= axis < ndim:
        return None
    return axis % ndim


def _bn_scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Inference-mode ``(scale, shift)`` of ``bn`` in float64 (float32 where float64 is unsupported)."""
    mean = bn.running_mean
    dtype = torch.float32 if mean.device.type == "mps" else torch.float64
    weight = None if bn.weight is None else bn.weight.detach().to(dtype)
    bias = None if bn.bias is None else bn.bias.detach().to(dtype)
    with torch.no_grad():
        return scale_shift(mean.to(dtype), bn.running_var.to(dtype), weight, bias, float(bn.eps))


class _Analysis:
    """Decides which BatchNorm folds into which layer; all names are qualified from the model root."""

    def __init__(self, root: nn.Module, ranks: dict[str, list[int]] | None, report: FuseReport) -> None:
        self.root = root
        self.ranks = ranks
        self.report = report
        self.names = {id(m): name for name, m in root.named_modules()}
        self.multiplicity = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        self.plan: list[_Fold] = []
        self.skips: dict[str, str] = {}
        self.opaque: set[int] = set()
        self.untraceable: list[str] = []

    # ---- driver

    def run(self) -> list[_Fold]:
        queue: list[nn.Module] = [self.root]
        visited: set[int] = set()
        while queue:
            module = queue.pop(0)
            if id(module) in visited:
                continue
            visited.add(id(module))
            queue.extend(self._analyse_module(module))
        folded = {op.bn for op in self.plan}
        for name, bn in self.root.named_modules():
            if is_batchnorm(bn) and name not in folded:
                reason = self.skips.get(name) or self._untraced_reason(name)
                self.report.skipped.append(SkipRecord(name, reason))
        return self.plan

    def _untraced_reason(self, name: str) -> str:
        owners = [p for p in self.untraceable if p == "" or name.startswith(p + ".")]
        if owners:
            owner = max(owners, key=len) or "the model"
            return f"called from the forward of {owner}, which torch.fx cannot trace (see notes)"
        return "not called as a module by any traced forward"

    def _analyse_module(self, module: nn.Module) -> list[nn.Module]:
        """Analyse one module's forward; return the submodules that need their own analysis."""
        prefix = self.names[id(module)]
        label = prefix or f"<{type(module).__name__}>"
        try:
            graph = _trace(module, self.opaque)
        except _TraceFailure as failure:
            self.untraceable.append(prefix)
            self.report.notes.append(
                f"{label}: torch.fx cannot trace its forward ({first_line(failure.error, with_type=True)}); "
                + (
                    "folding nn.Sequential neighbours and looking inside its children"
                    if type(module).forward is nn.Sequential.forward
                    else "looking inside its children only"
                )
            )
            if type(module).forward is nn.Sequential.forward:
                self._analyse_sequential(module, prefix)
            return [c for c in module.children() if not is_batchnorm(c) and not isinstance(c, _LAYERS)]
        self._analyse_graph(graph, module, prefix)
        nested = []
        for node in graph.nodes:
            if node.op == "call_module":
                sub = module.get_submodule(str(node.target))
                if (
                    not is_batchnorm(sub)
                    and not isinstance(sub, _LAYERS)
                    and any(is_batchnorm(m) for m in sub.modules())
                ):
                    nested.append(sub)
        return nested

    # ---- shared checks (module level)

    def _rank(self, name: str) -> int | None:
        if self.ranks is None:
            return None
        seen = set(self.ranks.get(name, []))
        return seen.pop() if len(seen) == 1 else None

    def _bn_problem(self, name: str, bn: nn.Module) -> str | None:
        if not _standard_bn(bn):
            return (
                f"{type(bn).__name__} overrides forward (e.g. a fused activation); folding would drop that, "
                "so it is kept"
            )
        if bn.running_mean is None or bn.running_var is None:
            return "track_running_stats=False: it normalises with batch statistics in eval, not an affine map"
        uses_batch = getattr(bn, "uses_batch_stats", None)
        if uses_batch is not None and uses_batch(training=False):
            return "it normalises with batch statistics in eval, not an affine map"
        if isinstance(bn.running_mean, nn.parameter.UninitializedTensorMixin):
            return "lazy layer not initialised; run the model once or pass example_inputs"
        if self.multiplicity[id(bn)] > 1:
            return "the same module is registered under several names; folding it would change every use"
        if _hooked(bn):
            return "it has hooks, which would stop firing if it were removed"
        return None

    def _layer_problem(self, name: str, layer: nn.Module) -> str | None:
        base = next(cls for cls in _LAYERS if isinstance(layer, cls))
        if type(layer).forward is not base.forward:
            return f"{name} ({type(layer).__name__}) overrides forward"
        from torch.nn.utils import parametrize

        if parametrize.is_parametrized(layer):
            return f"{name} has parametrized weights"
        if isinstance(layer.weight, nn.parameter.UninitializedTensorMixin):
            return f"{name} is a lazy layer not initialised yet; pass example_inputs"
        if self.multiplicity[id(layer)] > 1:
            return f"{name} is registered under several names"
        if _hooked(layer):
            return f"{name} has hooks"
        return None

    def _channels_problem(
        self, layer_name: str, layer: nn.Module, bn: nn.Module, ndim: int | None, side: Literal["output", "input"]
    ) -> tuple[str | None, str]:
        """Whether the BN's channels are the layer's ``side`` channels, for an input of rank ``ndim``."""
        if isinstance(layer, nn.Linear):
            channels = layer.out_features if side == "output" else layer.in_features
        else:
            channels = layer.out_channels if side == "output" else layer.in_channels
        if channels != bn.num_features:
            return f"{layer_name} has {channels} {side} channels, the BN {bn.num_features}", ""
        note = "" if ndim is not None else "input rank not verified (no example inputs)"
        if isinstance(layer, nn.Linear):
            return self._features_problem(bn, ndim, f"{layer_name} {'outputs' if side == 'output' else 'reads'}")
        spatial = len(layer.kernel_size)
        if ndim is not None and ndim != spatial + 2:
            return f"{layer_name} is called without a batch dimension (input rank {ndim})", ""
        if _bn_axis(bn, spatial + 2) != 1:
            return f"the BN normalises axis {getattr(bn, 'axis', None)}, not the channel axis 1 of {layer_name}", ""
        return None, note

    def _after_problem(self, layer_name: str, layer: nn.Module, bn: nn.Module) -> tuple[str | None, str]:
        """Whether BN(layer(x)) folds into ``layer``: (problem, note)."""
        return self._channels_problem(layer_name, layer, bn, self._rank(layer_name), "output")

    def _before_problem(self, bn_name: str, bn: nn.Module, layer_name: str, layer: nn.Module) -> tuple[str | None, str]:
        """Whether layer(BN(x)) folds into ``layer`` exactly: (problem, note)."""
        problem, note = self._channels_problem(layer_name, layer, bn, self._rank(bn_name), "input")
        if problem is not None or isinstance(layer, nn.Linear):
            return problem, note
        exact = self._border_problem(layer_name, layer)
        if exact is not None:
            _, shift = _bn_scale_shift(bn)
            if bool((shift == 0).all()):
                return None, note
            return exact, ""
        return None, note

    @staticmethod
    def _features_problem(bn: nn.Module, ndim: int | None, what: str) -> tuple[str | None, str]:
        """A linear layer's features are its last axis: the BN must normalise that axis."""
        axis = 1 if isinstance(bn, _BatchNorm) else getattr(bn, "axis", 1)
        if ndim is None:
            if axis == -1:
                return None, "input rank not verified (no example inputs)"
            if axis == 1:
                return None, "input rank not verified (no example inputs); assumed 2-D"
            return f"without example inputs the BN's axis {axis} cannot be matched to the features", ""
        if _bn_axis(bn, ndim) != ndim - 1:
            return f"{what} features on the last axis of rank {ndim} but the BN normalises axis {axis}", ""
        return None, ""

    @staticmethod
    def _border_problem(name: str, layer: nn.Module) -> str | None:
        if isinstance(layer, _ConvTransposeNd):
            if any(k != 1 for k in layer.kernel_size) or any(s != 1 for s in layer.stride):
                return (
                    f"{name} is a ConvTranspose with kernel {tuple(layer.kernel_size)} and stride "
                    f"{tuple(layer.stride)}: border outputs see fewer taps of the BN's shift"
                )
            if any(p != 0 for p in layer.output_padding):
                return f"{name} has output_padding {tuple(layer.output_padding)}: padded outputs see no shift"
            return None
        if layer.padding_mode != "zeros":
            return None  # reflect/replicate/circular pad with copies of normalised values: exact
        padding = layer.padding
        if isinstance(padding, str):
            if padding == "valid" or all(
                d * (k - 1) == 0 for d, k in zip(layer.dilation, layer.kernel_size, strict=True)
            ):
                return None
            return f"{name} uses padding='same' with zeros: border outputs would see zeros, not the BN's shift"
        if any(p != 0 for p in padding):
            return f"{name} has zero padding {tuple(padding)}: border outputs would see zeros, not the BN's shift"
        return None

    # ---- graph level

    def _analyse_graph(self, graph: fx.Graph, module: nn.Module, prefix: str) -> None:
        calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
        attrs = [str(n.target) for n in graph.nodes if n.op == "get_attr"]

        def qualified(target: Any) -> str:
            return f"{prefix}.{target}" if prefix else str(target)

        def touched(target: str) -> bool:
            return any(a == target or a.startswith(target + ".") for a in attrs)

        def layer_of(node: Any) -> tuple[str | None, nn.Module | None, str | None]:
            if isinstance(node, fx.Node) and node.op == "placeholder":
                return None, None, f"it reads the forward's argument `{node.target}` directly"
            if not isinstance(node, fx.Node) or node.op != "call_module":
                what = node.target if isinstance(node, fx.Node) else type(node).__name__
                return None, None, f"`{getattr(what, '__name__', what)}` is not a Conv/ConvTranspose/Linear module"
            sub = module.get_submodule(str(node.target))
            name = qualified(node.target)
            if not isinstance(sub, _LAYERS):
                return None, None, f"{name} ({type(sub).__name__}) is not a Conv/ConvTranspose/Linear module"
            problem = self._layer_problem(name, sub)
            if problem is None and calls[str(node.target)] > 1:
                problem = f"{name} is called {calls[str(node.target)]} times"
            if problem is None and touched(str(node.target)):
                problem = f"the forward reads {name}'s parameters directly"
            return name, sub, problem

        bn_nodes = []
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            sub = module.get_submodule(str(node.target))
            if not is_batchnorm(sub):
                continue
            name = qualified(node.target)
            problem = self._bn_problem(name, sub)
            if problem is None and calls[str(node.target)] > 1:
                problem = f"called {calls[str(node.target)]} times; each call would need its own fold"
            if problem is None and (len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node)):
                problem = "called with extra arguments (training=/mask=), so it is not a plain inference BN"
            if problem is None and touched(str(node.target)):
                problem = "the forward reads its tensors directly"
            if problem is not None:
                self.skips[name] = problem
            else:
                bn_nodes.append((node, name, sub))

        # Pass 1, BN after a layer (always exact); in graph order so chains like conv -> BN -> BN collapse.
        pending = []
        for node, name, bn in bn_nodes:
            producer = node.args[0]
            layer_name, layer, problem = layer_of(producer)
            note = ""
            if problem is None and len(producer.users) > 1:
                problem = f"{layer_name}'s output also feeds {len(producer.users) - 1} other consumer(s)"
            if problem is None:
                problem, note = self._after_problem(layer_name, layer, bn)
            if problem is None:
                self._record(_Fold(name, layer_name, "after"), note)
                node.replace_all_uses_with(producer)
                graph.erase_node(node)
            else:
                pending.append((node, name, bn, f"input: {problem}"))

        # Pass 2, BN before a layer where exact; in reverse order so BN -> BN -> conv collapses.
        for node, name, bn, after_problem in reversed(pending):
            users = list(node.users)
            note = ""
            if len(users) != 1:
                problem = f"its output feeds {len(users)} consumers"
            else:
                user = users[0]
                layer_name, layer, problem = layer_of(user)
                if problem is None and (len(user.args) != 1 or user.kwargs):
                    problem = f"{layer_name} is called with extra arguments"
                if problem is None:
                    problem, note = self._before_problem(name, bn, layer_name, layer)
            if problem is None:
                self._record(_Fold(name, layer_name, "before"), note)
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
            else:
                self.skips[name] = f"{after_problem}; output: {problem}"

    # ---- module patterns (untraceable nn.Sequential)

    def _analyse_sequential(self, seq: nn.Module, prefix: str) -> None:
        children = list(seq.named_children())
        counts = Counter(id(m) for _, m in children)

        def qualified(key: str) -> str:
            return f"{prefix}.{key}" if prefix else key

        used: set[int] = set()
        for i, (key, bn) in enumerate(children):
            if not is_batchnorm(bn):
                continue
            name = qualified(key)
            problem = self._bn_problem(name, bn)
            if problem is None and counts[id(bn)] > 1:
                problem = "appears several times in the Sequential"
            if problem is not None:
                self.skips[name] = problem
                continue
            reasons = []
            for j, position in ((i - 1, "after"), (i + 1, "before")):
                if not 0 <= j < len(children):
                    reasons.append(f"nothing {position}")
                    continue
                layer_key, layer = children[j]
                layer_name = qualified(layer_key)
                if not isinstance(layer, _LAYERS):
                    reasons.append(f"{layer_name} ({type(layer).__name__}) is not a Conv/ConvTranspose/Linear")
                    continue
                problem = self._layer_problem(layer_name, layer)
                if problem is None and counts[id(layer)] > 1:
                    problem = f"{layer_name} appears several times in the Sequential"
                if problem is None and position == "after":
                    problem, note = self._after_problem(layer_name, layer, bn)
                elif problem is None:
                    problem, note = self._before_problem(name, bn, layer_name, layer)
                if problem is None and position == "after" and id(layer) in used:
                    problem = f"{layer_name} already absorbed a BN after it"
                if problem is None:
                    self._record(_Fold(name, layer_name, position), note)
                    if position == "after":
                        used.add(id(layer))
                    break
                reasons.append(problem)
            else:
                self.skips[name] = "; ".join(reasons)

    def _record(self, op: _Fold, note: str) -> None:
        self.plan.append(op)
        self.report.folded.append(FoldRecord(op.bn, op.layer, op.position, note.strip("; ")))


# ---------------------------------------------------------------------------------------------- folding


def _set_submodule(model: nn.Module, name: str, value: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, value)


def _apply(model: nn.Module, op: _Fold) -> None:
    bn = model.get_submodule(op.bn)
    layer = model.get_submodule(op.layer)
    scale, shift = _bn_scale_shift(bn)
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    scale, shift = scale.to(weight.device), shift.to(weight.device)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            fold = fold_after_linear if op.position == "after" else fold_before_linear
            new_weight, new_bias = fold(weight, bias, scale, shift)
        else:
            fold = fold_after_conv if op.position == "after" else fold_before_conv
            transposed = isinstance(layer, _ConvTransposeNd)
            new_weight, new_bias = fold(weight, bias, scale, shift, transposed=transposed, groups=layer.groups)
    grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(new_weight, requires_grad=grad)
    layer.bias = nn.Parameter(new_bias, requires_grad=grad if layer.bias is None else layer.bias.requires_grad)
    _set_submodule(model, op.bn, nn.Identity())


def _transplant(model: nn.Module, fused: nn.Module, plan: Iterable[_Fold]) -> None:
    """Give ``model`` the fused parameters and Identity modules computed on its copy ``fused``."""
    for op in plan:
        source = fused.get_submodule(op.layer)
        target = model.get_submodule(op.layer)
        if type(target) is type(source):
            target.weight = source.weight
            target.bias = source.bias
        else:  # a lazy layer materialised on the copy only
            _set_submodule(model, op.layer, source)
        _set_submodule(model, op.bn, nn.Identity())


# ---------------------------------------------------------------------------------------------- check


def _default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    if dtype == torch.float64:
        return 1e-12, 1e-9
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-3, 2e-2
    return 1e-6, 1e-4


def _compare(reference: Any, output: Any, atol: float | None, rtol: float | None) -> tuple[bool, float, float, str]:
    """(differs, max_abs_diff, tolerance at that tensor, where) over every tensor of two output trees."""
    from torch.utils._pytree import tree_flatten

    ref_leaves, ref_spec = tree_flatten(reference)
    out_leaves, out_spec = tree_flatten(output)
    if ref_spec != out_spec:
        return True, math.inf, 0.0, "(the output structure changed)"
    worst = (False, 0.0, 0.0, "")
    worst_ratio = -1.0
    for index, (ref, out) in enumerate(zip(ref_leaves, out_leaves, strict=True)):
        where = f" at output leaf {index}" if len(ref_leaves) > 1 else ""
        if not isinstance(ref, Tensor):
            if not isinstance(out, Tensor) and ref == out:
                continue
            return True, math.inf, 0.0, f"(a non-tensor output changed{where})"
        if not isinstance(out, Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
            return True, math.inf, 0.0, f"(an output's shape or dtype changed{where})"
        if not ref.is_floating_point() and not ref.is_complex():
            if not torch.equal(ref, out):
                return True, math.inf, 0.0, f"(an integer output changed{where})"
            continue
        default_atol, default_rtol = _default_tolerances(ref.dtype)
        a = default_atol if atol is None else atol
        r = default_rtol if rtol is None else rtol
        ref64, out64 = ref.detach().double(), out.detach().double()
        finite = torch.isfinite(ref64)
        same = (ref64 == out64) | (ref64.isnan() & out64.isnan())
        if bool((~finite & ~same).any()) or bool((finite & ~torch.isfinite(out64)).any()):
            return True, math.inf, 0.0, f"(non-finite values changed{where})"
        diff = float((ref64 - out64).abs()[finite].max()) if bool(finite.any()) else 0.0
        scale = float(ref64.abs()[finite].max()) if bool(finite.any()) else 0.0
        tolerance = a + r * scale
        ratio = diff / tolerance if tolerance > 0 else (math.inf if diff > 0 else 0.0)
        if ratio > worst_ratio:
            worst_ratio = ratio
            worst = (diff > tolerance, diff, tolerance, where.strip())
        if diff > tolerance:
            return worst
    return worst


def _find_culprit(
    model: nn.Module,
    plan: list[_Fold],
    args: tuple[Any, ...],
    reference: Any,
    atol: float | None,
    rtol: float | None,
) -> str:
    """Replay the folds one by one on a fresh copy and name the first that breaks the output."""
    try:
        trial = copy.deepcopy(model).eval()
        for op in plan:
            _apply(trial, op)
            with torch.no_grad():
                if _compare(reference, trial(*_fresh(args)), atol, rtol)[0]:
                    return f", first after folding {op.bn} into {op.layer} ({op.position})"
    except Exception:  # the diagnosis is best effort; the main error is raised anyway
        return ""
    return ""
