"""Convert every BatchNorm layer of a model between torch.nn, bnkit, synchronised and GroupNorm forms.

Each conversion keeps what the target can hold: device, dtype, ``requires_grad`` of gamma/beta, the training
flag, momentum (PyTorch convention: weight of the NEW batch), eps, running statistics and
``num_batches_tracked``, and bnkit's freeze state (a frozen layer stays frozen: see :mod:`bnkit.tools.freeze`).
Nothing is dropped silently: a layer whose behaviour the target cannot express is refused with an error that
names it, unless ``strict=False`` says so explicitly. Subclasses of the torch layers (e.g. timm's
``BatchNormAct2d``, which fuses an activation) are always refused: their extra behaviour would be lost
(timm#1254); exclude them with ``layers=`` or convert them yourself.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from bnkit.layers.find import LayerSelector
from bnkit.tools.freeze import _set_stats, has_foreign_hooks, is_frozen_affine, is_frozen_stats
from bnkit.tools.model_edit import (
    bnkit_batchnorm_class,
    check_model,
    copy_unless_inplace,
    is_bnkit_batchnorm,
    replace_modules,
    select_batchnorms,
)
from bnkit.tools.model_inputs import call_with_example, eval_run

__all__ = ["TARGETS", "convert", "default_groups"]

#: Accepted values of ``to``.
TARGETS = ("bnkit", "sync", "bnkit-sync", "torch", "torch-sync", "group")

_TORCH_CLASSES: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_RANK_TO_DIM = {2: 1, 3: 1, 4: 2, 5: 3}


def default_groups(num_channels: int) -> int:
    """The number of GroupNorm groups ``convert(model, "group")`` uses: the largest divisor of C that is <= 32.

    32 groups is Wu & He's recommended setting; layers with fewer or awkward channel counts get the largest
    group count that divides them (a prime C > 32 gets 1 group, i.e. LayerNorm over channels and space).

    Example:
        >>> default_groups(64), default_groups(48), default_groups(20), default_groups(37)
        (32, 24, 20, 1)
    """
    return max(g for g in range(1, min(32, num_channels) + 1) if num_channels % g == 0)


def _is_plain_torch(module: nn.Module) -> bool:
    """torch BatchNorm1d/2d/3d or SyncBatchNorm exactly (not a subclass with behaviour of its own)."""
    return type(module) in (*_TORCH_CLASSES.values(), nn.SyncBatchNorm)


def _check_convertible(name: str, module: nn.Module, to: str) -> None:
    label = name or "<model>"
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
            raise ValueError(
                f"convert: layer {label!r} is a lazy BatchNorm that has not seen an input yet; run one forward "
                "pass first so its size is known"
            )
    if is_bnkit_batchnorm(module):
        if type(module) is not bnkit_batchnorm_class():
            raise ValueError(
                f"convert: layer {label!r} is a {type(module).__name__}, a subclass of bnkit.BatchNorm with "
                f"behaviour of its own that to={to!r} would drop; exclude it with layers=... or convert it yourself"
            )
        return
    if not _is_plain_torch(module):
        base = next(c.__name__ for c in type(module).__mro__[1:] if c.__module__.startswith("torch.nn"))
        raise ValueError(
            f"convert: layer {label!r} is a {type(module).__name__}, a subclass of {base} with behaviour of its "
            f"own (e.g. a fused activation) that to={to!r} would drop; exclude it with layers=... or convert "
            "it yourself"
        )


def _factory(module: nn.Module) -> dict[str, Any]:
    ref = next(iter([*module.parameters(recurse=False), *module.buffers(recurse=False)]), None)
    if ref is None:
        return {}
    dtype = ref.dtype if ref.is_floating_point() else None
    return {"device": ref.device, "dtype": dtype}


def _copy_grad_flags(src: nn.Module, dst: nn.Module) -> None:
    for attr in ("weight", "bias"):
        mine, theirs = getattr(src, attr, None), getattr(dst, attr, None)
        if mine is not None and theirs is not None:
            theirs.requires_grad_(mine.requires_grad)


def _take_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """``dst`` with ``src``'s state dict, ``requires_grad`` flags and training flag; returns ``dst``."""
    dst.load_state_dict(src.state_dict())
    _copy_grad_flags(src, dst)
    dst.train(src.training)
    return dst


