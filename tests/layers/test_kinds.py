"""bnkit.layers.kinds against the real classes: torch.nn, bnkit, torchvision and timm BatchNorm layers, look-alikes
recognised by their buffers, user classes taught with register_batchnorm, and an import that stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import bnkit
from bnkit.layers.kinds import (
    KINDS,
    describe_batchnorm,
    named_batchnorm_like,
    register_batchnorm,
    unrecognised_running_stats,
    unregister_batchnorm,
    warn_unrecognised,
)

torchvision = pytest.importorskip("torchvision")
timm_layers = pytest.importorskip("timm.layers")


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b


def test_torch_layers() -> None:
    for cls, dims in ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3)):
        bn = cls(5, eps=1e-3, momentum=None)
        info = describe_batchnorm(bn)
        assert (info.kind, info.num_features, info.channel_axis, info.spatial_dims) == ("torch", 5, 1, dims)
        assert (info.eps, info.momentum, info.momentum_convention) == (1e-3, None, "torch")
        assert _same(info.running_mean, bn.running_mean) and _same(info.running_var, bn.running_var)
        assert _same(info.weight, bn.weight) and _same(info.bias, bn.bias)
        assert _same(info.num_batches_tracked, bn.num_batches_tracked)
        assert not info.affine_is_buffer and not info.frozen and info.updates_stats and not info.fixed
        assert info.activation is None and info.after == ()
    untracked = describe_batchnorm(nn.BatchNorm2d(3, affine=False, track_running_stats=False))
    assert not untracked.has_running_stats and not untracked.has_affine and not untracked.updates_stats


def test_lazy_and_sync() -> None:
    lazy = nn.LazyBatchNorm2d()
    info = describe_batchnorm(lazy)
    assert (info.kind, info.num_features, info.spatial_dims, info.lazy) == ("torch", 0, 2, True)
    lazy(torch.randn(2, 4, 3, 3))  # becomes a BatchNorm2d
    info = describe_batchnorm(lazy)
    assert (info.num_features, info.lazy) == (4, False)
    sync = describe_batchnorm(nn.SyncBatchNorm(6, momentum=0.3))
    assert (sync.kind, sync.num_features, sync.momentum, sync.spatial_dims) == ("sync", 6, 0.3, None)


def test_bnkit_layer_in_both_conventions() -> None:
    bn = bnkit.BatchNorm(4, axis=-1, momentum=0.2)
    info = describe_batchnorm(bn)
    assert (info.kind, info.channel_axis, info.axis_for(3), info.momentum, info.torch_momentum) == (
        "bnkit",
        -1,
        2,
        0.2,
        0.2,
    )
    keras = bnkit.BatchNorm.from_keras(4, momentum=0.99, epsilon=1e-3)
    info = describe_batchnorm(keras)
    assert (info.momentum, info.momentum_convention) == (0.99, "keras")
    assert info.torch_momentum == pytest.approx(0.01)
    keras.freeze_stats = True
    info = describe_batchnorm(keras)
    assert info.frozen and not info.updates_stats and not info.fixed


def test_freeze_hooks_make_a_torch_layer_frozen() -> None:
    bn = nn.BatchNorm2d(3)
    bnkit.freeze(bn, affine=False)
    info = describe_batchnorm(bn)
    assert info.frozen and not info.updates_stats and not info.fixed
    bnkit.unfreeze(bn)
    assert describe_batchnorm(bn).updates_stats


def test_torchvision_frozen() -> None:
    bn = torchvision.ops.FrozenBatchNorm2d(7, eps=1e-4)
    info = describe_batchnorm(bn)
    assert (info.kind, info.num_features, info.eps, info.spatial_dims) == ("torchvision-frozen", 7, 1e-4, 2)
    assert info.affine_is_buffer and info.frozen and info.fixed and not info.updates_stats
    assert info.momentum is None and info.momentum_convention is None and info.num_batches_tracked is None
    assert _same(info.weight, bn.weight) and _same(info.running_var, bn.running_var)


def test_timm_bnact_and_sync_bnact() -> None:
    bn = timm_layers.BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=nn.Dropout)
    info = describe_batchnorm(bn)
    assert (info.kind, info.num_features, info.spatial_dims) == ("timm-bnact", 8, 2)
    assert isinstance(info.activation, nn.SiLU) and isinstance(info.drop, nn.Dropout)
    assert info.after == (bn.drop, bn.act)
    plain = describe_batchnorm(timm_layers.BatchNormAct2d(8, apply_act=False))
    assert plain.activation is None and plain.after == ()
    sync = timm_layers.convert_sync_batchnorm(nn.Sequential(bn))[0]
    assert type(sync).__name__ == "SyncBatchNormAct"
    info = describe_batchnorm(sync)
    assert info.kind == "timm-sync-bnact" and isinstance(info.activation, nn.SiLU) and info.updates_stats


def test_timm_frozen() -> None:
    model = nn.Sequential(timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU), nn.BatchNorm2d(4))
    frozen = timm_layers.freeze_batch_norm_2d(model)
    kinds = [(type(info.module).__name__, info.kind) for _, info in named_batchnorm_like(frozen)]
    # timm's FrozenBatchNorm2d is torchvision's class (timm re-exports it), so it reports as torchvision's
    assert kinds == [("FrozenBatchNormAct2d", "timm-frozen-bnact"), ("FrozenBatchNorm2d", "torchvision-frozen")]
    info = describe_batchnorm(frozen[0])
    assert isinstance(info.activation, nn.ReLU) and info.fixed and info.affine_is_buffer


class Detectron2StyleFrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d has exactly this state: four buffers and eps (detectron2 is not installed)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)


def test_lookalike_recognised_by_buffers() -> None:
    info = describe_batchnorm(Detectron2StyleFrozenBatchNorm2d(5))
    assert (info.kind, info.num_features, info.spatial_dims, info.fixed) == ("lookalike-frozen", 5, 2, True)


def test_near_lookalikes_are_not_recognised() -> None:
    class StatsOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(3))
            self.register_buffer("running_var", torch.ones(3))

    class WrongShapes(Detectron2StyleFrozenBatchNorm2d):
        def __init__(self) -> None:
            super().__init__(3)
            self.register_buffer("bias", torch.zeros(4))

    model = nn.Sequential(StatsOnly(), WrongShapes(), nn.InstanceNorm2d(3, track_running_stats=True), nn.Linear(3, 3))
    assert named_batchnorm_like(model) == []
    assert [name for name, _ in unrecognised_running_stats(model)] == ["0", "1"]  # InstanceNorm is known
    with pytest.warns(UserWarning, match=r"explain: .* not recognise.*: 0, 1; .*register_batchnorm"):
        assert warn_unrecognised(model, "explain") == ("0", "1")


class ScaleNorm(nn.Module):
    """A user's BatchNorm with its own attribute names, channels last, and an activation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.mu = nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.register_buffer("avg_mean", torch.zeros(channels))
        self.register_buffer("avg_var", torch.ones(channels))
        self.epsilon = 1e-3
        self.decay = 0.99
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.gamma * (x - self.avg_mean) / (self.avg_var + self.epsilon).sqrt())


