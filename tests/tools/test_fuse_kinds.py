"""bnkit.fuse on every BatchNorm kind the ecosystem ships, and on the matrix of real architectures.

Oracles: the real torchvision and timm classes (``FrozenBatchNorm2d``, ``BatchNormAct2d``, ``FrozenBatchNormAct2d``,
stock models built without weights: tests/models/zoo.py), the unfused model in eval mode (outputs to 1e-4 of their
scale), and onnxruntime running the ONNX export of the fused model.
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import bnkit
from bnkit.layers.kinds import named_batchnorm_like
from bnkit.tools.fuse import FuseReport, fuse, fuse_with_report
from tests.models.zoo import ZOO, ZooModel, build, randomise_statistics

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

REL = 1e-4

# BatchNorms that no exact fold can remove, per zoo model, and why (every other one must be folded).
KEPT: dict[str, tuple[int, str]] = {
    # DenseNet's pre-activation norms read a concatenation (or a pooled map) and feed a ReLU: no layer to fold into.
    "tv_densenet121": (62, "`cat` is not a Conv"),
    # Inception's auxiliary head only runs in training mode: the traced eval forward never calls it.
    "tv_inception_v3": (2, "not called"),
}


def leaves(output: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [leaf for leaf in tree_flatten(output)[0] if isinstance(leaf, torch.Tensor)]


def assert_exact(got: Any, expected: Any, rel: float = REL) -> None:
    """Same structure; every tensor equal to ``rel`` of its own largest magnitude (integers exactly)."""
    got_leaves, expected_leaves = leaves(got), leaves(expected)
    assert len(got_leaves) == len(expected_leaves) and expected_leaves
    for g, e in zip(got_leaves, expected_leaves, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        if not e.is_floating_point():
            assert torch.equal(g, e)
            continue
        scale = float(e.abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(g, e, rtol=0, atol=rel * scale)


def eval_output(model: nn.Module, example: Any) -> Any:
    with torch.no_grad():
        return copy.deepcopy(model).eval()(example)


def folds(report: FuseReport) -> dict[str, tuple[str, str]]:
    return {f.bn: (f.into, f.position) for f in report.folded}


# ---------------------------------------------------------------------------------------------- single kinds


def test_torchvision_frozen_batchnorm_folds_after_and_before_a_conv():
    from torchvision.ops import FrozenBatchNorm2d

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        FrozenBatchNorm2d(8),
        nn.ReLU(),
        FrozenBatchNorm2d(8, eps=1e-3),
        nn.Conv2d(8, 4, 1),
    )
    randomise_statistics(model)
    x = torch.randn(2, 3, 9, 9)
    fused, report = fuse_with_report(model, x)
    assert folds(report) == {"1": ("0", "after"), "3": ("4", "before")} and report.skipped == []
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[3], nn.Identity)
    assert named_batchnorm_like(fused) == [] and report.unrecognised == []
    assert_exact(fused(x), eval_output(model, x), rel=1e-5)
    assert type(model[1]) is FrozenBatchNorm2d  # the input model is untouched


def bn_act(**kwargs: Any) -> nn.Module:
    from timm.layers import BatchNormAct2d

    return BatchNormAct2d(8, **kwargs)


def test_timm_batchnorm_act_keeps_its_activation_and_drop_exactly():
    from timm.layers import BatchNormAct2d, DropBlock2d

    drop = functools.partial(DropBlock2d, drop_prob=0.2, block_size=3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        bn_act(act_layer=nn.SiLU, drop_layer=drop),  # drop + act: an nn.Sequential(drop=..., act=...)
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        bn_act(act_layer="hard_swish"),  # act only: the activation itself
        nn.Conv2d(8, 8, 1),
        bn_act(apply_act=False),  # nothing after normalising: nn.Identity
    )
    randomise_statistics(model)
    x = torch.randn(2, 3, 10, 10)
    fused, report = fuse_with_report(model, x)
    assert folds(report) == {"1": ("0", "after"), "3": ("2", "after"), "5": ("4", "after")}
    assert isinstance(fused[1], nn.Sequential) and [n for n, _ in fused[1].named_children()] == ["drop", "act"]
    assert isinstance(fused[1].drop, DropBlock2d) and isinstance(fused[1].act, nn.SiLU)
    assert type(fused[3]) is type(model[3].act) and isinstance(fused[5], nn.Identity)
    assert not any(isinstance(m, BatchNormAct2d) for m in fused.modules())
    assert "kept drop (DropBlock2d), act (SiLU)" in report.folded[0].note
    assert_exact(fused(x), eval_output(model, x), rel=1e-5)


def test_timm_batchnorm_act_is_never_folded_into_the_layer_after_it():
    # Its activation sits between its affine map and the next conv: folding forward would be wrong.
    model = randomise_statistics(nn.Sequential(bn_act(act_layer=nn.ReLU), nn.Conv2d(8, 4, 1)))
    x = torch.randn(2, 8, 5, 5)
    with pytest.warns(UserWarning, match="none of the 1 BatchNorm"):
        fused, report = fuse_with_report(model, x)
    assert "applies ReLU after normalising" in report.skipped[0].reason
    assert_exact(fused(x), eval_output(model, x), rel=1e-6)


def test_timm_frozen_batchnorm_act_folds_and_keeps_its_activation():
    from timm.layers import FrozenBatchNormAct2d, freeze_batch_norm_2d

    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn_act(act_layer=nn.GELU), nn.Conv2d(8, 2, 1), nn.BatchNorm2d(2))
    model = freeze_batch_norm_2d(model)  # timm's own conversion: FrozenBatchNormAct2d, FrozenBatchNorm2d
    assert isinstance(model[1], FrozenBatchNormAct2d)
    randomise_statistics(model)
    x = torch.randn(2, 3, 7, 7)
    fused, report = fuse_with_report(model, x)
    assert folds(report) == {"1": ("0", "after"), "3": ("2", "after")}
    assert isinstance(fused[1], nn.GELU) and isinstance(fused[3], nn.Identity)
    assert_exact(fused(x), eval_output(model, x), rel=1e-5)


def test_timm_split_batchnorm_folds_its_eval_path_and_keeps_its_activation():
    from timm.layers import SplitBatchNorm2d, convert_splitbn_model

    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn_act(act_layer=nn.SiLU), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    model = convert_splitbn_model(model, num_splits=2)  # AugMix-style: auxiliary BNs used in training only
    assert isinstance(model[1], SplitBatchNorm2d) and isinstance(model[3], SplitBatchNorm2d)
    randomise_statistics(model).eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = fuse_with_report(model, x)
    assert folds(report) == {"1": ("0", "after"), "3": ("2", "after")} and report.skipped == []
    assert "1.aux_bn.0: removed with 1, the folded BatchNorm that holds it" in report.notes
    assert isinstance(fused[1], nn.SiLU) and named_batchnorm_like(fused) == []
    assert_exact(fused(x), eval_output(model, x), rel=1e-5)


def test_inplace_fuse_of_a_batchnorm_act_keeps_the_models_own_activation_module():
    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 8, 3), bn_act(act_layer=nn.SiLU)))
    act = model[1].act
    reference = eval_output(model, torch.ones(1, 3, 5, 5))
    fused = fuse(model, torch.randn(2, 3, 5, 5), inplace=True)
    assert fused is model and model[1] is act
    assert_exact(model(torch.ones(1, 3, 5, 5)), reference, rel=1e-5)


# ---------------------------------------------------------------------------------------------- real architectures


def onnx_output(model: nn.Module, example: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    """The output onnxruntime computes for the ONNX export of ``model``, and the export's op types."""
    import onnx
    import onnxruntime

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"])
    blob = buffer.getvalue()
    session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": example.numpy()})
    return torch.from_numpy(out), {node.op_type for node in onnx.load_from_string(blob).graph.node}


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_every_foldable_batchnorm_of_a_real_architecture_is_folded_exactly(entry: ZooModel):
    model = build(entry)
    example = entry.example()
    expected = eval_output(model, example)
    before = {name: info.kind for name, info in named_batchnorm_like(model)}
    assert set(before.values()) == set(entry.kinds)  # the model holds the kinds the zoo says it does

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unrecognised, something folded: no warning
        fused, report = fuse_with_report(model, example)

    kept_count, kept_reason = KEPT.get(entry.name, (0, ""))
    left = {name for name, _ in named_batchnorm_like(fused)}
    assert left == {s.bn for s in report.skipped} and len(left) == kept_count
    assert all(kept_reason in s.reason for s in report.skipped), report.skipped[:2]
    assert len(report.folded) + kept_count == len(before) and report.unrecognised == []
    assert report.checked and report.compared and report.compared > 0
    assert_exact(fused(copy.deepcopy(example)), expected)
    assert {name for name, _ in named_batchnorm_like(model)} == set(before)  # the input model is untouched

    if entry.detector:
        return  # a detector's ONNX export is out of scope; its list-of-images call is what is tested here
    got, ops = onnx_output(fused, example)
    assert_exact(got, expected[0] if isinstance(expected, tuple) else expected)
    if kept_count == 0:
        assert "BatchNormalization" not in ops


