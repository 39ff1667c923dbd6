"""Framework-free facts of the study: domain names, the negative control and the policies' numbers and titles.

The PyTorch study (:mod:`bnkit.study.policies`, :mod:`bnkit.study.data`) and the Keras study
(:mod:`bnkit.study.keras_policies`, :mod:`bnkit.study.keras_data`) both read them from here, and so does the
report (:mod:`bnkit.study.report`), which therefore imports no deep-learning framework.

Example:
    >>> POLICY_INFO["all"].title
    'all layers, BN training'
    >>> DOMAIN_NAMES
    ('contrast', 'blur', 'noise', 'invert')
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BATCH_NORMS",
    "DOMAIN_NAMES",
    "NEGATIVE_CONTROLS",
    "POLICY_INFO",
    "FinetuneSettings",
    "PolicyInfo",
    "check_design",
    "policy_title",
    "resolve_policy",
]

#: Target domains in the order they are reported (what each shift does: :mod:`bnkit.study.data`).
DOMAIN_NAMES: tuple[str, ...] = ("contrast", "blur", "noise", "invert")

#: Norms of the batch-size experiment. ``batch_precise`` is not trained separately: it is the ``batch`` model
#: with its running statistics recomputed over the training set by ``bnkit.recalibrate`` (precise BN).
BATCH_NORMS: dict[str, str] = {
    "batch": "BatchNorm",
    "batch_precise": "BatchNorm + precise statistics",
    "group": "GroupNorm",
    "renorm": "Batch Renorm",
    "ghost": "Ghost BatchNorm",
}

#: Domains that recalibration is not expected to fix (used by the report to word the conclusion).
NEGATIVE_CONTROLS: frozenset[str] = frozenset({"invert"})


@dataclass(frozen=True)
class PolicyInfo:
    """What a fine-tuning policy is called, whichever framework runs it.

    Example:
        >>> PolicyInfo("source", 0, "source model", "baseline", False).number
        0
    """

    key: str
    number: int
    title: str
    description: str
    trains: bool


#: Every policy by key, in the order of the issue (source baseline first).
POLICY_INFO: dict[str, PolicyInfo] = {
    p.key: p
    for p in [
        PolicyInfo("source", 0, "source model", "the source model untouched (baseline)", False),
        PolicyInfo("head", 1, "head only, BN frozen", "head only, BN in inference mode (Keras guide)", True),
        PolicyInfo(
            "all_bn_frozen",
            2,
            "all layers, BN frozen",
            "all layers train, BN kept in inference mode (Keras guide when unfreezing)",
            True,
        ),
        PolicyInfo(
            "all", 3, "all layers, BN training", "all layers train, BN in training mode (plain model.train())", True
        ),
        PolicyInfo(
            "bn_only",
            4,
            "BN layers only",
            "BN statistics and gamma/beta train, everything else frozen (Stack Overflow recipe)",
            True,
        ),
        PolicyInfo(
            "recalibrate",
            5,
            "recalibrate (AdaBN)",
            "BN statistics recomputed on target images with bnkit.recalibrate, no gradient step",
            False,
        ),
        PolicyInfo(
            "recalibrate_head",
            6,
            "recalibrate + head",
            "bnkit.recalibrate, then head only with BN in inference mode",
            True,
        ),
    ]
}


def policy_title(policy: str) -> str:
    """``"[n] title"`` of a policy key (the plain title for the source model; unknown keys as they are).

    Example:
        >>> policy_title("all"), policy_title("source"), policy_title("mine")
        ('[3] all layers, BN training', 'source model', 'mine')
    """
    p = POLICY_INFO.get(policy)
    if p is None:
        return policy
    return f"[{p.number}] {p.title}" if p.number else p.title


@dataclass(frozen=True)
class FinetuneSettings:
    """How the gradient-based policies train on the labelled target split.

    Attributes:
        epochs: passes over the target-training split.
        batch_size: samples per step.
        lr: Adam learning rate.
        head: qualified name of the classification head (policies 1 and 6 train only it).
        recalibration_batch_size: batch size when feeding target images to ``bnkit.recalibrate``; the
            precise population statistics do not depend on it.

    Example:
        >>> FinetuneSettings(epochs=5).batch_size
        32
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    head: str = "head"
    recalibration_batch_size: int = 64


def resolve_policy(policy: str) -> str:
    """The key of ``policy`` given as a key or as its number.

    Example:
        >>> resolve_policy("4"), resolve_policy("bn_only")
        ('bn_only', 'bn_only')
    """
    if policy in POLICY_INFO:
        return policy
    for key, p in POLICY_INFO.items():
        if str(p.number) == str(policy).strip():
            return key
    raise ValueError(f"unknown policy {policy!r}: choose from {', '.join(POLICY_INFO)} (or their numbers 0-6)")


def check_design(
    seeds: tuple[int, ...], domains: tuple[str, ...], policies: tuple[str, ...], sizes: dict[str, int]
) -> tuple[str, ...]:
    """The checks both studies make of their design; returns the policies as keys (numbers resolved, deduplicated).

    Raises:
        ValueError: no seed, an unknown domain or policy, or a size (``sizes``: name -> value) below 1.

    Example:
        >>> check_design((0,), ("blur",), ("3", "all"), {"finetune.epochs": 30})
        ('all',)
    """
    if not seeds:
        raise ValueError("bnkit study: give at least one seed (e.g. --seeds 0 1 2)")
    unknown = [d for d in domains if d not in DOMAIN_NAMES]
    if unknown:
        raise ValueError(f"bnkit study: unknown domain(s) {', '.join(unknown)}; choose from {', '.join(DOMAIN_NAMES)}")
    resolved = tuple(dict.fromkeys(resolve_policy(p) for p in policies))
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"bnkit study: {name} must be >= 1, got {value}")
    return resolved
