"""``bnkit.BatchNorm``: one BatchNorm layer with exact PyTorch and Keras semantics and an explicit mode model."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnkit.core.moments import Moments, batch_stats, channel_moments, ghost_moments, reduction_dims
from bnkit.core.normalize import normalize, renorm_correction
from bnkit.core.running import ema_update, keras_ema_update, unbias
from bnkit.layers.renorm import Renorm
from bnkit.layers.validation import VALIDATED_SETTINGS, check_layer_state, check_setting

__all__ = ["BatchNorm"]

_FAST_DTYPES = (torch.float32, torch.float64)


class BatchNorm(nn.Module):
    r"""BatchNorm over any channel axis with PyTorch's or Keras's exact semantics and freeze switches.

    A drop-in for ``torch.nn.BatchNorm1d/2d/3d`` (same arguments, same state dict keys and shapes, same
    numbers) that can also reproduce Keras 3's ``BatchNormalization`` (:meth:`from_keras`).

    **During training** (batch statistics), per channel ``c`` over every other axis:
    ``y = weight * (x - mean_B) / sqrt(var_B + eps) + bias`` with the biased batch variance ``var_B``; gradients
    flow through ``mean_B`` and ``var_B``. The running statistics then move towards the batch:
    ``running = (1 - momentum) * running + momentum * batch``. ``momentum`` is PyTorch's convention, the weight
    of the NEW batch (Keras's 0.99 is PyTorch's 0.01); ``momentum=None`` is a cumulative average
    (factor ``1 / num_batches_tracked``). The stored variance is unbiased (``n / (n - 1)`` times ``var_B``) as in
    PyTorch, or biased as in Keras when ``unbiased_running_var=False``.

    **During inference** (running statistics): ``y = weight * (x - running_mean) / sqrt(running_var + eps) + bias``,
    a per-channel affine map; nothing is updated.

    **Mode rule.** Two orthogonal switches, plain attributes that survive ``train()``, ``eval()`` and
    ``copy.deepcopy``: ``freeze_stats`` (always normalise with the running statistics and never update them) and
    ``freeze_affine`` (gamma/beta get ``requires_grad=False`` and are detached in forward, so no gradient reaches
    them even if a later ``requires_grad_(True)`` re-enables them). ``trainable`` is Keras's alias for both.
    With ``t = training if training is not None else self.training``:

    ======================  ================  =====================  =======================
    t                       freeze_stats      track_running_stats    normalise with / update
    ======================  ================  =====================  =======================
    True                    False             True                   batch / yes
    True                    True              True                   running / no
    False                   any               True                   running / no
    any                     any               False                  batch / no (no buffers)
    ======================  ================  =====================  =======================

    Gamma/beta learn unless ``freeze_affine`` (or ``affine=False``). ``forward(x, training=True)`` overrides the
    mode for this call only.

    **Ghost batches** (``virtual_batch_size=k``): in training the batch is split into contiguous groups of ``k``
    samples (samples ``0..k-1``, ``k..2k-1``, ...; tf.keras interleaves instead), each normalised with its own
    statistics. The running statistics get one update per step with the average of the groups' means and of
    their variances (each in the layer's convention). A batch whose size is not a multiple of ``k`` is an error
    (use ``drop_last=True`` in the DataLoader). Inference uses the running statistics.

    **Batch Renormalization** (``renorm=Renorm(...)`` or ``True`` for the defaults): see :class:`bnkit.Renorm`.
    Adds buffers ``running_std``, ``renorm_mean`` and ``renorm_std``; as in Keras, ``running_var`` is derived as
    ``relu(running_std**2 - eps)``.

    **Masks** (``forward(x, mask=m)``, ``m`` boolean, ``x``'s shape without the channel axis): statistics over
    unmasked positions only; the output itself is not masked. A fully masked batch gives no NaN and leaves the
    running statistics (and ``num_batches_tracked``) unchanged.

    **Precision**: float16/bfloat16 inputs are normalised in float32 with float32 statistics and buffers; the
    output has the input's dtype. Variances are computed stably (never ``E[x^2] - E[x]^2``).

    **Non-finite batches**: a batch whose statistics are NaN/Inf never reaches the running statistics. By default
    (``on_nonfinite="skip"``) the choice is made on the device, with no host sync: the running statistics keep
    their values, ``num_batches_tracked`` does not move and the non-persistent counter ``skipped_batches``
    (not in the state dict, so checkpoints stay ``torch.nn``-compatible) counts the batch; the output is returned
    as computed. ``on_nonfinite="raise"`` raises ``FloatingPointError`` and ``"warn"`` warns; both read the
    verdict on the host, **one device sync per layer per training step** (a pipeline stall on GPUs, and a graph
    break under ``torch.compile``). A layer without running statistics has nothing to protect and behaves as
    ``torch.nn.BatchNorm``.

    **One forward path**: every call decides its mode once through :meth:`uses_batch_stats` and
    :meth:`updates_running_stats` (what ``explain``/``doctor`` report), computes the output with torch's fused
    kernel where that is exactly this layer's arithmetic (and bit-identical to ``torch.nn.BatchNorm``) or with the
    general path otherwise (masks, ghost batches, renorm, Keras convention, mixed dtypes), and writes running
    statistics in one place (:meth:`_commit`). No default forward reads a tensor on the host, so the layer works
    under ``torch.compile(fullgraph=True)`` and ``torch.export`` in train and eval.

    Args:
        num_features: Number of channels ``C``.
        eps: Added to the variance for numerical stability (PyTorch 1e-5; Keras 1e-3).
        momentum: Weight of the new batch in the running averages (PyTorch convention), or ``None`` for a
            cumulative average.
        affine: Learnable per-channel ``weight`` (gamma) and ``bias`` (beta).
        track_running_stats: Keep running statistics; without them batch statistics are used in train and eval.
        axis: The channel axis, any int (negative allowed); inputs of any rank >= 2.
        unbiased_running_var: Store the unbiased variance in ``running_var`` (PyTorch) or the biased one (Keras).
        virtual_batch_size: Ghost-batch group size ``k``.
        renorm: Batch Renormalization settings (:class:`bnkit.Renorm`), ``True`` for the defaults, or ``None``.
        sync: Synchronise batch statistics across ``torch.distributed`` ranks in training.
        process_group: Process group for ``sync`` (default: the world).
        on_nonfinite: ``"skip"`` (default: skip the update on the device, count it in ``skipped_batches``),
            ``"raise"`` or ``"warn"`` (each one host sync per training step) for non-finite batch statistics.
        name: Name used in error messages; the model tools set it to the layer's qualified name.

    Example:
        >>> import torch
        >>> bn = BatchNorm(8)
        >>> y = bn(torch.randn(4, 8, 5, 5))
        >>> bn.freeze_stats = True
        >>> _ = bn.train()
        >>> torch.equal(bn(y), bn(y, training=False))
        True
    """

    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 1,
        unbiased_running_var: bool = True,
        virtual_batch_size: int | None = None,
        renorm: Renorm | bool | None = None,
        sync: bool = False,
        process_group: Any = None,
        on_nonfinite: str = "skip",
        name: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        label = name or "BatchNorm"
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"{label}: num_features must be a positive int. Received: {num_features!r}")
        for setting, value in (
            ("eps", eps),
            ("momentum", momentum),
            ("virtual_batch_size", virtual_batch_size),
            ("on_nonfinite", on_nonfinite),
        ):
            check_setting(label, setting, value)  # before any state exists; assignment below checks again
        if renorm is True:
            renorm = Renorm()
        elif renorm is False:
            renorm = None
        if renorm is not None and not isinstance(renorm, Renorm):
            raise TypeError(f"{label}: renorm must be a bnkit.Renorm, True or None. Received: {renorm!r}")
        if renorm is not None and not track_running_stats:
            raise ValueError(f"{label}: renorm needs running statistics; set track_running_stats=True")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.keras_momentum: float | None = None
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = int(axis)
        self.unbiased_running_var = unbiased_running_var
        self.virtual_batch_size = virtual_batch_size
        self.renorm: Renorm | None = renorm
        self.sync = sync
        self.process_group = process_group
        self.on_nonfinite = on_nonfinite
        self.name = name
        self.freeze_stats = False
        self._freeze_affine = False
        self._seen_dim = 0  # rank of the last input, so to_torch() can pick BatchNorm1d/2d/3d
        # 1, 2 or 3: the torch.nn.BatchNorm{1,2,3}d that from_torch() copied, so to_torch() gives the same class back
        self.torch_dim: int | None = None
        if affine:
            self.weight: nn.Parameter | None = nn.Parameter(torch.empty(num_features, **factory))
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        # batches whose statistics were not finite and so left the running statistics alone; not persistent,
        # so state dicts load strictly into and from torch.nn BatchNorm
        self.register_buffer(
            "skipped_batches",
            torch.zeros((), dtype=torch.long, device=device) if track_running_stats else None,
            persistent=False,
        )
        if renorm is not None:
            self.register_buffer("running_std", torch.ones(num_features, **factory))
            self.register_buffer("renorm_mean", torch.zeros(num_features, **factory))
            self.register_buffer("renorm_std", torch.ones(num_features, **factory))
        self.reset_parameters()

    # ------------------------------------------------------------------ state

    def reset_running_stats(self) -> None:
        """Running mean 0, variance 1 (standard deviation 1 with renorm), ``num_batches_tracked`` 0.

        Example:
            >>> bn = BatchNorm(2); bn.running_mean += 1; bn.reset_running_stats(); bn.running_mean.tolist()
            [0.0, 0.0]
        """
        if not self.track_running_stats:
            return
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()
        if self.renorm is not None:
            self.running_std.fill_(1)
            self.renorm_mean.zero_()
            self.renorm_std.fill_(1)

    def reset_parameters(self) -> None:
        """Running statistics reset, gamma 1, beta 0 (as ``torch.nn.BatchNorm2d``).

        Example:
            >>> BatchNorm(2).weight.tolist()
            [1.0, 1.0]
        """
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def freeze_affine(self) -> bool:
        """Gamma/beta frozen: ``requires_grad=False`` and detached in forward. Survives ``train()``/``eval()``.

        Example:
            >>> bn = BatchNorm(2); bn.freeze_affine = True; bn.weight.requires_grad
            False
        """
        return self._freeze_affine

    @freeze_affine.setter
    def freeze_affine(self, value: bool) -> None:
        self._freeze_affine = bool(value)
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(not self._freeze_affine)

    @property
    def trainable(self) -> bool:
        """Keras's ``trainable``: False sets ``freeze_stats`` and ``freeze_affine``; True clears both.

        Reading it gives True unless both switches are set.

        Example:
            >>> bn = BatchNorm(2); bn.trainable = False; (bn.freeze_stats, bn.freeze_affine, bn.trainable)
            (True, True, False)
        """
        return not (self.freeze_stats and self._freeze_affine)

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self.freeze_stats = not value
        self.freeze_affine = not value

    def label(self) -> str:
        """The name used in messages: :attr:`name` when set, else a short description.

        Example:
            >>> BatchNorm(3).label()
            'BatchNorm(3)'
        """
        return self.name if self.name else f"BatchNorm({self.num_features})"

    def extra_repr(self) -> str:
        parts = [
            f"{self.num_features}",
            f"eps={self.eps}",
            f"momentum={self.momentum}",
            f"affine={self.affine}",
            f"track_running_stats={self.track_running_stats}",
        ]
        if self.axis != 1:
            parts.append(f"axis={self.axis}")
        if not self.unbiased_running_var:
            parts.append("unbiased_running_var=False")
        if self.keras_momentum is not None:
            parts.append(f"keras_momentum={self.keras_momentum}")
        if self.virtual_batch_size is not None:
            parts.append(f"virtual_batch_size={self.virtual_batch_size}")
        if self.renorm is not None:
            parts.append(f"renorm={self.renorm}")
        if self.sync:
            parts.append("sync=True")
        if self.freeze_stats:
            parts.append("freeze_stats=True")
        if self._freeze_affine:
            parts.append("freeze_affine=True")
        return ", ".join(parts)

    def __setattr__(self, name: str, value: Any) -> None:
        # settings are validated on every assignment, with the constructor's messages (bn.momentum = 1.5 raises)
        if name in VALIDATED_SETTINGS:
            value = check_setting(self.label() if "name" in self.__dict__ else "BatchNorm", name, value)
        super().__setattr__(name, value)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this first: refuse in one line that points to what works.

        The layer's Python-level options (per-call ``training=``, masks, settings validated on assignment) are
        outside TorchScript, which torch 2.x deprecates; ``torch.export`` and ``torch.compile`` take it whole.

        Example:
            >>> try:
            ...     torch.jit.script(BatchNorm(2, name="bn1"))
            ... except RuntimeError as error:
            ...     print(str(error)[:44])
            bn1: bnkit.BatchNorm is not TorchScript-able
        """
        raise RuntimeError(
            f"{self.label()}: bnkit.BatchNorm is not TorchScript-able: use torch.export.export(model, args) or "
            "torch.compile(model); for a TorchScript file convert first with bnkit.convert(model, 'torch')"
        )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, all-or-nothing: every entry is checked before any is copied.

        Raises:
            ValueError: a missing or unexpected entry (with ``strict``), a value that is not a tensor, a wrong
                shape or a float/integer mix-up; one line naming the layer and the entry, the layer unchanged.

        Example:
            >>> bn = BatchNorm(2, name="bn1")
            >>> try:
            ...     bn.load_state_dict({"weight": torch.ones(3)}, strict=False)
            ... except ValueError as error:
            ...     print(str(error)[:61])
            bn1: state dict entry 'weight' has shape (3,) but the layer's
        """
        check_layer_state(self.label(), self.state_dict(), state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        where = prefix[:-1] if prefix else self.label()
        # Check every entry before anything is copied, so a bad checkpoint leaves the layer untouched.
        check_layer_state(where, self.state_dict(), state_dict, strict=False, prefix=prefix)
        version = local_metadata.get("version")
        if self.track_running_stats and (version is None or version < 2):
            # Checkpoints from before num_batches_tracked existed (PyTorch's own migration rule).
            state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        if self.renorm is not None and prefix + "running_var" in state_dict:
            # A plain BatchNorm checkpoint loaded into a renorm layer: start renorm from its statistics.
            std = state_dict[prefix + "running_var"].clamp_min(0).sqrt()
            state_dict.setdefault(prefix + "running_std", std)
            state_dict.setdefault(prefix + "renorm_mean", state_dict.get(prefix + "running_mean"))
            state_dict.setdefault(prefix + "renorm_std", std.clone())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ mode rule

    def _resolve(self, training: bool | None) -> bool:
        return self.training if training is None else bool(training)

    def uses_batch_stats(self, training: bool | None = None) -> bool:
        """Whether a forward call normalises with batch statistics (the mode rule in the class docstring).

        Example:
            >>> bn = BatchNorm(2).eval(); bn.uses_batch_stats(), bn.uses_batch_stats(training=True)
            (False, True)
        """
        return (self._resolve(training) and not self.freeze_stats) or not self.track_running_stats

    def updates_running_stats(self, training: bool | None = None) -> bool:
        """Whether a forward call updates the running statistics.

        Example:
            >>> bn = BatchNorm(2); bn.freeze_stats = True; bn.updates_running_stats()
            False
        """
        return self.track_running_stats and self._resolve(training) and not self.freeze_stats

    def channel_axis(self, ndim: int) -> int:
        """The non-negative channel axis for an input of rank ``ndim``.

        Example:
            >>> BatchNorm(3, axis=-1).channel_axis(4)
            3
        """
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"{self.label()}: axis {self.axis} is out of range for an input of rank {ndim}; "
                f"pass an input with the channel axis {self.axis}, or build the layer with another axis"
            )
        return self.axis % ndim

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, training: bool | None = None, mask: Tensor | None = None) -> Tensor:
        """Normalise ``x``; ``training`` overrides ``self.training`` for this call only.

        Args:
            x: Input of rank >= 2 with ``num_features`` channels on ``axis``.
            training: ``None`` follows ``self.training``; a bool applies to this call only.
            mask: Boolean tensor of ``x``'s shape without the channel axis; statistics use True positions only.

        Returns:
            The normalised tensor, same shape and dtype as ``x``.

        Raises:
            ValueError: Wrong rank, channel count or mask shape; one value per channel in training; ghost batch
                size not a multiple of ``virtual_batch_size``.
            FloatingPointError: Non-finite batch statistics with ``on_nonfinite="raise"`` (nothing is updated).

        Example:
            >>> bn = BatchNorm(3, axis=-1)
            >>> bn(torch.randn(2, 5, 3), mask=torch.ones(2, 5, dtype=torch.bool)).shape
            torch.Size([2, 5, 3])
        """
        axis = self._check_input(x, mask)
        if self._seen_dim != x.ndim:
            self._seen_dim = x.ndim
        t = self._resolve(training)
        use_batch = self.uses_batch_stats(training)
        update = self.updates_running_stats(training)
        # Synchronised statistics: training with batch statistics and more than one rank taking part.
        synced = use_batch and t and self.sync and self._sync_world() > 1
        if use_batch and not synced and mask is None:
            # from shapes only (no host sync); a masked channel with one value is handled on the device
            self._check_values_per_channel(x, axis, mask)
        if not synced and self._native_ok(x, use_batch, mask):
            return self._forward_native(x, axis, use_batch)
        return self._forward_general(x, axis, t, use_batch, update, mask, synced)

    def _check_input(self, x: Tensor, mask: Tensor | None) -> int:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.label()}: expected a torch.Tensor input. Received: {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(
                f"{self.label()}: expected an input of rank >= 2 (batch and channels), got shape "
                f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
            )
        axis = self.channel_axis(x.ndim)
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"{self.label()}: expected {self.num_features} channels on axis {self.axis}, got "
                f"{x.shape[axis]} (input shape {tuple(x.shape)}); check the layer's num_features and axis"
            )
        if not x.is_floating_point():
            raise TypeError(f"{self.label()}: expected a floating-point input. Received dtype {x.dtype}")
        if mask is not None:
            expected = x.shape[:axis] + x.shape[axis + 1 :]
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != expected:
                got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                got_dtype = f" {mask.dtype}" if isinstance(mask, Tensor) else ""
                raise ValueError(
                    f"{self.label()}: mask must be a bool tensor of shape {tuple(expected)} (the input's shape "
                    f"without the channel axis). Received: {got}{got_dtype}"
                )
        return axis

    def _check_values_per_channel(self, x: Tensor, axis: int, mask: Tensor | None) -> None:
        # Not for synchronised layers: the global batch decides, checked after the statistics are merged.
        if self.virtual_batch_size is not None:
            per_channel = (x.numel() // x.shape[axis]) // max(1, x.shape[0]) * self.virtual_batch_size
        elif mask is not None:
            per_channel = int(mask.sum())
        else:
            per_channel = x.numel() // x.shape[axis]
        if per_channel == 1:
            self._raise_single_value(tuple(x.shape))

    def _raise_single_value(self, shape: tuple[int, ...]) -> None:
        raise ValueError(
            f"{self.label()}: only one value per channel in training (input shape {shape}), so batch "
            "statistics are undefined; use a larger batch, set freeze_stats=True or call eval() for this "
            "layer, or use GroupNorm"
        )

    def _native_ok(self, x: Tensor, use_batch: bool, mask: Tensor | None) -> bool:
        """True where ``F.batch_norm`` computes exactly what this layer means (the fast default path)."""
        if x.dtype not in _FAST_DTYPES:
            return False
        for tensor in (self.weight, self.running_mean):
            if tensor is not None and tensor.dtype != x.dtype:
                return False
        if not use_batch:
            return True
        if x.numel() == 0:
            return False
        if mask is not None or self.virtual_batch_size is not None or self.renorm is not None:
            return False
        # momentum=None needs 1 / num_batches_tracked as a Python float for the kernel (a host sync): general path
        return self.keras_momentum is None and self.unbiased_running_var and self.momentum is not None

    def _affine(self) -> tuple[Tensor | None, Tensor | None]:
        if self._freeze_affine:
            return (
                None if self.weight is None else self.weight.detach(),
                None if self.bias is None else self.bias.detach(),
            )
        return self.weight, self.bias

    def _forward_native(self, x: Tensor, axis: int, use_batch: bool) -> Tensor:
        weight, bias = self._affine()
        xc = x if axis == 1 else x.movedim(axis, 1)
        if not use_batch:
            y = F.batch_norm(xc, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)
            return y if axis == 1 else y.movedim(1, axis)
        if not self.track_running_stats:
            # Nothing to protect or update: exactly torch's call for a layer without running statistics.
            y = F.batch_norm(xc, None, None, weight, bias, True, 0.0, self.eps)
            return y if axis == 1 else y.movedim(1, axis)
        # The kernel updates the running statistics in place and keeps them for its backward: give it copies
        # (bit-identical values to torch's own update) and commit them only when finite, on the device.
        new_mean, new_var = self.running_mean.clone(), self.running_var.clone()
        y = F.batch_norm(xc, new_mean, new_var, weight, bias, True, self.momentum, self.eps)
        # One reduction checks both: a NaN or Inf in either makes the sum non-finite.
        finite = torch.isfinite(new_mean + new_var).all()
        self._verdict(finite)
        self._commit({"running_mean": new_mean, "running_var": new_var}, finite)
        return y if axis == 1 else y.movedim(1, axis)

    def _verdict(self, finite: Tensor) -> None:
        """``on_nonfinite="raise"``/``"warn"`` act on the host (one sync); the default ``"skip"`` reads nothing."""
        if self.on_nonfinite == "skip" or bool(finite):
            return
        message = (
            f"{self.label()}: batch statistics are not finite (NaN or Inf in the input or overflow); the "
            "running statistics were left unchanged. Check the input and the learning rate, or pass "
            "on_nonfinite='skip' (the default) to skip such batches without a host sync"
        )
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _finite(self, mean: Tensor, var: Tensor) -> Tensor:
        """A 0-dim bool tensor on the device: are the batch statistics finite? (Acts per ``on_nonfinite``.)"""
        finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
        self._verdict(finite)
        return finite

    def _forward_general(
        self, x: Tensor, axis: int, t: bool, use_batch: bool, update: bool, mask: Tensor | None, synced: bool
    ) -> Tensor:
        # float16/bfloat16 are normalised in float32, as Keras and PyTorch's kernels do.
        xf = x if x.dtype in _FAST_DTYPES else x.float()
        weight, bias = self._affine()
        if weight is not None and weight.dtype != xf.dtype:
            weight = weight.to(xf.dtype) if xf.dtype == torch.float64 else weight.float()
        if bias is not None and bias.dtype != xf.dtype:
            bias = bias.to(xf.dtype) if xf.dtype == torch.float64 else bias.float()
        if not use_batch:
            mean = self.running_mean.to(xf.dtype)
            var = self.running_var.to(xf.dtype)
            return normalize(xf, mean, var, weight, bias, self.eps, axis).to(x.dtype)
        if self.virtual_batch_size is not None:
            return self._forward_ghost(xf, axis, update, mask, weight, bias).to(x.dtype)
        if synced and mask is None and self.renorm is None:
            return self._forward_sync(xf, axis, update, weight, bias).to(x.dtype)
        if mask is None and xf.numel() > 0 and not synced:
            return self._forward_kernel(xf, axis, t, update, weight, bias).to(x.dtype)
        stats = channel_moments(xf, reduction_dims(x.ndim, axis), None if mask is None else mask.unsqueeze(axis))
        if synced:
            stats = self._sync(stats)
        count = stats.count
        mean = stats.mean
        var = stats.m2 / count.clamp_min(1)
        # A channel with no value (fully masked, empty batch) has nothing to normalise with: zero mean, unit
        # variance keep the output finite. One value per channel gives beta, as Keras does; neither updates the
        # running statistics (decided on the device, no host sync) nor counts as a skipped batch.
        present = (count > 1).all() if count.ndim else count > 1
        mean = torch.where(count > 0, mean, torch.zeros_like(mean))
        var = torch.where(count > 0, var, torch.ones_like(var))
        if xf.numel() == 0 and not synced:  # a synchronised empty rank still commits the global statistics
            return normalize(xf, mean, var, weight, bias, self.eps, axis).to(x.dtype)
        finite = self._finite(mean, var) if (update or t) else None
        if self.renorm is not None and (update or t):
            return self._forward_renorm(xf, axis, mean, var, count, weight, bias, update, finite, present).to(x.dtype)
        y = normalize(xf, mean, var, weight, bias, self.eps, axis)
        if update:
            assert finite is not None
            self._update_running(mean.detach(), var.detach(), count, finite, present)
        return y.to(x.dtype)

    def _forward_kernel(
        self, xf: Tensor, axis: int, t: bool, update: bool, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        """Batch statistics without mask or sync: statistics for the update (and renorm's r, d) computed apart,
        without gradient; the output and its gradient from torch's fused training kernel."""
        xc = xf if axis == 1 else xf.movedim(axis, 1)
        mean, var = batch_stats(xc)
        finite = self._finite(mean, var) if (update or t) else None
        count = float(xc.numel() // xc.shape[1])
        if self.renorm is not None:
            # r and d carry no gradient, so the fused kernel's batch-statistics gradient stays exact.
            weight, bias = self._renorm_affine(mean, var, weight, bias)
        y = F.batch_norm(xc, None, None, weight, bias, True, 0.0, self.eps)
        if update:
            assert finite is not None
            if self.renorm is not None:
                self._update_renorm(mean, var, count, finite)
            else:
                self._update_running(mean, var, count, finite)
        return y if axis == 1 else y.movedim(1, axis)

    def _forward_ghost(
        self,
        xf: Tensor,
        axis: int,
        update: bool,
        mask: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> Tensor:
        k = self.virtual_batch_size
        assert k is not None
        if mask is not None:
            raise ValueError(f"{self.label()}: mask and virtual_batch_size cannot be combined; drop one of them")
        if axis == 0:
            raise ValueError(f"{self.label()}: virtual_batch_size needs the batch on axis 0 and channels elsewhere")
        if self.renorm is not None:
            raise ValueError(f"{self.label()}: virtual_batch_size and renorm cannot be combined; drop one of them")
        if self._sync_world() > 1:
            raise ValueError(
                f"{self.label()}: virtual_batch_size and sync cannot be combined (ghost batches are per-device by "
                "design); set sync=False or drop virtual_batch_size"
            )
        n = xf.shape[0]
        if n % k != 0:
            raise ValueError(
                f"{self.label()}: batch size {n} is not a multiple of virtual_batch_size={k}; use a batch size "
                f"divisible by {k} (e.g. DataLoader(drop_last=True)) or change virtual_batch_size"
            )
        if n == 0:
            return xf.clone()
        count, mean, var = ghost_moments(xf, axis, k)
        groups = n // k
        # Per-group statistics broadcast over the grouped view [groups, k, ...] with channels on axis + 1.
        shape = [1] * (xf.ndim + 1)
        shape[0] = groups
        shape[axis + 1] = self.num_features
        xg = xf.reshape(groups, k, *xf.shape[1:])
        scale = torch.rsqrt(var + self.eps)
        if weight is not None:
            scale = scale * weight
        y = (xg - mean.reshape(shape)) * scale.reshape(shape)
        if bias is not None:
            cshape = [1] * (xf.ndim + 1)
            cshape[axis + 1] = self.num_features
            y = y + bias.reshape(cshape)
        if update:
            group_var = unbias(var, count) if self.unbiased_running_var else var
            finite = self._finite(mean, var)
            self._commit_running(mean.detach().mean(0), group_var.detach().mean(0), finite)
        return y.reshape(xf.shape)

    def _forward_renorm(
        self,
        xf: Tensor,
        axis: int,
        mean: Tensor,
        var: Tensor,
        count: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        update: bool,
        finite: Tensor | None,
        present: Tensor,
    ) -> Tensor:
        eff_weight, eff_bias = self._renorm_affine(mean.detach(), var.detach(), weight, bias)
        y = normalize(xf, mean, var, eff_weight, eff_bias, self.eps, axis)
        if update:
            assert finite is not None
            self._update_renorm(mean.detach(), var.detach(), count, finite, present)
        return y

    def _renorm_affine(
        self, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Gamma and beta with renorm's (r, d) folded in at the current schedule step.

        ``(x_hat * r + d) * gamma + beta == x_hat * (r * gamma) + (d * gamma + beta)``, as Keras composes it.
        """
        renorm = self.renorm
        assert renorm is not None
        rmin, rmax, dmax = renorm.bounds_at(self.num_batches_tracked, mean.dtype)  # on the device: no host sync
        r, d = renorm_correction(mean, var, self.renorm_mean, self.renorm_std, self.eps, rmin, rmax, dmax)
        eff_weight, eff_bias = (r, d) if weight is None else (r * weight, d * weight)
        return eff_weight, eff_bias if bias is None else eff_bias + bias

    @torch.no_grad()
    def _update_renorm(
        self, mean: Tensor, var: Tensor, count: Tensor | float, finite: Tensor, present: Tensor | None = None
    ) -> None:
        """Keras's renorm bookkeeping: renorm_mean/std with the renorm momentum, running mean/std with the
        layer's, and ``running_var = relu(running_std**2 - eps)``."""
        renorm = self.renorm
        assert renorm is not None
        batch_std = torch.sqrt(var + self.eps)
        stored = unbias(var, count) if self.unbiased_running_var else var
        running_std = torch.sqrt(stored + self.eps)
        rdt = self.renorm_mean.dtype
        if renorm.keras_momentum is not None:
            new_rmean = keras_ema_update(self.renorm_mean, mean.to(rdt), renorm.keras_momentum)
            new_rstd = keras_ema_update(self.renorm_std, batch_std.to(rdt), renorm.keras_momentum)
        else:
            new_rmean = ema_update(self.renorm_mean, mean.to(rdt), renorm.momentum)
            new_rstd = ema_update(self.renorm_std, batch_std.to(rdt), renorm.momentum)
        new_mean = self._ema(self.running_mean, mean)
        new_std = self._ema(self.running_std, running_std)
        updates = {
            "renorm_mean": new_rmean,
            "renorm_std": new_rstd,
            "running_mean": new_mean,
            "running_std": new_std,
            "running_var": torch.relu(new_std * new_std - self.eps),
        }
        self._commit(updates, finite, present)

    def _ema(self, running: Tensor, batch: Tensor) -> Tensor:
        batch = batch.to(running.dtype)
        if self.keras_momentum is not None:
            return keras_ema_update(running, batch, self.keras_momentum)
        if self.momentum is None:
            # the cumulative average's weight 1 / (batches so far, this one included), on the device
            factor = 1.0 / (self.num_batches_tracked + 1).to(torch.float64)
            return ema_update(running, batch, factor.to(running.dtype))
        return ema_update(running, batch, self.momentum)

    def _update_running(
        self, mean: Tensor, var_biased: Tensor, count: Tensor | float, finite: Tensor, present: Tensor | None = None
    ) -> None:
        var = unbias(var_biased, count) if self.unbiased_running_var else var_biased
        self._commit_running(mean, var, finite, present)

    def _commit_running(self, mean: Tensor, var: Tensor, finite: Tensor, present: Tensor | None = None) -> None:
        new = {"running_mean": self._ema(self.running_mean, mean), "running_var": self._ema(self.running_var, var)}
        self._commit(new, finite, present)

    @torch.no_grad()
    def _commit(self, updates: dict[str, Tensor], finite: Tensor, present: Tensor | None = None) -> None:
        """The one place a batch's running statistics are written, on the device.

        ``finite`` (0-dim bool) false: nothing changes but ``skipped_batches``. ``present`` false (a batch with
        fewer than two values in a channel): nothing changes at all.
        """
        if present is not None and not isinstance(present, Tensor):  # counts known from shapes
            present = torch.tensor(bool(present), device=finite.device)
        take = finite if present is None else finite & present
        self._select(updates, take)
        self._count(finite if present is None else finite | ~present, present)

    @torch.no_grad()
    def _select(self, updates: dict[str, Tensor], take: Tensor) -> None:
        for name, value in updates.items():
            buffer = getattr(self, name)
            buffer.copy_(torch.where(take, value.to(buffer.dtype), buffer))

    @torch.no_grad()
    def _count(self, finite: Tensor, present: Tensor | None = None) -> None:
        counted = finite if present is None else finite & present
        self.num_batches_tracked.add_(counted.to(self.num_batches_tracked.dtype))
        self.skipped_batches.add_((~finite).to(self.skipped_batches.dtype))

    # ------------------------------------------------------------------ distributed

    def _sync_world(self) -> int:
        if not self.sync:
            return 1
        from bnkit.distributed import get_world_size

        return get_world_size(self.process_group)

    def _forward_sync(self, xf: Tensor, axis: int, update: bool, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """Synchronised training without mask or renorm: one fused autograd function, PyTorch's communication."""
        from bnkit.distributed import sync_batch_norm

        y, stats = sync_batch_norm(
            xf, weight, bias, self.eps, axis=axis, group=self.process_group, layer_name=self.label()
        )
        # The global count is known only on the device: reading it would stall the pipeline. A global batch with
        # fewer than two values per channel (one value gives beta, as Keras does; every rank empty gives an empty
        # output) leaves the buffers alone, decided on the device. The merged moments are float64: the running
        # variance is m2 / n or m2 / (n - 1) in one rounding.
        if update:
            count = stats.count
            finite = self._finite(stats.mean, stats.m2)
            divisor = (count - 1 if self.unbiased_running_var else count).clamp_min(1)
            self._commit_running(stats.mean, stats.m2 / divisor, finite, count > 1)
        return y

    def _sync(self, stats: Moments) -> Moments:
        from bnkit.distributed import sync_moments

        # a mask covers whole positions, so every channel has the same count: no per-channel check (a host read)
        return sync_moments(stats, group=self.process_group, layer_name=self.label(), uniform_count=True)

    # ------------------------------------------------------------------ conversions

    @classmethod
    def from_torch(cls, module: nn.Module) -> BatchNorm:
        """An exact bnkit copy of a ``torch.nn`` BatchNorm1d/2d/3d or SyncBatchNorm (state, mode, grads).

        SyncBatchNorm becomes ``sync=True`` with the same process group. The class is remembered in
        ``torch_dim`` (1, 2 or 3; ``None`` for SyncBatchNorm, which has no rank), so :meth:`to_torch` gives the
        same class back without running the model.

        Example:
            >>> import torch.nn as nn
            >>> BatchNorm.from_torch(nn.BatchNorm2d(4, momentum=None)).momentum is None
            True
            >>> type(BatchNorm.from_torch(nn.BatchNorm3d(4)).to_torch()).__name__
            'BatchNorm3d'
        """
        from bnkit.layers.torch_layer import batchnorm_from_torch

        return batchnorm_from_torch(cls, module)

    def to_torch(self, dim: int | None = None, *, strict: bool = True) -> nn.modules.batchnorm._BatchNorm:
        """A ``torch.nn.BatchNorm{dim}d`` with this layer's configuration, state, mode and ``requires_grad``.

        Args:
            dim: 1, 2 or 3 (input rank 2-3, 4, 5). Default: from the rank of the last input seen, else the
                class :meth:`from_torch` copied (``torch_dim``), else 2.
            strict: Refuse settings torch cannot express (channel axis other than 1, biased running variance,
                Keras momentum formula, ghost batches, renorm, beta without gamma). With ``strict=False`` they
                are dropped: inference output is unchanged, training behaviour follows PyTorch. ``sync`` is
                always dropped: a plain torch BatchNorm is what this conversion is for.

        Example:
            >>> type(BatchNorm(4).to_torch(dim=1)).__name__
            'BatchNorm1d'
        """
        from bnkit.layers.torch_layer import batchnorm_to_torch

        return batchnorm_to_torch(self, dim, strict=strict)

    @classmethod
    def from_keras(
        cls,
        num_features: int,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        axis: int = -1,
        center: bool = True,
        scale: bool = True,
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum: float = 0.99,
        **kwargs: Any,
    ) -> BatchNorm:
        """A layer that behaves as Keras 3's ``BatchNormalization`` with the same arguments.

        Keras's meaning throughout: ``momentum`` weighs the OLD value (``r = r*m + x*(1-m)``, written as Keras
        writes it), ``epsilon`` 1e-3, channels-last ``axis=-1``, biased moving variance, ``center``/``scale``
        create beta/gamma separately, renorm as Keras 3.14+ (no clipping for a missing ``renorm_clipping`` key).
        ``trainable=False`` on the result is Keras's frozen layer. Weights map gamma->weight, beta->bias,
        moving_mean->running_mean, moving_variance->running_var. Extra keyword arguments go to the constructor.

        Example:
            >>> bn = BatchNorm.from_keras(16)
            >>> bn.eps, round(bn.momentum, 6), bn.keras_momentum, bn.axis, bn.unbiased_running_var
            (0.001, 0.01, 0.99, -1, False)
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"BatchNorm.from_keras: momentum is Keras's (weight of the OLD value, default 0.99) and must be "
                f"in [0, 1]. Received: momentum={momentum}"
            )
        layer = cls(
            num_features,
            eps=epsilon,
            momentum=1.0 - float(momentum),
            affine=center or scale,
            axis=axis,
            unbiased_running_var=False,
            renorm=Renorm.from_keras(renorm_clipping, renorm_momentum) if renorm else None,
            **kwargs,
        )
        layer.keras_momentum = float(momentum)
        if not scale and layer.weight is not None:
            layer.register_parameter("weight", None)
        if not center and layer.bias is not None:
            layer.register_parameter("bias", None)
        return layer

    @classmethod
    def from_keras_layer(cls, layer: Any, axis: int | None = None) -> BatchNorm:
        """An exact copy of a built Keras ``BatchNormalization`` (config, weights, statistics, ``trainable``).

        See :func:`bnkit.layers.keras_layer.batchnorm_from_keras_layer`.

        Example:
            >>> import keras
            >>> k = keras.layers.BatchNormalization(); k.build((None, 4))
            >>> BatchNorm.from_keras_layer(k, axis=1).axis
            1
        """
        from bnkit.layers.keras_layer import batchnorm_from_keras_layer

        return batchnorm_from_keras_layer(cls, layer, axis)

    def to_keras_layer(self, input_rank: int | None = None, *, strict: bool = True) -> Any:
        """A built Keras ``BatchNormalization`` computing exactly what this layer computes.

        See :func:`bnkit.layers.keras_layer.batchnorm_to_keras_layer`.

        Example:
            >>> BatchNorm.from_keras(4, epsilon=1e-5).to_keras_layer().epsilon
            1e-05
        """
        from bnkit.layers.keras_layer import batchnorm_to_keras_layer

        return batchnorm_to_keras_layer(self, input_rank, strict=strict)
