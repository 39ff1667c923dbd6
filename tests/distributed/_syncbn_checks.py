"""Checks run inside spawned gloo processes (see _spawn.py). Each takes (rank, world) and raises on failure.

Every rank builds the same full data set from a fixed seed, takes its own shard, and compares what the
distributed code gives with a single-process computation on the whole (concatenated) data.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bnkit
from bnkit.core.moments import channel_moments
from bnkit.distributed import SyncMismatchError, comm, configure, reduce_moments, sync_moments

CHECKS: dict[str, Callable[[int, int], None]] = {}
#: Leaves a collective unanswered on purpose, so it must run after every other check.
FINAL_CHECK = "skipped_layer_fails_in_bounded_time_naming_it"

_PORT_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_syncbn_cpu.py"
_spec = importlib.util.spec_from_file_location("torch_syncbn_cpu", _PORT_PATH)
torch_port = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_port)


def check(fn: Callable[[int, int], None]) -> Callable[[int, int], None]:
    CHECKS[fn.__name__] = fn
    return fn


def sizes_for(world: int) -> list[int]:
    return {1: [6], 2: [5, 3], 3: [5, 3, 0]}[world]


def shard(full: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return full[start : start + sizes[rank]]


def gather_all(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def assert_same_on_all_ranks(t: torch.Tensor) -> None:
    for other in gather_all(t):
        assert torch.equal(other, t), "ranks disagree"


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------ reduce_moments


@check
def reduce_moments_equals_union(rank: int, world: int) -> None:
    sizes = sizes_for(world)
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float64, torch.float32):
        full = (torch.randn(sum(sizes), 4, 3, generator=g, dtype=torch.float64) * 2 + 50).to(dtype)
        mine = channel_moments(shard(full, sizes, rank), (0, 2))
        got = reduce_moments(mine)
        want = channel_moments(full.double(), (0, 2))
        assert got.count.shape == () and got.mean.dtype == dtype
        assert float(got.count) == sum(sizes) * 3
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        close(got.mean.double(), want.mean, f"mean {dtype}", rtol=tol, atol=0)
        close(got.m2.double(), want.m2, f"m2 {dtype}", rtol=tol * 10, atol=0)
        for t in got:
            assert_same_on_all_ranks(t)
    # Per-channel counts (masked statistics) merge too, and a rank with count 0 contributes nothing.
    x = torch.arange(12.0).reshape(4, 3) + 10 * rank
    mask = torch.ones(4, 3, dtype=torch.bool) if rank != 1 else torch.zeros(4, 3, dtype=torch.bool)
    got = reduce_moments(channel_moments(x, (0,), mask=mask))
    kept = torch.cat([torch.arange(12.0).reshape(4, 3) + 10 * r for r in range(world) if r != 1])
    want = channel_moments(kept, (0,))
    assert got.count.shape == (3,) and got.count.tolist() == [4.0 * (world - 1)] * 3
    close(got.mean, want.mean, "masked mean")
    close(got.m2, want.m2, "masked m2")


@check
def reduce_moments_shape_mismatch_raises(rank: int, world: int) -> None:
    mine = channel_moments(torch.randn(4, 3 + rank), (0,))
    try:
        reduce_moments(mine)
    except SyncMismatchError as error:
        assert "another shape" in str(error), str(error)
    else:
        raise AssertionError("reduce_moments accepted different channel counts on different ranks")


@check
def exchange_numpy_and_torch_paths_agree(rank: int, world: int) -> None:
    # CPU float32/float64 merges run in NumPy, other dtypes and devices in torch: one merge, two array
    # libraries. float16 takes the torch path; its values here are exact in float16, so both must agree.
    from bnkit.distributed.moments import exchange

    g = torch.Generator().manual_seed(7 + rank)
    channels = 5
    count = torch.tensor([float([4, 0, 9][rank])])
    m2 = torch.randint(0, 64, (channels,), generator=g).float() / 4 if rank != 1 else torch.zeros(channels)
    mean = torch.randint(-64, 64, (channels,), generator=g).float() / 8 if rank != 1 else torch.zeros(channels)
    local = torch.cat([count, m2, mean])
    on_numpy = exchange(local.clone(), None, "exchange-check")
    on_torch = exchange(local.clone().half(), None, "exchange-check-half")
    assert on_numpy.dtype == on_torch.dtype == torch.float64
    close(on_numpy, on_torch, "numpy vs torch merge", rtol=1e-12, atol=1e-12)
    counts = torch.tensor([[4.0], [0.0], [9.0]])[:world]
    parts = gather_all(local)
    n, mu, big_m2 = bnkit.distributed.merge_gathered(
        counts, torch.stack([q[1 + channels :] for q in parts]), torch.stack([q[1 : 1 + channels] for q in parts])
    )
    close(on_numpy, torch.cat([n, big_m2, mu]), "exchange vs merge_gathered", rtol=1e-12, atol=1e-12)


@check
def sync_moments_identity_on_single_rank_group(rank: int, world: int) -> None:
    # A group of one rank: nothing to synchronise, the local statistics come back unchanged.
    groups = [dist.new_group([r]) for r in range(world)]
    local = channel_moments(torch.randn(5, 3), (0,))
    assert sync_moments(local, group=groups[rank], layer_name="solo") is local
    assert reduce_moments(local, group=groups[rank]) is local


# ------------------------------------------------------------------------------------- the synchronised layer


def _run_layer_case(
    rank: int,
    world: int,
    *,
    unbiased: bool,
    ndim: int,
    axis: int,
    momentum: float | None,
    dtype: torch.dtype = torch.float32,
    renorm: bool = False,
) -> None:
    sizes = sizes_for(world)
    c = 4
    g = torch.Generator().manual_seed(10 + ndim)
    spatial = {2: (), 3: (5,), 4: (3, 2), 5: (2, 2, 2)}[ndim]
    shape = (sum(sizes), c, *spatial)
    kwargs = dict(momentum=momentum, axis=axis, unbiased_running_var=unbiased, renorm=renorm, dtype=dtype)
    ref = bnkit.BatchNorm(c, **kwargs)
    syn = bnkit.BatchNorm(c, sync=True, name=f"case{ndim}{axis}{unbiased}{momentum}{dtype}{renorm}", **kwargs)
    with torch.no_grad():
        for layer in (ref, syn):
            layer.weight.copy_(torch.linspace(0.5, 2.0, c))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, c))
    for step in range(2):
        full = (torch.randn(shape, generator=g) * (step + 1) + 3.0).to(dtype)
        if axis == -1:
            full = full.movedim(1, -1).contiguous()
        weights = torch.randn(full.shape, generator=g).to(dtype)
        xf = full.clone().requires_grad_()
        yf = ref(xf)
        (yf * weights).sum().backward()
        xs = shard(full, sizes, rank).clone().requires_grad_()
        ys = syn(xs)
        (ys * shard(weights, sizes, rank)).sum().backward()
        close(ys, shard(yf, sizes, rank).detach(), f"output step {step}")
        close(xs.grad, shard(xf.grad, sizes, rank), f"input grad step {step}")
        for name in ("weight", "bias"):
            grad = getattr(syn, name).grad.clone()
            dist.all_reduce(grad)
            close(grad, getattr(ref, name).grad, f"{name} grad step {step}")
        for layer in (ref, syn):
            layer.zero_grad()
    close(syn.running_mean, ref.running_mean, "running_mean")
    close(syn.running_var, ref.running_var, "running_var")
    assert int(syn.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    for t in (syn.running_mean, syn.running_var):
        assert_same_on_all_ranks(t)
    # Eval uses the (identical) running statistics and never communicates.
    probe = torch.randn(shard(full, sizes, rank).shape, generator=g).to(dtype)
    close(syn.eval()(probe), ref.eval()(probe), "eval output")


@check
def layer_unbiased_nchw(rank: int, world: int) -> None:
    _run_layer_case(rank, world, unbiased=True, ndim=4, axis=1, momentum=0.1)


@check
def layer_biased_nchw(rank: int, world: int) -> None:
    _run_layer_case(rank, world, unbiased=False, ndim=4, axis=1, momentum=0.1)


@check
def layer_unbiased_2d_cumulative(rank: int, world: int) -> None:
    _run_layer_case(rank, world, unbiased=True, ndim=2, axis=1, momentum=None)


@check
def layer_biased_channels_last(rank: int, world: int) -> None:
    _run_layer_case(rank, world, unbiased=False, ndim=3, axis=-1, momentum=0.3)


@check
def layer_float64_5d(rank: int, world: int) -> None:
    _run_layer_case(rank, world, unbiased=True, ndim=5, axis=1, momentum=0.1, dtype=torch.float64)


@check
def layer_renorm(rank: int, world: int) -> None:
    _run_layer_case(rank, world, unbiased=True, ndim=4, axis=1, momentum=0.1, renorm=True)


@check
def layer_masked(rank: int, world: int) -> None:
    sizes = sizes_for(world)
    g = torch.Generator().manual_seed(3)
    full = torch.randn(sum(sizes), 6, 3, generator=g) * 2 + 1
    mask = torch.rand(sum(sizes), 6, generator=g) > 0.3
    ref = bnkit.BatchNorm(3, axis=-1)
    syn = bnkit.BatchNorm(3, axis=-1, sync=True, name="masked")
    xf = full.clone().requires_grad_()
    yf = ref(xf, mask=mask)
    yf.sum().backward()
    xs = shard(full, sizes, rank).clone().requires_grad_()
    ys = syn(xs, mask=shard(mask, sizes, rank))
    ys.sum().backward()
    close(ys, shard(yf, sizes, rank).detach(), "masked output")
    close(xs.grad, shard(xf.grad, sizes, rank), "masked input grad")
    close(syn.running_var, ref.running_var, "masked running_var")


@check
def layer_ghost_with_sync_raises(rank: int, world: int) -> None:
    layer = bnkit.BatchNorm(3, sync=True, virtual_batch_size=2, name="ghosty")
    try:
        layer(torch.randn(4, 3))
    except ValueError as error:
        assert "ghosty" in str(error) and "virtual_batch_size" in str(error), str(error)
    else:
        raise AssertionError("ghost batches with sync=True neither synchronised nor raised")


@check
def eval_and_frozen_never_communicate(rank: int, world: int) -> None:
    # Only rank 0 runs these layers: any collective would leave it waiting for the others and time out.
    previous = configure(timeout=3.0)
    try:
        if rank == 0:
            x = torch.randn(4, 3, 2)
            bnkit.BatchNorm(3, sync=True, name="ev").eval()(x)
            bnkit.BatchNorm(3, sync=True, track_running_stats=False, name="ev2").eval()(x)
            frozen = bnkit.BatchNorm(3, sync=True, name="fz")
            frozen.freeze_stats = True
            frozen.train()(x)
    finally:
        configure(**previous)
    dist.barrier()


@check
def single_value_per_channel_is_judged_globally(rank: int, world: int) -> None:
    # One sample on one rank is fine in sync training when the union has more values.
    layer = bnkit.BatchNorm(2, sync=True, name="one")
    n = 1 if rank == 0 else 2
    y = layer(torch.randn(n, 2))
    assert torch.isfinite(y).all()


# --------------------------------------------------------------------------- PyTorch's SyncBatchNorm algorithm


def _compare_with_port(rank: int, world: int, mean: float, std: float, eps: float) -> dict[str, float]:
    """Run bnkit SyncBN and the CPU port of torch.nn.SyncBatchNorm; return max relative errors vs float64."""
    sizes = sizes_for(world)
    c = 3
    g = torch.Generator().manual_seed(7)
    full = (torch.randn(sum(sizes), c, 4, 4, generator=g, dtype=torch.float64) * std + mean).float()
    upstream = torch.randn(full.shape, generator=g)
    ours = bnkit.BatchNorm(c, eps=eps, momentum=1.0, sync=True, name=f"port{mean}")
    theirs = torch_port.TorchSyncBatchNormCPU(c, eps=eps, momentum=1.0)
    # The float64 oracle: single process, whole batch.
    oracle = nn.BatchNorm2d(c, eps=eps, momentum=1.0).double()
    xo = full.double().requires_grad_()
    yo = oracle(xo)
    (yo * upstream.double()).sum().backward()
    errors: dict[str, float] = {}
    for label, layer in (("bnkit", ours), ("torch", theirs)):
        x = shard(full, sizes, rank).clone().requires_grad_()
        y = layer(x)
        (y * shard(upstream, sizes, rank)).sum().backward()
        rv = layer.running_var.double()
        errors[f"{label}_running_var"] = float(((rv - oracle.running_var) / oracle.running_var).abs().max())
        if x.numel():
            ref_y = shard(yo, sizes, rank).detach()
            ref_g = shard(xo.grad, sizes, rank)
            errors[f"{label}_output"] = float((y.double() - ref_y).abs().max() / ref_y.abs().max())
            errors[f"{label}_grad"] = float((x.grad.double() - ref_g).abs().max() / ref_g.abs().max())
    return errors


@check
def agrees_with_torch_syncbn_where_torch_is_right(rank: int, world: int) -> None:
    errors = _compare_with_port(rank, world, mean=0.5, std=2.0, eps=1e-5)
    for key, value in errors.items():
        assert value < 1e-5, (key, errors)


@check
def closer_to_float64_than_torch_when_var_below_eps(rank: int, world: int) -> None:
    # mean >> std and var (1e-8) << eps (1e-3): PyTorch rebuilds each rank's var as 1/invstd^2 - eps in float32,
    # which keeps only the digits of var + eps; bnkit exchanges m2 itself.
    errors = _compare_with_port(rank, world, mean=1.0, std=1e-4, eps=1e-3)
    assert errors["bnkit_running_var"] < 1e-4, errors
    assert errors["torch_running_var"] > 100 * errors["bnkit_running_var"], errors
    if "bnkit_output" in errors:
        # Outputs and gradients are limited by the float32 rounding of the mean in both implementations.
        assert errors["bnkit_output"] < 2 * errors["torch_output"] + 1e-6, errors
        assert errors["bnkit_grad"] < 2 * errors["torch_grad"] + 1e-6, errors


# ------------------------------------------------------------------------------------------------ DDP training


def _small_net(sync: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        bnkit.BatchNorm(4, sync=sync, name="net.1"),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, bias=False),
        bnkit.BatchNorm(5, sync=sync, unbiased_running_var=False, name="net.4"),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 2),
    )


@check
def ddp_training_equals_single_process(rank: int, world: int) -> None:
    sizes = sizes_for(world)
    ddp = nn.parallel.DistributedDataParallel(_small_net(sync=True))
    ref = _small_net(sync=False)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = torch.randn(sum(sizes), 3, 6, 6, generator=g)
        target = torch.randint(0, 2, (sum(sizes),), generator=g)
        # DDP averages gradients over ranks, so the single-process loss is the summed loss divided by world.
        loss = nn.functional.cross_entropy(ddp(shard(x, sizes, rank)), shard(target, sizes, rank), reduction="sum")
        opt_ddp.zero_grad()
        loss.backward()
        opt_ddp.step()
        ref_loss = nn.functional.cross_entropy(ref(x), target, reduction="sum") / world
        opt_ref.zero_grad()
        ref_loss.backward()
        opt_ref.step()
    for (name, a), b in zip(ddp.module.state_dict().items(), ref.state_dict().values(), strict=True):
        if a.is_floating_point():
            close(a, b, f"after 3 DDP steps: {name}", rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- host reads

_HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.item.default,
}


class _HostReads(TorchDispatchMode):
    """Counts operators that copy a tensor's value to the host (each one a pipeline stall on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@check
