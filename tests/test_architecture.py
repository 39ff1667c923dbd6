"""The layout is the architecture: each package imports only from the packages below it, optional extras lazily."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bnkit"

# Lower rank = lower level. A module may import bnkit packages of equal or lower rank only.
RANK = {
    "shared": 0,
    "core": 0,
    "distributed": 1,
    "layers": 2,
    "tools": 3,
    "inspection": 4,
    "keras": 4,
    "transfer": 4.5,  # Keras <-> PyTorch weight transfer: imports layers, tools and keras; below monitor
    "monitor": 5,
    "study": 6,
    "cli": 7,
}
OPTIONAL = {"rich", "tensorboard", "matplotlib", "sklearn", "onnx", "onnxruntime", "keras", "tqdm", "scipy"}
CORE_LEVELS = {"core", "distributed", "layers", "tools"}


def _package(path: Path) -> str | None:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else None


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(module name, imported at module top level?) for every import in the file."""
    # Only imports directly in the module body run at import time; those inside functions or under
    # `if TYPE_CHECKING:` are lazy.
    top = {id(node) for node in tree.body}  # type: ignore[attr-defined]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            found.append((name, id(node) in top))
    return found


FILES = sorted(p for p in SRC.rglob("*.py") if _package(p) in RANK)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down_and_extras_stay_optional(path: Path) -> None:
    package = _package(path)
    tree = ast.parse(path.read_text())
    for name, at_top in _imports(tree):
        root, _, rest = name.partition(".")
        if root == "bnkit" and rest:
            target = rest.split(".")[0]
            if target in RANK:
                assert RANK[target] <= RANK[package], f"{path.name}: {package} must not import bnkit.{target}"
        if root in OPTIONAL and package in CORE_LEVELS:
            assert not at_top, f"{path.name}: optional dependency {root} imported at module level in {package}"
    if package != "distributed":
        for name, _ in _imports(tree):
            assert not (package in {"core", "tools", "inspection"} and name.startswith("torch.distributed")), (
                f"{path.name}: only bnkit.distributed talks to torch.distributed"
            )


def test_core_has_no_modules() -> None:
    for path in (SRC / "core").glob("*.py"):
        for name, _ in _imports(ast.parse(path.read_text())):
            assert not name.startswith("torch.nn"), f"core/{path.name} must stay free of nn.Module ({name})"
        assert "from torch import nn" not in path.read_text(), f"core/{path.name} must stay free of nn.Module"


def test_shared_is_framework_free_and_keras_stays_off_the_torch_side() -> None:
    for path in sorted((SRC / "shared").glob("*.py")):
        for name, _ in _imports(ast.parse(path.read_text())):
            root, _, rest = name.partition(".")
            assert root not in {"torch", "keras", "tensorflow", "jax"}, f"shared/{path.name} imports {name}"
            assert not (root == "bnkit" and rest and rest.split(".")[0] != "shared"), f"shared/{path.name}: {name}"
    for path in sorted((SRC / "keras").glob("*.py")):
        for name, at_top in _imports(ast.parse(path.read_text())):
            root, _, rest = name.partition(".")
            assert root != "torch", f"keras/{path.name} imports torch"
            if root == "bnkit" and rest:
                assert rest.split(".")[0] in {"shared", "keras", "_lazy"}, f"keras/{path.name} imports {name}"
            assert not (root == "keras" and at_top and path.name == "__init__.py"), "bnkit.keras imports keras early"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_module_is_imported_from_another_package(path: Path) -> None:
    # A `_private` module is its package's business: what another package needs gets a public home.
    package = _package(path)
    for name, _ in _imports(ast.parse(path.read_text())):
        parts = name.split(".")
        if parts[0] != "bnkit" or len(parts) < 3:
            continue
        private = [part for part in parts[2:] if part.startswith("_")]
        assert not (private and parts[1] != package), f"{path.relative_to(SRC)} imports {name} from another package"
