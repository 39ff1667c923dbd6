"""Sub-commands through their parser and handler (no subprocess): results are checked against the library."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import bnkit
from bnkit.cli import output
from bnkit.cli.io import CliError
from bnkit.cli.main import COMMANDS, build_parser, main
from tests.cli.conftest import FACTORY_MODULE

NET = f"{FACTORY_MODULE}:net"


def _run(*argv: str):
    args = build_parser(argv[0]).parse_args(list(argv))
    return args, args.func(args)


def test_every_command_module_follows_the_contract() -> None:
    mine = [name for name, _, _ in COMMANDS if name not in ("study", "plot")]
    for name in mine:
        args = build_parser(name).parse_args([name, "m.pt", *_required(name)])
        assert callable(args.func) and callable(args.render) and args.command == name


def _required(name: str) -> list[str]:
    return {
        "shift": ["x.npy"],
        "recalibrate": ["x.npy", "-o", "o.pt"],
        "fuse": ["-o", "o.pt"],
        "fold": ["-o", "o.keras"],
        "convert": ["--to", "bnkit", "-o", "o.pt"],
    }.get(name, [])


def test_explain_matches_library(workdir: Path) -> None:
    _, data = _run("explain", "whole.pt", "--trust-pickle")
    assert data == bnkit.explain(torch.load("whole.pt", weights_only=False)).to_dicts()


def test_summary_accepts_torchscript_and_counts_like_eager(workdir: Path) -> None:
    _, eager = _run("summary", NET, "--input-size", "1,8,8")
    _, scripted = _run("summary", "scripted.pt")
    assert eager["parameters"] == scripted["parameters"] == 2618
    assert eager["total"] == 2626 and eager["rows"][0]["output_shape"] == [-1, 4, 8, 8]


def test_doctor_example_batch_and_fail_on(workdir: Path) -> None:
    _, result = _run("doctor", NET, "--input-size", "1,8,8", "--batch-size", "4")
    codes = [f["code"] for f in result.data]
    assert codes == ["BN001", "BN006", "BN007"] and result.exit_code == 0
    _, result = _run("doctor", NET, "--fail-on", "error")
    assert result.exit_code == 1
    _, result = _run("doctor", NET, "--data", "x.npy", "--fail-on", "info")
    assert "BN006" not in [f["code"] for f in result.data]  # 50 samples in the first batch
    with pytest.raises(CliError, match="not both"):
        _run("doctor", NET, "--data", "x.npy", "--input-size", "1,8,8")


def test_shift_matches_library(workdir: Path) -> None:
    _, data = _run("shift", "whole.pt", "--trust-pickle", "x.npy", "--batch-size", "16", "--num-batches", "2")
    model = torch.load("whole.pt", weights_only=False)
    x = torch.from_numpy(__import__("numpy").load("x.npy")).float()
    expected = bnkit.shift(model, list(x.split(16))[:2])
    assert data["score"] == pytest.approx(expected.score) and data["batches"] == 2


def test_recalibrate_writes_state_dict_for_factories_and_modules_otherwise(workdir: Path) -> None:
    _, data = _run("recalibrate", NET, "--weights", "state.pt", "x.npy", "-o", "rec.pt")
    assert data["format"] == "state_dict" and data["counts"] == {"1": 50 * 64}
    state = torch.load("rec.pt", weights_only=True)
    model = torch.load("whole.pt", weights_only=False)
    x = torch.from_numpy(__import__("numpy").load("x.npy")).float()
    with torch.no_grad():
        hidden = model[0](x)
    torch.testing.assert_close(state["1.running_mean"], hidden.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    _, data = _run("recalibrate", "whole.pt", "--trust-pickle", "x.npy", "-o", "rec_module.pt", "--method", "ema")
    assert data["format"] == "module"
    assert isinstance(torch.load("rec_module.pt", weights_only=False), torch.nn.Module)


def test_fuse_writes_a_model_without_batchnorm(workdir: Path) -> None:
    _, data = _run("fuse", "whole.pt", "--trust-pickle", "-o", "fused.pt", "--input-size", "1,8,8")
    assert data["checked"] and [f["bn"] for f in data["folded"]] == ["1"]
    fused = torch.load("fused.pt", weights_only=False)
    original = torch.load("whole.pt", weights_only=False).eval()
    assert not bnkit.named_batchnorms(fused)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    _, data = _run(
        "fuse", "whole.pt", "--trust-pickle", "-o", "fused.ts", "--input-size", "1,8,8", "--format", "torchscript"
    )
    torch.testing.assert_close(torch.jit.load("fused.ts")(x), original(x), rtol=1e-5, atol=1e-5)


def test_convert_round_trip(workdir: Path) -> None:
    _, data = _run("convert", "whole.pt", "--trust-pickle", "--to", "bnkit", "-o", "b.pt")
    assert data["converted"] == [{"layer": "1", "from": "BatchNorm2d", "to": "BatchNorm"}]
    _, data = _run("convert", "b.pt", "--trust-pickle", "--to", "torch", "-o", "t.pt", "--input-size", "1,8,8")
    back = torch.load("t.pt", weights_only=False)
    original = torch.load("whole.pt", weights_only=False)
    assert type(back[1]) is torch.nn.BatchNorm2d
    for key, value in original.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


@pytest.mark.parametrize("command", ["fuse", "recalibrate", "convert"])
def test_writers_refuse_their_input_before_working(workdir: Path, command: str) -> None:
    before = Path("whole.pt").read_bytes()
    extra = {"recalibrate": ["x.npy"], "convert": ["--to", "bnkit"]}.get(command, [])
    with pytest.raises(CliError, match=r"refusing to overwrite the input file 'whole\.pt'"):
        _run(command, "whole.pt", "--trust-pickle", *extra, "-o", "whole.pt")
    if command == "recalibrate":
        with pytest.raises(CliError, match=r"refusing to overwrite the input file 'x\.npy'"):
            _run(command, "whole.pt", "--trust-pickle", "x.npy", "-o", "x.npy")
    assert Path("whole.pt").read_bytes() == before


def test_main_exit_codes_and_one_line_errors(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "missing.pt"]) == 2
    err = capsys.readouterr().err
    assert err == "bnkit explain: error: model file 'missing.pt' not found\n"
    assert main(["shift", "whole.pt", "wrong.pt", "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnkit shift: error: the model failed on batch 0 (shape [10, 3, 8, 8])")
    assert err.count("\n") == 1
    assert main(["explain"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["nonsense"]) == 2
    assert main([]) == 2
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("bnkit ")
    assert main(["summary", NET, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 2626
    assert main(["--json", "summary", NET]) == 0  # global options before the command work too
    assert json.loads(capsys.readouterr().out)["total"] == 2626


def test_debug_shows_traceback(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "missing.pt", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_broken_command_module_does_not_break_others(monkeypatch, capsys) -> None:
    from bnkit.cli import main as main_mod

    broken = [*main_mod.COMMANDS, ("ghost", "bnkit.cli.commands.no_such_module", "missing")]
    monkeypatch.setattr(main_mod, "COMMANDS", broken)
    assert main_mod.main(["ghost"]) == 2
    assert "the 'ghost' command is not available" in capsys.readouterr().err
    assert main_mod.main(["summary", "torch.nn:Identity", "--json"]) == 0


def test_study_is_registered_and_has_help(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser("study").parse_args(["study", "--help"])
    assert info.value.code == 0 and "study" in capsys.readouterr().out


def test_output_rich_and_plain() -> None:
    table = output.Table("t", ["layer", "n"], [["a", 1234]], notes=["note"])
    plain = io.StringIO()
    output.print_blocks([table, "done"], plain, rich=False)
    assert plain.getvalue() == "t\nlayer      n\n-----  -----\na      1,234\nnote\n\ndone\n"
    fancy = io.StringIO()
    output.print_blocks([table, "done"], fancy, rich=True)
    text = fancy.getvalue()
    assert "1,234" in text and "│" in text and "done" in text
    assert output.jsonable({"x": float("inf"), "t": (1, 2)}) == {"x": "inf", "t": [1, 2]}