@pytest.fixture
def registered() -> type:
    register_batchnorm(
        ScaleNorm,
        channel_axis=-1,
        eps="epsilon",
        momentum="decay",
        momentum_convention="keras",
        running_mean="avg_mean",
        running_var="avg_var",
        weight="gamma",
        bias=None,
        activation="act",
    )
    yield ScaleNorm
    assert unregister_batchnorm(ScaleNorm)


def test_register_batchnorm(registered: type) -> None:
    layer = ScaleNorm(6)
    info = describe_batchnorm(layer)
    assert (info.kind, info.num_features, info.channel_axis, info.axis_for(4)) == ("registered", 6, -1, 3)
    assert (info.eps, info.momentum, info.momentum_convention) == (1e-3, 0.99, "keras")
    assert info.torch_momentum == pytest.approx(0.01)
    assert _same(info.running_mean, layer.avg_mean) and _same(info.weight, layer.gamma) and info.bias is None
    assert isinstance(info.activation, nn.GELU) and info.updates_stats and not info.frozen
    # subclasses are recognised through the registration of their base class
    sub = type("SubScaleNorm", (ScaleNorm,), {})(2)
    assert describe_batchnorm(sub).kind == "registered"
    model = nn.Sequential(nn.Linear(4, 6), layer)
    assert [(name, i.kind) for name, i in bnkit.named_batchnorm_like(model)] == [("1", "registered")]
    assert unrecognised_running_stats(model) == []


