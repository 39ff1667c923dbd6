"""Issue 11's CLI items: ``--input-size 3 224 224`` as well as ``3,224,224``, and ``doctor --intent inference``
on a model left in train mode (every factory returns one): put in eval mode once, said once, not one error per
layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

import bnkit
from bnkit.cli.commands import join_size_arguments, parse_size
from bnkit.cli.files import CliError
from bnkit.cli.main import main
from tests.cli.conftest import FACTORY_MODULE

NET = f"{FACTORY_MODULE}:net"


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("form", [["1,8,8"], ["1", "8", "8"], ["1x8x8"], ["1,", "8,", "8"], ["1 8 8"]])
def test_input_size_forms_give_the_same_summary(
    workdir: Path, capsys: pytest.CaptureFixture[str], form: list[str]
) -> None:
    reference = bnkit.summary(torch.load("whole.pt", weights_only=False), input_size=(1, 8, 8)).to_dict()
    # the numbers before MODEL (the case argparse alone cannot parse) and after it
    for argv in (["summary", "--input-size", *form, NET, "--json"], ["summary", NET, "--input-size", *form, "--json"]):
        code, out, err = _cli(capsys, *argv)
        assert code == 0, err
        data = json.loads(out)
        assert [r["output_shape"] for r in data["rows"]] == [r["output_shape"] for r in reference["rows"]]
        assert data["rows"][-1]["output_shape"] == [-1, 10]


def test_input_size_separate_numbers_reach_doctor_and_fuse_examples(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spaced = _cli(capsys, "doctor", NET, "--input-size", "1", "8", "8", "--batch-size", "2", "--json")
    commas = _cli(capsys, "doctor", NET, "--input-size", "1,8,8", "--batch-size", "2", "--json")
    assert spaced == commas and spaced[0] == 0
    assert "BN006" in [f["code"] for f in json.loads(spaced[1])]  # the example batch of 2 was built and used


@pytest.mark.parametrize("bad", [["0", "8"], ["3", "-1"], ["a,b"]])
def test_bad_input_size_is_one_line(workdir: Path, capsys: pytest.CaptureFixture[str], bad: list[str]) -> None:
    code, out, err = _cli(capsys, "summary", NET, "--input-size", *bad)
    assert code == 2 and out == "" and err.count("\n") == 1 and "--input-size" in err


def test_join_size_arguments_leaves_everything_else_alone() -> None:
    argv = ["fuse", "m.pt", "-o", "out.pt", "--batch-size", "4"]
    assert join_size_arguments(argv) == argv
    joined = join_size_arguments(["summary", "--input-size", "3", "5", "m.pt"])
    assert joined == ["summary", "--input-size", "3,5", "m.pt"]
    assert join_size_arguments(["x", "--", "--input-size", "3", "5"]) == ["x", "--", "--input-size", "3", "5"]
    assert parse_size(["3", "224", "224"]) == parse_size("3 224 224") == parse_size("3,224,224") == (3, 224, 224)
    with pytest.raises(CliError, match="positive integers"):
        parse_size("3,0")


def test_doctor_inference_on_a_factory_model_says_train_mode_once(capsys: pytest.CaptureFixture[str]) -> None:
    model = torchvision.models.resnet18(weights=None)
    assert model.training  # what every factory returns
    assert "BN005" in bnkit.doctor(model, intent="inference").codes()  # in train mode for inference: an error

    code, out, err = _cli(capsys, "doctor", "torchvision.models:resnet18", "--intent", "inference", "--json")
    assert code == 0
    findings = json.loads(out)
    assert findings == bnkit.doctor(torchvision.models.resnet18(weights=None).eval(), intent="inference").to_dicts()
    assert "BN005" not in [f["code"] for f in findings]
    notes = err.splitlines()
    assert len(notes) == 1 and notes[0].startswith("bnkit doctor: note: the model was in train mode")
    assert "model.eval()" in notes[0]

    # text output: the same note, once; the table has no BN005 row
    code, out, err = _cli(capsys, "doctor", "torchvision.models:resnet18", "--intent", "inference")
    assert code == 0 and err.count("note:") == 1 and "BN005" not in out


@pytest.mark.parametrize("intent", [None, "training", "fine-tune"])
def test_doctor_leaves_the_mode_alone_for_other_intents(
    workdir: Path, capsys: pytest.CaptureFixture[str], intent: str | None
) -> None:
    argv = ["doctor", NET, "--json"] + (["--intent", intent] if intent else [])
    code, out, err = _cli(capsys, *argv)
    assert code == 0 and "note" not in err
    assert json.loads(out) == bnkit.doctor(__import__(FACTORY_MODULE).net(), intent=intent).to_dicts()


def test_doctor_inference_on_an_eval_model_says_nothing(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.load("whole.pt", weights_only=False).eval()
    torch.save(model, "eval.pt")
    code, out, err = _cli(capsys, "doctor", "eval.pt", "--trust-pickle", "--intent", "inference", "--json")
    assert code == 0 and err == ""
    assert json.loads(out) == bnkit.doctor(model, intent="inference").to_dicts()
