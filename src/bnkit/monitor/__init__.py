"""Watch BatchNorm statistics while training: :class:`Monitor` (JSONL/TensorBoard logs, alerts) and :func:`plot`.

``Monitor`` (torch) is imported on first use, so ``from bnkit.monitor import plot, read_log`` works without torch
(for logs of ``bnkit.keras.Monitor``).

Example:
    >>> import torch
    >>> from bnkit.monitor import Monitor
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train()
    >>> with Monitor(model) as monitor:
    ...     _ = model(torch.randn(8, 3))
    >>> monitor.last["1"]["channels"]
    4
"""

from bnkit import _lazy
from bnkit.monitor.plot import plot
from bnkit.shared.alerts import Alert, MonitorWarning, Thresholds
from bnkit.shared.monitor_log import JSONL_NAME, QUANTITIES, read_log

__all__ = ["JSONL_NAME", "QUANTITIES", "Alert", "Monitor", "MonitorWarning", "Thresholds", "plot", "read_log"]

__getattr__, __dir__ = _lazy.lazy_exports(__name__, {"Monitor": "bnkit.monitor.monitor"}, globals())
