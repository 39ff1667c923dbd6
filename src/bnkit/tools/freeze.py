"""Freeze BatchNorm layers in a way that survives ``model.train()``: statistics, affine parameters, or both.

A frozen layer behaves like Keras's ``trainable=False``: it normalises with its running statistics, never
updates them, and (with ``affine=True``) its gamma/beta receive no gradient. PyTorch has no such notion:
``.eval()`` is undone by a parent's ``.train()`` and ``requires_grad=False`` does not stop the running
statistics from moving (pytorch#66073). bnkit freezes each kind of layer without changing its type or its
state dict keys, so checkpoints still load into the original architecture:

- ``bnkit.BatchNorm``: the layer's own ``freeze_stats`` / ``freeze_affine`` switches.
- ``torch.nn`` BatchNorm1d/2d/3d, SyncBatchNorm and subclasses: frozen statistics are a pair of small,
  picklable forward hooks that run the layer in inference mode for the duration of its forward call and then
  put its ``training`` flag back, so ``model.train()`` and ``model.eval()`` keep working on everything else;
  a frozen affine is ``requires_grad=False`` on ``weight`` and ``bias``. Both survive ``copy.deepcopy`` and
  ``torch.save(model)``. :func:`is_frozen_stats` and :func:`is_frozen_affine` tell whether a layer is frozen.

Four states result from the two switches (stats, affine): train (neither), Keras ``trainable=False`` (both),
frozen statistics only (``freeze(model, affine=False)``), adapting statistics with fixed gamma/beta
(``freeze(model, stats=False)``, AdaBN-style fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from bnkit.layers.find import LayerSelector
from bnkit.layers.kinds import BatchNormInfo, describe_batchnorm
from bnkit.tools.model_edit import (
    affine_params,
    check_model,
    is_bnkit_batchnorm,
    select_batchnorm_like,
)

__all__ = [
    "FreezeReport",
    "freeze",
    "has_foreign_hooks",
    "is_frozen_affine",
    "is_frozen_stats",
    "unfreeze",
]


@dataclass(frozen=True)
class FreezeReport:
    """What :func:`freeze` or :func:`unfreeze` did, layer by layer (qualified names; ``""`` is the model).

    Attributes:
        changed: layers whose state changed.
        unchanged: selected layers that were already in the requested state.
        skipped: layers where nothing requested applies, with the reason (no running statistics, no affine).

    Iterating over a report, or taking its ``len``, goes over ``changed``.

    Example:
        >>> import torch
        >>> report = freeze(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
        >>> report.changed, list(report)
        (('0',), ['0'])
    """

    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Any:
        return iter(self.changed)

    def __len__(self) -> int:
        return len(self.changed)

    def __str__(self) -> str:
        lines = [f"changed: {', '.join(self.changed) or 'none'}"]
        if self.unchanged:
            lines.append(f"already in that state: {', '.join(self.unchanged)}")
        lines.extend(f"skipped {name}: {reason}" for name, reason in self.skipped.items())
        return "\n".join(lines)


class _FrozenStatsPreHook:
    """Forward pre-hook that runs a ``torch.nn`` BatchNorm in inference mode for one call.

    A plain class (not a closure) so that ``copy.deepcopy`` and pickling of the whole model keep it.
    ``enabled`` lets :func:`bnkit.recalibrate` suspend the freeze without removing and re-adding hooks
    (which would change their order). ``bnkit_freezes_stats`` is how :func:`bnkit.layers.kinds.describe_batchnorm`
    (a lower layer, which cannot import this module) recognises the hook.
    """

    bnkit_freezes_stats = True

    def __init__(self) -> None:
        self.enabled = True
        self.saved: bool | None = None

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not self.enabled:
            return
        self.saved = module.training
        module.training = False


class _FrozenStatsPostHook:
    """Forward hook (registered with ``always_call=True``) that puts back the flag the pre-hook changed."""

    def __init__(self, pre: _FrozenStatsPreHook) -> None:
        self.pre = pre

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.pre.saved is not None:
            module.training = self.pre.saved
            self.pre.saved = None


class _NotScriptable:
    """Set as ``__prepare_scriptable__`` on a torch BatchNorm frozen with hooks: ``torch.jit.script`` calls it
    before compiling, so the refusal is one line naming the layer instead of TorchScript's error about the hook
    object (TorchScript cannot compile Python hooks). A class, not a closure, so frozen models still pickle."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> nn.Module:
        raise RuntimeError(
            f"bnkit.freeze: layer {self.name!r} is frozen with forward hooks, which torch.jit.script cannot compile "
            "(TorchScript is deprecated in torch 2.x): use torch.export.export(model, args) or "
            "torch.compile(model), or bnkit.fuse(model.eval()) for deployment"
        )


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def has_foreign_hooks(module: nn.Module) -> bool:
    """True when ``module`` carries hooks other than bnkit's own freeze hooks.

    Tools that replace or remove a layer (convert, fuse) use it: foreign hooks would silently stop firing,
    while the freeze hooks are bnkit's and are carried over (or are no-ops in eval).

    Example:
        >>> bn = nn.BatchNorm2d(3); _ = freeze(nn.Sequential(bn)); has_foreign_hooks(bn)
        False
        >>> _ = bn.register_forward_hook(lambda *args: None); has_foreign_hooks(bn)
        True
    """
    mine = {key for _, key in _freeze_hooks(module)}
    for attr in _HOOK_DICTS:
        hooks = getattr(module, attr, None) or {}
        if any(key not in mine for key in hooks):
            return True
    return False


def _freeze_hooks(module: nn.Module) -> list[tuple[dict, int]]:
    """(hook dict, key) of every freeze hook installed on ``module``."""
    found = []
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key, hook in hooks.items():
            if isinstance(hook, (_FrozenStatsPreHook, _FrozenStatsPostHook)):
                found.append((hooks, key))
    return found


def frozen_stats_hook(module: nn.Module) -> _FrozenStatsPreHook | None:
    """The freeze pre-hook of a ``torch.nn`` BatchNorm, or None (used by recalibrate to suspend the freeze).

    Example:
        >>> frozen_stats_hook(nn.BatchNorm1d(2)) is None
        True
    """
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _FrozenStatsPreHook):
            return hook
    return None


