"""bnkit.cli.io: every model form, weights nesting, data formats, atomic writes; errors are one-line CliErrors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.cli.io import CliError, extract_state_dict, load_data, load_model, require_eager, write_atomic
from tests.cli.conftest import FACTORY_MODULE


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_model_forms_load_the_same_weights(workdir: Path) -> None:
    pickled = load_model("whole.pt", trust_pickle=True)
    assert pickled.kind == "pickle" and pickled.input_paths() == [Path("whole.pt")]
    factory = load_model(f"{FACTORY_MODULE}:net", "ckpt.pt")  # nested under state_dict with DDP prefix
    assert factory.kind == "factory" and _same_state(factory.model, pickled.model)
    assert _same_state(load_model(f"{FACTORY_MODULE}:net", "state.pt").model, pickled.model)
    assert _same_state(load_model(f"{FACTORY_MODULE}:net", "whole.pt", trust_pickle=True).model, pickled.model)
    scripted = load_model("scripted.pt")
    assert scripted.kind == "torchscript"
    with pytest.raises(CliError, match="needs an eager model"):
        require_eager(scripted, "shift")


@pytest.mark.parametrize(
    ("spec", "weights", "message"),
    [
        ("missing.pt", None, "model file 'missing.pt' not found"),
        ("nopkg_xyz:net", None, "cannot import module 'nopkg_xyz'"),
        (f"{FACTORY_MODULE}:nope", None, "has no attribute 'nope'"),
        (f"{FACTORY_MODULE}:NOT_CALLABLE", None, "is not callable"),
        (f"{FACTORY_MODULE}:broken", None, "failed: RuntimeError: no GPU here"),
        (f"{FACTORY_MODULE}:batches", None, "returned a list, not a torch.nn.Module"),
        ("state.pt", None, "holds a state dict"),
        ("x.npy", None, "cannot load model file 'x.npy': not a file written by torch.save"),
        (f"{FACTORY_MODULE}:net", "missing.pt", "weights file 'missing.pt' not found"),
        (f"{FACTORY_MODULE}:net", "xy.pt", "no state dict found"),
        ("scripted.pt", "state.pt", "TorchScript"),
    ],
)
def test_model_errors(workdir: Path, spec: str, weights: str | None, message: str) -> None:
    with pytest.raises(CliError, match=message) as info:
        load_model(spec, weights)
    assert "\n" not in str(info.value)


def test_weights_that_do_not_match(workdir: Path) -> None:
    torch.save({"model": nn.Linear(2, 2).state_dict()}, "other.pt")
    expected = r"does not match the model: missing 0\.bias, 0\.weight, 1\.bias and 6 more; unexpected bias, weight"
    with pytest.raises(CliError, match=expected):
        load_model(f"{FACTORY_MODULE}:net", "other.pt")
    state = torch.load("state.pt")
    state["4.weight"] = torch.zeros(3, 3)
    torch.save(state, "bad_shape.pt")
    with pytest.raises(CliError, match="size mismatch"):
        load_model(f"{FACTORY_MODULE}:net", "bad_shape.pt")


def test_extract_state_dict_nesting() -> None:
    inner = {"w": torch.ones(1)}
    assert extract_state_dict({"model_state_dict": inner, "optimizer": {"lr": 1}}) is inner
    assert extract_state_dict({"ema": {"module": inner}}) is inner
    assert extract_state_dict({"epoch": 1}) is None


@pytest.mark.parametrize("spec", ["x.npy", "xy.npz", "xy.pt", f"{FACTORY_MODULE}:batches"])
def test_data_forms(workdir: Path, spec: str) -> None:
    source = load_data(spec, batch_size=16)
    batches = list(source.batches)
    assert all(b.dtype == torch.float32 and b.shape[1:] == (1, 8, 8) for b in batches)
    if spec != f"{FACTORY_MODULE}:batches":
        assert [len(b) for b in batches] == [16, 16, 16, 2] and source.num_batches == 4
        expected = torch.from_numpy(np.load("x.npy")).float()
        assert torch.equal(torch.cat(batches), expected)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nothing.npy", "data file 'nothing.npy' not found"),
        ("whole.pt", "refusing to unpickle data file 'whole.pt'"),
        ("data.csv", "unknown data format"),
        (f"{FACTORY_MODULE}:NOT_CALLABLE", "is not callable"),
    ],
)
def test_data_errors(workdir: Path, spec: str, message: str) -> None:
    Path("data.csv").write_text("1,2\n")
    with pytest.raises(CliError, match=message):
        load_data(spec)


def test_data_shape_and_keys(workdir: Path) -> None:
    np.save("flat.npy", np.zeros(5))
    with pytest.raises(CliError, match=r"has shape \[5\]"):
        load_data("flat.npy")
    np.savez("two.npz", a=np.zeros((2, 3)), b=np.zeros((2, 3)))
    with pytest.raises(CliError, match="holds arrays a, b"):
        load_data("two.npz")
    with pytest.raises(CliError, match="--batch-size"):
        load_data("x.npy", batch_size=0)


def test_atomic_write_never_over_input_and_clean_on_failure(workdir: Path) -> None:
    before = Path("whole.pt").read_bytes()
    with pytest.raises(CliError, match=r"refusing to overwrite the input file 'whole\.pt'"):
        write_atomic("whole.pt", lambda f: f.write(b"x"), inputs=["whole.pt"])
    os.symlink("whole.pt", "link.pt")
    with pytest.raises(CliError, match="refusing to overwrite"):
        write_atomic("link.pt", lambda f: f.write(b"x"), inputs=["whole.pt"])
    assert Path("whole.pt").read_bytes() == before

    Path("out.bin").write_bytes(b"old")

    def failing(handle):
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(CliError, match=r"cannot write '.*out\.bin': disk full; nothing was written"):
        write_atomic("out.bin", failing)
    assert Path("out.bin").read_bytes() == b"old"
    assert not [p for p in os.listdir(".") if p.endswith(".tmp")]
    write_atomic("out.bin", lambda f: f.write(b"new"))
    assert Path("out.bin").read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert Path("out.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it
    with pytest.raises(CliError, match="does not exist"):
        write_atomic("no/such/dir/x.bin", lambda f: f.write(b"x"))


def test_full_disk_is_one_line_naming_the_file(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Path("model.pt").write_bytes(b"old")
    made: list[str] = []

    def on_dev_full(dir: str, prefix: str, suffix: str) -> tuple[int, str]:
        name = os.path.join(dir, f"{prefix}x{suffix}")
        Path(name).touch()
        made.append(name)
        return os.open("/dev/full", os.O_WRONLY), name  # every write fails with ENOSPC, as on a full disk

    monkeypatch.setattr("bnkit.cli.files.tempfile.mkstemp", on_dev_full)
    big = {"w": torch.zeros(1 << 20)}
    with pytest.raises(CliError) as info:
        write_atomic("model.pt", lambda f: torch.save(big, f))
    message = str(info.value)
    assert message.startswith("cannot write '") and "model.pt': No space left on device; nothing was written" in message
    assert "\n" not in str(info.value) and "inline_container" not in str(info.value)
    assert Path("model.pt").read_bytes() == b"old" and not os.path.exists(made[0])


def test_unwritable_directory_is_one_line(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**_: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("bnkit.cli.files.tempfile.mkstemp", lambda *a, **k: refuse())
    with pytest.raises(CliError, match=r"cannot write '.*out\.pt': Permission denied; nothing was written"):
        write_atomic("out.pt", lambda f: f.write(b"x"))


def test_replacing_a_file_keeps_its_permissions(workdir: Path) -> None:
    Path("secret.pt").write_bytes(b"old")
    os.chmod("secret.pt", 0o600)
    write_atomic("secret.pt", lambda f: f.write(b"new"))
    assert Path("secret.pt").read_bytes() == b"new" and Path("secret.pt").stat().st_mode & 0o777 == 0o600


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    (tmp_path / "out.bin").write_bytes(b"old")
    script = textwrap.dedent(
        f"""
        import os, signal
        from bnkit.cli.io import write_atomic

        def slow(handle):
            handle.write(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            handle.write(b"never")

        write_atomic({str(tmp_path / "out.bin")!r}, slow)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["out.bin"] and (tmp_path / "out.bin").read_bytes() == b"old"


def test_object_arrays_name_the_file(workdir: Path) -> None:
    np.savez("objects.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(CliError, match=r"cannot load data file 'objects\.npz': array 'x' holds Python objects"):
        load_data("objects.npz")
    np.save("objects.npy", np.array([1, None], dtype=object), allow_pickle=True)
    with pytest.raises(CliError, match=r"cannot load data file 'objects\.npy'"):
        load_data("objects.npy")
