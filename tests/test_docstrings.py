"""Every public name has a docstring with an example, and every example in those docstrings runs as written.

Covers the names exported by ``bnkit`` (``bnkit.__all__``, resolved through its lazy ``__getattr__``) and the
public functions and classes of every module under ``bnkit.core``, ``bnkit.layers``, ``bnkit.tools`` and
``bnkit.inspection`` (listed in the module's ``__all__``, or defined there under a name without a leading
underscore). The doctests of those modules run with ``ELLIPSIS | NORMALIZE_WHITESPACE``.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
from pathlib import Path
from types import ModuleType

import pytest
import torch

import bnkit

SRC = Path(bnkit.__file__).resolve().parent
PACKAGES = ("shared", "core", "layers", "tools", "inspection", "keras", "transfer")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Docstring examples known to fail, in files this test's owner does not own; each is reported to its owner.
# Keys are doctest names ("module.qualname"); an entry is removed as soon as the example is fixed (the test
# below fails on a stale entry, so the list cannot silently outlive the bug).
KNOWN_FAILING_EXAMPLES: dict[str, str] = {}


def _module_names() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((SRC / package).rglob("*.py")):  # subpackages too (bnkit.tools.fuse)
            parts = path.relative_to(SRC).with_suffix("").parts
            names.append(".".join(("bnkit", *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return names


MODULES = _module_names()


def _public_objects(module: ModuleType) -> dict[str, object]:
    """Functions and classes in ``__all__`` or defined in ``module`` under a public name."""
    names = set(getattr(module, "__all__", ()))
    names |= {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == module.__name__
    }
    found = {name: getattr(module, name) for name in sorted(names)}
    return {name: value for name, value in found.items() if inspect.isfunction(value) or inspect.isclass(value)}


def _has_example(obj: object) -> bool:
    return "Example" in (obj.__doc__ or "")


def test_the_walk_sees_every_package() -> None:
    # A broken walk would make every test below pass vacuously.
    assert {name.split(".")[1] for name in MODULES} == set(PACKAGES)
    assert "bnkit.tools.fuse" in MODULES and "bnkit.inspection.doctor" in MODULES
    assert len(bnkit.__all__) >= 20


@pytest.mark.parametrize("name", bnkit.__all__)
def test_every_exported_name_has_an_example(name: str) -> None:
    obj = getattr(bnkit, name)  # resolved through bnkit.__getattr__
    assert _has_example(obj), f"bnkit.{name} ({obj!r}) has no 'Example' in its docstring"


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_function_and_class_has_an_example(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing = [name for name, obj in _public_objects(module).items() if not _has_example(obj)]
    assert not missing, f"{module_name}: no 'Example' in the docstring of {', '.join(missing)}"


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name: str) -> None:
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    failed: list[str] = []
    expected_failures: list[str] = []
    with torch.random.fork_rng(devices=[]):  # examples seed and draw from the global generator: isolate them
        torch.manual_seed(0)
        for test in doctest.DocTestFinder(exclude_empty=True).find(module, module_name):
            result = runner.run(test, out=lambda text: None, clear_globs=True)
            if test.name in KNOWN_FAILING_EXAMPLES:
                expected_failures.append(test.name)
                assert result.failed, f"{test.name} passes now: remove it from KNOWN_FAILING_EXAMPLES"
            elif result.failed:
                failed.append(test.name)
    assert not failed, f"failing docstring examples (run python -m doctest -v on the module): {', '.join(failed)}"
    listed = [name for name in KNOWN_FAILING_EXAMPLES if _module_of(name) == module_name]
    assert sorted(listed) == sorted(expected_failures), f"KNOWN_FAILING_EXAMPLES names missing examples: {listed}"


def _module_of(test_name: str) -> str | None:
    """The module a doctest name belongs to (the longest module name that prefixes it)."""
    owners = [name for name in MODULES if test_name.startswith(name + ".")]
    return max(owners, key=len) if owners else None


def test_examples_are_found() -> None:
    # The doctest finder must see the examples this test exists for.
    tests = doctest.DocTestFinder().find(importlib.import_module("bnkit.tools.fuse"), "bnkit.tools.fuse")
    assert sum(len(t.examples) for t in tests) >= 10
