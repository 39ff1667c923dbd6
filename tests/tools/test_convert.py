"""convert: exact torch <-> bnkit round trips, SyncBN -> BN on CPU, sync and GroupNorm targets, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
from bnkit.tools.convert import convert, default_groups
from bnkit.tools.freeze import freeze, is_frozen_affine, is_frozen_stats


class Mixed(nn.Module):
    """BatchNorm1d on [N, C] and [N, C, L], 2d and 3d, with assorted settings, at several depths."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(3, momentum=None)
        self.seq = nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4, affine=False))
        self.bn2 = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)
        self.bn2b = nn.BatchNorm2d(4, bias=False)
        self.bn3 = nn.BatchNorm3d(2, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.seq(self.bn1(x[:, :, 0]).unsqueeze(-1).expand(-1, -1, 5))  # [N, 4, 5]
        b = self.bn2b(self.bn2(a.unsqueeze(-1).expand(-1, -1, -1, 3)))  # [N, 4, 5, 3]
        c = self.bn3(b[:, :2].unsqueeze(-1))  # [N, 2, 5, 3, 1]
        return c.sum() + b.mean() + x.std()


def inputs(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 2) * 2 + 1


def trained() -> Mixed:
    model = Mixed()
    with torch.no_grad():
        for _ in range(3):
            model(inputs())
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    model.seq[0].weight.requires_grad_(False)
    model.bn2.bias.requires_grad_(False)
    model.bn2.eval()  # mixed training flags must survive
    return model


def assert_models_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]
    assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_bnkit_torch_round_trip_is_exact(mode: str) -> None:
    original = trained()
    original.train(mode == "train")
    as_bnkit = convert(original, "bnkit")
    assert all(type(m) is bnkit.BatchNorm for _, m in bnkit.named_batchnorms(as_bnkit))
    back = convert(as_bnkit, "torch", example_inputs=inputs())
    assert [type(m) for m in back.modules()] == [type(m) for m in original.modules()]
    assert_models_equal(original, back)
    assert_models_equal(original, convert(as_bnkit, "torch", dim={"bn1": 1, "seq.1": 1, "bn2": 2, "bn2b": 2, "bn3": 3}))

    # The same data through all three gives the same outputs and the same state afterwards.
    x = inputs()
    outs = []
    for model in (original, as_bnkit, back):
        with torch.no_grad():
            outs.append((model(x), model(x * 3)))
    assert torch.equal(outs[2][0], outs[0][0]) and torch.equal(outs[2][1], outs[0][1])
    # bnkit's training path for track_running_stats=False (bn3) is not bit-identical to torch's kernel
    # (rounding only); every layer with running statistics is, as the state comparison below shows.
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    assert_models_equal(original, back)
    for key, value in original.state_dict().items():
        if key.startswith("bn1.running"):
            # momentum=None: torch reads num_batches_tracked on the host (a sync) to form 1/n in double; bnkit
            # forms it on the device in float32 (no sync), which can differ in the last bit
            torch.testing.assert_close(value, as_bnkit.state_dict()[key], rtol=2e-7, atol=0)
        else:
            assert torch.equal(value, as_bnkit.state_dict()[key]), key


def test_bnkit_names_are_the_qualified_names() -> None:
    model = convert(trained(), "bnkit")
    assert model.seq[1].name == "seq.1" and model.bn3.name == "bn3"


def test_bnkit_layers_remember_their_rank_for_torch() -> None:
    model = convert(trained(), "bnkit")
    with torch.no_grad():
        model(inputs())
    back = convert(model, "torch")  # ranks seen in forward are enough
    assert type(back.bn1) is nn.BatchNorm1d and type(back.bn3) is nn.BatchNorm3d


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_syncbn_to_bn_on_cpu_without_process_group(mode: str) -> None:
    assert not torch.distributed.is_initialized()
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.2), nn.ReLU(), nn.BatchNorm2d(4))
    with torch.no_grad():
        reference(torch.randn(8, 3, 6, 6))
    synced = convert(reference, "torch-sync")
    assert type(synced[1]) is nn.SyncBatchNorm and type(synced[3]) is nn.SyncBatchNorm
    assert_models_equal(reference, synced)
    back = convert(synced, "torch", dim=2)
    assert type(back[1]) is nn.BatchNorm2d
    assert_models_equal(reference, back)
    x = torch.randn(8, 3, 6, 6)
    reference.train(mode == "train")
    back.train(mode == "train")
    with torch.no_grad():
        assert torch.equal(reference(x), back(x))
    assert_models_equal(reference, back)


