"""``bnkit study``: should I freeze BatchNorm when fine-tuning? Measured, rerunnable, on a laptop CPU.

The default run pre-trains a small BatchNorm network on scikit-learn's bundled digits, adapts it to shifted
target domains under six fine-tuning policies, trains from scratch at small batch sizes with BatchNorm,
GroupNorm, Batch Renormalization and ghost batches, checks ``bnkit.fuse`` and grounds ``bnkit.shift``'s
thresholds; it writes ``results.json``, ``report.md`` and PNG plots. It uses bnkit's public API only.
``run_keras_study`` runs the fine-tuning study with Keras 3 (``bnkit study --framework keras``), scoring every
policy with Keras's default moving statistics and with exact ones.

Example:
    >>> from bnkit.study import StudyConfig, run_study
    >>> cfg = StudyConfig.quick_config(seeds=(0,), domains=("contrast",), policies=("source",),
    ...                                batch_sizes=(), fuse=False, source_epochs=1)
    >>> run_study(cfg, out=None, progress=False)["summary"]["finetune"]["contrast"]["source"]["n"]
    1
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bnkit import _lazy

_EXPORTS: dict[str, str] = {
    "StudyConfig": "bnkit.study.experiments",
    "FinetuneSettings": "bnkit.study.policies",
    "POLICIES": "bnkit.study.policies",
    "DOMAINS": "bnkit.study.data",
    "run_study": "bnkit.study.run",
    "run_custom_study": "bnkit.study.custom",
    "KerasStudyConfig": "bnkit.study.keras_study",
    "run_keras_study": "bnkit.study.keras_study",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from bnkit.study.data import DOMAINS  # noqa: F401
    from bnkit.study.experiments import StudyConfig  # noqa: F401
    from bnkit.study.keras_study import KerasStudyConfig, run_keras_study  # noqa: F401
    from bnkit.study.policies import POLICIES, FinetuneSettings  # noqa: F401
    from bnkit.study.run import run_study  # noqa: F401
