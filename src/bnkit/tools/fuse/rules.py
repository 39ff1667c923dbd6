"""When a BatchNorm folds exactly into a neighbouring layer: the checks on the BatchNorm, on the layer and on the
pair (channels, axis, rank, and the border effects of folding into the layer after it)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from bnkit.tools.freeze import has_foreign_hooks
from bnkit.tools.fuse.norms import NormView, norm_view  # noqa: F401 (norm_view: examples)
from bnkit.tools.fuse.trace import LAYERS

__all__ = ["Verdict", "after_verdict", "before_verdict", "layer_problem", "norm_problem"]


@dataclass(frozen=True)
class Verdict:
    """Whether a fold is exact: ``problem`` is None when it is; ``note`` is what the user should still know.

    Example:
        >>> Verdict(None, "input rank not verified").ok
        True
    """

    problem: str | None
    note: str = ""

    @property
    def ok(self) -> bool:
        """True when the fold may go ahead."""
        return self.problem is None


def norm_problem(view: NormView, multiplicity: Counter[int]) -> str | None:
    """Why the BatchNorm ``view`` describes cannot be folded anywhere; None when it can.

    Example:
        >>> bn = nn.BatchNorm2d(3)
        >>> norm_problem(norm_view(bn), Counter({id(bn): 2}))
        'the same module is registered under several names; folding it would change every use'
    """
    bn = view.module
    if not view.understood:
        return f"{view.kind} overrides forward (e.g. a fused activation); folding would drop that, so it is kept"
    if view.info.lazy:
        return "lazy layer not initialised; run the model once or pass example_inputs"
    if not view.info.has_running_stats:
        return "track_running_stats=False: it normalises with batch statistics in eval, not an affine map"
    if not view.uses_running_stats():
        return "it normalises with batch statistics in eval, not an affine map"
    if multiplicity[id(bn)] > 1:
        return "the same module is registered under several names; folding it would change every use"
    # bnkit.freeze's hooks only switch a BN to inference mode, which it already is in a fused (eval) model.
    if has_foreign_hooks(bn):
        return "it has hooks, which would stop firing if it were removed"
    return None


def layer_problem(name: str, layer: nn.Module, multiplicity: Counter[int]) -> str | None:
    """Why ``layer`` (a Conv/ConvTranspose/Linear) cannot absorb a BatchNorm; None when it can.

    Example:
        >>> layer = nn.Conv2d(3, 4, 1)
        >>> _ = layer.register_forward_hook(lambda *args: None)
        >>> layer_problem("conv", layer, Counter())
        'conv has hooks'
    """
    base = next(cls for cls in LAYERS if isinstance(layer, cls))
    if type(layer).forward is not base.forward:
        return f"{name} ({type(layer).__name__}) overrides forward"
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(layer):
        return f"{name} has parametrized weights"
    if isinstance(layer.weight, nn.parameter.UninitializedTensorMixin):
        return f"{name} is a lazy layer not initialised yet; pass example_inputs"
    if multiplicity[id(layer)] > 1:
        return f"{name} is registered under several names"
    if has_foreign_hooks(layer):
        return f"{name} has hooks"
    return None


def _channels_verdict(
    layer_name: str, layer: nn.Module, view: NormView, ndim: int | None, side: Literal["output", "input"]
) -> Verdict:
    """Whether the BN's channels are the layer's ``side`` channels, for an input of rank ``ndim``."""
    if isinstance(layer, nn.Linear):
        channels = layer.out_features if side == "output" else layer.in_features
    else:
        channels = layer.out_channels if side == "output" else layer.in_channels
    if channels != view.num_features:
        return Verdict(f"{layer_name} has {channels} {side} channels, the BN {view.num_features}")
    if isinstance(layer, nn.Linear):
        return _features_verdict(view, ndim, f"{layer_name} {'outputs' if side == 'output' else 'reads'}")
    note = "" if ndim is not None else "input rank not verified (no example inputs)"
    spatial = len(layer.kernel_size)
    if ndim is not None and ndim != spatial + 2:
        return Verdict(f"{layer_name} is called without a batch dimension (input rank {ndim})")
    if view.channel_axis(spatial + 2) != 1:
        return Verdict(f"the BN normalises axis {view.configured_axis}, not the channel axis 1 of {layer_name}")
    return Verdict(None, note)


def _features_verdict(view: NormView, ndim: int | None, what: str) -> Verdict:
    """A linear layer's features are its last axis: the BN must normalise that axis."""
    axis = view.configured_axis
    if ndim is None:
        if axis == -1:
            return Verdict(None, "input rank not verified (no example inputs)")
        if axis == 1:
            return Verdict(None, "input rank not verified (no example inputs); assumed 2-D")
        return Verdict(f"without example inputs the BN's axis {axis} cannot be matched to the features")
    if view.channel_axis(ndim) != ndim - 1:
        return Verdict(f"{what} features on the last axis of rank {ndim} but the BN normalises axis {axis}")
    return Verdict(None)


