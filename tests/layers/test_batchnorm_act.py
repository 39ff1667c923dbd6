"""``bnkit.BatchNormAct``: equal to ``nn.BatchNorm2d`` + activation (outputs, gradients, running statistics over
30 training steps), exact gradients in float64 (gamma = 0 included), timm ``BatchNormAct2d`` state dicts both
ways, no host reads in forward, ``torch.compile(fullgraph=True)`` in training, and the low-memory path keeping
only the output."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import bnkit
from tests.layers.test_host_syncs import HostReads

timm_layers = pytest.importorskip("timm.layers")

TORCH_ACTS: dict[str, Callable[[], nn.Module]] = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": lambda: nn.ELU(0.7),
}


def _make(activation: str, channels: int = 6, **kwargs) -> bnkit.BatchNormAct:
    return bnkit.BatchNormAct(channels, activation, negative_slope=0.1, alpha=0.7, **kwargs)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal to 1e-5 relative: ``||actual - expected|| <= 1e-5 ||expected||`` (norms over the whole tensor).

    Relative to the tensor, not elementwise: ELU's inverse at strongly negative inputs is limited by float32's
    resolution of ``y`` near ``-alpha`` (documented), which moves single entries of the input gradient.
    """
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = float((actual - expected).norm())
    assert error <= 1e-5 * float(expected.norm()) + 1e-30, (
        f"{what}: relative error {error / float(expected.norm()):.2e}"
    )


def _randomise(layer: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 1.5 + 0.25)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.5)


@pytest.mark.parametrize("memory", ["low", "standard"])
@pytest.mark.parametrize("activation", sorted(TORCH_ACTS))
def test_thirty_training_steps_equal_torch_batchnorm_then_activation(activation: str, memory: str) -> None:
    ours = _make(activation, memory=memory)
    bn, act = nn.BatchNorm2d(6), TORCH_ACTS[activation]()
    _randomise(ours, 0)
    bn.load_state_dict(ours.state_dict())
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(bn.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for step in range(30):
        x = torch.randn(8, 6, 5, 4, generator=g) * 2 + 0.5
        upstream = torch.randn(8, 6, 5, 4, generator=g)
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_ref = ours(x_ours), act(bn(x_ref))
        (y_ours * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        _close(y_ours, y_ref, f"step {step} output")
        _close(x_ours.grad, x_ref.grad, f"step {step} input gradient")
        _close(ours.weight.grad, bn.weight.grad, f"step {step} weight gradient")
        _close(ours.bias.grad, bn.bias.grad, f"step {step} bias gradient")
        opt_ours.step(), opt_ref.step()
        opt_ours.zero_grad(), opt_ref.zero_grad()
    for name in ("running_mean", "running_var"):
        _close(getattr(ours, name), getattr(bn, name), name)
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 30
    assert int(ours.inexact_batches) == 0
    assert ours.uses_low_memory() == (memory == "low" and activation != "relu")


def _gradcheck(layer: bnkit.BatchNormAct, shape: tuple[int, ...] = (3, 4, 3, 2)) -> None:
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    weight.requires_grad_(), bias.requires_grad_()

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            layer.weight.copy_(w), layer.bias.copy_(b)
        # the layer's parameters carry w and b into the graph: route their gradients back to w and b
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("activation", "training"),
    # ReLU keeps only its output with running statistics; in training it takes the standard path (parity test)
    [("identity", True), ("leaky_relu", True), ("elu", True)]
    + [(a, False) for a in ("identity", "leaky_relu", "elu", "relu")],
)
def test_gradcheck_float64_with_zero_gamma(activation: str, training: bool) -> None:
    layer = _make(activation, 4, dtype=torch.float64, exact_channels=2).train(training)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.0, 1.3, 0.0, -0.7], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.3, -0.2, -0.4, 0.1], dtype=torch.float64))
        layer.running_mean.copy_(torch.tensor([0.1, -0.3, 0.2, 0.0], dtype=torch.float64))
        layer.running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8], dtype=torch.float64))
    assert layer.uses_low_memory(dtype=torch.float64)
    _gradcheck(layer)
    assert int(layer.inexact_batches) == 0