def sync_training_step_reads_nothing_on_the_host(rank: int, world: int) -> None:
    # Past a layer's first call (which checks widths and dtypes once), a synchronised training step adds only
    # its collectives: no host read in forward or backward, for every synchronised path.
    sizes = sizes_for(world)
    cases = {
        "fused": (lambda: bnkit.BatchNorm(3, sync=True, name="hr.fused"), (4, 4), False),
        "masked": (lambda: bnkit.BatchNorm(3, sync=True, name="hr.masked"), (5,), True),
        "renorm": (lambda: bnkit.BatchNorm(3, sync=True, renorm=bnkit.Renorm.paper(), name="hr.renorm"), (4,), False),
        "keras": (lambda: bnkit.BatchNorm.from_keras(3, axis=1, sync=True, name="hr.keras"), (4, 4), False),
    }
    for label, (make, spatial, masked) in cases.items():
        layer = make()
        for step in range(3):
            x = torch.randn(sizes[rank], 3, *spatial, requires_grad=True)
            mask = torch.rand(sizes[rank], *spatial) > 0.3 if masked else None
            counter = _HostReads()
            with counter:
                y = layer(x, mask=mask) if masked else layer(x)
                y.sum().backward()
            if step > 0:
                assert counter.count == 0, f"{label}: {counter.count} host reads in synchronised step {step}"
    dist.barrier()


