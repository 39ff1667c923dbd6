"""explain: its claims are checked against what the layers actually do when the model runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import bnkit
from bnkit.inspection.explain import Explanation, LayerExplanation


def _probe(model: nn.Module, name: str, training: bool, x: torch.Tensor) -> tuple[str, bool]:
    """Run a copy of the model in train()/eval() and observe the layer: which statistics, did it update."""
    model = copy.deepcopy(model)
    model.train(training)
    layer = dict(model.named_modules())[name]
    seen = {}

    def hook(module, args, output):
        seen["x"], seen["y"] = args[0].detach(), output.detach()

    handle = layer.register_forward_hook(hook)
    before = layer.running_mean.clone() if getattr(layer, "running_mean", None) is not None else None
    with torch.no_grad():
        model(x)
    handle.remove()
    updated = before is not None and not torch.equal(before, layer.running_mean)
    inp, out = seen["x"], seen["y"]
    var, mean = torch.var_mean(inp, dim=(0, 2, 3), correction=0, keepdim=True)
    weight = layer.weight.view(1, -1, 1, 1) if layer.weight is not None else 1.0
    bias = layer.bias.view(1, -1, 1, 1) if layer.bias is not None else 0.0
    batch_out = (inp - mean) / torch.sqrt(var + layer.eps) * weight + bias
    return ("batch" if torch.allclose(out, batch_out, atol=1e-4) else "running"), updated


def _net(bn: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.ReLU())


def _frozen_torch(**kwargs) -> nn.Module:
    bn = nn.BatchNorm2d(4)
    bnkit.freeze(bn, **kwargs)
    return bn


def _untracked_with_buffers() -> nn.Module:
    # track_running_stats switched off after construction: the buffers stay, and torch still uses them in eval
    bn = nn.BatchNorm2d(4)
    bn.track_running_stats = False
    return bn


def _bnkit(**switches) -> nn.Module:
    bn = bnkit.BatchNorm(4)
    for key, value in switches.items():
        setattr(bn, key, value)
    return bn


CASES = {
    "torch default": lambda: nn.BatchNorm2d(4),
    "torch eval()": lambda: nn.BatchNorm2d(4).eval(),
    "torch no running stats": lambda: nn.BatchNorm2d(4, track_running_stats=False),
    "torch untracked, buffers kept": _untracked_with_buffers,
    "torch requires_grad False": lambda: nn.BatchNorm2d(4).requires_grad_(False),
    "torch frozen by bnkit": lambda: _frozen_torch(),
    "torch stats frozen by bnkit": lambda: _frozen_torch(affine=False),
    "torch affine frozen by bnkit": lambda: _frozen_torch(stats=False),
    "bnkit default": lambda: _bnkit(),
    "bnkit freeze_stats": lambda: _bnkit(freeze_stats=True),
    "bnkit trainable False": lambda: _bnkit(trainable=False),
    "bnkit no running stats": lambda: bnkit.BatchNorm(4, track_running_stats=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_claims_match_behaviour_in_train_and_eval(case: str) -> None:
    model = _net(CASES[case]())
    row = bnkit.explain(model)[0]
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 3 + 1
    for training, claimed in ((True, row.train), (False, row.eval)):
        normalize, updated = _probe(model, "1", training, x)
        assert (claimed.normalize, claimed.updates_running_stats) == (normalize, updated), (case, training)


@pytest.mark.parametrize("case", sorted(CASES))
def test_affine_claim_matches_requires_grad(case: str) -> None:
    bn = CASES[case]()
    row = bnkit.explain(_net(bn))[0]
    grads = [bn.weight.requires_grad, bn.bias.requires_grad]
    expected = "learn" if all(grads) else "frozen" if not any(grads) else None
    assert row.affine == expected


def test_affine_partly_frozen() -> None:
    bn = nn.BatchNorm2d(4)
    bn.bias.requires_grad_(False)
    assert bnkit.explain(bn)[0].affine == "bias frozen"
    assert bnkit.explain(nn.BatchNorm2d(4, affine=False))[0].affine == "none"


def _reasons(bn: nn.Module) -> str:
    return "\n".join(bnkit.explain(_net(bn))[0].reasons)


def test_reason_requires_grad_false_but_statistics_update() -> None:
    bn = nn.BatchNorm2d(4)
    bn.weight.requires_grad_(False)
    assert "requires_grad is False on weight but statistics still update in train()" in _reasons(bn)


def test_reason_requires_grad_false_without_update_when_frozen() -> None:
    text = _reasons(_frozen_torch())
    assert "statistics frozen by bnkit.freeze" in text
    assert "still update" not in text


def test_reason_bnkit_switches_and_track_running_stats() -> None:
    assert "freeze_stats is set" in _reasons(_bnkit(freeze_stats=True))
    assert "freeze_affine is set" in _reasons(_bnkit(freeze_affine=True))
    assert "track_running_stats=False" in _reasons(nn.BatchNorm2d(4, track_running_stats=False))


def test_reason_eval_is_undone_by_train() -> None:
    assert "a parent's model.train() switches it back" in _reasons(nn.BatchNorm2d(4).eval())
    assert "switches it back" not in _reasons(nn.BatchNorm2d(4))
    frozen = _frozen_torch()
    frozen.eval()
    assert "switches it back" not in _reasons(frozen)


def test_reason_momentum_conventions() -> None:
    assert "cumulative average" in _reasons(nn.BatchNorm2d(4, momentum=None))
    keras = bnkit.BatchNorm.from_keras(4, axis=1)
    assert "Keras momentum 0.99" in _reasons(keras)


def test_rows_for_every_kind_of_norm_layer_in_module_order() -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.Sequential(nn.SyncBatchNorm(3), bnkit.BatchNorm(3)),
        nn.GroupNorm(1, 3),
        nn.LayerNorm(3),
        nn.InstanceNorm1d(3),
        nn.Linear(3, 3),
    )
    table = bnkit.explain(model)
    assert [(r.name, r.type) for r in table] == [
        ("0", "BatchNorm1d"),
        ("1.0", "SyncBatchNorm"),
        ("1.1", "bnkit.BatchNorm"),
        ("2", "GroupNorm"),
        ("3", "LayerNorm"),
        ("4", "InstanceNorm1d"),
    ]
    assert [r.batch_dependent for r in table] == [True, True, True, False, False, False]
    assert table[1].train.synchronized and not table[1].eval.synchronized
    assert table[3].train.normalize == table[3].eval.normalize == "per-sample"
    assert "batch-independent" in table[3].reasons[0]
    assert [r.channels for r in table] == [3, 3, 3, 3, 3, 3]


def test_model_that_is_a_layer_and_model_without_norms() -> None:
    table = bnkit.explain(nn.BatchNorm1d(5))
    assert len(table) == 1 and table[0].name == "" and "(model)" in str(table)
    with pytest.warns(UserWarning, match="explain: the model has no BatchNorm or other normalisation layer"):
        assert str(bnkit.explain(nn.Linear(2, 2))) == "no BatchNorm or other normalisation layer found"


def test_plain_data_json_and_table() -> None:
    model = _net(nn.BatchNorm2d(4, track_running_stats=False))
    table = bnkit.explain(model)
    assert isinstance(table, Explanation) and isinstance(table[0], LayerExplanation)
    data = json.loads(table.to_json())
    assert data == table.to_dicts()
    assert data[0]["train"] == {"normalize": "batch", "updates_running_stats": False, "synchronized": False}
    text = str(table)
    assert "track_running_stats=False" in text and text.splitlines()[0].startswith("layer")


def test_explain_changes_nothing() -> None:
    model = _net(nn.BatchNorm2d(4))
    model[1].eval()
    state = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    bnkit.explain(model)
    assert [m.training for m in model.modules()] == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        bnkit.explain("model.pt")  # type: ignore[arg-type]


def test_unrecognised_running_statistics_are_named() -> None:
    class Stats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(2))
            self.register_buffer("running_var", torch.ones(2))

    model = nn.Sequential(nn.BatchNorm1d(2), Stats())
    with pytest.warns(UserWarning, match=r"explain: .*not recognise.*: 1"):
        table = bnkit.explain(model)
    assert [row.name for row in table] == ["0"] and table.unrecognised == ("1",)
    assert str(table).endswith("not recognised (running statistics, unknown class; see bnkit.register_batchnorm): 1")


def test_frozen_batchnorm_and_timm_activation_rows() -> None:
    torchvision = pytest.importorskip("torchvision")
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(torchvision.ops.FrozenBatchNorm2d(3), timm_layers.BatchNormAct2d(3, act_layer=nn.SiLU))
    frozen, act = bnkit.explain(model)
    assert (frozen.kind, frozen.affine, frozen.train.normalize, frozen.train.updates_running_stats) == (
        "torchvision-frozen",
        "fixed",
        "running",
        False,
    )
    assert frozen.channels == 3 and "never loaded" in frozen.reasons[-1]
    assert (act.kind, act.after, act.train.normalize) == ("timm-bnact", ["SiLU"], "batch")
    assert act.reasons[-1] == "then SiLU in the same module (BatchNormAct2d)"
    assert LayerExplanation.from_dict(act.to_dict()) == act
    # the claims hold: the frozen layer's output is the same in train() and eval()
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(model[0].train()(x), model[0].eval()(x), rtol=0, atol=0)
