"""The command line's file handling that needs neither torch nor Keras: one-line errors, atomic writes, NumPy
data files and importing ``package.module:attr`` factories.

Both model families use these: the PyTorch loaders in :mod:`bnkit.cli.io` and the Keras ones in
:mod:`bnkit.cli.keras_io` (importing this module never imports torch, so the Keras commands run without it).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from bnkit.shared.errors import first_line

__all__ = [
    "DATA_KEYS",
    "CliError",
    "check_output_path",
    "existing_file",
    "import_attr",
    "is_factory_spec",
    "read_array",
    "write_atomic",
]

_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

#: The names under which a data file's inputs are looked up (dict entries, ``.npz`` arrays), in this order.
DATA_KEYS = ("x", "inputs", "input", "data", "images")


class CliError(Exception):
    """A problem with what the user gave (file, model, data, option): printed as one line, exit status 2.

    Example:
        >>> str(CliError("model file 'm.pt' not found"))
        "model file 'm.pt' not found"
    """


def is_factory_spec(spec: str) -> bool:
    """True for ``package.module:factory`` (and it is not an existing file).

    Example:
        >>> is_factory_spec("torchvision.models:resnet18"), is_factory_spec("model.pt")
        (True, False)
    """
    return bool(_FACTORY.match(spec)) and not os.path.exists(spec)


def import_attr(spec: str, what: str) -> Any:
    """The attribute ``attr`` (dotted) of module ``package.module`` for ``package.module:attr``; the current
    directory is importable while the module is imported (console scripts do not put it on ``sys.path``).

    Raises:
        CliError: the module cannot be imported or has no such attribute (naming ``what``: model, data).

    Example:
        >>> import_attr("os.path:join", "data").__name__
        'join'
    """
    module_name, _, attr_path = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import module {module_name!r} for {what} {spec!r}: {first_line(exc)}") from exc
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise CliError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, part)
    return target


def existing_file(path_text: str, what: str) -> Path:
    """``path_text`` as a Path when it is an existing file; else a one-line error naming ``what``.

    Raises:
        CliError: missing, or a directory.

    Example:
        >>> existing_file("missing.pt", "model")
        Traceback (most recent call last):
        ...
        bnkit.cli.files.CliError: model file 'missing.pt' not found
    """
    path = Path(path_text)
    if not path.exists():
        hint = " (for a factory write package.module:function)" if ":" in path_text else ""
        raise CliError(f"{what} file {path_text!r} not found{hint}")
    if path.is_dir():
        raise CliError(f"{what} {path_text!r} is a directory, not a file")
    return path


def read_array(path: Path, spec: str) -> tuple[Any, str]:
    """The numeric array of a ``.npy`` file, or of an ``.npz`` file (its ``x``/``inputs``/``input``/``data``/
    ``images`` array, or its only array), read without pickle; returns ``(array, where)``, ``where`` naming the
    file (and key) for messages.

    Raises:
        CliError: a corrupt file, an ``.npz`` with several arrays none of them named as above, object arrays
            (they would need pickle).

    Example:
        >>> import numpy as np, tempfile
        >>> p = Path(tempfile.mkdtemp()) / "d.npz"
        >>> np.savez(p, x=np.zeros((4, 2)), y=np.zeros(4))
        >>> array, where = read_array(p, "d.npz"); array.shape, where
        ((4, 2), "d.npz['x']")
    """
    import numpy as np

    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:  # corrupt or pickled arrays
        raise CliError(f"cannot load data file {spec!r}: {first_line(exc)}") from exc
    if not hasattr(arrays, "files"):
        return arrays, spec
    with arrays:
        names = list(arrays.files)
        key = next((k for k in DATA_KEYS if k in names), names[0] if len(names) == 1 else None)
        if key is None:
            raise CliError(
                f"data file {spec!r} holds arrays {', '.join(names)}: name the inputs one of {', '.join(DATA_KEYS)}"
            )
        try:
            array = arrays[key]
        except ValueError as exc:  # object arrays need pickle, which data loading never uses
            raise CliError(
                f"cannot load data file {spec!r}: array {key!r} holds Python objects (it would need pickle); "
                "save numeric arrays"
            ) from exc
    return array, f"{spec}[{key!r}]"


def check_output_path(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Validate an output path before any work: not an input file, an existing directory, not a directory.

    Raises:
        CliError: ``path`` is one of ``inputs`` (or the same file through a link), or its directory is missing.

    Example:
        >>> check_output_path("out.pt", ["model.pt"]).name
        'out.pt'
    """
    target = Path(path)
    for item in inputs:
        source = Path(item)
        if target.resolve() == source.resolve() or (
            target.exists() and source.exists() and os.path.samefile(target, source)
        ):
            raise CliError(f"refusing to overwrite the input file {str(source)!r}: choose another -o/--output")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise CliError(f"output directory {str(directory)!r} does not exist")
    if target.is_dir():
        raise CliError(f"output {str(target)!r} is a directory: give a file name")
    return target


def write_atomic(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, inputs: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """Write a file through a temporary file in the same directory and ``os.replace``; never over an input.

    A reader never sees a half-written file. On any error, Ctrl-C or SIGTERM the temporary file is removed and
    an existing file at ``path`` is left as it was. Replacing a file keeps its permission bits; a new file gets
    the permissions ``open()`` would give it. A full disk or an unwritable directory is one line naming the file.

    Raises:
        CliError: ``path`` is one of ``inputs`` (or the same file through a link), its directory is missing, or
            the operating system refused the write (full disk, permissions, read-only file system).

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> write_atomic(out, lambda f: f.write(b"ok")).read_bytes()
        b'ok'
    """
    target = check_output_path(path, inputs)
    mode = _mode_for(target)
    handle: _RecordingWriter | None = None
    tmp_name: str | None = None
    try:
        with _terminate_as_interrupt():
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as raw:
                handle = _RecordingWriter(raw)
                write(handle)  # type: ignore[arg-type]
                handle.flush()
                os.fsync(raw.fileno())
            os.chmod(tmp_name, mode)
            os.replace(tmp_name, target)
    except BaseException as exc:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        os_error = exc if isinstance(exc, OSError) else (handle.error if handle is not None else None)
        if os_error is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit, CliError)):
            reason = os_error.strerror or first_line(os_error)
            raise CliError(f"cannot write {str(target)!r}: {reason}; nothing was written") from exc
        raise
    return target


def _mode_for(target: Path) -> int:
    if target.exists():
        return stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)  # there is no way to read the umask without setting it
    os.umask(umask)
    return 0o666 & ~umask


class _RecordingWriter:
    """A binary file that remembers the operating system's error: torch.save reports a full disk only as
    ``[enforce fail at inline_container.cc] unexpected pos``, which names neither the file nor the cause."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._raw.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._raw.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) while writing, so the temporary file is cleaned up as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield  # only the main thread may set handlers, and a handler the program installed is its own
        return

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