def is_frozen_stats(module: nn.Module) -> bool:
    """True when a BatchNorm layer's statistics are frozen (inference-mode normalisation, no updates).

    For ``bnkit.BatchNorm`` this is its ``freeze_stats`` switch; for ``torch.nn`` BatchNorm layers it means
    :func:`freeze` installed its hooks; a layer whose class fixes its statistics (FrozenBatchNorm2d) always is.
    A layer in ``eval()`` mode is not frozen: the next ``train()`` undoes it.

    Example:
        >>> bn = nn.BatchNorm2d(3)
        >>> _ = freeze(bn, affine=False)
        >>> is_frozen_stats(bn), bn.train().training, is_frozen_stats(bn)
        (True, True, True)
    """
    if is_bnkit_batchnorm(module):
        return bool(module.freeze_stats)
    if frozen_stats_hook(module) is not None:
        return True
    info = describe_batchnorm(module)
    return info is not None and info.fixed


def is_frozen_affine(module: nn.Module) -> bool:
    """True when a BatchNorm layer's gamma and beta are frozen (for torch layers: none requires grad).

    A layer without affine parameters (``affine=False``) is never reported as frozen.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> _ = freeze(bn, stats=False)
        >>> is_frozen_affine(bn), bn.weight.requires_grad
        (True, False)
    """
    if is_bnkit_batchnorm(module):
        return bool(module.freeze_affine) and bool(affine_params(module))
    params = affine_params(module).values()
    return bool(params) and not any(p.requires_grad for p in params)


def _set_stats(module: nn.Module, frozen: bool, name: str = "") -> bool:
    """Put the statistics switch in the requested state; True when something changed."""
    if is_bnkit_batchnorm(module):
        if bool(module.freeze_stats) == frozen:
            return False
        module.freeze_stats = frozen
        return True
    hooks = _freeze_hooks(module)
    if frozen:
        if frozen_stats_hook(module) is not None:
            return False
        pre = _FrozenStatsPreHook()
        # Prepended so later pre-hooks (monitors, user hooks) already see the effective mode.
        module.register_forward_pre_hook(pre, prepend=True)
        module.register_forward_hook(_FrozenStatsPostHook(pre), always_call=True)
        module.__dict__["__prepare_scriptable__"] = _NotScriptable(name or type(module).__name__)
        return True
    if not hooks:
        return False
    for hooks_dict, key in hooks:
        del hooks_dict[key]
        module._forward_hooks_always_called.pop(key, None)
    module.__dict__.pop("__prepare_scriptable__", None)
    return True


def _affine_of(info: BatchNormInfo) -> list[nn.Parameter]:
    """gamma/beta parameters of a layer (buffers, as in FrozenBatchNorm2d, never train and are left out)."""
    return [p for p in (info.weight, info.bias) if isinstance(p, nn.Parameter)]


def _set_affine(module: nn.Module, frozen: bool, params: list[nn.Parameter]) -> bool:
    """Put gamma/beta in the requested state; True when something changed."""
    changed = any(p.requires_grad == frozen for p in params)
    if is_bnkit_batchnorm(module):
        changed = changed or bool(module.freeze_affine) != frozen
        # The layer's own setter also sets requires_grad and detaches gamma/beta in forward.
        module.freeze_affine = frozen
    for param in params:
        param.requires_grad_(not frozen)
        if frozen and changed:
            # A stale gradient would still move a frozen parameter in optimizers with momentum.
            param.grad = None
    return changed


