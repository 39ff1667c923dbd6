"""bnkit.Monitor: logged values against statistics computed directly from the layers' inputs (float64), the
JSONL and TensorBoard outputs read back, steps and ``every``, alerts, hooks, and models that still pickle,
deep-copy, script and export while a monitor is attached."""

from __future__ import annotations

import copy
import io
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_mod

import bnkit
from bnkit.monitor import JSONL_NAME, QUANTITIES, Monitor, MonitorWarning, Thresholds, read_log
from bnkit.monitor.monitor import _channel_moments

BN_TYPES = (nn.modules.batchnorm._BatchNorm, bnkit.BatchNorm)


def _global_hook_counts() -> tuple[int, int]:
    return len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks)


@pytest.fixture(autouse=True)
def no_leftover_hooks():
    """Every test must leave torch's global hook tables as it found them (a monitor left attached would not)."""
    before = _global_hook_counts()
    yield
    assert _global_hook_counts() == before


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 5),
        nn.BatchNorm1d(5),
    ).train()


class _Oracle:
    """Plain per-module hooks that keep each BN's input and its state before the call (the test's reference)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[dict[str, dict[str, torch.Tensor]]] = []
        self.current: dict[str, dict[str, torch.Tensor]] = {}
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, BN_TYPES):
                self.handles.append(module.register_forward_pre_hook(self._make(name)))

    def _make(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.current[name] = {
                "x": args[0].detach().double().clone(),
                "rm": module.running_mean.detach().double().clone(),
                "rv": module.running_var.detach().double().clone(),
                "w": module.weight.detach().double().clone(),
                "b": module.bias.detach().double().clone(),
                "eps": module.eps,
                "axis": module.channel_axis(args[0].ndim) if isinstance(module, bnkit.BatchNorm) else 1,
            }

        return hook

    def end_step(self) -> None:
        self.calls.append(self.current)
        self.current = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _expected(entry: dict) -> dict[str, float]:
    x, axis, eps = entry["x"], entry["axis"], entry["eps"]
    dims = [d for d in range(x.ndim) if d != axis]
    mean = x.mean(dim=dims)
    var = ((x - mean.view([-1 if d == axis else 1 for d in range(x.ndim)])) ** 2).mean(dim=dims)
    rm, rv = entry["rm"], entry["rv"]
    vp, vq = var + eps, rv + eps
    kl = 0.5 * ((vp - vq) ** 2 + (vp + vq) * (mean - rm) ** 2) / (vp * vq)
    return {
        "batch_mean": float(mean.mean()),
        "batch_var": float(var.mean()),
        "batch_var_min": float(var.min()),
        "batch_var_max": float(var.max()),
        "running_mean": float(rm.mean()),
        "running_var": float(rv.mean()),
        "running_var_min": float(rv.min()),
        "running_var_max": float(rv.max()),
        "drift": float(kl.mean()),
        "drift_max": float(kl.max()),
        "weight_norm": float(entry["w"].norm()),
        "bias_norm": float(entry["b"].norm()),
        "dead_fraction": float((var < eps).double().mean()),
        "_mean": mean,
        "_var": var,
    }


def _train(
    model: nn.Module,
    steps: int,
    monitor: Monitor | None = None,
    oracle: _Oracle | None = None,
    shape=(8, 3, 9, 9),
    seed: int = 1,
    scale: float = 1.0,
    shift: float = 0.0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(*shape, generator=gen) * scale + shift
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if oracle is not None:
            oracle.end_step()
        if monitor is not None:
            monitor.step()


def _close(a: float, b: float, rel: float = 1e-5, abs_: float = 1e-7) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


# ---------------------------------------------------------------------------------------------- values


def test_records_match_direct_computation(tmp_path: Path) -> None:
    model = _model()
    oracle = _Oracle(model)
    with Monitor(model, log_dir=tmp_path, warn=False) as monitor:
        _train(model, 4, monitor, oracle)
    oracle.remove()
    stats = read_log(tmp_path)["stats"]
    assert [r["step"] for r in stats] == [s for s in range(4) for _ in range(3)]
    assert [r["layer"] for r in stats[:3]] == ["1", "4", "7"]
    for record in stats:
        expected = _expected(oracle.calls[record["step"]][record["layer"]])
        for name in QUANTITIES:
            assert _close(record[name], expected[name]), (record["step"], record["layer"], name)
        assert record["uses_batch_stats"] is True
        assert record["num_batches_tracked"] == record["step"]  # read before this step's update
        assert record["count"] == {"1": 8 * 49, "4": 8 * 25, "7": 8}[record["layer"]]
        assert record["channels"] == {"1": 4, "4": 6, "7": 5}[record["layer"]]
    # Weights move with training, so the weight norms must differ between steps (the snapshot is per step).
    norms = [r["weight_norm"] for r in stats if r["layer"] == "7"]
    assert len(set(norms)) == len(norms)


def test_tensorboard_events_match_direct_computation(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _model()
    oracle = _Oracle(model)
    with Monitor(model, log_dir=tmp_path, histogram_every=2, warn=False) as monitor:
        _train(model, 3, monitor, oracle)
    oracle.remove()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    for layer in ("1", "4", "7"):
        for name in QUANTITIES:
            values = events.Scalars(f"bn_{name}/{layer}")
            assert [v.step for v in values] == [0, 1, 2]
            for v in values:
                expected = _expected(oracle.calls[v.step][layer])[name]
                # TensorBoard stores float32 scalars.
                assert _close(v.value, expected, rel=1e-5, abs_=1e-6), (layer, name, v.step)
        assert [v.value for v in events.Scalars(f"bn_uses_batch_stats/{layer}")] == [1.0, 1.0, 1.0]
    histogram_tags = [t for t in tags["histograms"] if t.endswith("/4")]
    assert sorted(histogram_tags) == sorted(
        f"bn_hist_{n}/4" for n in ("batch_mean", "batch_var", "running_mean", "running_var", "weight", "bias")
    )
    for kind, key in (("batch_mean", "_mean"), ("batch_var", "_var"), ("running_var", "rv"), ("weight", "w")):
        hists = events.Histograms(f"bn_hist_{kind}/4")
        assert [h.step for h in hists] == [0, 2]  # every 2nd recorded step
        for h in hists:
            entry = oracle.calls[h.step]["4"]
            vector = _expected(entry)[key] if key.startswith("_") else entry[key]
            value = h.histogram_value
            assert value.num == vector.numel()
            assert _close(value.min, float(vector.min()), abs_=1e-9)
            assert _close(value.max, float(vector.max()), abs_=1e-9)
            assert _close(value.sum, float(vector.sum()), abs_=1e-9)
            assert _close(value.sum_squares, float((vector**2).sum()), abs_=1e-9)
            assert sum(value.bucket) == vector.numel()


def test_bnkit_batchnorm_channels_last_axis_and_mask() -> None:
    torch.manual_seed(0)
    bn = bnkit.BatchNorm(3, axis=-1)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    oracle = _Oracle(bn)
    x = torch.randn(4, 5, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([1.0, 0.0, -1.0])
    with Monitor(bn) as monitor:
        bn(x)
        oracle.end_step()
        mask = torch.ones(4, 5, dtype=torch.bool)
        mask[:, 3:] = False
        bn(x, mask=mask)
    oracle.remove()
    first, second = monitor.history
    expected = _expected(oracle.calls[0][""])
    for name in QUANTITIES:
        assert _close(first[name], expected[name]), name
    masked = x[:, :3].double()
    assert _close(second["batch_mean"], float(masked.mean(dim=(0, 1)).mean()))
    assert _close(second["batch_var"], float(masked.var(dim=(0, 1), unbiased=False).mean()))
    assert second["count"] == 12


@pytest.mark.parametrize("offset", [0.0, 3.0, 1e3, 1e5])
@pytest.mark.parametrize(
    ("shape", "axis", "layout"),
    [
        ((8, 5, 4, 4), 1, "contiguous"),
        ((8, 5, 6, 6), 1, "channels_last"),
        ((16, 5), 1, "contiguous"),
        ((8, 3, 40), 1, "contiguous"),
        ((4, 6, 6, 5), 3, "contiguous"),
        ((4, 6, 3, 3, 3), 1, "permuted"),
    ],
)
def test_cpu_moments_are_accurate(shape, axis, layout, offset) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen) * 0.5 + offset
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = x.transpose(2, 4)
    stats, raw, count = _channel_moments(x, axis, None, 1e-5)
    stats = stats.double()
    if raw:
        mean = stats[0] / count
        var = stats[1] / count - mean * mean
    else:
        mean, var = stats
    dims = tuple(d for d in range(x.ndim) if d != axis)
    var64, mean64 = torch.var_mean(x.double(), dim=dims, correction=0)
    assert count == x.numel() // x.shape[axis]
    torch.testing.assert_close(mean, mean64, rtol=1e-6, atol=1e-6)
    # |mean| >> std must trigger the exact path: the one-pass variance would be garbage at offset 1e5.
    torch.testing.assert_close(var, var64, rtol=1e-3, atol=0.0)
    if offset >= 1e3:
        assert raw is False


def test_dead_channels_fraction() -> None:
    bn = nn.BatchNorm2d(4).train()
    x = torch.randn(6, 4, 3, 3)
    x[:, 1] = 0.0
    x[:, 3] = 7.0  # constant but not zero: the exact path must see a zero variance
    with Monitor(bn, warn=False) as monitor:
        bn(x)
    assert monitor.history[0]["dead_fraction"] == 0.5
    assert monitor.history[0]["batch_var_min"] == 0.0


# ---------------------------------------------------------------------------------------------- modes


def test_uses_batch_stats_reflects_eval_freeze_and_bnkit_switches() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),
        nn.BatchNorm1d(4),
        nn.BatchNorm1d(4),
        bnkit.BatchNorm(4),
        nn.BatchNorm1d(4, track_running_stats=False),
    ).train()
    model[2].eval()  # an eval layer inside a training model: running statistics
    bnkit.freeze(model, layers="3")  # freeze's hooks run the layer in inference mode for the call
    model[4].freeze_stats = True
    before = model[3].running_mean.clone()
    with Monitor(model) as monitor:
        model(torch.randn(8, 3))
    modes = {r["layer"]: r["uses_batch_stats"] for r in monitor.history}
    assert modes == {"1": True, "2": False, "3": False, "4": False, "5": True}
    assert torch.equal(model[3].running_mean, before)
    assert model[3].training is True  # the flag freeze put back after the call
    no_running = monitor.last["5"]
    assert no_running["running_mean"] is None and no_running["drift"] is None
    assert no_running["num_batches_tracked"] is None
    assert no_running["batch_var"] > 0


def test_affine_false_has_no_norms(tmp_path: Path) -> None:
    bn = nn.BatchNorm1d(3, affine=False).train()
    with Monitor(bn, log_dir=tmp_path, tensorboard=False) as monitor:
        bn(torch.randn(5, 3))
    record = read_log(tmp_path)["stats"][0]
    assert record["weight_norm"] is None and record["bias_norm"] is None
    assert monitor.last[""]["drift"] > 0


# ---------------------------------------------------------------------------------------------- steps


def test_every_counts_training_forwards_without_step_calls() -> None:
    bn = nn.BatchNorm1d(2)
    with Monitor(bn, every=3) as monitor:
        for i in range(10):
            bn.train(i != 4)  # an eval call neither counts as a step nor is recorded
            bn(torch.randn(4, 2))
    assert [r["step"] for r in monitor.history] == [0, 3, 6]
    assert monitor.global_step == 8


def test_every_follows_step_calls_and_global_step() -> None:
    model = _model()
    with Monitor(model, every=2, warn=False) as monitor:
        for step in range(0, 12, 3):  # the user's own numbering
            monitor.step(step)
            model(torch.randn(4, 3, 9, 9))
            model(torch.randn(4, 3, 9, 9))  # gradient accumulation: recorded once per step
    assert sorted({r["step"] for r in monitor.history}) == [0, 6]
    assert len(monitor.history) == 2 * 3


def test_auto_step_false_with_accumulation_from_the_start() -> None:
    bn = nn.BatchNorm1d(2).train()
    with Monitor(bn, auto_step=False) as monitor:
        for _ in range(3):
            bn(torch.randn(4, 2))
            bn(torch.randn(4, 2) + 100)  # second call in the same step: not recorded
            monitor.step()
    assert [r["step"] for r in monitor.history] == [0, 1, 2]
    assert all(abs(r["batch_mean"]) < 5 for r in monitor.history)


def test_shared_layer_recorded_at_first_call() -> None:
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(bn, nn.Linear(3, 3), bn).train()
    with Monitor(model) as monitor:
        x = torch.randn(6, 3)
        model(x)
    assert len(monitor.history) == 1
    assert _close(monitor.history[0]["batch_mean"], float(x.double().mean()))


def test_layers_selector() -> None:
    model = _model()
    with Monitor(model, layers=["1", "7"], warn=False) as monitor:
        model(torch.randn(4, 3, 9, 9))
    assert monitor.layers == ["1", "7"]
    assert [r["layer"] for r in monitor.history] == ["1", "7"]


# ---------------------------------------------------------------------------------------------- alerts


def _settled_bn(channels: int = 4) -> nn.BatchNorm2d:
    """A BN whose running statistics match N(0, 1) data and that has seen enough batches for drift alerts."""
    bn = nn.BatchNorm2d(channels).train()
    bn.num_batches_tracked.fill_(1000)
    bn.momentum = 0.0  # the running statistics stay put, so each test controls the drift exactly
    return bn


def test_no_alert_on_healthy_training() -> None:
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)
        with Monitor(model, thresholds={"drift_warmup": 0, "drift": 50.0}) as monitor:
            _train(model, 5, monitor)
    assert monitor.alerts == []


def test_drift_alert_fires_once_then_again_after_recovery() -> None:
    bn = _settled_bn()
    gen = torch.Generator().manual_seed(0)
    with Monitor(bn, thresholds=Thresholds(drift=1.0)) as monitor:
        with pytest.warns(MonitorWarning, match="drift"):
            for shift in (0.0, 3.0, 3.0, 0.0, 3.0):
                bn(torch.randn(16, 4, 4, 4, generator=gen) + shift)
                monitor.step()
    assert [(a.step, a.kind) for a in monitor.alerts] == [(1, "drift"), (4, "drift")]
    alert = monitor.alerts[0]
    assert alert.layer == "" and alert.value > 1.0 and alert.threshold == 1.0
    assert monitor.history[0]["drift"] < 0.1


def test_drift_warmup_suppresses_fresh_layers() -> None:
    bn = nn.BatchNorm2d(2).train()  # num_batches_tracked 0: running statistics still 0/1
    with Monitor(bn, thresholds={"drift_warmup": 3}, warn=False) as monitor:
        for _ in range(5):
            bn(torch.randn(8, 2, 3, 3) * 5 + 10)
    assert [(a.step, a.kind) for a in monitor.alerts] == [(3, "drift")]


def test_nonfinite_alert_and_strict_jsonl(tmp_path: Path) -> None:
    bn = _settled_bn(3)
    x = torch.randn(8, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    with Monitor(bn, log_dir=tmp_path, tensorboard=False) as monitor:
        with pytest.warns(MonitorWarning, match="non-finite"):
            bn(x)
            monitor.step()
    assert [a.kind for a in monitor.alerts] == ["nonfinite"]
    lines = (tmp_path / JSONL_NAME).read_text().splitlines()

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    parsed = [json.loads(line, parse_constant=refuse) for line in lines]
    stats = next(p for p in parsed if p["kind"] == "stats")
    assert stats["batch_mean"] is None and "batch_mean" in stats["nonfinite"]
    alert = next(p for p in parsed if p["kind"] == "alert")
    assert alert["alert"] == "nonfinite" and alert["value"] is None
    assert math.isnan(read_log(tmp_path)["stats"][0]["batch_mean"])


def test_collapse_and_explosion_alerts() -> None:
    bn = _settled_bn(4)
    collapsed = torch.randn(8, 4, 3, 3)
    collapsed[:, :3] = 0.5
    with Monitor(bn, thresholds={"drift": None}) as monitor:
        with pytest.warns(MonitorWarning) as caught:
            bn(collapsed)
            monitor.step()
            bn(torch.randn(8, 4, 3, 3) * 1e4)
            monitor.step()
    assert [(a.step, a.kind) for a in monitor.alerts] == [(0, "variance_collapse"), (1, "variance_explosion")]
    assert monitor.alerts[0].value == 0.75
    assert len(caught) == 2


def test_thresholds_can_be_switched_off() -> None:
    bn = _settled_bn(2)
    off = {"drift": None, "collapse_fraction": None, "var_max": None, "nonfinite": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)
        with Monitor(bn, thresholds=off) as monitor:
            bn(torch.full((4, 2, 2, 2), float("inf")))
            bn(torch.zeros(4, 2, 2, 2))
    assert monitor.alerts == []


def test_warn_false_still_collects() -> None:
    bn = _settled_bn(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)
        with Monitor(bn, warn=False) as monitor:
            bn(torch.randn(8, 2, 2, 2) + 10)
    assert [a.kind for a in monitor.alerts] == ["drift"]


# ---------------------------------------------------------------------------------------------- outputs


def test_jsonl_content_and_meta(tmp_path: Path) -> None:
    model = _model()
    with Monitor(model, log_dir=tmp_path, tensorboard=False, every=2, warn=False) as monitor:
        _train(model, 4, monitor)
    assert not list(tmp_path.glob("events.out.tfevents*"))
    log = read_log(tmp_path)
    (meta,) = log["meta"]
    assert meta["every"] == 2 and meta["version"] == 1
    assert [(x["name"], x["type"], x["channels"], x["eps"]) for x in meta["layers"]] == [
        ("1", "BatchNorm2d", 4, 1e-5),
        ("4", "BatchNorm2d", 6, 1e-5),
        ("7", "BatchNorm1d", 5, 1e-5),
    ]
    assert meta["thresholds"]["drift"] == 1.0
    record = log["stats"][0]
    assert set(record) == {
        "kind",
        "step",
        "time",
        "layer",
        "uses_batch_stats",
        "channels",
        "count",
        "num_batches_tracked",
        *QUANTITIES,
    }
    assert [r["step"] for r in log["stats"]] == [0, 0, 0, 2, 2, 2]
    assert monitor.history == []  # written to disk, not kept in memory by default


def test_existing_writer_is_used_and_left_open(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    model = _model()
    with Monitor(model, writer=writer, warn=False) as monitor:
        assert monitor.writer is writer
        _train(model, 2, monitor)
    writer.add_scalar("user/loss", 1.5, 0)  # still open
    writer.close()
    assert (tmp_path / JSONL_NAME).is_file()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    assert "user/loss" in events.Tags()["scalars"]
    assert len(events.Scalars("bn_drift/4")) == 2


def test_appending_runs_and_partial_last_line(tmp_path: Path) -> None:
    bn = nn.BatchNorm1d(2).train()
    for _ in range(2):
        with Monitor(bn, log_dir=tmp_path, tensorboard=False, warn=False):
            bn(torch.randn(4, 2))
    with open(tmp_path / JSONL_NAME, "a") as f:
        f.write('{"kind": "stats", "st')  # a run killed mid-write
    log = read_log(tmp_path)
    assert len(log["meta"]) == 2 and len(log["stats"]) == 2
    (tmp_path / "bad.jsonl").write_text('{"kind": "meta"}\nnot json\n{"kind": "meta"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_log(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="no monitor log"):
        read_log(tmp_path / "missing")


def test_tensorboard_true_without_package_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    bn = nn.BatchNorm1d(2)
    with pytest.raises(ImportError, match=r"pip install 'bnkit\[monitor\]'"):
        Monitor(bn, log_dir=tmp_path, tensorboard=True).attach()
    with pytest.warns(MonitorWarning, match="tensorboard is not installed"):
        monitor = Monitor(bn, log_dir=tmp_path / "b").attach()
    monitor.close()
    assert (tmp_path / "b" / JSONL_NAME).is_file()


# ---------------------------------------------------------------------------------------------- hooks


def test_detach_removes_every_hook_even_after_an_error() -> None:
    model = _model()
    before = _global_hook_counts()
    monitor = Monitor(model, warn=False).attach()
    assert monitor.attached and _global_hook_counts() == (before[0] + 1, before[1] + 1)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    monitor.detach()
    assert not monitor.attached and _global_hook_counts() == before
    with pytest.raises(RuntimeError, match="boom"), Monitor(model, warn=False):
        model(torch.randn(2, 3, 9, 9))
        raise RuntimeError("boom")
    assert _global_hook_counts() == before
    model(torch.randn(2, 3, 9, 9))  # not recorded anywhere, no error


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_attached_model_pickles_deepcopies_scripts_and_exports() -> None:
    model = _model()
    with Monitor(model, warn=False) as monitor:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        twin = copy.deepcopy(model)
        scripted = torch.jit.script(model)
        x = torch.randn(4, 3, 9, 9)
        for other in (loaded, twin, scripted):
            other(x)  # copies are not watched
        assert monitor.history == [] and monitor._pending == []
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in twin.modules())
        model.eval()
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), model(x))
        model.train()
        model(x)
    assert len(monitor.history) == 3


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        Monitor(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="matching 'nope'"):
        Monitor(_model(), layers="nope")
    with pytest.raises(ValueError, match="every must be a positive int"):
        Monitor(_model(), every=0)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        Monitor("model")
    with pytest.raises(TypeError, match="SummaryWriter"):
        Monitor(_model(), writer=object())
    with pytest.raises(ValueError, match="unknown threshold"):
        Monitor(_model(), thresholds={"drfit": 1.0})
    with pytest.raises(TypeError, match="global_step must be an int"):
        Monitor(_model()).step(1.5)


def test_write_errors_surface_in_the_training_thread(tmp_path: Path) -> None:
    class FullDisk:
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    bn = nn.BatchNorm1d(2).train()
    monitor = Monitor(bn, log_dir=tmp_path, tensorboard=False, warn=False).attach()
    monitor._file = FullDisk()
    bn(torch.randn(4, 2))
    monitor.step()  # queued; the writer thread fails
    bn(torch.randn(4, 2))
    with pytest.raises(OSError, match="No space left"):
        monitor.detach()
    assert not monitor.attached
    monitor.close()


def test_records_show_bnkit_skipped_batches(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bnkit.BatchNorm(4), nn.BatchNorm2d(4))
    bad = torch.randn(4, 3, 5, 5)
    bad[0, 0, 0, 0] = float("nan")
    with Monitor(model, log_dir=tmp_path, tensorboard=False, warn=False) as monitor:
        for x in (torch.randn(4, 3, 5, 5), bad):
            model(x)
            monitor.step()
    stats = read_log(tmp_path)["stats"]
    assert [r["skipped_batches"] for r in stats if r["layer"] == "1"] == [0, 1]
    assert all("skipped_batches" not in r for r in stats if r["layer"] == "2")  # torch layers have no counter
