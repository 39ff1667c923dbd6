"""bnkit.transfer: verified weight transfer between a Keras 3 model and its PyTorch twin, either way.

:func:`transfer_weights` copies (every layout rule of the Keras <-> PyTorch table), :func:`verify_transfer`
checks a port layer by layer in inference and in one training step and names the first layer that diverges
and why. Keras and torch are imported inside the functions.

Example:
    >>> import bnkit.transfer
    >>> sorted(bnkit.transfer.__all__)
    ['LayerCheck', 'TransferReport', 'transfer_weights', 'verify_transfer']
"""

from __future__ import annotations

from bnkit.transfer.port import transfer_weights, verify_transfer
from bnkit.transfer.report import LayerCheck, TransferReport

__all__ = ["LayerCheck", "TransferReport", "transfer_weights", "verify_transfer"]