def test_torch_reads_the_rank_of_a_syncbn_from_its_neighbours_or_from_dim() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.SyncBatchNorm(3))
    assert type(convert(model, "torch")[1]) is nn.BatchNorm1d  # from the Linear before it
    assert type(convert(model, "torch", example_inputs=torch.randn(4, 2))[1]) is nn.BatchNorm1d
    assert type(convert(model, "torch", dim=3)[1]) is nn.BatchNorm3d  # dim wins
    with pytest.raises(ValueError, match="dim must be 1, 2, 3"):
        convert(model, "torch", dim=4)
    with pytest.raises(ValueError, match=r"dim\['1'\] must be 1, 2, 3"):
        convert(model, "torch", dim={"1": 0})


def test_bnkit_settings_torch_cannot_express_are_refused_unless_not_strict() -> None:
    keras_like = bnkit.BatchNorm.from_keras(4, axis=1)
    with torch.no_grad():
        keras_like.train()(torch.randn(8, 4) * 3)
    model = nn.Sequential(nn.Identity(), keras_like)
    with pytest.raises(ValueError, match=r"layer '1'.*biased running variance.*strict=False"):
        convert(model, "torch", dim=1)
    loose = convert(model, "torch", dim=1, strict=False)
    assert type(loose[1]) is nn.BatchNorm1d
    x = torch.randn(5, 4)
    torch.testing.assert_close(loose.eval()(x), model.eval()(x), rtol=0, atol=0)
    channels_last = nn.Sequential(bnkit.BatchNorm(4, axis=-1))
    with pytest.raises(ValueError, match="channel axis -1"):
        convert(channels_last, "torch", dim=2)


def test_sync_and_bnkit_sync_targets() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), bnkit.BatchNorm(3, virtual_batch_size=2))
    torch_synced = convert(model, "torch-sync")
    assert type(torch_synced[0]) is nn.SyncBatchNorm
    assert type(torch_synced[1]) is bnkit.BatchNorm and torch_synced[1].sync
    assert torch_synced[1].virtual_batch_size == 2
    assert not model[1].sync  # the input model is not changed
    for target in ("sync", "bnkit-sync"):
        both = convert(model, target)
        assert all(type(m) is bnkit.BatchNorm and m.sync for m in both)
        x = torch.randn(4, 3, 2, 2)  # without a process group a synchronised layer is the local layer
        torch.testing.assert_close(both[0](x), model[0](x))
    plain = convert(both, "torch", dim=2, layers="0")
    assert type(plain[0]) is nn.BatchNorm2d  # sync is dropped without complaint by "torch"


