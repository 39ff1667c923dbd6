"""``torch.compile(fullgraph=True)`` and ``torch.export`` of ``bnkit.BatchNorm`` in every mode, train and eval:
outputs, input and parameter gradients and running statistics equal eager ones; frozen and fused models too."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from torch import nn

import bnkit

MODES: dict[str, Callable[[], nn.Module]] = {
    "default": lambda: bnkit.BatchNorm(4),
    "momentum-None": lambda: bnkit.BatchNorm(4, momentum=None),
    "keras": lambda: bnkit.BatchNorm.from_keras(4, axis=1),
    "ghost": lambda: bnkit.BatchNorm(4, virtual_batch_size=2),
    "renorm": lambda: bnkit.BatchNorm(4, renorm=bnkit.Renorm.paper()),
    "biased-var": lambda: bnkit.BatchNorm(4, unbiased_running_var=False),
}


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def _step(module: nn.Module, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = module(x, **kwargs)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in module.parameters() if p.grad is not None]


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_compile_fullgraph_equals_eager(mode: str, training: bool) -> None:
    torch._dynamo.reset()
    eager = MODES[mode]().train(training)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for seed in range(2):
        ye, gxe, gpe = _step(eager, _x(seed))
        yc, gxc, gpc = _step(compiled, _x(seed))
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gxc, gxe, rtol=1e-5, atol=1e-6)
        for a, b in zip(gpc, gpe, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _assert_same_state(compiled_module, eager)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_export_equals_eager(mode: str, training: bool) -> None:
    eager = MODES[mode]().train(training)
    exported = torch.export.export(copy.deepcopy(eager), (_x(),)).module()
    for seed in range(2):
        with torch.no_grad():
            torch.testing.assert_close(exported(_x(seed)), eager(_x(seed)), rtol=1e-5, atol=1e-6)
    _assert_same_state(exported, eager)


def test_masked_training_compiles_with_fullgraph() -> None:
    torch._dynamo.reset()
    eager = bnkit.BatchNorm(4, axis=-1)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 6, 4)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    torch.testing.assert_close(compiled(x, mask=mask), eager(x, mask=mask), rtol=1e-5, atol=1e-6)
    _assert_same_state(compiled_module, eager)


def test_inductor_training_step_equals_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    # No conv bias: BN cancels it, so its gradient is zero up to rounding noise (seen at 1e-5 in one run) and
    # comparing two noises says nothing about the compiled step.
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), bnkit.BatchNorm(4), nn.ReLU())
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = torch.randn(4, 3, 6, 6)
    ye, _, gpe = _step(eager, x)
    yc, _, gpc = _step(compiled, x)
    torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
    for a, b in zip(gpc, gpe, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    _assert_same_state(compiled_module, eager)


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), bnkit.BatchNorm(4)
    )


def test_frozen_model_compiles_and_exports_in_train_mode() -> None:
    torch._dynamo.reset()
    model = _small_net()
    model(torch.randn(8, 3, 6, 6))
    before = copy.deepcopy(model)
    frozen = copy.deepcopy(model)
    bnkit.freeze(frozen)  # in place
    frozen.train()
    x = torch.randn(4, 3, 6, 6)
    expected = frozen(x)
    compiled = torch.compile(copy.deepcopy(frozen), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    exported = torch.export.export(copy.deepcopy(frozen), (x,)).module()
    torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)
    _assert_same_state(frozen, before)  # frozen statistics never moved


def test_fused_model_compiles_and_exports() -> None:
    torch._dynamo.reset()
    model = _small_net()
    model(torch.randn(8, 3, 6, 6))
    fused = bnkit.fuse(model.eval())
    x = torch.randn(2, 3, 6, 6)
    expected = fused(x)
    torch.testing.assert_close(torch.compile(fused, fullgraph=True, backend="aot_eager")(x), expected)
    torch.testing.assert_close(torch.export.export(fused, (x,)).module()(x), expected)


def test_jit_script_refuses_in_one_line_pointing_to_export() -> None:
    with pytest.raises(RuntimeError, match=r"^bn1: bnkit.BatchNorm is not TorchScript-able: use torch.export") as info:
        torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), bnkit.BatchNorm(4, name="bn1")))
    assert "\n" not in str(info.value)


def test_jit_script_of_a_frozen_torch_model_refuses_naming_the_layer_and_works_after_unfreeze() -> None:
    model = _small_net()[:3]
    bnkit.freeze(model)
    with pytest.raises(RuntimeError, match=r"layer '1' is frozen with forward hooks.*torch.export.export") as info:
        torch.jit.script(model)
    assert "\n" not in str(info.value)
    assert isinstance(model[1], nn.BatchNorm2d)  # the refusal left the model as it was
    bnkit.unfreeze(model)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(torch.jit.script(model.eval())(x), model(x))
