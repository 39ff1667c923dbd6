"""No file runs code unless the user says so: crafted pickles with a harmless payload, in every command.

The payload creates a marker file when unpickled. Without ``--trust-pickle`` every command refuses the file with
one line and the marker never appears; with it the marker appears, which proves the payload is real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnkit.cli.main import main
from tests.cli.conftest import FACTORY_MODULE

NET = f"{FACTORY_MODULE}:net"


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: creates an empty file, nothing else."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _weights_with_payload(workdir: Path, marker: Path) -> str:
    state = torch.load(workdir / "state.pt", weights_only=True)
    torch.save({"state_dict": state, "extra": _Payload(marker)}, workdir / "evil_weights.pt")
    return "evil_weights.pt"


COMMANDS = {
    "explain": [],
    "summary": [],
    "doctor": [],
    "shift": ["x.npy", "--num-batches", "1"],
    "fuse": ["-o", "fused.pt", "--input-size", "1,8,8"],
    "recalibrate": ["x.npy", "-o", "rec.pt", "--num-batches", "1"],
    "convert": ["--to", "bnkit", "-o", "b.pt"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_weights_with_a_payload_are_refused(
    workdir: Path, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker-weights"
    weights = _weights_with_payload(workdir, marker)
    assert main([command, NET, "--weights", weights, *COMMANDS[command]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to unpickle weights file 'evil_weights.pt'" in err
    assert "--trust-pickle" in err and "io.open" in err  # says why (the global it refers to) and how
    assert not marker.exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_model_file_with_a_payload_is_refused(
    workdir: Path, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker-model"
    torch.save(_Payload(marker), workdir / "evil_model.pt")
    assert main([command, "evil_model.pt", *COMMANDS[command]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to unpickle model file 'evil_model.pt'" in err
    assert not marker.exists()


def test_an_export_program_is_refused_naming_the_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 3),)), workdir / "m.pt2")
    assert main(["summary", "m.pt2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load model file 'm.pt2': it is a torch.export program" in err


def test_whole_module_needs_trust_pickle(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "whole.pt"]) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle model file 'whole.pt'" in err and "torch.nn.modules.container.Sequential" in err
    assert main(["explain", "whole.pt", "--trust-pickle"]) == 0


def test_the_payloads_are_real(workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker-trusted"
    weights = _weights_with_payload(workdir, marker)
    assert main(["explain", NET, "--weights", weights, "--trust-pickle"]) == 0
    assert marker.exists()
    marker.unlink()
    torch.save(_Payload(marker), workdir / "evil_model.pt")
    assert main(["explain", "evil_model.pt", "--trust-pickle"]) == 2  # it ran, then was found not to be a model
    assert marker.exists() and "does not contain a torch.nn.Module" in capsys.readouterr().err


def test_data_files_never_unpickle_code(workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker-data"
    torch.save({"x": torch.randn(8, 1, 8, 8), "extra": _Payload(marker)}, workdir / "evil_data.pt")
    assert main(["shift", NET, "evil_data.pt"]) == 2
    assert "refusing to unpickle data file 'evil_data.pt'" in capsys.readouterr().err
    assert main(["shift", NET, "evil_data.pt", "--trust-pickle"]) == 2  # data is never unpickled, even trusted
    assert not marker.exists()


def test_safetensors_weights(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    state = torch.load(workdir / "state.pt", weights_only=True)
    save_file(state, str(workdir / "w.safetensors"))
    assert main(["summary", NET, "--weights", "w.safetensors", "--json"]) == 0
    capsys.readouterr()
    (workdir / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{nothing")
    assert main(["summary", NET, "--weights", "bad.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnkit summary: error: cannot load weights file 'bad.safetensors'") and err.count("\n") == 1