def _apply(model: nn.Module, stats: bool, affine: bool, layers: LayerSelector, frozen: bool) -> FreezeReport:
    tool = "freeze" if frozen else "unfreeze"
    check_model(model, tool)
    for flag_name, flag in (("stats", stats), ("affine", affine)):
        if not isinstance(flag, bool):
            raise TypeError(f"{tool}: {flag_name} must be True or False, got {flag!r}")
    if not stats and not affine:
        raise ValueError(f"{tool}: stats=False and affine=False select nothing to {tool}; set one to True")
    selected = select_batchnorm_like(model, layers, tool)

    # Decide everything first so that a layer that cannot be handled leaves the model untouched.
    plan: list[tuple[str, nn.Module, bool, list[nn.Parameter]]] = []
    skipped: dict[str, str] = {}
    for name, info in selected:
        module = info.module
        if info.fixed:
            skipped[name] = f"{type(module).__name__} fixes its statistics and gamma/beta by class: always frozen" + (
                "" if frozen else "; rebuild it as a trainable BatchNorm to unfreeze it"
            )
            continue
        params = _affine_of(info)
        do_stats = stats and info.has_running_stats
        do_affine = affine and bool(params)
        if not do_stats and not do_affine:
            reasons = []
            if stats:
                reasons.append("no running statistics (track_running_stats=False): it always uses batch statistics")
            if affine:
                reasons.append("no gamma/beta (affine=False)")
            skipped[name] = "; ".join(reasons)
            continue
        plan.append((name, module, do_stats, params if do_affine else []))

    changed: list[str] = []
    unchanged: list[str] = []
    for name, module, do_stats, params in plan:
        stats_changed = _set_stats(module, frozen, name) if do_stats else False
        affine_changed = _set_affine(module, frozen, params) if params else False
        (changed if stats_changed or affine_changed else unchanged).append(name)
    return FreezeReport(tuple(changed), tuple(unchanged), skipped)


def freeze(model: nn.Module, stats: bool = True, affine: bool = True, layers: LayerSelector = None) -> FreezeReport:
    """Freeze BatchNorm layers in place, in a way that survives ``model.train()``.

    ``freeze(model)`` is Keras's ``trainable=False``: the selected layers normalise with their running
    statistics in training and in inference, never update them (``num_batches_tracked`` included), and their
    gamma/beta get ``requires_grad=False`` (any stored ``.grad`` is cleared, so optimizers with momentum do
    not move them either). ``freeze(model, affine=False)`` freezes only the statistics (gamma/beta still
    learn); ``freeze(model, stats=False)`` only fixes gamma/beta, so the statistics keep adapting in training
    mode. An aspect that is not asked for is left as it is. Layer types and state dict keys do not change.

    Every BatchNorm kind bnkit recognises is handled (:func:`bnkit.named_batchnorm_like`): timm's
    BatchNormAct2d and SyncBatchNormAct are frozen like ``torch.nn`` layers (their activation is untouched),
    classes taught with :func:`bnkit.register_batchnorm` too (their forward must follow ``module.training``).
    Layers whose class already fixes the statistics (torchvision's and timm's FrozenBatchNorm2d,
    FrozenBatchNormAct2d, look-alikes) are reported under ``skipped``. Layers without running statistics
    (``track_running_stats=False``) always use batch statistics: freezing their statistics does not apply and
    they are reported under ``skipped`` (likewise gamma/beta of layers with ``affine=False``). A model with no
    BatchNorm bnkit recognises gives a warning naming the modules with running statistics it does not know.

    Args:
        model: any module; BatchNorm layers are found at any depth (the model itself may be one).
        stats: freeze the running statistics (inference-mode normalisation).
        affine: freeze gamma and beta.
        layers: which BatchNorm layers: None (all), a glob on the qualified name, a type, a predicate
            ``(name, module) -> bool`` or a list of names/globs. A selector that matches no layer raises.

    Returns:
        A :class:`FreezeReport` naming the layers that changed, those already frozen, and those skipped.

    Raises:
        TypeError: ``model`` is not a module, or a flag is not a bool.
        ValueError: nothing to freeze (both flags False) or ``layers`` matches no BatchNorm.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> freeze(model).changed
        ('1',)
        >>> before = model[1].running_mean.clone()
        >>> _ = model.train()(torch.randn(2, 3, 5, 5))
        >>> torch.equal(model[1].running_mean, before)
        True
    """
    return _apply(model, stats, affine, layers, frozen=True)


def unfreeze(model: nn.Module, stats: bool = True, affine: bool = True, layers: LayerSelector = None) -> FreezeReport:
    """Undo :func:`freeze` in place: statistics follow the training flag again, gamma/beta require grad.

    ``unfreeze(model, stats=True)`` removes bnkit's freeze hooks (or clears ``freeze_stats``);
    ``affine=True`` sets ``requires_grad=True`` on gamma and beta (and clears ``freeze_affine``). Arguments
    and report as in :func:`freeze`.

    Args:
        model: any module containing BatchNorm layers.
        stats: unfreeze the running statistics.
        affine: make gamma and beta trainable again.
        layers: which BatchNorm layers (see :func:`freeze`).

    Returns:
        A :class:`FreezeReport` naming the layers that changed.

    Raises:
        TypeError: ``model`` is not a module, or a flag is not a bool.
        ValueError: nothing to unfreeze (both flags False) or ``layers`` matches no BatchNorm.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(4))
        >>> _ = freeze(model)
        >>> unfreeze(model).changed, model[0].weight.requires_grad
        (('0',), True)
    """
    return _apply(model, stats, affine, layers, frozen=False)