def _carry_freeze(src: nn.Module, dst: nn.Module) -> None:
    """A frozen layer stays frozen in its new form (hooks for torch layers, switches for bnkit)."""
    stats, affine = is_frozen_stats(src), is_frozen_affine(src)
    if is_bnkit_batchnorm(dst):
        dst.freeze_stats = stats and dst.track_running_stats
        if affine:
            dst.freeze_affine = True
    else:
        if stats and getattr(dst, "running_mean", None) is not None:
            _set_stats(dst, True)
        if affine:
            _copy_grad_flags(src, dst)


def _torch_from_torch(module: nn.Module, cls: type[nn.Module], **extra: Any) -> nn.Module:
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        bias=module.bias is not None or not module.affine,
        **extra,
        **_factory(module),
    )
    return _take_state(module, new)


def _bnkit_to_torch(label: str, module: nn.Module, dim: int, strict: bool) -> nn.Module:
    """``torch.nn.BatchNorm{dim}d`` via :meth:`bnkit.BatchNorm.to_torch`; a frozen layer stays frozen."""
    try:
        new = module.to_torch(dim, strict=strict)
    except ValueError as err:
        raise ValueError(f"convert: layer {label!r}: {err}") from None
    if module.freeze_stats and module.track_running_stats:
        _set_stats(new, True)
    return new


def _to_bnkit(name: str, module: nn.Module, sync: bool, process_group: Any) -> nn.Module:
    if is_bnkit_batchnorm(module):
        return _bnkit_synced(module, process_group) if sync else module
    new = bnkit_batchnorm_class().from_torch(module)
    if sync:
        new.sync = True
        if process_group is not None or not isinstance(module, nn.SyncBatchNorm):
            new.process_group = process_group
    new.name = name or None
    _carry_freeze(module, new)
    return new


def _to_torch(name: str, module: nn.Module, dim: int | None, strict: bool) -> nn.Module:
    if type(module) in _TORCH_CLASSES.values():
        return module
    label = name or "<model>"
    if dim is None:
        raise ValueError(
            f"convert: cannot tell whether layer {label!r} needs BatchNorm1d, 2d or 3d; pass dim=1|2|3 (or a "
            "dict of layer name to dim) or example_inputs=... so the input rank is recorded"
        )
    if is_bnkit_batchnorm(module):
        return _bnkit_to_torch(label, module, dim, strict)
    new = _torch_from_torch(module, _TORCH_CLASSES[dim])
    _carry_freeze(module, new)
    return new


def _bnkit_synced(module: nn.Module, process_group: Any) -> nn.Module:
    """A copy of a bnkit layer with ``sync=True`` (a copy, so an error later leaves an in-place model as it was)."""
    if module.sync and process_group is None:
        return module
    new = copy.deepcopy(module)
    new.sync = True
    if process_group is not None or not module.sync:
        new.process_group = process_group
    return new


def _to_sync(module: nn.Module, process_group: Any) -> nn.Module:
    if is_bnkit_batchnorm(module):
        return _bnkit_synced(module, process_group)
    if isinstance(module, nn.SyncBatchNorm):
        return module
    new = _torch_from_torch(module, nn.SyncBatchNorm, process_group=process_group)
    _carry_freeze(module, new)
    return new


def _to_group(name: str, module: nn.Module, groups: int | Callable[[int], int] | None, ndim: int | None) -> nn.Module:
    label = name or "<model>"
    channels = module.num_features
    if is_bnkit_batchnorm(module) and module.axis != 1 and (ndim is None or module.axis % ndim != 1):
        raise ValueError(
            f"convert: layer {label!r} normalises channel axis {module.axis}, but GroupNorm needs channels on "
            "axis 1; permute the input or pass example_inputs=... if the axis is 1 for its input rank"
        )
    if groups is None:
        count = default_groups(channels)
    elif callable(groups):
        count = groups(channels)
    else:
        count = groups
    if not isinstance(count, int) or isinstance(count, bool) or count < 1 or channels % count:
        raise ValueError(
            f"convert: layer {label!r} has {channels} channels, which {count!r} groups do not divide; pass "
            "groups=<a divisor> or a callable channels -> groups"
        )
    affine = module.weight is not None or module.bias is not None
    new = nn.GroupNorm(
        count, channels, eps=module.eps, affine=affine, bias=module.bias is not None or not affine, **_factory(module)
    )
    if affine:
        with torch.no_grad():
            if module.weight is not None:
                new.weight.copy_(module.weight)
            else:
                # GroupNorm cannot have beta without gamma: gamma stays at its identity value, frozen.
                new.weight.requires_grad_(False)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        _copy_grad_flags(module, new)
    new.train(module.training)
    return new