def _border_problem(name: str, layer: nn.Module) -> str | None:
    """Why folding a BN into the layer AFTER it would change border outputs; None when it would not."""
    if isinstance(layer, _ConvTransposeNd):
        if any(k != 1 for k in layer.kernel_size) or any(s != 1 for s in layer.stride):
            return (
                f"{name} is a ConvTranspose with kernel {tuple(layer.kernel_size)} and stride "
                f"{tuple(layer.stride)}: border outputs see fewer taps of the BN's shift"
            )
        if any(p != 0 for p in layer.output_padding):
            return f"{name} has output_padding {tuple(layer.output_padding)}: padded outputs see no shift"
        return None
    if layer.padding_mode != "zeros":
        return None  # reflect/replicate/circular pad with copies of normalised values: exact
    padding = layer.padding
    if isinstance(padding, str):
        if padding == "valid" or all(d * (k - 1) == 0 for d, k in zip(layer.dilation, layer.kernel_size, strict=True)):
            return None
        return f"{name} uses padding='same' with zeros: border outputs would see zeros, not the BN's shift"
    if any(p != 0 for p in padding):
        return f"{name} has zero padding {tuple(padding)}: border outputs would see zeros, not the BN's shift"
    return None


def kept_note(view: NormView) -> str:
    """What a fold keeps of the BatchNorm (its post modules), for the report.

    Example:
        >>> kept_note(norm_view(nn.BatchNorm2d(3)))
        ''
    """
    if not view.post:
        return ""
    kept = ", ".join(f"{role} ({type(module).__name__})" for role, module in view.post)
    return f"kept {kept}"


def after_verdict(layer_name: str, layer: nn.Module, view: NormView, layer_rank: int | None) -> Verdict:
    """Whether BN(layer(x)) folds into ``layer`` (always exact when the channels line up).

    Example:
        >>> after_verdict("conv", nn.Conv2d(3, 4, 1), norm_view(nn.BatchNorm2d(5)), 4)
        Verdict(problem='conv has 4 output channels, the BN 5', note='')
    """
    verdict = _channels_verdict(layer_name, layer, view, layer_rank, "output")
    if not verdict.ok:
        return verdict
    return Verdict(None, "; ".join(n for n in (verdict.note, kept_note(view)) if n))


def before_verdict(view: NormView, bn_rank: int | None, layer_name: str, layer: nn.Module) -> Verdict:
    """Whether layer(BN(x)) folds into ``layer`` exactly.

    Example:
        >>> bn = nn.BatchNorm2d(3).eval()
        >>> _ = bn.running_mean.fill_(1.0)  # a non-zero shift
        >>> before_verdict(norm_view(bn), 4, "conv", nn.Conv2d(3, 4, 3, padding=1)).problem
        "conv has zero padding (1, 1): border outputs would see zeros, not the BN's shift"
    """
    if view.post:
        applied = ", ".join(type(module).__name__ for _, module in view.post)
        return Verdict(f"it applies {applied} after normalising, so its map cannot move into {layer_name}")
    verdict = _channels_verdict(layer_name, layer, view, bn_rank, "input")
    if not verdict.ok or isinstance(layer, nn.Linear):
        return verdict
    exact = _border_problem(layer_name, layer)
    if exact is not None:
        if bool((view.affine().shift == 0).all()):
            return verdict
        return Verdict(exact)
    return verdict
