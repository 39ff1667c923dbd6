"""The real-architecture matrix: stock torchvision and timm models, built without weights, with every BatchNorm kind.

Each :class:`ZooModel` builds the REAL class (``weights=None`` / ``pretrained=False``), gives it realistic
statistics (random running mean/variance and gamma/beta, so normalisation is not the identity), and says how to
call it: ``example`` follows bnkit's one convention for example inputs (a tensor or list is one positional
argument, a tuple positional arguments, a callable ``forward(model)``), ``batches`` are data batches for the
tools that iterate data (recalibrate, shift) together with ``forward`` (``None`` = the default
``call_on_batch``), and ``train_step`` calls the model in training mode (a detector needs targets there).

Inputs are as small as each architecture allows so the matrix fits CI time on two cores; :func:`build` seeds
everything, so a model and its inputs are the same in every test. torchvision and timm are imported inside the
builders only.

Kinds covered: ``torch`` (BatchNorm1d/2d/3d), ``sync`` (SyncBatchNorm), ``bnkit``, ``torchvision-frozen``
(a detector's FrozenBatchNorm2d backbone), ``timm-bnact``, ``timm-sync-bnact``, ``timm-frozen-bnact``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnkit.layers.kinds import named_batchnorm_like

__all__ = ["MODELS", "ZOO", "ZooModel", "build", "classification", "randomise_statistics"]


@dataclass(frozen=True)
class ZooModel:
    """One entry of the matrix.

    Attributes:
        name: the test id.
        builder: returns the model (real torchvision/timm class), before statistics are randomised.
        shape: the example input shape (an image/clip batch), or for a detector the shapes of its images.
        kinds: the BatchNorm kinds the model holds (what :func:`bnkit.layers.kinds.describe_batchnorm` reports).
        classification: a stock classification model (``doctor(..., intent="inference")`` must be quiet).
        detector: takes a list of images (and targets in training mode).
        train_shape: a larger input for training mode, when the architecture needs one (Inception's aux head).
        num_batches: how many data batches :meth:`batches` returns.
    """

    name: str
    builder: Callable[[], nn.Module]
    shape: tuple[int, ...] | tuple[tuple[int, ...], ...]
    kinds: frozenset[str]
    classification: bool = True
    detector: bool = False
    train_shape: tuple[int, ...] | None = None
    num_batches: int = 3
    tags: tuple[str, ...] = field(default_factory=tuple)

    # ----------------------------------------------------------------------------- inputs

    def _images(self, generator: torch.Generator) -> list[torch.Tensor]:
        return [torch.rand(shape, generator=generator) for shape in self.shape]  # type: ignore[arg-type]

    def example(self, seed: int = 1) -> Any:
        """Example inputs in bnkit's convention: a tensor, or a detector's list of images (one argument)."""
        generator = torch.Generator().manual_seed(seed)
        if self.detector:
            return self._images(generator)
        return torch.randn(self.shape, generator=generator)  # type: ignore[arg-type]

    def batches(self, seed: int = 2) -> list[Any]:
        """``num_batches`` data batches (different sizes where the architecture allows) for recalibrate/shift."""
        generator = torch.Generator().manual_seed(seed)
        out: list[Any] = []
        for k in range(self.num_batches):
            if self.detector:
                out.append(self._images(generator)[: 1 + k % 2])
            else:
                shape = (4 + k % 2, *self.shape[1:])  # type: ignore[misc]
                out.append(torch.randn(shape, generator=generator) * 1.5 + 0.25)
        return out

    @property
    def forward(self) -> Callable[[nn.Module, Any], Any] | None:
        """``forward=`` for recalibrate/shift: a detector's batch is a list of images, one argument."""
        if self.detector:
            return _call_one
        return None

    def train_step(self, model: nn.Module, seed: int = 3) -> Any:
        """One forward call in training mode (the caller sets the mode), with targets for a detector."""
        generator = torch.Generator().manual_seed(seed)
        if self.detector:
            images = self._images(generator)
            targets = [{"boxes": torch.tensor([[2.0, 3.0, 30.0, 28.0]]), "labels": torch.tensor([1])} for _ in images]
            return model(images, targets)
        shape = self.train_shape or self.shape
        return model(torch.randn(shape, generator=generator))  # type: ignore[arg-type]


def _call_one(model: nn.Module, batch: Any) -> Any:
    return model(batch)


def randomise_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm-like layer realistic statistics: running mean ~ N(0, 0.3^2), running variance in
    [0.5, 2], gamma in [0.5, 1.5], beta ~ N(0, 0.1^2) (in place; returns the model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, info in named_batchnorm_like(model):
            c = info.num_features

            def rand(scale: float, low: float = 0.0, c: int = c) -> torch.Tensor:
                return low + scale * torch.rand(c, generator=generator)

            if info.running_mean is not None:
                info.running_mean.copy_(torch.randn(c, generator=generator) * 0.3)
                info.running_var.copy_(rand(1.5, 0.5))
            if info.weight is not None:
                info.weight.copy_(rand(1.0, 0.5))
            if info.bias is not None:
                info.bias.copy_(torch.randn(c, generator=generator) * 0.1)
    return model


# ------------------------------------------------------------------------------------------------ builders


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)

    return make


def _timm(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return make


def _r3d() -> nn.Module:
    from torchvision.models.video import r3d_18

    return r3d_18(weights=None)


def _detector() -> nn.Module:
    """Faster R-CNN with a ResNet-18 FPN backbone in torchvision's FrozenBatchNorm2d, as with pretrained weights
    (torchvision picks FrozenBatchNorm2d only when weights are given, so it is asked for explicitly)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    return FasterRCNN(
        backbone,
        num_classes=3,
        min_size=64,
        max_size=80,
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20,
        rpn_pre_nms_top_n_train=50,
        rpn_post_nms_top_n_train=20,
        box_batch_size_per_image=16,
        rpn_batch_size_per_image=16,
    )


def _sync_resnet18() -> nn.Module:
    import torchvision

    return nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(weights=None))


def _timm_sync() -> nn.Module:
    import timm
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(timm.create_model("lcnet_050", pretrained=False))


def _timm_frozen() -> nn.Module:
    import timm
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(timm.create_model("mobilenetv3_small_050", pretrained=False))


def _bnkit_resnet18() -> nn.Module:
    """torchvision ResNet-18 with every BatchNorm2d replaced by an exact ``bnkit.BatchNorm`` copy."""
    import torchvision

    from bnkit.layers.batchnorm import BatchNorm

    model = torchvision.models.resnet18(weights=None)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, child_name, BatchNorm.from_torch(child))
    return model


_IMG = (2, 3, 32, 32)

ZOO: tuple[ZooModel, ...] = (
    ZooModel("tv_resnet18", _tv("resnet18"), _IMG, frozenset({"torch"})),
    ZooModel("tv_mobilenet_v3_small", _tv("mobilenet_v3_small"), _IMG, frozenset({"torch"})),
    ZooModel("tv_densenet121", _tv("densenet121"), _IMG, frozenset({"torch"})),
    ZooModel(
        "tv_inception_v3",
        _tv("inception_v3", aux_logits=True, init_weights=False),
        (2, 3, 75, 75),
        frozenset({"torch"}),
        train_shape=(2, 3, 299, 299),  # the aux head needs a 17x17 Mixed_6e output
    ),
    ZooModel("tv_efficientnet_b0", _tv("efficientnet_b0"), _IMG, frozenset({"torch"})),
    ZooModel("tv_shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), _IMG, frozenset({"torch"})),
    ZooModel("tv_regnet_y_400mf", _tv("regnet_y_400mf"), _IMG, frozenset({"torch"})),
    ZooModel("tv_r3d_18", _r3d, (2, 3, 4, 16, 16), frozenset({"torch"})),
    ZooModel(
        "tv_fasterrcnn_frozen",
        _detector,
        ((3, 64, 80), (3, 56, 64)),
        frozenset({"torchvision-frozen"}),
        classification=False,
        detector=True,
    ),
    ZooModel("tv_resnet18_sync", _sync_resnet18, _IMG, frozenset({"sync"})),
    ZooModel("bnkit_resnet18", _bnkit_resnet18, _IMG, frozenset({"bnkit"})),
    ZooModel("timm_efficientnet_b0", _timm("efficientnet_b0"), _IMG, frozenset({"timm-bnact"})),
    ZooModel("timm_mobilenetv3_small_050", _timm("mobilenetv3_small_050"), _IMG, frozenset({"timm-bnact"})),
    ZooModel("timm_regnety_002", _timm("regnety_002"), _IMG, frozenset({"timm-bnact"})),
    ZooModel("timm_cs3darknet_focus_s", _timm("cs3darknet_focus_s"), _IMG, frozenset({"timm-bnact"})),
    ZooModel("timm_lcnet_050_sync", _timm_sync, _IMG, frozenset({"timm-sync-bnact"})),
    ZooModel(
        "timm_mobilenetv3_small_050_frozen",
        _timm_frozen,
        _IMG,
        frozenset({"timm-frozen-bnact"}),
    ),
)

#: name -> entry
MODELS: dict[str, ZooModel] = {entry.name: entry for entry in ZOO}


def build(entry: ZooModel | str, seed: int = 0) -> nn.Module:
    """A fresh model of ``entry`` with realistic statistics, in eval mode, identical on every call."""
    entry = MODELS[entry] if isinstance(entry, str) else entry
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = entry.builder()
    return randomise_statistics(model, seed).eval()


def classification() -> list[ZooModel]:
    """The stock classification models (doctor must be quiet on them in eval mode with intent="inference")."""
    return [entry for entry in ZOO if entry.classification]