def _record_ranks(model: nn.Module, modules: list[nn.Module], example_inputs: Any) -> dict[int, int]:
    """Run ``model`` once in eval mode without gradients and return ``id(module) -> input rank``."""
    ranks: dict[int, int] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            ranks.setdefault(id(module), args[0].ndim)

    with eval_run(model) as handles:
        handles.extend(m.register_forward_pre_hook(hook) for m in modules)
        call_with_example(model, example_inputs)
    return ranks


def _dims(
    model: nn.Module,
    selected: list[tuple[str, nn.Module]],
    dim: int | Mapping[str, int] | None,
    example_inputs: Any,
) -> dict[int, int]:
    """``id(module) -> 1|2|3`` from ``dim``, then ``example_inputs``, then the rank a bnkit layer last saw."""
    if dim is not None and not isinstance(dim, Mapping) and (isinstance(dim, bool) or dim not in _TORCH_CLASSES):
        raise ValueError(f"convert: dim must be 1, 2, 3 or a dict of layer name to dim; got {dim!r}")
    ranks = _record_ranks(model, [m for _, m in selected], example_inputs) if example_inputs is not None else {}
    dims: dict[int, int] = {}
    for name, module in selected:
        chosen: int | None = None
        if isinstance(dim, Mapping):
            chosen = dim.get(name)
            if chosen is not None and (isinstance(chosen, bool) or chosen not in _TORCH_CLASSES):
                raise ValueError(f"convert: dim[{name!r}] must be 1, 2 or 3; got {chosen!r}")
        elif dim is not None:
            chosen = dim
        if chosen is None and id(module) in ranks:
            chosen = _RANK_TO_DIM.get(ranks[id(module)])
        if chosen is None and is_bnkit_batchnorm(module):
            chosen = _RANK_TO_DIM.get(getattr(module, "_seen_dim", 0))
        if chosen is not None:
            dims[id(module)] = chosen
    return dims


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
    """Convert the BatchNorm layers of ``model`` (at any depth) to another form.

    Targets:

    - ``"bnkit"``: ``torch.nn`` BatchNorm1d/2d/3d and SyncBatchNorm -> ``bnkit.BatchNorm`` (exact: same outputs
      and state in train and eval; SyncBatchNorm becomes ``sync=True`` with its process group). bnkit layers are
      left as they are.
    - ``"sync"`` (alias ``"bnkit-sync"``): every BatchNorm -> ``bnkit.BatchNorm(sync=True)``: statistics merged
      exactly across ``torch.distributed`` ranks in training, on CPU (gloo) and GPU; bnkit layers keep their
      settings (Keras semantics, renorm) and gain ``sync=True``.
    - ``"torch"``: ``bnkit.BatchNorm`` and ``SyncBatchNorm`` -> ``torch.nn.BatchNorm1d/2d/3d`` (PyTorch has no
      SyncBN -> BN converter, pytorch#41081; works on CPU without a process group). The class follows the
      input rank (2-3 -> 1d, 4 -> 2d, 5 -> 3d), taken in this order: ``dim`` (an int for every layer, or a dict
      of qualified name -> dim), the rank each layer sees in one eval-mode, no-grad forward of
      ``example_inputs`` (a tensor, a tuple of positional arguments or a dict of keyword arguments), and for
      bnkit layers the rank of the last input they saw. A layer whose rank is still unknown raises. bnkit
      settings torch cannot express (channel axis other than 1, biased running variance, Keras momentum
      formula, ghost batches, renorm, sync) are refused unless ``strict=False``, which keeps inference exact
      and lets training follow PyTorch's rules; synchronisation is always dropped (that is the point).
    - ``"torch-sync"``: ``torch.nn`` BatchNorm1d/2d/3d -> ``torch.nn.SyncBatchNorm`` (CUDA only in PyTorch);
      bnkit layers stay bnkit with ``sync=True``.
    - ``"group"``: every BatchNorm -> ``torch.nn.GroupNorm(G, C, eps=eps)`` with ``G = groups`` (an int, or a
      callable ``C -> G``), by default :func:`default_groups` (the largest divisor of C that is <= 32).
      gamma and beta are copied unchanged into GroupNorm's per-channel weight and bias (with their
      ``requires_grad``; a layer without beta gets ``bias=False``, one with beta but no gamma gets a frozen
      gamma of 1); the running statistics, momentum and freeze state are discarded, since GroupNorm
      normalises each sample with its own statistics. The outputs differ from the BatchNorm's, so fine-tune
      after converting.

    Subclasses of the torch layers (and of bnkit.BatchNorm) are refused, never silently stripped of their
    extra behaviour; lazy layers must have seen an input. Hooks registered on a replaced layer do not move to
    the new layer (a warning names those layers), except bnkit's own freeze.

    Args:
        model: any module; the model itself may be a BatchNorm.
        to: one of ``"bnkit"``, ``"sync"`` (= ``"bnkit-sync"``), ``"torch"``, ``"torch-sync"``, ``"group"``.
        inplace: convert inside ``model`` instead of a deep copy. A model that is itself a BatchNorm cannot be
            replaced in place; its conversion is returned.
        layers: which BatchNorm layers (None: all; glob, type, predicate or list of names).
        dim: ``"torch"`` only: 1, 2 or 3 for every converted layer, or a dict of qualified name -> dim.
        example_inputs: ``"torch"``/``"group"``: inputs for one forward pass that records each layer's input
            rank.
        groups: ``"group"`` only: the number of groups, or a callable ``num_channels -> groups``.
        process_group: ``"sync"``/``"bnkit-sync"``/``"torch-sync"``: the process group (default: the world).
        strict: ``"torch"`` only: refuse bnkit settings torch cannot express (default) or drop them.

    Returns:
        The converted model (a new one unless ``inplace=True``).

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: unknown target, a layer that cannot be converted (named in the message), an unknown rank
            for ``"torch"``, or groups that do not divide the channels. The input model is left untouched.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SyncBatchNorm(4))
        >>> type(convert(model, "torch", dim=2)[1]).__name__
        'BatchNorm2d'
        >>> type(convert(model, "bnkit")[1]).__name__
        'BatchNorm'
        >>> convert(model, "group")[1]
        GroupNorm(4, 4, eps=1e-05, affine=True, bias=True)
    """
    check_model(model, "convert")
    if not isinstance(to, str) or to not in TARGETS:
        raise ValueError(f"convert: to must be one of {', '.join(TARGETS)}; got {to!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"convert: inplace must be True or False, got {inplace!r}")
    if groups is not None and to != "group":
        raise ValueError(f"convert: groups= only applies to to='group', not to={to!r}")
    if dim is not None and to != "torch":
        raise ValueError(f"convert: dim= only applies to to='torch', not to={to!r}")

    # Check every selected layer on the original before copying or touching anything.
    for name, module in select_batchnorms(model, layers, "convert"):
        _check_convertible(name, module, to)

    result = copy_unless_inplace(model, inplace)
    selected = select_batchnorms(result, layers, "convert")
    dims: dict[int, int] = {}
    if to in ("torch", "group") and (example_inputs is not None or dim is not None or to == "torch"):
        dims = _dims(result, selected, dim if to == "torch" else None, example_inputs)

    # Build every replacement first, so an error leaves even an in-place model unchanged.
    replacements: dict[int, nn.Module] = {}
    for name, module in selected:
        if to in ("bnkit", "sync", "bnkit-sync"):
            new = _to_bnkit(name, module, to != "bnkit", process_group)
        elif to == "torch":
            new = _to_torch(name, module, dims.get(id(module)), strict)
        elif to == "torch-sync":
            new = _to_sync(module, process_group)
        else:
            rank = {1: 3, 2: 4, 3: 5}.get(dims.get(id(module), 0))
            new = _to_group(name, module, groups, rank)
        if new is not module:
            replacements[id(module)] = new

    dropped = [
        name or "<model>"
        for name, module in selected
        if id(module) in replacements
        and type(replacements[id(module)]) is not type(module)
        and has_foreign_hooks(module)
    ]
    if dropped:
        warnings.warn(
            f"convert: hooks registered on {', '.join(dropped)} were not carried over to the converted layers; "
            "register them again on the returned model",
            UserWarning,
            stacklevel=2,
        )
    return replace_modules(result, replacements)
