"""doctor: every rule fires on the mistake it describes and stays quiet on the corrected model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import bnkit
from bnkit.inspection.doctor import RULES, SEVERITIES, Diagnosis, Finding, describe_rules


def _codes(model: nn.Module, example=None, intent=None) -> list[str]:
    return bnkit.doctor(model, example, intent=intent).codes()


def _trained(*modules: nn.Module) -> nn.Sequential:
    """A model whose BN layers saw data, so the never-updated rule has no reason to fire."""
    torch.manual_seed(0)
    model = nn.Sequential(*modules)
    with torch.no_grad():
        model(torch.randn(16, model[0].in_features if isinstance(model[0], nn.Linear) else 4))
    return model


def _mlp(**bn_kwargs) -> nn.Sequential:
    return _trained(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6, **bn_kwargs), nn.ReLU())


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(self.bn(x)))


class CalledOnce(CalledTwice):
    def __init__(self) -> None:
        super().__init__()
        self.bn2 = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.fc(self.bn(x)))


def _keras_eps_mix(quiet: bool) -> nn.Sequential:
    return _trained(
        nn.Linear(4, 6, bias=False),
        nn.BatchNorm1d(6),
        nn.BatchNorm1d(6),
        nn.BatchNorm1d(6, eps=1e-5 if quiet else 1e-3),
    )


def _momentum_mix(quiet: bool) -> nn.Sequential:
    return _trained(
        nn.Linear(4, 6, bias=False),
        nn.BatchNorm1d(6),
        nn.BatchNorm1d(6),
        nn.BatchNorm1d(6, momentum=0.1 if quiet else 0.01),
    )


def _frozen_params(quiet: bool) -> nn.Module:
    model = _mlp()
    if quiet:
        bnkit.freeze(model)
    else:
        model[1].requires_grad_(False)
    return model


def _eval_frozen(quiet: bool) -> nn.Module:
    model = _mlp()
    if quiet:
        bnkit.freeze(model, affine=False)
    else:
        model[1].eval()
    return model


def _never_updated(quiet: bool) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6)).eval()
    if quiet:
        state = _mlp().state_dict()
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("2")})
    return model


def _bad_variance(quiet: bool, value: float) -> nn.Module:
    model = _mlp().eval()
    if not quiet:
        model[1].running_var[2] = value
    return model


def _bias_before_bn(quiet: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=quiet is False), nn.BatchNorm2d(4))
    with torch.no_grad():
        model(torch.randn(8, 3, 5, 5))
    return model


def _skipped(quiet: bool) -> nn.Module:
    model = bnkit.convert(_mlp(), to="bnkit")
    x = torch.randn(8, 4)
    if not quiet:
        x[0, 0] = float("nan")
    model.train()(x)
    return model


class _RunningStats(nn.Module):
    """A module with running statistics bnkit does not recognise (a user's own BatchNorm, not registered)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(6))
        self.register_buffer("running_var", torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean) / self.running_var.sqrt()


def _unrecognised(quiet: bool) -> nn.Module:
    model = _mlp()
    if not quiet:
        model.append(_RunningStats())
    return model


# rule code -> (build(quiet) -> model, example_inputs or None, intent)
CASES = {
    "BN001": (lambda quiet: _mlp(momentum=0.1 if quiet else 0.99), None, None),
    "BN002": (_keras_eps_mix, None, None),
    "BN003": (_momentum_mix, None, None),
    "BN004": (_frozen_params, None, None),
    "BN005": (lambda quiet: _mlp().eval() if quiet else _mlp(), None, "inference"),
    "BN006": (lambda quiet: _mlp(), "batch", None),
    "BN007": (_bias_before_bn, None, None),
    "BN008": (_never_updated, None, "inference"),
    "BN009": (lambda quiet: _bad_variance(quiet, float("nan")), None, None),
    "BN010": (lambda quiet: CalledOnce() if quiet else CalledTwice(), torch.randn(16, 4), None),
    "BN011": (_eval_frozen, None, "fine-tune"),
    "BN012": (_skipped, None, None),
    "BN013": (_unrecognised, None, None),
}


def test_every_rule_has_a_case_and_codes_are_stable() -> None:
    assert [r["code"] for r in describe_rules()] == [f"BN{i:03d}" for i in range(1, len(RULES) + 1)]
    assert sorted(CASES) == [r["code"] for r in describe_rules()]


def _example(example, quiet: bool):
    if isinstance(example, str):  # per-device batch: 4 samples fire, 32 stay quiet
        return torch.randn(32 if quiet else 4, 4)
    return example


@pytest.mark.parametrize("code", sorted(CASES))
def test_rule_fires(code: str) -> None:
    build, example, intent = CASES[code]
    findings = bnkit.doctor(build(False), _example(example, False), intent=intent)
    assert code in findings.codes(), str(findings)
    finding = next(f for f in findings if f.code == code)
    assert finding.severity in SEVERITIES and finding.message and finding.fix and finding.layer


@pytest.mark.parametrize("code", sorted(CASES))
def test_rule_stays_quiet(code: str) -> None:
    build, example, intent = CASES[code]
    findings = bnkit.doctor(build(True), _example(example, True), intent=intent)
    assert code not in findings.codes(), str(findings)


def test_healthy_model_has_no_findings_for_any_intent() -> None:
    model = _mlp()
    example = torch.randn(32, 4)
    assert _codes(model, example, "training") == []
    assert _codes(model, example, "fine-tune") == []
    assert _codes(model.eval(), example, "inference") == []


def test_keras_momentum_quiet_for_keras_convention_layer_and_message() -> None:
    keras_layer = bnkit.BatchNorm.from_keras(6, axis=1)
    assert "BN001" not in _codes(nn.Sequential(keras_layer))
    finding = bnkit.doctor(_mlp(momentum=0.99))[0]
    assert finding.layer == "1" and "momentum=0.01" in finding.fix and "Keras" in finding.message


def test_partial_port_names_the_minority_layer() -> None:
    findings = [f for f in bnkit.doctor(_keras_eps_mix(False)) if f.code == "BN002"]
    assert [f.layer for f in findings] == ["3"]
    assert "eps=0.001" in findings[0].message and "2 of 3" in findings[0].message


def test_track_running_stats_false_at_inference_is_a_warning() -> None:
    model = _trained(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6, track_running_stats=False)).eval()
    findings = [f for f in bnkit.doctor(model, intent="inference") if f.code == "BN005"]
    assert [(f.severity, f.layer) for f in findings] == [("warning", "1")]


