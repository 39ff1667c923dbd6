"""The fine-tuning policies the study compares, written with bnkit's public API only.

=================== =====================================================================================
key                 what it does
=================== =====================================================================================
source              the source model untouched (baseline)
head                1. head only, BN in inference mode (Keras transfer-learning guide, first stage):
                    ``bnkit.freeze(model)``, every other parameter frozen, the head trains
all_bn_frozen       2. all layers train, BN kept in inference mode (Keras guide when unfreezing):
                    ``bnkit.freeze(model)`` (statistics and gamma/beta), convolutions and head train
all                 3. all layers train, BN in training mode (what a plain ``model.train()`` does)
bn_only             4. BN layers only (statistics, gamma and beta), everything else frozen (the Stack
                    Overflow recipe): ``requires_grad=False`` outside BN, BN in training mode
recalibrate         5. recalibration only (AdaBN): ``bnkit.recalibrate(model, target_images)``, no gradient step
recalibrate_head    6. recalibration, then head only as in policy 1
=================== =====================================================================================

Every policy starts from a deep copy of the source model and returns the adapted copy in eval mode.

Example:
    >>> list(POLICIES)[:3]
    ['source', 'head', 'all_bn_frozen']
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from bnkit.study.catalog import POLICY_INFO, FinetuneSettings, resolve_policy
from bnkit.study.data import Dataset
from bnkit.study.train import batches, train

__all__ = ["POLICIES", "FinetuneSettings", "Policy", "apply_policy", "recalibration_batches", "resolve_policy"]


@dataclass(frozen=True)
class Policy:
    """One way of adapting a source model to a target domain.

    Example:
        >>> POLICIES["recalibrate"].number
        5
    """

    key: str
    number: int
    title: str
    description: str
    trains: bool
    apply: Callable[[nn.Module, Dataset, FinetuneSettings, int], nn.Module]


def recalibration_batches(data: Dataset, batch_size: int) -> list:
    """The target images (no labels) as a list of batches for :func:`bnkit.recalibrate`.

    Example:
        >>> import torch
        >>> [b.shape[0] for b in recalibration_batches(Dataset(torch.zeros(5, 1, 8, 8), torch.zeros(5)), 2)]
        [2, 2, 1]
    """
    return [x for x, _ in batches(data, batch_size)]


def _head_module(model: nn.Module, head: str) -> nn.Module:
    try:
        return model.get_submodule(head)
    except AttributeError as exc:
        names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
        raise ValueError(
            f"model has no module named {head!r} to use as the head; pass one of: {', '.join(names[-5:])}"
        ) from exc


def _only_trainable(model: nn.Module, modules: list[nn.Module]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)


def _source(model: nn.Module, data: Dataset, cfg: FinetuneSettings, seed: int) -> nn.Module:
    return model


def _head(model: nn.Module, data: Dataset, cfg: FinetuneSettings, seed: int) -> nn.Module:
    import bnkit

    _only_trainable(model, [_head_module(model, cfg.head)])
    bnkit.freeze(model)
    return train(model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)


def _all_bn_frozen(model: nn.Module, data: Dataset, cfg: FinetuneSettings, seed: int) -> nn.Module:
    import bnkit

    for p in model.parameters():
        p.requires_grad_(True)
    bnkit.freeze(model)
    return train(model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)


def _all(model: nn.Module, data: Dataset, cfg: FinetuneSettings, seed: int) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return train(model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)


def _bn_only(model: nn.Module, data: Dataset, cfg: FinetuneSettings, seed: int) -> nn.Module:
    import bnkit

    _only_trainable(model, [m for _, m in bnkit.named_batchnorms(model)])
    # explicit: whatever the source model's freeze state, BN normalises with batch statistics and learns
    bnkit.unfreeze(model)
    return train(model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)


def _recalibrate(model: nn.Module, data: Dataset, cfg: FinetuneSettings, seed: int) -> nn.Module:
    import bnkit

    bnkit.recalibrate(model, recalibration_batches(data, cfg.recalibration_batch_size), progress=False)
    return model.eval()


def _recalibrate_head(model: nn.Module, data: Dataset, cfg: FinetuneSettings, seed: int) -> nn.Module:
    return _head(_recalibrate(model, data, cfg, seed), data, cfg, seed)


#: Every policy by key, in the order of the issue (source baseline first); names and titles from
#: :data:`bnkit.study.catalog.POLICY_INFO`.
_IMPLEMENTATIONS: dict[str, Callable[[nn.Module, Dataset, FinetuneSettings, int], nn.Module]] = {
    "source": _source,
    "head": _head,
    "all_bn_frozen": _all_bn_frozen,
    "all": _all,
    "bn_only": _bn_only,
    "recalibrate": _recalibrate,
    "recalibrate_head": _recalibrate_head,
}
POLICIES: dict[str, Policy] = {
    key: Policy(info.key, info.number, info.title, info.description, info.trains, _IMPLEMENTATIONS[key])
    for key, info in POLICY_INFO.items()
}


def apply_policy(
    policy: str, source_model: nn.Module, data: Dataset, settings: FinetuneSettings, seed: int
) -> nn.Module:
    """Adapt a deep copy of ``source_model`` to ``data`` with ``policy``; the source model is untouched.

    Args:
        policy: a key of :data:`POLICIES` or its number (``"5"``).
        source_model: the pretrained model.
        data: labelled target-training data (the recalibration policies use only its images).
        settings: fine-tuning settings.
        seed: shuffling seed of the training loop.

    Returns:
        The adapted copy, in eval mode.

    Raises:
        ValueError: unknown policy.

    Example:
        >>> from bnkit.study.model import DigitsNet
        >>> import torch
        >>> src = DigitsNet()
        >>> ds = Dataset(torch.rand(8, 1, 8, 8), torch.arange(8))
        >>> apply_policy("source", src, ds, FinetuneSettings(), 0) is not src
        True
    """
    key = resolve_policy(policy)
    model = copy.deepcopy(source_model)
    return POLICIES[key].apply(model, data, settings, seed).eval()
