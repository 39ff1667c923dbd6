"""Keras models and data for the command line: ``--backend``, loading ``.keras`` files safely, reading data as
NumPy arrays and writing ``.keras`` files atomically. Never imports torch (unless the Keras backend is torch).

* ``--backend tensorflow|jax|torch`` sets ``KERAS_BACKEND`` before Keras is imported (Keras reads it once, at
  import). Without it Keras picks its backend as usual (``KERAS_BACKEND``, then ``~/.keras/keras.json``).
* A ``MODEL`` ending in ``.keras`` is loaded with ``keras.saving.load_model(path, safe_mode=True)``: Keras
  refuses a ``Lambda`` layer's Python bytecode and only builds classes from Keras or registered ones (bnkit's
  ``BatchNormalization`` is registered first). ``--trust-pickle`` passes ``safe_mode=False`` (trusted files only).
* Data: ``.npy``/``.npz`` read without pickle (float64 and integer arrays become float32), ``.pt``/``.pth`` read
  by the PyTorch loader (``weights_only=True``; needs torch), or ``package.module:factory`` returning arrays, a
  list of batches or a ``tf.data.Dataset``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bnkit.cli.files import CliError, check_output_path, existing_file, import_attr, read_array, write_atomic
from bnkit.shared.errors import first_line

__all__ = [
    "BACKENDS",
    "KerasData",
    "LoadedKeras",
    "check_keras_output",
    "is_keras_file",
    "load_keras_data",
    "load_keras_model",
    "save_keras_model",
    "select_backend",
]

#: The ``--backend`` choices and the package (and pip name) each needs.
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorflow": ("tensorflow", "tensorflow"),
    "jax": ("jax", "jax"),
    "torch": ("torch", "torch"),
}


def is_keras_file(spec: str) -> bool:
    """True for a ``MODEL`` argument naming a Keras 3 file (``.keras``).

    Example:
        >>> is_keras_file("model.keras"), is_keras_file("model.pt"), is_keras_file("pkg.nets:resnet")
        (True, False, False)
    """
    return Path(spec).suffix.lower() == ".keras"


def select_backend(name: str | None) -> str | None:
    """Make Keras use backend ``name`` (``--backend``): sets ``KERAS_BACKEND`` before Keras is imported.

    None leaves the choice to Keras. Returns ``name``.

    Raises:
        CliError: Keras was already imported with another backend, or the backend's package is not installed
            (naming what to install).

    Example:
        >>> select_backend(None) is None
        True
    """
    if name is None:
        return None
    if name not in BACKENDS:
        raise CliError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")
    keras = sys.modules.get("keras")
    if keras is not None:
        current = str(keras.backend.backend())
        if current != name:
            raise CliError(
                f"--backend {name}: Keras was already imported with the {current} backend in this process; the "
                f"backend is chosen when Keras is first imported (run bnkit in a new process, or set "
                f"KERAS_BACKEND={name})"
            )
        return name
    package, pip_name = BACKENDS[name]
    if importlib.util.find_spec(package) is None:
        raise CliError(f"--backend {name}: {package} is not installed: pip install {pip_name}")
    os.environ["KERAS_BACKEND"] = name
    return name


def _import_keras() -> Any:
    from bnkit.keras.compat import import_keras

    try:
        keras = import_keras()
        import bnkit.keras.layer  # noqa: F401  (registers bnkit>BatchNormalization for loading)
    except ImportError as exc:
        backend = os.environ.get("KERAS_BACKEND", "from ~/.keras/keras.json, else tensorflow")
        raise CliError(
            f"cannot import Keras (backend {backend}): {first_line(exc)}; install it, or choose an installed "
            f"backend with --backend {'|'.join(BACKENDS)}"
        ) from exc
    return keras


@dataclass
class LoadedKeras:
    """A Keras model and where it came from.

    Attributes:
        model: The ``keras.Model``.
        path: The ``.keras`` file.
        backend: The Keras backend it runs on.

    Example:
        >>> LoadedKeras(None, Path("m.keras"), "jax").input_paths()
        [PosixPath('m.keras')]
    """

    model: Any
    path: Path
    backend: str

    def input_paths(self) -> list[Path]:
        """The files the model was read from (an output must never overwrite them).

        Example:
            >>> LoadedKeras(None, Path("m.keras"), "jax").input_paths()[0].name
            'm.keras'
        """
        return [self.path]


def load_keras_model(spec: str, *, trust_pickle: bool = False, backend: str | None = None) -> LoadedKeras:
    """Load a ``.keras`` file on ``backend`` (see :func:`select_backend`), in Keras's safe mode unless
    ``trust_pickle``.

    Raises:
        CliError: a missing or damaged file, a file that needs unsafe deserialization (a Python ``Lambda``) while
            ``trust_pickle`` is False, a class Keras cannot find, a backend problem.

    Example:
        >>> load_keras_model("missing.keras")
        Traceback (most recent call last):
        ...
        bnkit.cli.files.CliError: model file 'missing.keras' not found
    """
    path = existing_file(spec, "model")
    if not zipfile.is_zipfile(path):
        raise CliError(f"{spec!r} is not a Keras archive (a .keras file is a zip written by model.save)")
    select_backend(backend)
    keras = _import_keras()
    try:
        model = keras.saving.load_model(str(path), safe_mode=not trust_pickle)
    except Exception as exc:  # Keras raises ValueError/TypeError/KeyError/OSError for bad archives
        text = first_line(exc)
        if not trust_pickle and "safe_mode" in text:
            raise CliError(
                f"refusing to load model file {spec!r}: it holds Python code (such as a Lambda layer's bytecode) "
                "that Keras loads only outside safe mode and that runs when the model is called; load it only if "
                "you trust it: pass --trust-pickle"
            ) from exc
        raise CliError(f"cannot load Keras model file {spec!r}: {text}") from exc
    if not isinstance(model, keras.Model):
        raise CliError(f"{spec!r} does not contain a keras.Model (found a {type(model).__name__})")
    return LoadedKeras(model, path, str(keras.backend.backend()))


@dataclass
class KerasData:
    """Data for a Keras model: what ``bnkit.keras.recalibrate`` takes, and what it is.

    Attributes:
        data: A NumPy array (split into batches of ``batch_size`` by the tools) or an iterable of batches.
        description: Where it came from and its shape, for messages.
        path: The data file (None for a factory).

    Example:
        >>> import numpy as np
        >>> KerasData(np.zeros((2, 3)), "x", None).first_batch(1).shape
        (1, 3)
    """

    data: Any
    description: str
    path: Path | None

    def first_batch(self, batch_size: int | None) -> Any:
        """The first batch (an array's first ``batch_size`` samples, all when None); ``x`` of an ``(x, y)`` batch.

        Raises:
            CliError: no batch.

        Example:
            >>> KerasData([([1], [0])], "x", None).first_batch(None)
            [1]
        """
        if _is_array(self.data):
            return self.data if batch_size is None else self.data[:batch_size]
        for batch in self.data:
            return batch[0] if isinstance(batch, tuple) else batch
        raise CliError(f"the data {self.description} yielded no batches")


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, (list, tuple, dict))


def _float_array(array: Any, where: str) -> Any:
    import numpy as np

    if array.dtype == object:
        raise CliError(f"data {where}: object arrays are not supported, save numeric arrays")
    if array.ndim < 2:
        shape = list(array.shape)
        raise CliError(f"data {where} has shape {shape}: expected [samples, ...] with at least 2 dimensions")
    if array.shape[0] == 0:
        raise CliError(f"data {where} is empty")
    if array.dtype == np.float64 or not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return array


def load_keras_data(spec: str, *, batch_size: int = 64) -> KerasData:
    """Load ``DATA`` for a Keras model: ``.npy``/``.npz`` (no pickle), ``.pt``/``.pth`` (torch's restricted
    loader; needs torch) or ``package.module:factory``.

    Raises:
        CliError: missing file, unknown format, no usable array.

    Example:
        >>> import numpy as np, tempfile
        >>> path = Path(tempfile.mkdtemp()) / "x.npy"
        >>> np.save(path, np.zeros((10, 3)))
        >>> data = load_keras_data(str(path))
        >>> data.data.dtype, data.description
        (dtype('float32'), 'x.npy: 10 samples of shape [3]')
    """
    from bnkit.cli.files import is_factory_spec

    if is_factory_spec(spec):
        obj = import_attr(spec, "data")
        if callable(obj):
            try:
                obj = obj()
            except Exception as exc:  # the user's factory may raise anything; report it on one line
                raise CliError(f"data factory {spec!r} failed: {first_line(exc, with_type=True)}") from exc
        if _is_array(obj) and type(obj).__module__.startswith("numpy"):
            return KerasData(_float_array(obj, spec), spec, None)
        if not isinstance(obj, Iterable) and not _is_array(obj):
            raise CliError(f"data factory {spec!r} returned a {type(obj).__name__}, not arrays or batches")
        return KerasData(obj, spec, None)
    path = existing_file(spec, "data")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        array, where = read_array(path, spec)
        array = _float_array(array, where)
        return KerasData(array, f"{path.name}: {array.shape[0]} samples of shape {list(array.shape[1:])}", path)
    if suffix in (".pt", ".pth"):
        if importlib.util.find_spec("torch") is None:
            raise CliError(f"data file {spec!r} is a PyTorch file and torch is not installed: save it with numpy.save")
        from bnkit.cli.io import load_data

        source = load_data(spec, batch_size=batch_size)
        batches = [b.numpy() if hasattr(b, "numpy") else b for b in source.batches]
        return KerasData(batches, source.description, path)
    raise CliError(
        f"unknown data format {suffix or '(no suffix)'!r} for {spec!r}: use .npy, .npz, .pt, .pth or "
        "package.module:factory"
    )


def check_keras_output(output: str, inputs: Iterable[Path]) -> Path:
    """Refuse a bad ``-o`` before any work: not ending in ``.keras``, an input file, a missing directory.

    Raises:
        CliError: as above.

    Example:
        >>> check_keras_output("out.keras", [Path("model.keras")]).name
        'out.keras'
    """
    if Path(output).suffix.lower() != ".keras":
        raise CliError(f"output {output!r}: a Keras model is written as a .keras file; give -o NAME.keras")
    return check_output_path(output, inputs)


def save_keras_model(model: Any, output: str, *, inputs: Iterable[Path]) -> Path:
    """Write ``model`` with ``model.save`` to ``output`` (``.keras``) atomically, never over one of ``inputs``.

    Keras saves to a temporary directory first; the archive is then copied through
    :func:`bnkit.cli.files.write_atomic`, so a reader never sees half a file and an error leaves ``output`` as it
    was.

    Example:
        >>> import keras, tempfile
        >>> out = Path(tempfile.mkdtemp()) / "m.keras"
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> save_keras_model(m, str(out), inputs=[]).name
        'm.keras'
    """
    inputs = list(inputs)
    check_keras_output(output, inputs)
    with tempfile.TemporaryDirectory(prefix="bnkit-keras-") as tmp:
        staged = Path(tmp) / "model.keras"
        model.save(str(staged))

        def copy(handle: IO[bytes]) -> None:
            with open(staged, "rb") as source:
                shutil.copyfileobj(source, handle)

        return write_atomic(output, copy, inputs=inputs)