@check
def global_single_value_gives_beta_and_keeps_running_stats(rank: int, world: int) -> None:
    # One value per channel in the union of all ranks' batches: known only on the device, so no error; the
    # output is beta (as Keras and a masked channel give) and the running statistics do not move.
    layer = bnkit.BatchNorm(2, sync=True, name="single.global")
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.5]))
        layer.running_mean.fill_(0.25)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1 if rank == 0 else 0, 2)
    y = layer(x)
    if rank == 0:
        # torch's kernel computes x * a + (beta - mean * a) with a = 1/sqrt(eps): beta up to that rounding
        close(y.detach(), layer.bias.detach().reshape(1, 2), "output of a global batch of one", rtol=0, atol=1e-4)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} moved on a global batch of one"
    assert int(layer.skipped_batches) == 0
    empty = bnkit.BatchNorm(2, sync=True, name="single.empty")
    assert empty(torch.randn(0, 2)).shape == (0, 2)
    assert int(empty.num_batches_tracked) == 0 and torch.equal(empty.running_var, torch.ones(2))
    dist.barrier()


@check
def device_path_tag_mismatch_raises_naming_the_call(rank: int, world: int) -> None:
    # Off the NumPy path (here float16: the path accelerators take) the tag verdict is queued and read once the
    # device has produced it (comm.defer_check); for CPU tensors that is at once.
    from bnkit.distributed.moments import exchange

    local = torch.tensor([4.0, 1.0, 2.0, 0.5, -0.5]).half()
    name = "tag.left" if rank == 0 else "tag.right"
    try:
        exchange(local.clone(), None, name)
    except SyncMismatchError as error:
        assert name in str(error) and "call 0" in str(error), str(error)
    else:
        raise AssertionError("a float16 exchange between different layers passed its tag check")
    assert not comm._PENDING
    dist.barrier()