def test_timm_batchnorm_act_models_lose_every_batchnorm():
    # The numbers: timm efficientnet_b0 has 49 BatchNormAct2d layers, and fuse folded none of them.
    model = randomise_statistics(timm.create_model("efficientnet_b0", pretrained=False)).eval()
    x = torch.randn(1, 3, 32, 32)
    fused, report = fuse_with_report(model, x)
    assert len(report.folded) == 49 and report.skipped == [] and named_batchnorm_like(fused) == []
    assert isinstance(fused.bn1, nn.SiLU) and isinstance(fused.conv_head, nn.Conv2d)
    assert_exact(fused(x), eval_output(model, x))


def test_detector_without_detections_fails_the_check_in_one_line_and_is_left_untouched():
    entry = next(e for e in ZOO if e.detector)
    model = build(entry)
    model.roi_heads.score_thresh = 1.01  # no box can pass: empty boxes, scores and labels
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"check compared nothing: FasterRCNN returned 6 tensors, all empty") as info:
        fuse(model, entry.example(), inplace=True)
    assert "\n" not in str(info.value) and "example_inputs for which the model produces output" in str(info.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {info.kind for _, info in named_batchnorm_like(model)} == {"torchvision-frozen"}


def test_look_alike_frozen_batchnorm_is_folded_and_a_foreign_norm_is_named():
    class DetectronFrozenBN(nn.Module):
        """detectron2's FrozenBatchNorm2d layout (buffers weight/bias/running_mean/running_var, eps); its forward."""

        def __init__(self, n: int, eps: float = 1e-5) -> None:
            super().__init__()
            self.eps = eps
            for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                self.register_buffer(name, torch.full((n,), value))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)

    class RunningOnly(nn.Module):  # running statistics, no affine buffers: not a shape bnkit recognises
        def __init__(self, n: int) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(n))
            self.register_buffer("running_var", torch.ones(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - self.running_mean.reshape(1, -1, 1, 1)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), DetectronFrozenBN(4), RunningOnly(4))
    randomise_statistics(model)
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"fuse: modules with running statistics .* left out: 2;"):
        fused, report = fuse_with_report(model, x)
    assert folds(report) == {"1": ("0", "after")} and report.unrecognised == ["2"]
    assert_exact(fused(x), eval_output(model, x), rel=1e-5)


def test_bnkit_fuse_is_the_package_entry_point():
    assert bnkit.fuse is fuse and bnkit.FuseReport is FuseReport
    assert FuseReport.__module__ == "bnkit.tools.fuse"  # pickles name the public home, not the private layout
