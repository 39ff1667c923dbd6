"""bnkit: BatchNorm that behaves the way people think it does.

The public API is re-exported here and imported lazily, so ``import bnkit`` stays fast and optional extras
(rich, tensorboard, matplotlib, scikit-learn) are only imported by the features that need them.

Example:
    >>> import bnkit, torch
    >>> bn = bnkit.BatchNorm(8)
    >>> bn(torch.randn(4, 8, 5, 5)).shape
    torch.Size([4, 8, 5, 5])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bnkit import _lazy

__version__ = "0.1.0"

# public name -> module that defines it (one concept per module; see docs/architecture.md)
_EXPORTS: dict[str, str] = {
    "BatchNorm": "bnkit.layers.batchnorm",
    "BatchNormAct": "bnkit.layers.batchnorm_act",
    "Renorm": "bnkit.layers.renorm",
    "is_batchnorm": "bnkit.layers.find",
    "named_batchnorms": "bnkit.layers.find",
    "BatchNormInfo": "bnkit.layers.kinds",
    "describe_batchnorm": "bnkit.layers.kinds",
    "named_batchnorm_like": "bnkit.layers.kinds",
    "register_batchnorm": "bnkit.layers.kinds",
    "unregister_batchnorm": "bnkit.layers.kinds",
    "freeze": "bnkit.tools.freeze",
    "unfreeze": "bnkit.tools.freeze",
    "convert": "bnkit.tools.convert",
    "convert_with_report": "bnkit.tools.convert",
    "ConvertReport": "bnkit.tools.convert",
    "fuse": "bnkit.tools.fuse",
    "fuse_with_report": "bnkit.tools.fuse",
    "FuseReport": "bnkit.tools.fuse",
    "FreezeReport": "bnkit.tools.freeze",
    "is_frozen_stats": "bnkit.tools.freeze",
    "is_frozen_affine": "bnkit.tools.freeze",
    "recalibrate": "bnkit.tools.recalibrate",
    "RecalibrationReport": "bnkit.tools.recalibrate",
    "sync_running_stats": "bnkit.tools.sync_stats",
    "read_checkpoint": "bnkit.tools.checkpoint",
    "load_weights": "bnkit.tools.checkpoint",
    "check_weights": "bnkit.tools.checkpoint",
    "UntrustedFileError": "bnkit.tools.checkpoint",
    "WeightsMismatchError": "bnkit.tools.checkpoint",
    "explain": "bnkit.inspection.explain",
    "summary": "bnkit.inspection.summary",
    "doctor": "bnkit.inspection.doctor",
    "shift": "bnkit.inspection.shift",
    "Monitor": "bnkit.monitor.monitor",
    "plot": "bnkit.monitor.plot",
    "transfer_weights": "bnkit.transfer.port",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # static re-exports for type checkers and IDEs
    from bnkit.layers.batchnorm import BatchNorm as BatchNorm
    from bnkit.layers.batchnorm_act import BatchNormAct as BatchNormAct
    from bnkit.layers.find import is_batchnorm as is_batchnorm
    from bnkit.layers.find import named_batchnorms as named_batchnorms
    from bnkit.layers.kinds import BatchNormInfo as BatchNormInfo
    from bnkit.layers.kinds import describe_batchnorm as describe_batchnorm
    from bnkit.layers.kinds import named_batchnorm_like as named_batchnorm_like
    from bnkit.layers.kinds import register_batchnorm as register_batchnorm
    from bnkit.layers.kinds import unregister_batchnorm as unregister_batchnorm
    from bnkit.layers.renorm import Renorm as Renorm