def test_group_conversion_groups_and_affine() -> None:
    assert [default_groups(c) for c in (1, 8, 20, 32, 48, 64, 96, 37)] == [1, 8, 20, 32, 24, 32, 32, 1]
    model = nn.Sequential(
        nn.Conv2d(3, 48, 1), nn.BatchNorm2d(48), nn.BatchNorm2d(48, affine=False), nn.BatchNorm2d(48, bias=False)
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    model[1].bias.requires_grad_(False)
    grouped = convert(model, "group")
    gn = grouped[1]
    assert type(gn) is nn.GroupNorm and gn.num_groups == 24 and gn.eps == model[1].eps
    assert torch.equal(gn.weight, model[1].weight) and torch.equal(gn.bias, model[1].bias)
    assert gn.weight.requires_grad and not gn.bias.requires_grad
    assert not grouped[2].affine
    assert grouped[3].bias is None and grouped[3].weight is not None
    x = torch.randn(2, 3, 4, 4)
    h = model[0](x)
    torch.testing.assert_close(gn(h), F.group_norm(h, 24, model[1].weight, model[1].bias, model[1].eps))
    assert convert(model, "group", groups=4)[1].num_groups == 4
    assert convert(model, "group", groups=lambda c: c)[1].num_groups == 48
    with pytest.raises(ValueError, match=r"layer '1' has 48 channels, which 5 groups do not divide"):
        convert(model, "group", groups=5)


def test_inplace_and_new_model_semantics() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    new = convert(model, "bnkit")
    assert new is not model and type(model[1]) is nn.BatchNorm1d
    assert new[0].weight is not model[0].weight
    same_object = convert(model, "bnkit", inplace=True)
    assert same_object is model and type(model[1]) is bnkit.BatchNorm
    top = nn.BatchNorm2d(3)
    converted = convert(top, "bnkit", inplace=True)
    assert type(converted) is bnkit.BatchNorm and type(top) is nn.BatchNorm2d


def test_shared_layer_stays_shared() -> None:
    bn = nn.BatchNorm1d(3)
    model = nn.ModuleDict({"a": bn, "b": nn.Sequential(bn)})
    converted = convert(model, "bnkit")
    assert converted["a"] is converted["b"][0] and type(converted["a"]) is bnkit.BatchNorm


def test_freeze_state_is_carried_across_conversions() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    freeze(model, layers="0")
    freeze(model, layers="1", stats=False)
    as_bnkit = convert(model, "bnkit")
    assert as_bnkit[0].freeze_stats and as_bnkit[0].freeze_affine
    assert not as_bnkit[1].freeze_stats and as_bnkit[1].freeze_affine
    back = convert(as_bnkit, "torch", dim=2)
    assert is_frozen_stats(back[0]) and is_frozen_affine(back[0])
    assert not is_frozen_stats(back[1]) and is_frozen_affine(back[1])
    synced = convert(model, "torch-sync")
    assert is_frozen_stats(synced[0]) and not is_frozen_stats(synced[1])
    bnkit_synced = convert(model, "sync")
    assert bnkit_synced[0].freeze_stats and not bnkit_synced[1].freeze_stats
    before = back[0].running_mean.clone()
    back.train()(torch.randn(4, 3, 2, 2))
    assert torch.equal(back[0].running_mean, before)


def test_device_and_dtype_are_kept() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3)).double()
    with torch.no_grad():
        model(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    for to, kwargs in (("bnkit", {}), ("sync", {}), ("group", {})):
        converted = convert(model, to, **kwargs)
        assert all(t.dtype == torch.float64 for t in converted.parameters())
        assert all(t.device == torch.device("cpu") for t in converted.state_dict().values())
    back = convert(convert(model, "bnkit"), "torch", dim=2)
    assert back[0].running_var.dtype == torch.float64
    assert torch.equal(back[0].running_var, model[0].running_var)


def test_foreign_hooks_are_reported() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    model[0].register_forward_hook(lambda m, a, o: None)
    with pytest.warns(UserWarning, match="hooks registered on 0 were not carried over"):
        convert(model, "bnkit")


def test_bad_arguments(snapshot, same) -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    before = snapshot(model)
    targets = "bnkit, sync, bnkit-sync, torch, torch-sync, group, frozen, trainable, bnact"
    with pytest.raises(ValueError, match=f"to must be one of {targets}; got 'layernorm'"):
        convert(model, "layernorm")
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        convert([model], "bnkit")
    with pytest.raises(ValueError, match="groups= only applies"):
        convert(model, "bnkit", groups=2)
    with pytest.raises(ValueError, match="dim= only applies"):
        convert(model, "sync", dim=1)
    with pytest.raises(ValueError, match="matched no BatchNorm"):
        convert(model, "bnkit", layers="nothing*")
    with pytest.raises(ValueError, match="lazy BatchNorm that has not seen an input"):
        convert(nn.Sequential(nn.LazyBatchNorm1d()), "bnkit")
    same(before, snapshot(model))
    lazy = nn.Sequential(nn.LazyBatchNorm1d())
    lazy(torch.randn(4, 3))
    assert type(convert(lazy, "bnkit")[0]) is bnkit.BatchNorm


def test_original_model_is_never_mutated(snapshot, same) -> None:
    model = trained()
    before = snapshot(model)
    deep = copy.deepcopy(model)
    for to, kwargs in (
        ("bnkit", {}),
        ("bnkit-sync", {}),
        ("sync", {}),
        ("torch-sync", {}),
        ("group", {}),
        ("torch", {"example_inputs": inputs()}),
    ):
        convert(model if to != "torch" else convert(deep, "bnkit"), to, **kwargs)
    same(before, snapshot(model))