# ------------------------------------------------------------------------------------------- skipped layers


@check
def skipped_layer_same_width_fails_at_once_naming_it(rank: int, world: int) -> None:
    left = bnkit.BatchNorm(3, sync=True, name="block.left")
    right = bnkit.BatchNorm(3, sync=True, name="block.right")
    layer = left if rank == 0 else right  # rank 0 runs a layer the others skip
    start = time.monotonic()
    try:
        layer(torch.randn(4, 3))
    except SyncMismatchError as error:
        assert layer.name in str(error) and "pytorch#44957" in str(error), str(error)
    else:
        raise AssertionError("ranks in different synchronised layers mixed their statistics")
    assert time.monotonic() - start < 5.0
    dist.barrier()  # the group is still usable: every rank took part in the one collective


@check
def skipped_layer_other_width_fails_with_shape_check(rank: int, world: int) -> None:
    layer = bnkit.BatchNorm(3, sync=True, name="narrow") if rank == 0 else bnkit.BatchNorm(5, sync=True, name="wide")
    previous = configure(check_shapes=True)
    try:
        layer(torch.randn(4, layer.num_features))
    except SyncMismatchError as error:
        assert layer.name in str(error), str(error)
    else:
        raise AssertionError("ranks in layers of different widths were not detected")
    finally:
        configure(**previous)
    dist.barrier()


