"""Checks shared by the convert tests: two models train and infer alike, step by step."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float | None) -> None:
    assert torch.isfinite(a).all(), f"{what}: not finite (the check would compare NaN with NaN)"
    if tol is None:
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=what)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def assert_trains_alike(
    original: nn.Module,
    converted: nn.Module,
    batches: list[Any],
    *,
    tol: float | None = None,
    call: Callable[[nn.Module, Any], Any] | None = None,
    eval_input: Any = None,
    eval_call: Callable[[nn.Module, Any], Any] | None = None,
) -> None:
    """``original`` and ``converted`` (copies of both are used) give the same outputs, input gradients,
    parameter gradients, parameters and running statistics over a few SGD steps in train mode, then the same
    outputs in eval mode (on ``eval_input``, default the first batch, through ``eval_call``, default ``call``).
    ``tol=None`` asks for bit-identical tensors."""
    call = call or (lambda model, x: model(x))
    eval_input = batches[0] if eval_input is None else eval_input
    models = [copy.deepcopy(original).train(), copy.deepcopy(converted).train()]
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01) for m in models]
    for step, batch in enumerate(batches):
        results = []
        for model, optimizer in zip(models, optimizers, strict=True):
            x = batch.clone().requires_grad_(True) if isinstance(batch, torch.Tensor) else batch
            torch.manual_seed(step)  # the same dropout masks and detector samples for both
            outs = _tensors(call(model, x))
            loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).mean() for o in outs)
            optimizer.zero_grad()
            loss.backward()
            grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
            results.append((outs, x.grad if isinstance(x, torch.Tensor) else None, grads))
            optimizer.step()
        (outs_a, gx_a, grads_a), (outs_b, gx_b, grads_b) = results
        assert len(outs_a) == len(outs_b)
        for a, b in zip(outs_a, outs_b, strict=True):
            _close(a, b, f"train output, step {step}", tol)
        if gx_a is not None or gx_b is not None:
            _close(gx_a, gx_b, f"input gradient, step {step}", tol)
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            _close(grads_a[name], grads_b[name], f"gradient of {name}, step {step}", tol)
    state_a, state_b = models[0].state_dict(), models[1].state_dict()
    for key in state_a.keys() & state_b.keys():
        _close(state_a[key].float(), state_b[key].float(), f"state {key} after training", tol)
    with torch.no_grad():
        for model in models:
            model.eval()
        evaluate = eval_call or call
        for a, b in zip(
            _tensors(evaluate(models[0], eval_input)), _tensors(evaluate(models[1], eval_input)), strict=True
        ):
            _close(a, b, "eval output", tol)