def test_registration_takes_precedence_and_describe_callable() -> None:
    def describe(module: nn.Module) -> bnkit.BatchNormInfo:
        info = describe_batchnorm.__wrapped__(module) if hasattr(describe_batchnorm, "__wrapped__") else None
        assert info is None
        return bnkit.BatchNormInfo(
            module=module,
            kind="my-bn",
            num_features=module.num_features,
            channel_axis=1,
            spatial_dims=2,
            eps=module.eps,
            momentum=None,
            momentum_convention=None,
            running_mean=module.running_mean,
            running_var=module.running_var,
            num_batches_tracked=None,
            weight=module.weight,
            bias=module.bias,
            affine_is_buffer=False,
            activation=None,
            drop=None,
            frozen=True,
            updates_stats=False,
        )

    class MyBN(nn.BatchNorm2d):
        pass

    register_batchnorm(MyBN, kind="my-bn", describe=describe)
    try:
        assert describe_batchnorm(MyBN(3)).kind == "my-bn"
        assert describe_batchnorm(nn.BatchNorm2d(3)).kind == "torch"
    finally:
        assert unregister_batchnorm(MyBN)
    assert describe_batchnorm(MyBN(3)).kind == "torch"


def test_register_batchnorm_errors() -> None:
    with pytest.raises(TypeError, match=r"must be an nn\.Module subclass"):
        register_batchnorm(int)
    with pytest.raises(ValueError, match="describe= describes the layer completely; leave out eps"):
        register_batchnorm(ScaleNorm, describe=lambda m: None, eps=1e-3)
    with pytest.raises(ValueError, match="momentum given without momentum_convention"):
        register_batchnorm(ScaleNorm, momentum=0.1)
    with pytest.raises(ValueError, match="frozen=True, updates_stats=True"):
        register_batchnorm(ScaleNorm, frozen=True, updates_stats=True)
    with pytest.raises(ValueError, match="spatial_dims"):
        register_batchnorm(ScaleNorm, spatial_dims=4)
    assert not unregister_batchnorm(ScaleNorm)  # nothing half-registered
    register_batchnorm(ScaleNorm)  # default attribute names: running_mean does not exist on ScaleNorm
    try:
        with pytest.raises(ValueError, match=r"ScaleNorm: registered with running_mean='running_mean' but the layer"):
            describe_batchnorm(ScaleNorm(2))
    finally:
        unregister_batchnorm(ScaleNorm)


def test_kinds_are_listed() -> None:
    assert set(KINDS) >= {"torch", "sync", "bnkit", "torchvision-frozen", "timm-bnact", "timm-frozen-bnact"}


def test_script_modules_are_not_described() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.BatchNorm2d(2), torchvision.ops.FrozenBatchNorm2d(2)))
    assert named_batchnorm_like(scripted) == []


def test_importing_bnkit_imports_neither_torchvision_nor_timm() -> None:
    code = (
        "import sys, torch, bnkit\n"
        "from bnkit.layers.kinds import describe_batchnorm, named_batchnorm_like\n"
        "m = torch.nn.Sequential(torch.nn.BatchNorm2d(2), bnkit.BatchNorm(2))\n"
        "print([i.kind for _, i in named_batchnorm_like(m)], bnkit.explain(m)[0].kind, bnkit.doctor(m).codes())\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torchvision', 'timm')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("['torch', 'bnkit'] torch")
    assert lines[-1] == "[]"