@check
def skipped_layer_fails_in_bounded_time_naming_it(rank: int, world: int) -> None:
    if rank != 0:
        time.sleep(4.0)  # stay alive (not in any collective) while rank 0 waits in vain
        return
    previous = configure(timeout=1.5)
    start = time.monotonic()
    try:
        bnkit.BatchNorm(3, sync=True, name="head.bn")(torch.randn(4, 3))
    except SyncMismatchError as error:
        assert "head.bn" in str(error) and "1.5 s" in str(error), str(error)
    else:
        raise AssertionError("a lone rank in a synchronised layer did not fail")
    finally:
        configure(**previous)
    assert time.monotonic() - start < 3.5, time.monotonic() - start


# ------------------------------------------------------------------------------------ sync_running_stats


def _stats_model() -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm1d(3),
        bnkit.BatchNorm(4, renorm=True, name="renormed"),
        bnkit.BatchNorm(2, track_running_stats=False),
        bnkit.BatchNorm(2, unbiased_running_var=False),
    )


def _stat_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # the state-dict buffers: bnkit's non-persistent skipped_batches counter is a rank-local diagnostic
    return [(n, b) for n, b in model.named_buffers() if not n.endswith("skipped_batches")]


def _fill_rank_stats(model: nn.Module, rank: int) -> None:
    with torch.no_grad():
        for i, (name, buf) in enumerate(_stat_buffers(model)):
            if name.endswith("num_batches_tracked"):
                buf.fill_(10 * rank + i)
            else:
                buf.copy_(torch.linspace(1.0, 2.0, buf.numel()) * (rank + 1) + i)


