"""The one-line wording of an exception, shared by every tool and the command line (framework-free)."""

from __future__ import annotations

__all__ = ["first_line"]


def first_line(error: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message for a one-line error (the type's name when it has none).

    With ``with_type=True`` the type's name comes first: ``"RuntimeError: shape mismatch"``.

    Example:
        >>> first_line(ValueError("bad value\\nmore detail")), first_line(KeyError())
        ('bad value', 'KeyError')
        >>> first_line(OSError("disk full"), with_type=True)
        'OSError: disk full'
    """
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    if with_type:
        return f"{type(error).__name__}: {line}" if line else type(error).__name__
    return line or type(error).__name__
