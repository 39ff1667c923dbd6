"""Layer selection by name glob, type, predicate or list of names, for torch modules and Keras layers alike."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any, Union

__all__ = ["Selector", "check_selector", "matches"]

#: None (all), a glob on the layer's path (``"layer1.*"``, ``"base/bn*"``), a type or tuple of types, a predicate
#: ``(name, layer) -> bool``, or an iterable of names/globs.
Selector = Union[None, str, type, tuple, Callable[[str, Any], bool], Iterable[str]]  # noqa: UP007


def matches(selector: Selector, name: str, layer: Any) -> bool:
    """True when ``selector`` chooses the layer called ``name``.

    Example:
        >>> matches("base/*", "base/bn2", None), matches(["a", "b*"], "bn", None), matches(None, "x", None)
        (True, True, True)
    """
    if selector is None:
        return True
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(name, selector)
    if isinstance(selector, type) or (isinstance(selector, tuple) and all(isinstance(s, type) for s in selector)):
        return isinstance(layer, selector)
    if callable(selector):
        return bool(selector(name, layer))
    return any(matches(s, name, layer) for s in selector)


def check_selector(layers: Any, tool: str) -> None:
    """Raise a one-line TypeError when ``layers`` is not a selector (a bool, a number, bytes).

    Example:
        >>> check_selector("bn*", "freeze")
    """
    if isinstance(layers, (bytes, int, float)) or layers is True or layers is False:
        raise TypeError(
            f"{tool}: layers must be None, a name glob, a layer type, a predicate or a list of names; got {layers!r}"
        )