@check
def sync_running_stats_reduce_and_broadcast(rank: int, world: int) -> None:
    expected = [_stats_model() for _ in range(world)]
    for r, m in enumerate(expected):
        _fill_rank_stats(m, r)
    model = nn.parallel.DistributedDataParallel(_stats_model(), broadcast_buffers=False)
    _fill_rank_stats(model.module, rank)
    names = bnkit.sync_running_stats(model, mode="reduce")
    assert names == ["module.0", "module.1", "module.3"], names
    others = ([b for _, b in _stat_buffers(m)] for m in expected)
    for (name, buf), *theirs in zip(_stat_buffers(model.module), *others, strict=True):
        if name.endswith("num_batches_tracked"):
            assert int(buf) == int(theirs[rank]), name  # left alone
            continue
        if name != "1.running_var":  # re-derived from the averaged running_std, checked below
            close(buf, torch.stack(theirs).mean(0), f"reduce {name}")
        assert_same_on_all_ranks(buf)
    renormed = model.module[1]
    close(renormed.running_var, torch.relu(renormed.running_std**2 - renormed.eps), "renorm invariant")
    _fill_rank_stats(model.module, rank)
    bnkit.sync_running_stats(model.module, mode="broadcast")
    for (name, buf), (_, theirs) in zip(_stat_buffers(model.module), _stat_buffers(expected[0]), strict=True):
        assert torch.equal(buf, theirs), f"broadcast {name}"


@check
def sync_running_stats_refuses_different_models(rank: int, world: int) -> None:
    model = nn.Sequential(nn.BatchNorm1d(3 if rank == 0 else 4))
    try:
        bnkit.sync_running_stats(model)
    except SyncMismatchError as error:
        assert "sync_running_stats" in str(error), str(error)
    else:
        raise AssertionError("models of different shapes were averaged")
    try:
        bnkit.sync_running_stats(model, mode="mean")
    except ValueError as error:
        assert "'reduce' or 'broadcast'" in str(error)
    else:
        raise AssertionError("a bad mode was accepted")


