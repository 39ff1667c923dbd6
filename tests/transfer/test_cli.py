"""``bnkit convert model.keras --to torch --factory ...`` and the reverse, through the real parser."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import torch

from bnkit.cli.commands.convert import render
from bnkit.cli.io import CliError
from bnkit.cli.main import build_parser
from tests.transfer.models import Twin, inputs, keras_model


def _run(*argv: str):
    args = build_parser(argv[0]).parse_args(list(argv))
    return args.func(args)


def _logits(model, x: np.ndarray) -> np.ndarray:
    if isinstance(model, keras.Model):
        return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
    return model.eval()(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).detach().numpy()


def test_keras_file_to_torch_and_back(tmp_path: Path) -> None:
    k = keras_model()
    k.save(tmp_path / "model.keras")
    out = tmp_path / "out.pt"
    data = _run(
        "convert",
        str(tmp_path / "model.keras"),
        "--to",
        "torch",
        "--factory",
        "tests.transfer.models:Twin",
        "-o",
        str(out),
    )
    assert data["port"] == "keras -> torch" and data["pairs"] == 10
    text = "\n".join(str(block) for block in render(data))
    assert f"wrote {out} (module): keras -> torch, 10 layer pairs verified" in text
    ported = torch.load(out, weights_only=False)
    x = inputs(16)
    expected = _logits(k, x)
    assert np.linalg.norm(_logits(ported, x) - expected) / np.linalg.norm(expected) <= 1e-6
    # the reverse: a PyTorch factory with its state dict, into the Keras twin
    torch.save(ported.state_dict(), tmp_path / "w.pt")
    back = tmp_path / "back.keras"
    data = _run(
        "convert",
        "tests.transfer.models:Twin",
        "--weights",
        str(tmp_path / "w.pt"),
        "--to",
        "keras",
        "--factory",
        "tests.transfer.models:keras_model",
        "-o",
        str(back),
    )
    assert data["port"] == "torch -> keras" and data["format"] == "keras"
    reloaded = keras.saving.load_model(back)
    twin = Twin()  # what the factory and the state dict give: eps is not in a state dict, so torch's 1e-5
    twin.load_state_dict(torch.load(tmp_path / "w.pt"))
    expected = _logits(twin, x)
    assert np.linalg.norm(_logits(reloaded, x) - expected) / np.linalg.norm(expected) <= 1e-6
    assert reloaded.get_layer("bn1").epsilon == 1e-5 and "bn1: epsilon 0.001 -> 1e-05" in data["changes"]


def test_a_port_that_does_not_verify_writes_nothing(tmp_path: Path) -> None:
    keras_model().save(tmp_path / "model.keras")
    out = tmp_path / "out.pt"
    with pytest.raises(CliError, match=r"nothing written: conv1 -> conv1 .*padding: torch conv1 pads \(1, 1\)"):
        _run(
            "convert",
            str(tmp_path / "model.keras"),
            "--to",
            "torch",
            "--factory",
            "tests.transfer.models:padding_twin",
            "-o",
            str(out),
        )
    assert not out.exists()


def test_porting_arguments_are_checked(tmp_path: Path) -> None:
    keras_model().save(tmp_path / "model.keras")
    with pytest.raises(CliError, match="needs the twin model"):
        _run("convert", str(tmp_path / "model.keras"), "--to", "torch", "-o", str(tmp_path / "o.pt"))
    with pytest.raises(CliError, match="is ported --to torch"):
        _run(
            "convert",
            str(tmp_path / "model.keras"),
            "--to",
            "bnkit",
            "--factory",
            "tests.transfer.models:Twin",
            "-o",
            str(tmp_path / "o.pt"),
        )
    with pytest.raises(CliError, match="needs the twin model"):
        _run("convert", "tests.transfer.models:Twin", "--to", "keras", "-o", str(tmp_path / "o.keras"))
    with pytest.raises(CliError, match=r"\.keras"):
        _run(
            "convert",
            "tests.transfer.models:Twin",
            "--to",
            "keras",
            "--factory",
            "tests.transfer.models:keras_model",
            "-o",
            str(tmp_path / "o.pt"),
        )