def test_small_batch_severity_ghost_and_frozen() -> None:
    one = [f for f in bnkit.doctor(_mlp(), torch.randn(1, 4)) if f.code == "BN006"]
    assert one[0].severity == "error"
    images = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    assert [f.severity for f in bnkit.doctor(images, torch.randn(1, 3, 6, 6)) if f.code == "BN006"] == ["warning"]
    ghost = nn.Sequential(nn.Linear(4, 6, bias=False), bnkit.BatchNorm(6, virtual_batch_size=4))
    ghost_findings = [f for f in bnkit.doctor(ghost, torch.randn(32, 4)) if f.code == "BN006"]
    assert "ghost batches of 4" in ghost_findings[0].message
    frozen = _mlp()
    bnkit.freeze(frozen)
    assert "BN006" not in _codes(frozen, torch.randn(2, 4))
    assert "BN006" not in _codes(_mlp(), torch.randn(2, 4), "inference")


def test_bias_before_bn_by_trace_by_fx_and_not_through_other_ops() -> None:
    class Residual(nn.Module):  # not Sequential: found through torch.fx or the example run
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 4)
            self.bn_after_relu = nn.BatchNorm1d(4)

        def forward(self, x):
            y = x + self.bn(self.conv(x))
            return self.bn_after_relu(torch.relu(self.fc(y.mean((2, 3)))))

    model = Residual()
    x = torch.randn(8, 4, 5, 5)
    for example in (None, x):
        findings = [f for f in bnkit.doctor(model, example) if f.code == "BN007"]
        assert [f.layer for f in findings] == ["bn"]
        assert "'conv'" in findings[0].message
    frozen = Residual()
    bnkit.freeze(frozen, layers="bn")
    assert "BN007" not in _codes(frozen, x)


def test_bias_before_bn_needs_the_channel_axis_to_match() -> None:
    class Tokens(nn.Module):  # Linear on the last axis, BN1d over axis 1 of a 3-D input: not redundant
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 5)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.fc(x))

    assert "BN007" not in _codes(Tokens(), torch.randn(8, 3, 5))


def test_variance_below_eps_and_negative() -> None:
    tiny = bnkit.doctor(_bad_variance(False, 1e-9))
    assert [(f.code, f.severity) for f in tiny] == [("BN009", "warning")]
    assert "1 of 6 channels" in tiny[0].message
    negative = bnkit.doctor(_bad_variance(False, -1.0))
    assert [(f.code, f.severity) for f in negative] == [("BN009", "error")]
    assert "negative" in negative[0].message


def test_called_twice_is_an_error_for_synchronised_layers() -> None:
    model = CalledTwice()
    model.bn = bnkit.BatchNorm(4, sync=True) if _sync_ok() else nn.SyncBatchNorm(4)
    findings = [f for f in bnkit.doctor(model, torch.randn(16, 4)) if f.code == "BN010"]
    assert findings[0].severity == "error" and "2 times" in findings[0].message


def _sync_ok() -> bool:
    try:
        bnkit.BatchNorm(4, sync=True)
    except NotImplementedError:
        return False
    return True


def test_doctor_changes_nothing_and_removes_hooks() -> None:
    model = CalledTwice()
    model.bn.eval()
    state = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    bnkit.doctor(model, torch.randn(16, 4))
    assert [m.training for m in model.modules()] == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_output_forms() -> None:
    findings = bnkit.doctor(_mlp(momentum=0.9).eval(), intent="inference")
    assert isinstance(findings, Diagnosis) and all(isinstance(f, Finding) for f in findings)
    assert json.loads(findings.to_json()) == findings.to_dicts()
    assert findings.worst() == "error"
    assert str(findings).splitlines()[0].split() == ["code", "severity", "layer", "problem", "fix"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="intent must be one of"):
        bnkit.doctor(_mlp(), intent="deploy")
    with pytest.raises(ValueError, match="the model failed on example_inputs"):
        bnkit.doctor(_mlp(), torch.randn(8, 5))
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        bnkit.doctor(None)  # type: ignore[arg-type]


def test_a_model_without_batchnorm_is_not_passed_silently() -> None:
    with pytest.warns(UserWarning, match="doctor: the model has no BatchNorm layer; nothing to check"):
        assert bnkit.doctor(nn.Sequential(nn.Linear(2, 2))).codes() == []