@check
def sync_running_stats_nonfinite_raises_on_every_rank_and_changes_nothing(rank: int, world: int) -> None:
    import warnings

    model = _stats_model()
    _fill_rank_stats(model, rank)
    if rank == world - 1:
        with torch.no_grad():
            model[0].running_var[1] = float("nan")
    before = [b.clone() for _, b in _stat_buffers(model)]
    try:
        bnkit.sync_running_stats(model, mode="reduce")
    except ValueError as error:
        assert f"'0' on rank(s) [{world - 1}]" in str(error) and "nothing was changed" in str(error), str(error)
    else:
        raise AssertionError("NaN running statistics were averaged into every rank")
    assert all(
        torch.equal(a, b) or (a.isnan() == b.isnan()).all()
        for a, b in zip([b for _, b in _stat_buffers(model)], before, strict=True)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = bnkit.sync_running_stats(model, mode="reduce", on_nonfinite="skip")
    assert names == ["1", "3"], names
    assert any("left '0' on rank(s)" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert torch.equal(model[0].running_mean, before[0])  # the skipped layer is untouched on every rank
    assert_same_on_all_ranks(model[3].running_mean)
    # broadcast: only rank 0's values travel, so NaN elsewhere is repaired, not refused
    bnkit.sync_running_stats(model, mode="broadcast")
    assert_same_on_all_ranks(model[0].running_var)


@check
def sync_bn_ranks_in_different_dtypes_fail_clearly(rank: int, world: int) -> None:
    dtype = torch.float32 if rank == 0 else torch.float64
    layer = bnkit.BatchNorm(3, sync=True, name="mixed.dtype", dtype=dtype)
    try:
        layer(torch.randn(4, 3, dtype=dtype))
    except SyncMismatchError as error:
        assert "mixed.dtype" in str(error) and "torch.float" in str(error) and "same dtype" in str(error), str(error)
    else:
        raise AssertionError("ranks in different dtypes were not detected")
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_mean, torch.zeros(3, dtype=dtype))
    dist.barrier()  # no abort, no hang: the group is still usable


@check
def sync_bn_ranks_with_different_widths_fail_clearly_by_default(rank: int, world: int) -> None:
    width = 3 if rank == 0 else 4
    layer = bnkit.BatchNorm(width, sync=True, name="stem.bn")
    try:
        layer(torch.randn(4, width))
    except SyncMismatchError as error:
        assert "stem.bn" in str(error) and "channels" in str(error), str(error)
    else:
        raise AssertionError("ranks holding layers of different widths were not detected")
    dist.barrier()  # no abort, no hang: the group is still usable


# ------------------------------------------------------------------------------------ distributed recalibrate


def _recal_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        bnkit.BatchNorm(4, unbiased_running_var=False),
        nn.ReLU(),
    )


@check
def recalibrate_merges_shards_exactly(rank: int, world: int) -> None:
    # Uneven shards with uneven batch sizes: rank r gets a slice split into batches of 2 + r.
    _recalibrate_against_union(rank, world, [0, 9, 17, 23] if world == 3 else [0, 14, 23])


@check
def recalibrate_with_an_empty_shard(rank: int, world: int) -> None:
    # The last rank gets no batch at all: it still takes part in every reduction and ends equal to the others.
    _recalibrate_against_union(rank, world, [0, 12, 23, 23] if world == 3 else [0, 23, 23])


def _recalibrate_against_union(rank: int, world: int, bounds: list[int]) -> None:
    import copy

    g = torch.Generator().manual_seed(11)
    data = torch.randn(23, 3, 7, 7, generator=g) * 2 + 1
    shards = [list(data[bounds[r] : bounds[r + 1]].split(2 + r)) for r in range(world)]
    mine = shards[rank]
    union = [batch for part in shards for batch in part]
    for sequential in (False, True):
        base = _recal_model()
        single = copy.deepcopy(base)
        # The reference is one process over the union of the shards' batches: switch synchronisation off.
        with mock.patch.object(comm, "is_active", lambda group=None: False):
            bnkit.recalibrate(single, union, progress=False, sequential=sequential)
        dist_model = copy.deepcopy(base)
        bnkit.recalibrate(dist_model, list(mine), progress=False, sequential=sequential)
        for (name, a), b in zip(dist_model.named_buffers(), single.named_buffers(), strict=True):
            if a.is_floating_point():
                close(a, b[1], f"recalibrate sequential={sequential} {name}")
                assert_same_on_all_ranks(a)


# ------------------------------------------------------------------------------------------------- convert


@check
def converted_sync_model_trains_like_single_process(rank: int, world: int) -> None:
    sizes = sizes_for(world)
    base = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(1))
    base(torch.randn(2, 2, 5, 5))
    synced = bnkit.convert(base, "bnkit-sync")
    layer = synced[1]
    assert isinstance(layer, bnkit.BatchNorm) and layer.sync and layer.name == "1", layer
    single = bnkit.convert(base, "bnkit")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sum(sizes), 2, 5, 5, generator=g)
    xs = shard(x, sizes, rank).clone().requires_grad_()
    synced(xs).sum().backward()
    xf = x.clone().requires_grad_()
    single(xf).sum().backward()
    close(xs.grad, shard(xf.grad, sizes, rank), "input grad through converted sync model")
    close(layer.running_var, single[1].running_var, "running_var of converted sync model")