def test_default_exact_channel_covers_one_zero_gamma_and_more_are_counted() -> None:
    layer = _make("leaky_relu", 4, dtype=torch.float64)  # ceil(4 / 64) = 1 exact channel
    with torch.no_grad():  # beta away from 0, so the zero channel does not sit on leaky ReLU's kink
        layer.weight.copy_(torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.2, -0.5, 0.1, 0.3], dtype=torch.float64))
    _gradcheck(layer)
    assert int(layer.inexact_batches) == 0
    with torch.no_grad():
        layer.weight[3] = 0.0  # two zero channels, one kept exactly: the step is counted
    x = torch.randn(4, 4, 3, dtype=torch.float64)
    layer(x).sum().backward()
    assert int(layer.inexact_batches) == 1
    assert "inexact_batches" not in layer.state_dict()


def test_small_gamma_against_beta_is_kept_exact_in_float32() -> None:
    # |beta| / |gamma| = 1e4: xhat recovered from y would lose about 1e-3; the exact channel keeps it
    layer = _make("leaky_relu", 4, exact_channels=1)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 1e-4, 0.8, 1.2]))
        layer.bias.copy_(torch.tensor([0.1, 1.0, -0.2, 0.0]))
    bn.load_state_dict(layer.state_dict())
    x = torch.randn(16, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(16, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    layer(x).mul(upstream).sum().backward()
    F.leaky_relu(bn(x), 0.1).mul(upstream).sum().backward()
    _close(layer.weight.grad, bn.weight.grad, "weight gradient")


def test_low_memory_keeps_only_the_output() -> None:
    """With the next layer keeping y, BN + leaky ReLU saves no activation-sized tensor of its own."""

    def saved(model: nn.Module, x: torch.Tensor) -> int:
        params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        return sum(storages.values())

    x = torch.randn(4, 64, 8, 8)
    conv = nn.Conv2d(64, 8, 3, bias=False)
    ours = saved(nn.Sequential(bnkit.BatchNormAct(64, "leaky_relu"), conv), x)
    torch_bn = saved(nn.Sequential(nn.BatchNorm2d(64), nn.LeakyReLU(inplace=True), conv), x)
    y_bytes = x.numel() * 4
    exact = x.numel() // 64 * 4  # the one exact channel
    assert torch_bn >= 2 * y_bytes
    assert y_bytes <= ours <= y_bytes + exact + 64 * 4 * 4


@pytest.mark.parametrize(
    ("kwargs", "training", "masked", "expected"),
    [
        ({}, True, False, True),
        ({}, False, False, True),
        ({"memory": "standard"}, True, False, False),
        ({"virtual_batch_size": 2}, True, False, False),
        ({"virtual_batch_size": 2}, False, False, True),
        ({"renorm": True}, True, False, False),
        ({"momentum": None}, True, False, True),
        ({"track_running_stats": False}, False, False, True),
        ({}, True, True, False),
    ],
)
def test_which_modes_keep_only_the_output(kwargs: dict, training: bool, masked: bool, expected: bool) -> None:
    layer = _make("leaky_relu", 4, **kwargs)
    assert layer.uses_low_memory(training, masked=masked) is expected
    assert layer.uses_low_memory(training, dtype=torch.bfloat16) is False


MODES: dict[str, tuple[dict, tuple[int, ...], bool, bool]] = {
    # name: (constructor options, input shape, masked, freeze_stats)
    "momentum-None": ({"momentum": None}, (8, 4, 3, 3), False, False),
    "biased-var": ({"unbiased_running_var": False}, (8, 4, 3, 3), False, False),
    "channels-last-axis": ({"axis": -1}, (8, 3, 4), False, False),
    "no-running-stats": ({"track_running_stats": False}, (8, 4, 3, 3), False, False),
    "ghost": ({"virtual_batch_size": 2}, (8, 4, 3, 3), False, False),
    "renorm": ({"renorm": True}, (8, 4, 3, 3), False, False),
    "mask": ({}, (8, 4, 5), True, False),
    "freeze-stats": ({}, (8, 4, 3, 3), False, True),
    "standard": ({"memory": "standard"}, (8, 4, 3, 3), False, False),
}


@pytest.mark.parametrize("activation", ["leaky_relu", "relu"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_equals_bnkit_batchnorm_then_activation(mode: str, activation: str) -> None:
    options, shape, masked, frozen = MODES[mode]
    ours = _make(activation, 4, **options)
    ref = bnkit.BatchNorm(4, **{k: v for k, v in options.items() if k != "memory"})
    ours.freeze_stats = ref.freeze_stats = frozen
    _randomise(ours, 2)
    ref.load_state_dict(ours.state_dict())
    act = TORCH_ACTS[activation]()
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(*shape, generator=g) + 1
        kwargs = {}
        if masked:
            mask = torch.rand(shape[0], shape[2], generator=g) > 0.3
            mask[0] = True
            kwargs = {"mask": mask}
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa, **kwargs), act(ref(xb, **kwargs))
        upstream = torch.randn(*shape, generator=g)
        (ya * upstream).sum().backward()
        (yb * upstream).sum().backward()
        _close(ya, yb, "output")
        _close(xa.grad, xb.grad, "input gradient")
        _close(ours.weight.grad, ref.weight.grad, "weight gradient")
    for name, value in ref.state_dict().items():
        _close(ours.state_dict()[name].float(), value.float(), name)


def test_keras_convention_low_path_equals_bnkit_keras_batchnorm() -> None:
    ours = bnkit.BatchNormAct.from_keras(4, activation="elu", axis=1)
    ref = bnkit.BatchNorm.from_keras(4, axis=1)
    assert ours.uses_low_memory() and ours.keras_momentum == 0.99
    x = torch.randn(8, 4, 5, generator=torch.Generator().manual_seed(0)) * 3
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).sum().backward()
    F.elu(ref(xb)).sum().backward()
    _close(xa.grad, xb.grad, "input gradient")
    for name in ("running_mean", "running_var"):
        _close(getattr(ours, name), getattr(ref, name), name)


def test_no_exact_channels_are_kept_or_counted_without_gradients() -> None:
    layer = _make("leaky_relu", 4, exact_channels=0)
    with torch.no_grad():
        layer.weight.zero_()
        layer(torch.randn(8, 4, 3))
    assert int(layer.inexact_batches) == 0 and int(layer.num_batches_tracked) == 1
    x = torch.randn(8, 4, 3, requires_grad=True)
    y = layer(x)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        grad.sum().backward()


def test_keras_scale_false_and_affine_false_keep_only_the_output() -> None:
    for make_ours, make_ref in (
        (
            lambda: bnkit.BatchNormAct.from_keras(4, activation="leaky_relu", axis=1, scale=False),
            lambda: bnkit.BatchNorm.from_keras(4, axis=1, scale=False),
        ),
        (lambda: _make("leaky_relu", 4, affine=False), lambda: bnkit.BatchNorm(4, affine=False)),
    ):
        ours, ref = make_ours(), make_ref()
        assert ours.uses_low_memory()
        x = torch.randn(8, 4, 5) * 2
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        upstream = torch.randn(8, 4, 5)
        (ours(xa) * upstream).sum().backward()
        (F.leaky_relu(ref(xb), 0.1 if ours.negative_slope == 0.1 else 0.01) * upstream).sum().backward()
        _close(xa.grad, xb.grad, "input gradient")
        if ref.bias is not None:
            _close(ours.bias.grad, ref.bias.grad, "bias gradient")
        _close(ours.running_var, ref.running_var, "running_var")


def test_frozen_affine_and_half_precision() -> None:
    layer = _make("leaky_relu", 4)
    layer.freeze_affine = True
    x = torch.randn(8, 4, 3, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None
    half = _make("leaky_relu", 4)
    ref = bnkit.BatchNorm(4)
    xh = torch.randn(8, 4, 3).bfloat16()
    torch.testing.assert_close(half(xh), F.leaky_relu(ref(xh), 0.1))  # standard path, bnkit's float32 rule
    assert not half.uses_low_memory(dtype=torch.bfloat16)


def test_nonfinite_batch_is_skipped_on_the_low_path() -> None:
    layer = _make("leaky_relu", 4)
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(8, 4, 3)
    x[0, 1, 0] = float("nan")
    layer(x)
    assert int(layer.skipped_batches) == 1
    for name, value in before.items():
        torch.testing.assert_close(layer.state_dict()[name], value)


@pytest.mark.parametrize(
    ("act_layer", "activation"),
    [(nn.ReLU, "relu"), (nn.LeakyReLU, "leaky_relu"), (nn.ELU, "elu"), (nn.Identity, "identity")],
)
def test_timm_batchnormact2d_state_dicts_load_both_ways(act_layer: type[nn.Module], activation: str) -> None:
    theirs = timm_layers.BatchNormAct2d(6, act_layer=act_layer)
    _randomise(theirs, 5)
    with torch.no_grad():
        theirs.running_mean.uniform_(-1, 1), theirs.running_var.uniform_(0.5, 2)
        theirs.num_batches_tracked.fill_(7)
    ours = bnkit.BatchNormAct(6, activation)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(4, 6, 3, 3)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x.clone()))
    back = timm_layers.BatchNormAct2d(6, act_layer=act_layer)
    back.load_state_dict(ours.state_dict(), strict=True)
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value)
    copied = bnkit.BatchNormAct.from_torch(theirs)
    assert copied.activation == activation and not copied.training
    torch.testing.assert_close(copied(x), theirs(x.clone()))


