"""Watch BatchNorm statistics while training: :class:`Monitor` (JSONL/TensorBoard logs, alerts) and :func:`plot`.

Example:
    >>> import torch
    >>> from bnkit.monitor import Monitor
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train()
    >>> with Monitor(model) as monitor:
    ...     _ = model(torch.randn(8, 3))
    >>> monitor.last["1"]["channels"]
    4
"""

from bnkit.monitor.monitor import JSONL_NAME, QUANTITIES, Alert, Monitor, MonitorWarning, Thresholds, read_log
from bnkit.monitor.plot import plot

__all__ = ["JSONL_NAME", "QUANTITIES", "Alert", "Monitor", "MonitorWarning", "Thresholds", "plot", "read_log"]
