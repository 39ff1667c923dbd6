"""No default forward of ``bnkit.BatchNorm`` reads a tensor on the host (train and eval, every mode).

A host read (``.item()``, ``bool(t)``, ``float(t)``) stalls a GPU pipeline once per layer per step and breaks
``torch.compile`` graphs. The count is taken at the dispatcher, where every such read becomes
``aten._local_scalar_dense`` (or ``is_nonzero`` / ``equal``), so nothing slips past.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bnkit

_SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.item.default,
}


class HostReads(TorchDispatchMode):
    """Counts operators that copy a tensor's value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _mask(x: torch.Tensor) -> torch.Tensor:
    mask = torch.rand(x.shape[0], x.shape[2], generator=torch.Generator().manual_seed(0)) > 0.3
    mask[0] = True
    return mask


MODES: dict[str, tuple[Callable[[], bnkit.BatchNorm], tuple[int, ...], bool]] = {
    "default": (lambda: bnkit.BatchNorm(4), (8, 4, 3, 3), False),
    "momentum-None": (lambda: bnkit.BatchNorm(4, momentum=None), (8, 4, 3, 3), False),
    "keras": (lambda: bnkit.BatchNorm.from_keras(4), (8, 3, 3, 4), False),
    "keras-renorm": (lambda: bnkit.BatchNorm.from_keras(4, renorm=True), (8, 3, 3, 4), False),
    "ghost": (lambda: bnkit.BatchNorm(4, virtual_batch_size=2), (8, 4, 3, 3), False),
    "mask": (lambda: bnkit.BatchNorm(4), (8, 4, 5), True),
    "renorm": (lambda: bnkit.BatchNorm(4, renorm=bnkit.Renorm.paper()), (8, 4, 3, 3), False),
    "no-running-stats": (lambda: bnkit.BatchNorm(4, track_running_stats=False), (8, 4, 3, 3), False),
    "channels-last-axis": (lambda: bnkit.BatchNorm(4, axis=-1), (8, 3, 4), False),
    "biased-var": (lambda: bnkit.BatchNorm(4, unbiased_running_var=False), (8, 4, 3, 3), False),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_forward_reads_nothing_on_the_host(mode: str, training: bool) -> None:
    make, shape, masked = MODES[mode]
    bn = make().train(training)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    kwargs = {"mask": _mask(x)} if masked else {}
    bn(x, **kwargs)  # first call outside the counter (records the input rank)
    with HostReads() as reads:
        for _ in range(3):
            bn(x, **kwargs)
    assert reads.count == 0, f"{mode}: {reads.count} host reads in 3 forwards"


def test_frozen_and_nonfinite_batches_read_nothing_either() -> None:
    bn = bnkit.BatchNorm(4)
    bad = torch.randn(8, 4, 3, 3)
    bad[0, 1, 0, 0] = float("nan")
    with HostReads() as reads:
        bn(bad)
        bn.freeze_stats = True
        bn(bad)
    assert reads.count == 0 and int(bn.skipped_batches) == 1


def test_raise_policy_costs_one_read_per_step_as_documented() -> None:
    bn = bnkit.BatchNorm(4, on_nonfinite="raise")
    with HostReads() as reads:
        bn(torch.randn(8, 4, 3, 3))
    assert reads.count == 1