def test_from_torch_training_copy_of_timm_leaky_matches_timm() -> None:
    theirs = timm_layers.BatchNormAct2d(6, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2})
    ours = bnkit.BatchNormAct.from_torch(theirs)
    assert ours.negative_slope == 0.2 and ours.uses_low_memory()
    x = torch.randn(8, 6, 4, 4)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).square().sum().backward()
    theirs(xb).square().sum().backward()
    _close(xa.grad, xb.grad, "input gradient")
    _close(ours.weight.grad, theirs.weight.grad, "weight gradient")
    _close(ours.running_var, theirs.running_var, "running_var")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "mode", ["leaky_relu", "elu", "identity", "relu", "leaky_relu/momentum-None", "leaky_relu/axis-last"]
)
def test_forward_reads_nothing_on_the_host(mode: str, training: bool) -> None:
    activation = mode.split("/")[0]
    options = {"momentum": None} if mode.endswith("None") else {"axis": -1} if mode.endswith("last") else {}
    layer = _make(activation, 4, **options).train(training)
    with torch.no_grad():
        layer.weight[1] = 0.0
    x = torch.randn(8, 4, 3, 4, requires_grad=True)
    layer(x)
    with HostReads() as reads:
        for _ in range(3):
            layer(x)
    assert reads.count == 0, f"{mode}: {reads.count} host reads in 3 forwards"


