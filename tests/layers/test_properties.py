"""Property-based tests of bnkit.BatchNorm against a float64 reference, and gradchecks of every training path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bnkit import BatchNorm, Renorm
from tests.layers.reference import reference_forward

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Output tolerance of the reference comparison per input dtype (low precision loses at the final cast).
TOL = {"float32": 2e-4, "float64": 1e-9, "bfloat16": 5e-2, "float16": 5e-3}


@st.composite
def layer_inputs(draw: st.DrawFn):
    rank = draw(st.integers(2, 5))
    shape = [draw(st.integers(2, 5))] + [draw(st.integers(1, 4)) for _ in range(rank - 1)]
    axis = draw(st.integers(-rank + 1, rank - 1).filter(lambda a: a % rank != 0))
    channels = shape[axis % rank]
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.01, 1.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 3.0, -100.0]))
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return x64, axis, channels, g


@given(
    data=layer_inputs(),
    dtype=st.sampled_from(sorted(DTYPES)),
    training=st.booleans(),
    unbiased=st.booleans(),
    masked=st.booleans(),
    momentum=st.sampled_from([0.1, 0.5, None]),
)
def test_matches_float64_reference(data, dtype, training, unbiased, masked, momentum) -> None:
    x64, axis, channels, g = data
    x = x64.to(DTYPES[dtype])
    xr = x.double().numpy()  # the reference sees exactly the values the layer sees
    param_dtype = torch.float64 if dtype == "float64" else None
    bn = BatchNorm(channels, axis=axis, unbiased_running_var=unbiased, momentum=momentum, dtype=param_dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0, generator=g)
        bn.bias.uniform_(-1.0, 1.0, generator=g)
        bn.running_mean.uniform_(-1.0, 1.0, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
    before_mean, before_var = bn.running_mean.double().numpy().copy(), bn.running_var.double().numpy().copy()
    mask = None
    if masked:
        mask_shape = x.shape[: axis % x.ndim] + x.shape[axis % x.ndim + 1 :]
        mask = torch.rand(mask_shape, generator=g) > 0.3
        mask.view(-1)[:2] = True  # at least two values per channel
    weight, bias = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    if training:
        np_mask = None if mask is None else mask.numpy()
        y_ref, mean, var, count = reference_forward(xr, axis, weight, bias, bn.eps, mask=np_mask)
    else:
        y_ref, mean, var, count = reference_forward(xr, axis, weight, bias, bn.eps, before_mean, before_var)
    y = bn(x, training=training, mask=mask)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y.double().detach().numpy(), y_ref, rtol=TOL[dtype], atol=TOL[dtype])
    if training:
        factor = 1.0 if momentum is None else momentum
        stored = var * count / (count - 1) if unbiased else var
        rtol = 1e-9 if dtype == "float64" else 1e-4
        np.testing.assert_allclose(
            bn.running_mean.double().numpy(), (1 - factor) * before_mean + factor * mean, rtol=rtol, atol=rtol
        )
        np.testing.assert_allclose(
            bn.running_var.double().numpy(), (1 - factor) * before_var + factor * stored, rtol=rtol, atol=rtol
        )
        assert int(bn.num_batches_tracked) == 1
    else:
        np.testing.assert_array_equal(bn.running_mean.double().numpy(), before_mean)
        assert int(bn.num_batches_tracked) == 0


@given(data=layer_inputs(), k=st.sampled_from([1, 2]))
def test_ghost_batches_match_per_group_reference(data, k) -> None:
    x64, axis, channels, _ = data
    n = x64.shape[0] - x64.shape[0] % k
    x64 = x64[:n]
    bn = BatchNorm(channels, axis=axis, virtual_batch_size=k, momentum=1.0, dtype=torch.float64)
    if k * x64.numel() // x64.shape[axis] // n == 1:
        with pytest.raises(ValueError, match="one value per channel"):
            bn(x64, training=True)
        return
    y = bn(x64, training=True).detach().numpy()
    means, variances = [], []
    for start in range(0, n, k):
        part = x64[start : start + k].numpy()
        y_ref, mean, var, count = reference_forward(part, axis, None, None, bn.eps)
        np.testing.assert_allclose(y[start : start + k], y_ref, rtol=1e-9, atol=1e-9)
        means.append(mean)
        variances.append(var * count / (count - 1))
    np.testing.assert_allclose(bn.running_mean.numpy(), np.mean(means, axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), np.mean(variances, axis=0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "layer", "shape", "extra"),
    [
        ("plain", lambda: BatchNorm(3, dtype=torch.float64), (4, 3, 2, 2), {}),
        ("axis-last", lambda: BatchNorm(3, axis=-1, dtype=torch.float64), (4, 2, 3), {}),
        ("ghost", lambda: BatchNorm(3, virtual_batch_size=2, dtype=torch.float64), (4, 3, 2), {}),
        ("mask", lambda: BatchNorm(3, dtype=torch.float64), (4, 3, 3), {"mask": True}),
        ("renorm", lambda: BatchNorm(3, renorm=Renorm(rmax=1.2, dmax=0.1), dtype=torch.float64), (5, 3), {}),
    ],
)
def test_gradcheck_training_paths(name, layer, shape, extra) -> None:
    torch.manual_seed(0)
    bn = layer()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        if bn.renorm is not None:
            # r and d carry no gradient by definition; with both clipped they are also locally constant, so
            # finite differences see the same function autograd differentiates.
            bn.renorm_mean.fill_(50.0)
            bn.renorm_std.fill_(100.0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = None
    if extra.get("mask"):
        mask = torch.rand(shape[:1] + shape[2:]) > 0.3
        mask.view(-1)[:2] = True
    weight = bn.weight.detach().clone().requires_grad_()
    bias = bn.bias.detach().clone().requires_grad_()

    def fn(inp, w, b):
        return _functional_call(bn, inp, w, b, mask)

    assert torch.autograd.gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-6)


def _functional_call(bn: BatchNorm, x, weight, bias, mask):
    """Call the layer in training mode with the given parameters, without touching its stored state."""
    tensors = {k: v.clone() for k, v in bn.named_buffers()}
    tensors.update(weight=weight, bias=bias)
    return torch.func.functional_call(bn, tensors, (x,), {"training": True, "mask": mask})
