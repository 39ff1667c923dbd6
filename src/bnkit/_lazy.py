"""Lazy re-exports for a package ``__init__`` (PEP 562): a public name is imported from its module on first use.

Kept at the top of the package, outside the ranked sub-packages, so that ``bnkit`` and ``bnkit.study`` share one
implementation; it imports nothing from bnkit.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: top-level module of a framework -> the bnkit extra that installs it (for the one-line "install" error).
FRAMEWORK_EXTRAS: dict[str, str] = {
    "torch": "torch",
    "torchvision": "vision",
    "timm": "vision",
    "keras": "keras",
    "tensorflow": "tensorflow",
    "jax": "jax",
}


def missing_framework(error: ModuleNotFoundError, feature: str) -> ModuleNotFoundError | None:
    """A one-line error naming the extra to install when ``error`` is a missing framework, else None.

    Example:
        >>> str(missing_framework(ModuleNotFoundError("No module named 'torch'", name="torch"), "bnkit.freeze"))
        "bnkit.freeze needs torch, which is not installed: pip install 'bnkit[torch]'"
    """
    missing = (error.name or "").split(".")[0]
    extra = FRAMEWORK_EXTRAS.get(missing)
    if extra is None:
        return None
    return ModuleNotFoundError(
        f"{feature} needs {missing}, which is not installed: pip install 'bnkit[{extra}]'", name=missing
    )


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` for a package that re-exports names lazily.

    ``__getattr__`` imports the module that ``exports`` names for an attribute, caches the value in ``namespace``
    (so the next lookup skips ``__getattr__``) and returns it; any other name raises ``AttributeError``.
    ``__dir__`` lists ``namespace`` together with every exported name, imported or not.

    Args:
        package: the package's name, as error messages show it.
        exports: public name -> the module that defines it.
        namespace: the package's ``globals()``.

    Returns:
        ``(__getattr__, __dir__)``, to assign at the package's top level.

    Example:
        >>> ns = {}
        >>> getattr_, dir_ = lazy_exports("pkg", {"sqrt": "math"}, ns)
        >>> getattr_("sqrt")(9.0), "sqrt" in ns, dir_()
        (3.0, True, ['sqrt'])
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as error:
            friendly = missing_framework(error, f"{package}.{name}")
            if friendly is None:
                raise
            raise friendly from None
        value = getattr(imported, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
