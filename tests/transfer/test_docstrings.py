"""The examples in bnkit.transfer's docstrings run as written (tests/test_docstrings.py covers the other packages)."""

from __future__ import annotations

import doctest
import importlib
import inspect
from pathlib import Path

import pytest

import bnkit.transfer

MODULES = sorted(p.stem for p in Path(bnkit.transfer.__file__).parent.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_examples_run_and_public_names_have_one(name: str) -> None:
    module = importlib.import_module(f"bnkit.transfer.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    for public in module.__all__:
        obj = getattr(module, public)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert "Example" in (obj.__doc__ or ""), f"{name}.{public} has no example"
