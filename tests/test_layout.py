"""The handlers tree shows the architecture: packages by concern, small units, and imports that point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HANDLERS = Path(__file__).resolve().parent.parent / "handlers"
PACKAGES = ("config", "weights", "inputs", "execution", "answers")
# Who may import whom: the entry point uses the ensemble, the ensemble uses the concerns, every concern
# uses config and errors. Among the concerns the arrows run answers -> inputs, execution -> inputs.
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "weights": {"config", "errors"},
    "inputs": {"config", "errors"},
    "execution": {"config", "errors", "inputs"},
    "answers": {"config", "errors", "inputs"},
    "ensemble": {"config", "errors", "weights", "inputs", "execution", "answers"},
    "ensemble_metrics": {"ensemble", "config", "errors", "execution"},
    "worker_exit": set(),
    "ensemble_handler": {"ensemble", "ensemble_metrics", "worker_exit", "config", "errors", "inputs", "execution"},
}
MAX_CLASS_LINES = 250
MAX_MODULE_LINES = 400


def unit_of(path: Path) -> str:
    """The layer a file belongs to: its package, or the top-level module's own name."""
    parts = path.relative_to(HANDLERS).with_suffix("").parts
    return parts[0] if parts[0] != "__init__" else "handlers"


def imported_units(path: Path) -> set[str]:
    """The handlers layers a module imports, wherever the import statement is."""
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        units |= {name.split(".")[1] for name in names if name.startswith("handlers.")}
    return units


def sources() -> list[Path]:
    return sorted(HANDLERS.rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_says_what_it_owns_in_one_line(package: str) -> None:
    doc = ast.get_docstring(ast.parse((HANDLERS / package / "__init__.py").read_text()))
    assert doc is not None and doc.count("\n") == 0 and len(doc) > 20


def test_the_tree_is_the_documented_one() -> None:
    top = sorted(p.name for p in HANDLERS.iterdir() if p.name != "__pycache__")
    assert top == sorted(
        [
            "__init__.py",
            "answers",
            "config",
            "ensemble.py",
            "ensemble_handler.py",
            "ensemble_metrics.py",
            "errors.py",
            "execution",
            "inputs",
            "weights",
            "worker_exit.py",
        ]
    )
    assert set(ALLOWED) == {unit_of(p) for p in sources()} - {"handlers"}


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(HANDLERS).as_posix())
def test_imports_point_one_way(path: Path) -> None:
    unit = unit_of(path)
    if unit == "handlers":
        assert imported_units(path) == set()
        return
    assert imported_units(path) - {unit} <= ALLOWED[unit]


def test_the_allowed_arrows_have_no_cycle() -> None:
    done: set[str] = set()

    def visit(unit: str, trail: tuple[str, ...]) -> None:
        assert unit not in trail, f"import cycle: {' -> '.join((*trail, unit))}"
        if unit not in done:
            for used in ALLOWED[unit]:
                visit(used, (*trail, unit))
            done.add(unit)

    for unit in ALLOWED:
        visit(unit, ())


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(HANDLERS).as_posix())
def test_units_stay_small(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno is not None  # always set by ast.parse
            assert node.end_lineno - node.lineno + 1 <= MAX_CLASS_LINES, f"class {node.name}"