@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "identity", "relu"])
def test_compile_fullgraph_training_equals_eager(activation: str) -> None:
    torch._dynamo.reset()
    eager = _make(activation, 4, momentum=None)
    with torch.no_grad():
        eager.weight[2] = 0.0
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for seed in range(2):
        x = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(seed)) * 2 + 1
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        upstream = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
        ye, yc = eager(xe), compiled(xc)
        (ye * upstream).sum().backward()
        (yc * upstream).sum().backward()
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled_module.weight.grad, eager.weight.grad, rtol=1e-5, atol=1e-6)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_module.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_bad_settings_are_one_line_errors_naming_the_layer() -> None:
    for kwargs, fragment in (
        ({"activation": "gelu"}, "activation must be one of"),
        ({"activation": "leaky_relu", "negative_slope": 0.0}, "negative_slope must be"),
        ({"memory": "tiny"}, "memory must be"),
        ({"exact_channels": -1}, "exact_channels must be"),
    ):
        with pytest.raises(ValueError, match=fragment) as info:
            bnkit.BatchNormAct(4, name="stem.bn", **kwargs)
        assert str(info.value).startswith("stem.bn:") and "\n" not in str(info.value)
    layer = bnkit.BatchNormAct(4, "elu", name="head.bn")
    with pytest.raises(ValueError, match=r"^head\.bn: activation must be one of"):
        layer.activation = "gelu"
    with pytest.raises(ValueError, match=r"^head\.bn: alpha must be"):
        layer.alpha = float("nan")
    assert layer.activation == "elu" and layer.alpha == 1.0
    with pytest.raises(ValueError, match="would drop the relu"):
        bnkit.BatchNormAct(4).to_torch()
    assert isinstance(bnkit.BatchNormAct(4, "identity").to_torch(), nn.BatchNorm2d)
    assert isinstance(bnkit.BatchNormAct(4), bnkit.BatchNorm) and bnkit.is_batchnorm(bnkit.BatchNormAct(4))
